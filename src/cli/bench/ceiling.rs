//! `harness bench --ceiling`: what the database itself allows. On a fresh database holding
//! `--tasks` no-op tasks (enqueued in bulk, not timed), two connections each claim 500 tasks
//! with the claim statement and write their completions with the completion statement, until
//! none is left: no handler, no worker pool, no wake-ups. Tasks per second of wall time is the
//! limit the other figures of the same machine and database can be held against.

use std::time::Instant;

use anyhow::bail;
use serde_json::json;

use harness::Config;
use harness::db::{self, Database};
use harness::queue::{Completion, NewTask, Outcome, Queue};

pub(super) const DEFAULT_TASKS: usize = 200_000;

/// Rows per claim and per completion statement.
const BATCH: u32 = 500;

/// Connections claiming and completing at once.
const CONNECTIONS: usize = 2;

pub(super) async fn run(
    cfg: &Config,
    tasks: usize,
    runs: usize,
    json_out: bool,
) -> anyhow::Result<()> {
    if tasks == 0 || runs == 0 {
        bail!("--tasks and --runs must be at least 1");
    }
    let database = Database::open_existing(cfg).await?;
    let admin_url = db::with_database(database.url(), "postgres");
    let mut rates = Vec::new();
    for i in 0..runs {
        let name = format!("harness_bench_ceiling_{}_{i}", std::process::id());
        db::create_database_at(&admin_url, &name).await?;
        let url = db::with_database(database.url(), &name);
        let result = measure(&url, tasks).await;
        db::drop_database_at(&admin_url, &name).await?;
        let rate = result?;
        eprintln!("run {}: claim + complete {rate:.0} tasks/s", i + 1);
        rates.push(rate);
    }
    database.close().await;
    let median = super::median_of(rates).round();
    if json_out {
        let v = json!({
            "ceiling_per_s": median, "tasks": tasks, "runs": runs, "batch": BATCH,
            "connections": CONNECTIONS,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        });
        println!("{v}");
    } else {
        println!(
            "{tasks} no-op tasks, claim and completion statements alone ({CONNECTIONS} \
             connections, batches of {BATCH}), median of {runs} run(s):"
        );
        println!("  ceiling           {median:>10.0} tasks/s");
    }
    Ok(())
}

/// One run: tasks per second from the first claim to the last completion.
async fn measure(url: &str, tasks: usize) -> anyhow::Result<f64> {
    let pool = db::connect(url, CONNECTIONS as u32 + 1).await?;
    db::migrate(&pool).await?;
    let queue = Queue::new(pool.clone(), 0);
    for start in (0..tasks).step_by(5_000) {
        let n = 5_000.min(tasks - start);
        queue
            .enqueue_many(vec![NewTask::new("noop", json!({})); n])
            .await?;
    }
    sqlx::query("ANALYZE tasks").execute(&pool).await?;
    let kinds = vec!["noop".to_string()];
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let (queue, kinds) = (queue.clone(), kinds.clone());
        workers.spawn(async move {
            let replica = format!("ceiling-{c}");
            let mut done = 0usize;
            loop {
                let claimed = queue.claim(&replica, BATCH, &kinds).await?;
                if claimed.is_empty() {
                    return Ok::<_, anyhow::Error>(done);
                }
                let batch: Vec<Completion> = claimed
                    .iter()
                    .map(|t| Completion {
                        id: t.id,
                        attempt: t.attempt,
                        outcome: Outcome::Success(serde_json::Value::Null),
                        retry_at: chrono::Utc::now(),
                        handoff: None,
                    })
                    .collect();
                queue.complete(&replica, &batch).await?;
                done += batch.len();
            }
        });
    }
    let mut done = 0;
    while let Some(r) = workers.join_next().await {
        done += r??;
    }
    let secs = started.elapsed().as_secs_f64();
    pool.close().await;
    if done != tasks {
        bail!("{done} of {tasks} tasks were claimed and completed");
    }
    Ok(tasks as f64 / secs)
}
