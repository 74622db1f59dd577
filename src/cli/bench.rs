//! `harness bench`: throughput and latency of the queue, measured on a fresh database.
//!
//! 1. Enqueue: `--tasks` no-op tasks in bulk statements of `--batch` rows from `--producers`
//!    concurrent connections; tasks per second of wall time.
//! 2. Process: `--replicas` `harness serve` processes with `--concurrency` each run them;
//!    the rate is tasks / (last completion − first claim), both read from the database.
//! 3. Pick-up latency: one idle replica; tasks enqueued one at a time, each waited for;
//!    latency is `started_at − created_at` of each task, as the database clock saw them.
//!
//! `--agent` times agent runs through the sandbox, `--governor` the governor's step,
//! `--console` the web console's pages over a big history (see [`console`]), and `--history`
//! the queue, the API and the pruner over a big history of finished tasks (see [`history`]).

mod api;
mod ceiling;
mod console;
mod history;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use serde_json::json;

use harness::Config;
use harness::db::{self, Database};
use harness::queue::{NewTask, Queue};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub file: super::FileArg,
    /// No-op tasks to enqueue and process [default: 20000]; with --console, the tasks of the
    /// history the pages show [default: 1000000]
    #[arg(long)]
    tasks: Option<usize>,
    /// Tasks each replica runs at once (its bulk.max_concurrent)
    #[arg(long, default_value_t = 512)]
    concurrency: u32,
    /// Replica processes that process the tasks
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Claimed tasks each replica may keep waiting for a slot (its bulk.prefetch, 0..=10000)
    /// [default: bulk.prefetch of the configuration]
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    prefetch: Option<u32>,
    /// Rows per bulk enqueue statement
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Concurrent producers (connections) doing the bulk enqueue
    #[arg(long, default_value_t = 2)]
    producers: usize,
    /// Sequential single enqueues for the pick-up latency
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Repeat the whole measurement and report the medians [default: 1]; with --agent, the
    /// number of agent runs timed; with --governor, samples (at least 20); with --console,
    /// requests per page [default: 50]
    #[arg(long)]
    runs: Option<usize>,
    /// Time runs of this Python agent through the sandbox, next to the same interpreter
    /// running a trivial script (no database needed)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["governor", "console"])]
    agent: Option<std::path::PathBuf>,
    /// Measure the governor's CPU cost per sample (--runs samples) and its share of one core
    /// at telemetry.sample_interval_s (no database needed)
    #[arg(long, conflicts_with = "console")]
    governor: bool,
    /// Time the web console's pages on a fresh database seeded with a big history (--tasks
    /// tasks over seven days, --agents agents), served by one `harness serve`: p50, p95 and
    /// max per page, and how often each page's requests read the tasks table by sequential
    /// scan. Takes a few minutes for a million tasks
    #[arg(long)]
    console: bool,
    /// With --console: the agents of the history
    #[arg(long, default_value_t = 200, requires = "console")]
    agents: usize,
    /// With --console: keep the database afterwards (stderr says how to reach it) to look at
    /// query plans with EXPLAIN ANALYZE; drop it with `DROP DATABASE <name>` when done
    #[arg(long, requires = "console")]
    keep: bool,
    /// With --console: how long to wait after a page's requests before reading the table
    /// statistics, so that the replica's sessions have published theirs (an idle PostgreSQL
    /// session does within 10 s); below that, a page's reads may be counted with the next
    /// page's, and the replica's background reads are not measured
    #[arg(long, value_name = "DURATION", default_value = "10.5s", value_parser = super::parse_duration, requires = "console")]
    stats_wait: Duration,
    /// Single enqueues (one task per call) from --clients concurrent clients, on a fresh
    /// database: `POST /api/tasks` to one `harness serve`, the library's `Queue::enqueue`
    /// (concurrent calls share commits), and `Queue::enqueue_in` with one commit per call;
    /// --tasks calls each (default 20,000), medians of --runs
    #[arg(long, conflicts_with_all = ["agent", "governor", "console"])]
    api: bool,
    /// The ceiling of the database: the claim and completion statements alone (no enqueue
    /// timed, no handler, no worker pool), batches of 500 from two connections, on --tasks
    /// no-op tasks (default 200,000) of a fresh database; medians of --runs
    #[arg(long, conflicts_with_all = ["agent", "governor", "console", "api"])]
    ceiling: bool,
    /// The queue over a history of N finished tasks (a fifth ended within the last day, the
    /// rest 8 to 38 days ago, 1 % of those failed): on a fresh database without it and one
    /// with it, processing of --tasks no-op tasks; with it, also `GET /api/tasks` (first page)
    /// and the pruner deleting the old part while replicas process ten times --tasks; medians
    /// of --runs
    #[arg(long, value_name = "N", conflicts_with_all = ["agent", "governor", "console", "api", "ceiling"])]
    history: Option<u64>,
    /// With --api: calls in flight at a time
    #[arg(long, default_value_t = api::DEFAULT_CLIENTS, requires = "api")]
    clients: usize,
    /// The queues each replica serves, as worker.queues (e.g. '{default: 512, agents: 8,
    /// heavy: 1}'), instead of the `default` queue with --concurrency slots; the benchmark's
    /// tasks wait in `default`
    #[arg(long, value_name = "YAML", conflicts_with_all = ["agent", "governor", "console", "api", "ceiling"])]
    queues: Option<String>,
    /// A limit set on each run's database before its replicas start, as TARGET=N (at most N
    /// running) or TARGET=R/INTERVAL (a rate), TARGET as for `harness limits set`, e.g.
    /// kind:llm=3 or queue:heavy=60/min (repeatable); on kinds or queues the benchmark's
    /// tasks are not in, it measures what limits that bind nothing cost
    #[arg(long = "limit", value_name = "TARGET=SPEC", conflicts_with_all = ["agent", "governor", "console", "api", "ceiling"])]
    limits: Vec<String>,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Measurement {
    enqueue_per_s: f64,
    process_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
}

