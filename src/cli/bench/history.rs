//! `harness bench --history N`: the queue, the API and the pruner over a big history of
//! finished tasks.
//!
//! Each run makes two fresh databases, one after the other. The first stays empty. The second
//! gets N finished tasks (`kind = 'history'`), inserted in bulk and then vacuumed and
//! analysed, as autovacuum would have done on a database that grew this big (not timed),
//! laid out as in a database pruned for a while: the newest fifth, ended within the last day,
//! fills the start of the table (space freed by earlier prunes is reused), and the rest,
//! ended 8 to 38 days ago (1 % failed), follows in id order (see [`seed`]). On each, as the queue
//! benchmark: bulk enqueue of `--tasks` no-op tasks and their processing by `--replicas`
//! replicas of `--concurrency`. With the history, also:
//! - `GET /api/tasks` (the first page) to one `harness serve`, [`LIST_REQUESTS`] times one
//!   after another: p50 and p95 of the whole request;
//! - the pruner: `Queue::prune` with the default retention (7 days) and a replica's batch
//!   (5,000 rows), started with the replicas on ten times `--tasks` more no-op tasks: rows it
//!   deleted per second while they worked (counted when they are done, if it is not), next to
//!   the tasks per second they completed; then the time it took to delete the whole history.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use sqlx::{ConnectOptions, Connection};

use harness::Config;
use harness::db::{self, Database};
use harness::queue::Queue;

use super::console::Replica;
use super::{BenchArgs, enqueue_and_start, median_of, percentile, processing};

/// Requests of the first page of `GET /api/tasks` per run.
pub(super) const LIST_REQUESTS: usize = 100;
/// The pruner's retention and batch: a replica's defaults (`gc_completed_after_days` 7,
/// `replica::pruner`'s batch).
const RETENTION: Duration = Duration::from_secs(7 * 86_400);
const PRUNE_BATCH: u32 = 5_000;
/// Rows per statement that builds the history.
const SEED_CHUNK: u64 = 500_000;

/// One run's figures.
#[derive(Debug, Clone, Copy, Serialize)]
struct Figures {
    empty_per_s: f64,
    history_per_s: f64,
    list_p50_ms: f64,
    list_p95_ms: f64,
    prune_rows_per_s: f64,
    process_during_prune_per_s: f64,
    /// Rows the pruner deleted in all (the completed part of the history).
    pruned: u64,
    /// Whether it had deleted them all before the replicas were done.
    prune_finished: bool,
    /// Seconds from its start to its end (the replicas worked during the first part).
    whole_prune_s: f64,
}

pub(super) async fn run(cfg: &Config, args: &BenchArgs, history: u64) -> anyhow::Result<()> {
    if history == 0 || args.tasks() == 0 || args.runs() == 0 || args.concurrency == 0 {
        anyhow::bail!("--history, --tasks, --runs and --concurrency must be at least 1");
    }
    let database = Database::open_existing(cfg).await?;
    let admin_url = db::with_database(database.url(), "postgres");
    let mut runs = Vec::new();
    for i in 0..args.runs() {
        let one = |suffix: &str| {
            let name = format!("harness_bench_history_{}_{i}_{suffix}", std::process::id());
            (name.clone(), db::with_database(database.url(), &name))
        };
        let (empty_name, empty_url) = one("empty");
        db::create_database_at(&admin_url, &empty_name).await?;
        let empty = processing_on(cfg, args, &empty_url, 0).await;
        db::drop_database_at(&admin_url, &empty_name).await?;
        let empty_per_s = empty?;

        let (name, url) = one("full");
        db::create_database_at(&admin_url, &name).await?;
        let result = with_history(cfg, args, &url, history, empty_per_s).await;
        db::drop_database_at(&admin_url, &name).await?;
        let f = result?;
        if !args.json {
            eprintln!(
                "run {}: processing {:.0}/s empty, {:.0}/s with the history; GET /api/tasks \
                 p50 {:.2} ms p95 {:.2} ms; prune {:.0} rows/s while processing {:.0}/s{}, \
                 {} rows in {:.1} s",
                i + 1,
                f.empty_per_s,
                f.history_per_s,
                f.list_p50_ms,
                f.list_p95_ms,
                f.prune_rows_per_s,
                f.process_during_prune_per_s,
                if f.prune_finished {
                    " (done before them)"
                } else {
                    ""
                },
                f.pruned,
                f.whole_prune_s,
            );
        }
        runs.push(f);
    }
    database.close().await;
    report(args, history, &runs)
}

