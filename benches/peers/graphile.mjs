// One graphile-worker throughput measurement on a fresh database of its own, for run.sh.
//
//   node graphile.mjs            (settings from the environment, see below)
//
// DATABASE_URL   a URL of the PostgreSQL server (any database on it; needs CREATEDB)
// JOBS           no-op jobs to enqueue and process            [20000]
// CONCURRENCY    the worker's concurrentJobs                  [24]
// MAX_POOL       the worker's pg pool size   [min(CONCURRENCY + 1, 50)]
// LOCAL_QUEUE    the worker's localQueue.size [max(500, CONCURRENCY)]
// BATCH          jobs per add_jobs call (enqueue, not timed)  [5000]
// DB_NAME        the database to create and drop     [peers_graphile_<pid>]
//
// 1. CREATE DATABASE DB_NAME; install graphile-worker's schema (runMigrations).
// 2. Enqueue JOBS jobs of one task identifier with graphile_worker.add_jobs, BATCH at a time
//    (the statement of graphile-worker's own perfTest/init.js).
// 3. run() one worker with perfTest/graphile.config.js's settings but concurrentJobs =
//    CONCURRENCY; the task is `async () => {}`. Timed until the jobs table is empty.
// 4. Stop the worker, DROP DATABASE.
//
// Prints one JSON object on stdout; the worker's warnings and errors go to stderr.

import { readFileSync } from "node:fs";
import pg from "pg";

// graphile-worker reads NO_LOG_SUCCESS when it is loaded: without it, every job logs a line.
process.env.NO_LOG_SUCCESS = "1";
const { run, runMigrations, Logger } = await import("graphile-worker");
const { version: graphileVersion } = JSON.parse(
  readFileSync(new URL("./node_modules/graphile-worker/package.json", import.meta.url), "utf8"),
);

const int = (name, dflt) => {
  const v = process.env[name];
  if (v === undefined || v === "") return dflt;
  const n = Number.parseInt(v, 10);
  if (!Number.isFinite(n) || n < 1) throw new Error(`${name} must be a positive integer, not ${v}`);
  return n;
};

const adminUrl = process.env.DATABASE_URL;
if (!adminUrl) throw new Error("DATABASE_URL is not set");
const JOBS = int("JOBS", 20000);
const CONCURRENCY = int("CONCURRENCY", 24);
// perfTest: maxPoolSize = CONCURRENT_JOBS + 1. Capped so that concurrency 512 does not need
// 513 connections (more than most servers allow); with the local queue and batched
// completion the worker uses only a few of them anyway (`peak_pool` in the output).
const MAX_POOL = int("MAX_POOL", Math.min(CONCURRENCY + 1, 50));
// perfTest: localQueue.size 500 (with concurrency 24). graphile-worker warns when the local
// queue is smaller than the concurrency ("may result in drastically lower performance"), so
// above 500 it gets the concurrency.
const LOCAL_QUEUE = int("LOCAL_QUEUE", Math.max(500, CONCURRENCY));
const BATCH = int("BATCH", 5000);
const TASK = "noop";

const dbName = process.env.DB_NAME || `peers_graphile_${process.pid}`;
if (!/^[a-z0-9_]+$/.test(dbName)) throw new Error(`DB_NAME must match [a-z0-9_]+, not ${dbName}`);
const withDatabase = (url, db) => {
  const u = new URL(url);
  u.pathname = "/" + encodeURIComponent(db);
  return u.toString();
};
const dbUrl = withDatabase(adminUrl, dbName);

const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`[graphile ${level}] ${message}`);
});

const now = () => Number(process.hrtime.bigint()) / 1e6; // milliseconds

async function adminQuery(sql) {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    return await client.query(sql);
  } finally {
    await client.end();
  }
}