/// Tasks of the queue benchmark unless --tasks says otherwise.
const QUEUE_TASKS: usize = 20_000;

impl BenchArgs {
    fn tasks(&self) -> usize {
        self.tasks.unwrap_or(if self.console {
            console::DEFAULT_TASKS
        } else {
            QUEUE_TASKS
        })
    }

    /// Each replica's bulk.prefetch: --prefetch, else the configuration's.
    fn prefetch(&self, cfg: &Config) -> u32 {
        self.prefetch.unwrap_or(cfg.bulk.prefetch)
    }

    fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.console {
            console::DEFAULT_RUNS
        } else {
            1
        })
    }
}

pub async fn run(cfg: Config, args: BenchArgs) -> anyhow::Result<()> {
    if let Some(agent) = &args.agent {
        return agent_bench(&cfg, agent, args.runs().max(1), args.json).await;
    }
    if args.governor {
        return governor_bench(&cfg, args.runs().max(20), args.json);
    }
    if args.console {
        let options = console::Options {
            tasks: args.tasks(),
            agents: args.agents,
            runs: args.runs(),
            keep: args.keep,
            stats_wait: args.stats_wait,
            json: args.json,
        };
        return console::run(&cfg, &options).await;
    }
    if args.ceiling {
        return ceiling::run(
            &cfg,
            args.tasks.unwrap_or(ceiling::DEFAULT_TASKS),
            args.runs(),
            args.json,
        )
        .await;
    }
    if let Some(history) = args.history {
        return history::run(&cfg, &args, history).await;
    }
    if args.api {
        let options = api::Options {
            tasks: args.tasks.unwrap_or(api::DEFAULT_TASKS),
            clients: args.clients,
            runs: args.runs(),
            json: args.json,
        };
        return api::run(&cfg, &options).await;
    }
    if args.tasks() == 0
        || args.concurrency == 0
        || args.replicas == 0
        || args.runs() == 0
        || args.producers == 0
        || args.batch == 0
    {
        bail!(
            "--tasks, --concurrency, --replicas, --runs, --producers and --batch must be at least 1"
        );
    }
    let database = Database::open_existing(&cfg).await?;
    // With database.session_url (database.url is a pooler in transaction mode), databases are
    // made and dropped, and migrated, on the session URL; the replicas get both, as in a fleet.
    let session = cfg.database.session_url.as_ref().map(|s| s.expose());
    let admin_url = db::with_database(session.unwrap_or(database.url()), "postgres");
    let mut runs = Vec::new();
    for i in 0..args.runs() {
        let name = format!("harness_bench_{}_{i}", std::process::id());
        db::create_database_at(&admin_url, &name).await?;
        let url = db::with_database(database.url(), &name);
        let session_url = session.map(|s| db::with_database(s, &name));
        let result = measure(&cfg, &args, &url, session_url.as_deref()).await;
        db::drop_database_at(&admin_url, &name).await?;
        let m = result?;
        if !args.json {
            eprintln!(
                "run {}: enqueue {:.0}/s, process {:.0}/s, pick-up p50 {:.2} ms p99 {:.2} ms",
                i + 1,
                m.enqueue_per_s,
                m.process_per_s,
                m.latency_p50_ms,
                m.latency_p99_ms
            );
        }
        runs.push(m);
    }
    database.close().await;

    report(&args, args.prefetch(&cfg), &median(&runs))
}

