//! `harness bench --api`: single enqueues, one task per call, from many concurrent clients.
//!
//! Each run uses a fresh database and one real `harness serve` (its API on a loopback port).
//! Three ways to enqueue `--tasks` tasks, `--clients` calls in flight at a time:
//! 1. `POST /api/tasks` over keep-alive HTTP connections;
//! 2. the library's `Queue::enqueue` in this process (concurrent calls share commits), with
//!    the tasks delayed and again with tasks due at once (each batch also sends a NOTIFY);
//! 3. the library's `Queue::enqueue_in` on a pooled connection, one statement and one commit
//!    per call (what every single enqueue cost before group commit).
//!
//! Tasks are delayed by an hour, so the replica only serves the API and nothing runs them
//! (the tasks due at once are enqueued after it stopped).
//! The figure is calls answered per second of wall time; each call is answered only after
//! its task is committed. The median of `--runs` runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use harness::Config;
use harness::db::{self, Database};
use harness::queue::{NewTask, Queue};

use super::console::Replica;

pub(super) const DEFAULT_TASKS: usize = 20_000;
pub(super) const DEFAULT_CLIENTS: usize = 64;

/// What `--api` was asked for.
pub(super) struct Options {
    pub tasks: usize,
    pub clients: usize,
    pub runs: usize,
    pub json: bool,
}

/// One run's figures: calls per second.
#[derive(Debug, Clone, Copy, Serialize)]
struct Figures {
    api_per_s: f64,
    library_per_s: f64,
    library_due_per_s: f64,
    library_one_commit_each_per_s: f64,
}

const DELAY: Duration = Duration::from_secs(3600);

pub(super) async fn run(cfg: &Config, o: &Options) -> anyhow::Result<()> {
    if o.tasks == 0 || o.clients == 0 || o.runs == 0 {
        bail!("--tasks, --clients and --runs must be at least 1");
    }
    let database = Database::open_existing(cfg).await?;
    let admin_url = db::with_database(database.url(), "postgres");
    let mut runs = Vec::new();
    for i in 0..o.runs {
        let name = format!("harness_bench_api_{}_{i}", std::process::id());
        db::create_database_at(&admin_url, &name).await?;
        let url = db::with_database(database.url(), &name);
        let result = measure(cfg, o, &url).await;
        db::drop_database_at(&admin_url, &name).await?;
        let f = result?;
        eprintln!(
            "run {}: API {:.0}/s, library {:.0}/s, library due now {:.0}/s, library one commit each {:.0}/s",
            i + 1,
            f.api_per_s,
            f.library_per_s,
            f.library_due_per_s,
            f.library_one_commit_each_per_s
        );
        runs.push(f);
    }
    database.close().await;
    let med = |f: fn(&Figures) -> f64| super::median_of(runs.iter().map(f).collect()).round();
    let m = Figures {
        api_per_s: med(|f| f.api_per_s),
        library_per_s: med(|f| f.library_per_s),
        library_due_per_s: med(|f| f.library_due_per_s),
        library_one_commit_each_per_s: med(|f| f.library_one_commit_each_per_s),
    };
    if o.json {
        let mut v = serde_json::to_value(m)?;
        v["tasks"] = json!(o.tasks);
        v["clients"] = json!(o.clients);
        v["runs"] = json!(o.runs);
        v["cpus"] = json!(std::thread::available_parallelism().map_or(0, |n| n.get()));
        println!("{v}");
    } else {
        println!(
            "{} single enqueues, {} at a time, median of {} run(s):",
            o.tasks, o.clients, o.runs
        );
        println!(
            "  POST /api/tasks                  {:>10.0} /s",
            m.api_per_s
        );
        println!(
            "  Queue::enqueue (group commit)    {:>10.0} /s",
            m.library_per_s
        );
        println!(
            "  Queue::enqueue, tasks due now     {:>8.0} /s",
            m.library_due_per_s
        );
        println!(
            "  Queue::enqueue_in, one commit each {:>8.0} /s",
            m.library_one_commit_each_per_s
        );
    }
    Ok(())
}

async fn measure(cfg: &Config, o: &Options, url: &str) -> anyhow::Result<Figures> {
    let pool = db::connect(url, (o.clients as u32).min(64) + 4).await?;
    db::migrate(&pool).await?;
    let mut replica = Replica::spawn(cfg, url)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(o.clients)
        .timeout(Duration::from_secs(60))
        .build()?;
    replica.ready(&client).await?;
    // A failed call is the replica's to explain: its log goes with the error.
    let api_per_s = through_api(&client, &replica.base, o)
        .await
        .map_err(|e| e.context(format!("the replica's log ends:\n{}", replica.log_tail())))?;
    drop(replica);

    let queue = Queue::new(pool.clone(), 0);
    let library_per_s =
        through_library(o, &queue, || NewTask::new("echo", json!({})).delay(DELAY)).await?;
    // The same calls with tasks due at once: each batch also sends the NOTIFY that wakes
    // replicas (none runs now, so the tasks stay where they are).
    let library_due_per_s = through_library(o, &queue, || NewTask::new("echo", json!({}))).await?;
    let one_each = concurrently(o, {
        let (queue, pool) = (queue.clone(), pool.clone());
        move |_| {
            let (queue, pool) = (queue.clone(), pool.clone());
            async move {
                let mut conn = pool.acquire().await?;
                queue
                    .enqueue_in(&mut conn, NewTask::new("echo", json!({})).delay(DELAY))
                    .await?;
                Ok(())
            }
        }
    })
    .await?;
    pool.close().await;
    Ok(Figures {
        api_per_s,
        library_per_s,
        library_due_per_s,
        library_one_commit_each_per_s: one_each,
    })
}

/// `Queue::enqueue` calls of the tasks `task` makes; calls per second (see [`concurrently`]).
async fn through_library(o: &Options, queue: &Queue, task: fn() -> NewTask) -> anyhow::Result<f64> {
    let queue = queue.clone();
    concurrently(o, move |_| {
        let queue = queue.clone();
        async move {
            queue.enqueue(task()).await?;
            Ok(())
        }
    })
    .await
}

/// Runs `o.tasks` calls of `call`, `o.clients` at a time; calls per second of wall time.
async fn concurrently<F, Fut>(o: &Options, call: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..o.clients {
        let (next, call, total) = (next.clone(), call.clone(), o.tasks);
        clients.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                call(i).await?;
            }
        });
    }
    while let Some(r) = clients.join_next().await {
        r??;
    }
    Ok(o.tasks as f64 / started.elapsed().as_secs_f64())
}

/// `POST /api/tasks` calls; each must answer 201 Created.
async fn through_api(client: &reqwest::Client, base: &str, o: &Options) -> anyhow::Result<f64> {
    let url = format!("{base}/api/tasks");
    let body = json!({"kind": "echo", "payload": {}, "delay_s": DELAY.as_secs()});
    // The connections are opened before the clock starts.
    let warm = Options {
        tasks: o.clients,
        clients: o.clients,
        runs: 1,
        json: false,
    };
    concurrently(&warm, post(client.clone(), url.clone(), body.clone()))
        .await
        .context("warming up the API's connections")?;
    concurrently(o, post(client.clone(), url, body)).await
}

fn post(
    client: reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>
+ Clone
+ Send
+ 'static {
    move |_| {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        Box::pin(async move {
            let r = client.post(&url).json(&body).send().await?;
            if r.status() != reqwest::StatusCode::CREATED {
                bail!(
                    "POST /api/tasks answered {}: {}",
                    r.status(),
                    r.text().await?
                );
            }
            Ok(())
        })
    }
}