/// Bulk enqueue and processing of `--tasks` no-op tasks on the database at `url`, holding
/// `history` finished tasks first (built here); tasks per second.
async fn processing_on(
    cfg: &Config,
    args: &BenchArgs,
    url: &str,
    history: u64,
) -> anyhow::Result<f64> {
    let pool = db::connect(url, args.producers as u32 + 2).await?;
    db::migrate(&pool).await?;
    if history > 0 {
        // Seeding statements take seconds by design: not a warning each (sqlx's slow-statement
        // log).
        let mut conn = db::options(url)?
            .disable_statement_logging()
            .connect()
            .await?;
        seed(&mut conn, history).await?;
        conn.close().await?;
    }
    let queue = Queue::new(pool.clone(), 0);
    let (_, after, mut replicas) =
        enqueue_and_start(cfg, args, &queue, url, None, args.tasks()).await?;
    let rate = processing(&queue, after, args.tasks(), &mut replicas).await;
    drop(replicas);
    pool.close().await;
    rate
}

async fn with_history(
    cfg: &Config,
    args: &BenchArgs,
    url: &str,
    history: u64,
    empty_per_s: f64,
) -> anyhow::Result<Figures> {
    let history_per_s = processing_on(cfg, args, url, history).await?;
    let (list_p50_ms, list_p95_ms) = list_latency(cfg, url).await?;

    // The pruner, started with the replicas on ten times --tasks more tasks.
    let pool = db::connect(url, args.producers as u32 + 3).await?;
    let queue = Queue::new(pool.clone(), 0);
    let before = completed_history(&pool).await?;
    let tasks = 10 * args.tasks();
    let (_, after, mut replicas) = enqueue_and_start(cfg, args, &queue, url, None, tasks).await?;
    let started = Instant::now();
    let pruner = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let deleted = queue.prune(RETENTION, PRUNE_BATCH).await;
            (deleted, Instant::now())
        })
    };
    let process_during_prune_per_s = processing(&queue, after, tasks, &mut replicas).await?;
    let processed_at = Instant::now();
    // What the pruner deleted while the replicas worked, then all of it.
    let during = if pruner.is_finished() {
        None
    } else {
        Some(before.saturating_sub(completed_history(&pool).await?))
    };
    drop(replicas);
    let (deleted, ended) = pruner.await?;
    let pruned = deleted?;
    let (prune_rows_per_s, prune_finished) = match during {
        None => (
            pruned as f64 / (ended - started).as_secs_f64().max(1e-6),
            true,
        ),
        Some(n) => (
            n as f64 / (processed_at - started).as_secs_f64().max(1e-6),
            false,
        ),
    };
    let whole_prune_s = (ended - started).as_secs_f64();
    pool.close().await;
    Ok(Figures {
        empty_per_s,
        history_per_s,
        list_p50_ms,
        list_p95_ms,
        prune_rows_per_s,
        process_during_prune_per_s,
        pruned,
        prune_finished,
        whole_prune_s,
    })
}