/// `kind:llm=3` (at most 3 running) or `queue:heavy=60/min` (a rate), as `--limit` takes it.
fn bench_limit(spec: &str) -> anyhow::Result<harness::queue::limits::Limit> {
    use harness::queue::limits::{Limit, Scope, parse_rate, parse_target};
    let bad =
        || anyhow::anyhow!("--limit {spec:?}: give TARGET=N or TARGET=R/INTERVAL, e.g. kind:llm=3");
    let (target, value) = spec.rsplit_once('=').ok_or_else(bad)?;
    let (scope, target) =
        parse_target(target).map_err(|e| anyhow::anyhow!("--limit {spec:?}: {e}"))?;
    if scope == Scope::Agent {
        bail!("--limit {spec:?}: the benchmark runs no agents; limit a queue, kind or key");
    }
    let (concurrency, rate, per_ms) = if value.contains('/') {
        let (r, ms) = parse_rate(value).map_err(|e| anyhow::anyhow!("--limit {spec:?}: {e}"))?;
        (None, Some(r), Some(ms))
    } else {
        (Some(value.parse().map_err(|_| bad())?), None, None)
    };
    Ok(Limit {
        scope,
        target: target.to_string(),
        concurrency,
        rate,
        per_ms,
    })
}

/// The median of each figure over the runs.
fn median(runs: &[Measurement]) -> Measurement {
    let med = |f: fn(&Measurement) -> f64| median_of(runs.iter().map(f).collect());
    Measurement {
        enqueue_per_s: med(|m| m.enqueue_per_s).round(),
        process_per_s: med(|m| m.process_per_s).round(),
        latency_p50_ms: (med(|m| m.latency_p50_ms) * 1000.0).round() / 1000.0,
        latency_p99_ms: (med(|m| m.latency_p99_ms) * 1000.0).round() / 1000.0,
    }
}

/// Prints the summary, as one JSON object with `--json`.
fn report(args: &BenchArgs, prefetch: u32, summary: &Measurement) -> anyhow::Result<()> {
    if args.json {
        let mut v = serde_json::to_value(summary)?;
        v["tasks"] = json!(args.tasks());
        v["concurrency"] = json!(args.concurrency);
        v["replicas"] = json!(args.replicas);
        v["prefetch"] = json!(prefetch);
        v["producers"] = json!(args.producers);
        v["batch"] = json!(args.batch);
        v["runs"] = json!(args.runs());
        v["queues"] = json!(args.queues);
        v["limits"] = json!(args.limits);
        v["cpus"] = json!(std::thread::available_parallelism().map_or(0, |n| n.get()));
        println!("{v}");
        return Ok(());
    }
    let mut slots = match &args.queues {
        Some(q) => format!("queues {q}"),
        None => format!("concurrency {}", args.concurrency),
    };
    if !args.limits.is_empty() {
        slots.push_str(&format!(", limits {}", args.limits.join(" ")));
    }
    println!(
        "{} no-op tasks ({} producers, batches of {}), {} replica(s) × {slots} \
         (prefetch {}), median of {} run(s):",
        args.tasks(),
        args.producers,
        args.batch,
        args.replicas,
        prefetch,
        args.runs()
    );
    println!(
        "  bulk enqueue      {:>10.0} tasks/s",
        summary.enqueue_per_s
    );
    println!(
        "  processing        {:>10.0} tasks/s",
        summary.process_per_s
    );
    println!(
        "  pick-up latency   p50 {:.2} ms, p99 {:.2} ms",
        summary.latency_p50_ms, summary.latency_p99_ms
    );
    Ok(())
}