async function measure() {
  await runMigrations({ connectionString: dbUrl, logger });

  // Enqueue (not part of the processing figure).
  const producer = new pg.Client({ connectionString: dbUrl });
  await producer.connect();
  const enqueueStart = now();
  for (let start = 0; start < JOBS; start += BATCH) {
    const jobs = [];
    for (let i = start; i < Math.min(JOBS, start + BATCH); i++) {
      jobs.push({ identifier: TASK, payload: { id: i } });
    }
    await producer.query(
      "select 1 from graphile_worker.add_jobs(array(select json_populate_recordset(null::graphile_worker.job_spec, $1::json)))",
      [JSON.stringify(jobs)],
    );
  }
  const enqueueMs = now() - enqueueStart;
  const queued = Number(
    (await producer.query("select count(*) as n from graphile_worker._private_jobs")).rows[0].n,
  );
  if (queued !== JOBS) throw new Error(`expected ${JOBS} queued jobs, found ${queued}`);

  // The worker's pool, ours so that its peak size can be read.
  const pool = new pg.Pool({ connectionString: dbUrl, max: MAX_POOL });
  pool.on("error", (e) => console.error(`[graphile pool] ${e.message}`));
  pool.on("connect", (client) => client.on("error", (e) => console.error(`[graphile client] ${e.message}`)));
  let peakPool = 0;
  pool.on("acquire", () => {
    peakPool = Math.max(peakPool, pool.totalCount);
  });

  let ran = 0;
  let firstJobAt = null;
  let allRan;
  const allRanPromise = new Promise((resolve) => (allRan = resolve));
  const taskList = {
    [TASK]: async () => {
      if (firstJobAt === null) firstJobAt = now();
      if (++ran === JOBS) allRan();
    },
  };

  const runCalledAt = now();
  const runner = await run({
    pgPool: pool,
    taskList,
    noHandleSignals: true,
    preset: {
      worker: {
        logger,
        concurrentJobs: CONCURRENCY,
        maxPoolSize: MAX_POOL,
        // graphile-worker 0.17.3 perfTest/graphile.config.js:
        gracefulShutdownAbortTimeout: 2500,
        localQueue: { size: LOCAL_QUEUE, refetchDelay: { durationMs: 10 } },
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
        // perfTest leaves pollInterval at its default (2000 ms); all jobs are queued before
        // the worker starts, so it only matters once the queue runs dry.
      },
    },
  });
  const readyAt = now();

  await allRanPromise;
  // The last completions are batched: done when the database has deleted every job.
  for (;;) {
    const { rows } = await producer.query(
      "select exists (select 1 from graphile_worker._private_jobs) as left",
    );
    if (!rows[0].left) break;
    await new Promise((r) => setTimeout(r, 2));
  }
  const doneAt = now();

  await runner.stop();
  await runner.promise.catch(() => {});
  await pool.end();
  await producer.end();

  // The worker is ready when run() resolves; its first job may start a little before.
  const startedAt = Math.min(readyAt, firstJobAt ?? readyAt);
  const perS = (ms) => Math.round((JOBS * 1000) / ms);
  return {
    side: "graphile-worker",
    graphile_version: graphileVersion,
    jobs: JOBS,
    concurrency: CONCURRENCY,
    max_pool: MAX_POOL,
    local_queue: LOCAL_QUEUE,
    peak_pool: peakPool,
    // The figure run.sh compares: worker started (run() resolved) -> jobs table empty.
    process_per_s: perS(doneAt - startedAt),
    // The same, from the first job's start (harness's own figure starts at its first claim).
    process_per_s_from_first_job: perS(doneAt - (firstJobAt ?? readyAt)),
    // The same, including run()'s start-up (pool connect, migration check, LISTEN).
    process_per_s_from_run_call: perS(doneAt - runCalledAt),
    startup_ms: Math.round((readyAt - runCalledAt) * 10) / 10,
    enqueue_per_s: perS(enqueueMs),
  };
}

let exitCode = 0;
try {
  await adminQuery(`CREATE DATABASE "${dbName}"`);
  try {
    console.log(JSON.stringify(await measure()));
  } finally {
    await adminQuery(`DROP DATABASE IF EXISTS "${dbName}" WITH (FORCE)`);
  }
} catch (e) {
  console.error(`graphile.mjs: ${e.stack || e}`);
  exitCode = 1;
}
process.exit(exitCode);