/// Builds the history: `n` finished tasks laid out as in a database that has been pruned for
/// a while, where new rows fill the space freed at the start of the table. The newest fifth
/// (ended within the last day, which the pruner keeps) comes first in the table, with the
/// highest ids; then the rest (ended 8 to 38 days ago, in id order, 1 % failed). Then VACUUM
/// ANALYZE.
async fn seed(conn: &mut sqlx::PgConnection, n: u64) -> anyhow::Result<()> {
    let recent = n / 5;
    let old = n - recent;
    // (first id, last id, start of the span, its length, share failed) of each part, in the
    // order they go into the table.
    let parts = [
        (old + 1, n, "1 day", "1 day", 0),
        (1, old, "38 days", "30 days", 100),
    ];
    for (first, last, ago, span, fail_every) in parts {
        let mut from = first;
        while from <= last {
            let to = (from + SEED_CHUNK - 1).min(last);
            sqlx::query(
                "INSERT INTO tasks (id, kind, status, result, error, attempt, scheduled_at, \
                                    started_at, completed_at, created_at) \
                 SELECT g, 'history', \
                        CASE WHEN $6 > 0 AND g % $6 = 0 THEN 'failed' ELSE 'completed' END, \
                        CASE WHEN $6 > 0 AND g % $6 = 0 THEN NULL ELSE '{}'::jsonb END, \
                        CASE WHEN $6 > 0 AND g % $6 = 0 THEN 'a failure of the history' END, \
                        1, at, at, at + interval '5 ms', at \
                 FROM (SELECT g, now() - $4::interval \
                                 + ((g - $3)::float8 / ($5 - $3 + 1)) * $7::interval AS at \
                       FROM generate_series($1::bigint, $2::bigint) g) s",
            )
            .bind(from as i64)
            .bind(to as i64)
            .bind(first as i64)
            .bind(ago)
            .bind(last as i64)
            .bind(fail_every as i64)
            .bind(span)
            .execute(&mut *conn)
            .await
            .context("building the history")?;
            from = to + 1;
        }
    }
    sqlx::query("SELECT setval(pg_get_serial_sequence('tasks', 'id'), $1)")
        .bind(n as i64)
        .execute(&mut *conn)
        .await?;
    sqlx::query("VACUUM ANALYZE tasks")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Completed tasks of the history past the retention still there.
async fn completed_history(pool: &sqlx::PgPool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE kind = 'history' AND status = 'completed' \
         AND completed_at < now() - interval '7 days'",
    )
    .fetch_one(pool)
    .await?;
    Ok(n as u64)
}

/// p50 and p95 in milliseconds of `GET /api/tasks` (the first page) to one `harness serve`.
async fn list_latency(cfg: &Config, url: &str) -> anyhow::Result<(f64, f64)> {
    let mut replica = Replica::spawn(cfg, url)?;
    let client = reqwest::Client::new();
    replica.ready(&client).await?;
    let mut ms = Vec::with_capacity(LIST_REQUESTS);
    for _ in 0..LIST_REQUESTS {
        let t0 = Instant::now();
        replica.get(&client, "/api/tasks").await?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.95)))
}

fn report(args: &BenchArgs, history: u64, runs: &[Figures]) -> anyhow::Result<()> {
    let med = |f: fn(&Figures) -> f64| median_of(runs.iter().map(f).collect());
    let (empty, full) = (med(|f| f.empty_per_s), med(|f| f.history_per_s));
    let (p50, p95) = (med(|f| f.list_p50_ms), med(|f| f.list_p95_ms));
    let (prune, during) = (
        med(|f| f.prune_rows_per_s),
        med(|f| f.process_during_prune_per_s),
    );
    let whole = med(|f| f.whole_prune_s);
    if args.json {
        let v = json!({
            "history": history,
            "tasks": args.tasks(),
            "concurrency": args.concurrency,
            "replicas": args.replicas,
            "runs": runs.len(),
            "empty_per_s": empty.round(),
            "history_per_s": full.round(),
            "ratio": (full / empty * 100.0).round() / 100.0,
            "list_p50_ms": (p50 * 100.0).round() / 100.0,
            "list_p95_ms": (p95 * 100.0).round() / 100.0,
            "prune_rows_per_s": prune.round(),
            "process_during_prune_per_s": during.round(),
            "whole_prune_s": (whole * 10.0).round() / 10.0,
            "each_run": runs,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "a history of {history} finished tasks; {} no-op tasks, {} replica(s) × concurrency \
         {}; median of {} run(s):",
        args.tasks(),
        args.replicas,
        args.concurrency,
        runs.len()
    );
    println!("  processing, empty database     {empty:>10.0} tasks/s");
    println!(
        "  processing, with the history   {full:>10.0} tasks/s ({:.2}× empty)",
        full / empty
    );
    println!("  GET /api/tasks, first page     p50 {p50:.2} ms, p95 {p95:.2} ms");
    println!(
        "  prune of the history           {prune:>10.0} rows/s, while processing {during:.0} \
         tasks/s ({} tasks)",
        10 * args.tasks()
    );
    println!("  prune of the whole history     {whole:>10.1} s");
    Ok(())
}