/// Replica processes that are stopped (SIGTERM, then SIGKILL) when dropped.
struct Replicas(Vec<Child>);

impl Replicas {
    fn spawn(
        cfg: &Config,
        url: &str,
        session: Option<&str>,
        n: u32,
        concurrency: u32,
        prefetch: u32,
        queues: Option<&str>,
    ) -> anyhow::Result<Replicas> {
        let exe = std::env::current_exe().context("locating the harness binary")?;
        let mut children = Vec::new();
        for _ in 0..n {
            let mut cmd = Command::new(&exe);
            for (k, _) in std::env::vars() {
                if k.starts_with("HARNESS_") {
                    cmd.env_remove(k);
                }
            }
            let child = cmd
                .args(["serve", "--no-api"])
                .env("DATABASE_URL", url)
                .env("HARNESS_HOME", &cfg.home)
                .env("HARNESS_BULK__MAX_CONCURRENT", concurrency.to_string())
                .env("HARNESS_BULK__PREFETCH", prefetch.to_string())
                // Health and metrics on a free port: a taken api.bind would stop the replica.
                .env("HARNESS_API__BIND", "127.0.0.1:0")
                .env("HARNESS_DATABASE__MAX_CONNECTIONS", "10")
                .envs(session.map(|s| ("HARNESS_DATABASE__SESSION_URL", s)))
                .envs(queues.map(|q| ("HARNESS_WORKER__QUEUES", q)))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a replica")?;
            children.push(child);
        }
        Ok(Replicas(children))
    }

    /// How the replicas ended, when every one of them has.
    fn all_exited(&mut self) -> Option<String> {
        let mut ended = Vec::new();
        for c in &mut self.0 {
            match c.try_wait() {
                Ok(Some(status)) => ended.push(status.to_string()),
                _ => return None,
            }
        }
        Some(ended.join(", "))
    }

    fn stop_all_but_first(&mut self) {
        let rest: Vec<Child> = self.0.drain(1..).collect();
        stop(rest);
    }
}

fn stop(children: Vec<Child>) {
    for c in &children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for mut c in children {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        stop(std::mem::take(&mut self.0));
    }
}

/// One run on the fresh database at `url`: bulk enqueue, processing by replica processes,
/// then pick-up latency on one idle replica.
/// `session`: the database's session URL, when `url` goes through a pooler.
async fn measure(
    cfg: &Config,
    args: &BenchArgs,
    url: &str,
    session: Option<&str>,
) -> anyhow::Result<Measurement> {
    let pool = db::connect(url, args.producers as u32 + 2).await?;
    match session {
        Some(session) => {
            use sqlx::{ConnectOptions, Connection};
            let mut conn = db::options(session)?.connect().await?;
            db::migrate_on(&mut conn).await?;
            conn.close().await?;
        }
        None => db::migrate(&pool).await?,
    }
    for spec in &args.limits {
        harness::queue::limits::set(&pool, &bench_limit(spec)?).await?;
    }
    let queue = Queue::new(pool.clone(), 0);
    let (enqueue_per_s, after, mut replicas) =
        enqueue_and_start(cfg, args, &queue, url, session, args.tasks()).await?;
    let process_per_s = processing(&queue, after, args.tasks(), &mut replicas).await?;
    replicas.stop_all_but_first();
    let mut latencies = pickup_latencies(&queue, args.latency_samples).await?;
    drop(replicas);
    pool.close().await;
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok(Measurement {
        enqueue_per_s,
        process_per_s,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
    })
}

/// Enqueues `tasks` no-op tasks (see [`bulk_enqueue`]) and starts the replicas that will run
/// them: the enqueue rate, the id the new tasks come after (for [`processing`]), the replicas.
async fn enqueue_and_start(
    cfg: &Config,
    args: &BenchArgs,
    queue: &Queue,
    url: &str,
    session: Option<&str>,
    tasks: usize,
) -> anyhow::Result<(f64, harness::queue::TaskId, Replicas)> {
    let after = queue.last_id().await?;
    let enqueue_per_s = bulk_enqueue(queue, args, tasks).await?;
    let prefetch = args.prefetch(cfg);
    let replicas = Replicas::spawn(
        cfg,
        url,
        session,
        args.replicas,
        args.concurrency,
        prefetch,
        args.queues.as_deref(),
    )?;
    Ok((enqueue_per_s, after, replicas))
}

/// Enqueues `tasks` no-op tasks in batches of `args.batch` shared out to `args.producers`;
/// tasks per second.
async fn bulk_enqueue(queue: &Queue, args: &BenchArgs, tasks: usize) -> anyhow::Result<f64> {
    let batches: Vec<usize> = (0..tasks)
        .step_by(args.batch)
        .map(|start| args.batch.min(tasks - start))
        .collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let batches = std::sync::Arc::new(batches);
    // Connections are opened before the clock starts.
    let mut conns = Vec::new();
    for _ in 0..args.producers {
        conns.push(queue.pool().acquire().await?);
    }
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for mut conn in conns {
        let (queue, next, batches) = (queue.clone(), next.clone(), batches.clone());
        producers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&n) = batches.get(i) else {
                    return Ok::<_, harness::queue::Error>(());
                };
                queue
                    .enqueue_many_in(&mut conn, vec![NewTask::new("noop", json!({})); n])
                    .await?;
            }
        });
    }
    while let Some(r) = producers.join_next().await {
        r??;
    }
    Ok(tasks as f64 / started.elapsed().as_secs_f64())
}

/// Waits until every task after task `after` (the `tasks` the bench enqueued) is finished;
/// tasks per second from the first start to the last completion.
async fn processing(
    queue: &Queue,
    after: harness::queue::TaskId,
    tasks: usize,
    replicas: &mut Replicas,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    // The progress check must not load the system it measures: "anything not completed?"
    // is a probe of two partial indexes, where counting completed rows would scan.
    while queue.any_unfinished(after).await? {
        if Instant::now() > deadline {
            bail!("the tasks did not all complete within 10 minutes");
        }
        if let Some(how) = replicas.all_exited() {
            bail!(
                "every replica exited before the tasks were done ({how}); see their errors above"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = queue.processing_window(after).await?;
    Ok(tasks as f64 / window.max(1e-6))
}

/// Milliseconds from enqueue to start of `samples` tasks enqueued one at a time.
async fn pickup_latencies(queue: &Queue, samples: usize) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let id = queue.enqueue(NewTask::new("noop", json!({}))).await?.id;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(secs) = queue.pickup_latency(id).await? {
                latencies.push(secs * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                bail!("task {id} was not picked up within 10 s");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    Ok(latencies)
}

/// The median of several runs' figures (the middle one; the upper middle of an even count).
fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Per-run time of an agent through the sandbox (fresh directory, scrubbed environment,
/// limits, result file), forked from the fork server and started as an interpreter of its
/// own, against the bare interpreter starting and running `pass`.
async fn agent_bench(
    cfg: &Config,
    file: &std::path::Path,
    runs: usize,
    json_out: bool,
) -> anyhow::Result<()> {
    use harness::executor::{ExecStatus, Executor, RunSpec, Runtime};
    let code =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    // Forked (when the configuration allows it) and exec'd, with the same settings otherwise.
    let mut paths = Vec::new();
    if cfg.executor.fork_server {
        paths.push(("forked", Executor::new(&cfg.executor)?));
    }
    let mut exec_cfg = cfg.executor.clone();
    exec_cfg.fork_server = false;
    paths.push(("exec", Executor::new(&exec_cfg)?));
    let python = paths[0].1.python.clone();
    let spec = RunSpec::new(Runtime::Python { code }, &paths[0].1);
    let trivial = tempfile::Builder::new().suffix(".py").tempfile()?;
    std::fs::write(trivial.path(), "pass\n")?;
    let bare = || {
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(trivial.path()).env_clear().stdin(Stdio::null());
        cmd
    };
    // Warm the page cache (and start the fork server) before timing.
    for _ in 0..3 {
        for (_, executor) in &paths {
            let r = executor.run(&spec).await?;
            if r.status != ExecStatus::Success {
                bail!(
                    "the agent does not succeed: {}",
                    r.error.unwrap_or_default()
                );
            }
        }
        bare().status().await?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); paths.len()];
    let mut bare_ms = Vec::with_capacity(runs);
    // Interleaved, so all see the same machine load.
    for _ in 0..runs {
        for ((_, executor), ms) in paths.iter().zip(&mut times) {
            let t = Instant::now();
            executor.run(&spec).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let t = Instant::now();
        bare().status().await?;
        bare_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    bare_ms.sort_by(|a, b| a.total_cmp(b));
    let bare_p50 = percentile(&bare_ms, 0.5);
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    let mut report = serde_json::Map::new();
    report.insert("runs".into(), json!(runs));
    report.insert("python".into(), json!(python));
    report.insert("bare_p50_ms".into(), json!(round(bare_p50)));
    if !json_out {
        println!(
            "{runs} runs of {} with {}:",
            file.display(),
            python.display()
        );
    }
    for ((name, _), ms) in paths.iter().zip(&mut times) {
        ms.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (percentile(ms, 0.5), percentile(ms, 0.99));
        report.insert(
            (*name).into(),
            json!({
                "run_p50_ms": round(p50),
                "run_p99_ms": round(p99),
                "overhead_p50_ms": round(p50 - bare_p50),
            }),
        );
        if !json_out {
            let how = match *name {
                "forked" => "forked (fork server)",
                _ => "own interpreter     ",
            };
            println!(
                "  {how}  p50 {p50:.2} ms, p99 {p99:.2} ms, overhead p50 {:.2} ms",
                p50 - bare_p50
            );
        }
    }
    if json_out {
        println!("{}", serde_json::Value::Object(report));
    } else {
        println!("  bare interpreter      p50 {bare_p50:.2} ms (`pass`, no harness)");
    }
    Ok(())
}

fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// CPU time of one governor step (sample the host, feed and evaluate the state machine),
/// and what that costs at the configured sampling interval.
fn governor_bench(cfg: &Config, samples: usize, json_out: bool) -> anyhow::Result<()> {
    use harness::governor::{Machine, ResourceLimits, ResourceMonitor, Sampler, Settings};
    let mut monitor =
        ResourceMonitor::new(ResourceLimits::default()).map_err(anyhow::Error::msg)?;
    let mut machine = Machine::new(Settings::from_config(cfg), std::time::Instant::now());
    let mut costs = Vec::with_capacity(samples);
    for _ in 0..samples {
        // sysinfo needs time between CPU samples to compute a usage.
        std::thread::sleep(Duration::from_millis(20));
        let before = thread_cpu();
        let r = monitor.sample();
        let now = std::time::Instant::now();
        machine.observe_sample(now, r.cpu_percent, r.memory_percent);
        machine.observe_failures(now, 0);
        machine.evaluate(now);
        costs.push((thread_cpu() - before).as_secs_f64() * 1000.0);
    }
    costs.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (percentile(&costs, 0.5), percentile(&costs, 0.99));
    let interval = cfg.telemetry.sample_interval_s as f64;
    let share = p50 / 1000.0 / interval * 100.0;
    if json_out {
        println!(
            "{}",
            json!({
                "samples": samples,
                "sample_cpu_p50_ms": (p50 * 1000.0).round() / 1000.0,
                "sample_cpu_p99_ms": (p99 * 1000.0).round() / 1000.0,
                "sample_interval_s": interval,
                "core_percent": (share * 10000.0).round() / 10000.0,
                "container_limited": monitor.container_limited(),
            })
        );
    } else {
        println!("governor step, {samples} samples: CPU p50 {p50:.3} ms, p99 {p99:.3} ms");
        println!("at one sample every {interval} s: {share:.4} % of one core");
    }
    Ok(())
}
