//! Chaos: real `harness serve` replicas on a real PostgreSQL, killed with `kill -9`, stopped
//! longer than `rescue_after`, and cut off by PostgreSQL restarts (fast and immediate) and an
//! outage of twice `rescue_after` — while a few thousand tasks run. Command tasks append their
//! idempotency key to a file when they start, so every execution is counted.
//!
//! Checked: every task completes; no completed task starts again; re-executions never exceed
//! the attempts lost to kills and stops; no task of a replica that stayed alive is ever
//! rescued (the outage and the restarts); every live replica heartbeats again within a few
//! seconds of PostgreSQL accepting connections.
//!
//! Sized for CI on 2 cores. The bigger run of the closing note is the same test with
//! `CHAOS_TASKS=20000 CHAOS_KILLS=10 CHAOS_STOPS=2 CHAOS_PG_FAULTS=3`.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use harness::queue::{NewTask, Queue};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use sqlx::PgPool;

const RESCUE_AFTER_S: u64 = 3;
const DATABASE: &str = "chaos";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `harness serve` process (stopped with its group when dropped).
struct Replica {
    child: common::Proc,
    id: String,
}

impl Replica {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.pid())
    }
}

/// Runs `probe` until it returns `Some`, across database errors (the server may be down).
async fn until<T>(within: Duration, what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    common::eventually(what, within, probe).await
}

/// Starts a replica logging (at info) to a file of its own in `logs`, kept for the report of a
/// failure ([`said_about`]).
async fn start_replica(url: &str, logs: &std::path::Path) -> Replica {
    let n = std::fs::read_dir(logs).map_or(0, |d| d.count());
    let log = std::fs::File::create(logs.join(format!("replica-{n}.log"))).unwrap();
    let child = common::Proc::spawn(
        common::harness_at(url)
            .arg("serve")
            .arg("--no-api")
            .env(
                "HARNESS_PERSISTENCE__RESCUE_AFTER_S",
                RESCUE_AFTER_S.to_string(),
            )
            .env("HARNESS_BULK__MAX_CONCURRENT", "8")
            // The machine is busy on purpose: throttling would only slow the test down.
            .env("HARNESS_GOVERNANCE__CPU_HIGH_PCT", "100")
            .env("HARNESS_GOVERNANCE__MEM_HIGH_PCT", "100")
            .stdout(Stdio::null())
            .stderr(log),
    );
    let pid = child.pid();
    let pool = harness::db::connect(url, 1).await.unwrap();
    let id = until(
        Duration::from_secs(30),
        "a replica to register",
        async || {
            sqlx::query_scalar::<_, String>("SELECT id FROM replicas WHERE pid = $1")
                .bind(pid)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten()
        },
    )
    .await;
    pool.close().await;
    Replica { child, id }
}

/// What every replica logged about task `id`, for the message of a failed assertion.
fn said_about(logs: &std::path::Path, id: i64) -> String {
    let needles = [format!("\"task.id\":{id},"), format!("\"task.id\":{id}}}")];
    let mut said = String::new();
    let mut files: Vec<_> = std::fs::read_dir(logs)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| needles.iter().any(|n| l.contains(n.as_str())))
        {
            said.push_str(&format!("\n  {}: {line}", path.display()));
        }
    }
    said
}

/// What a fault did, for the report and the accounting.
#[derive(Debug)]
enum Fault {
    Kill {
        replica: String,
        at: DateTime<Utc>,
    },
    Stop {
        replica: String,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    Postgres {
        how: &'static str,
        reconnect: Vec<Duration>,
    },
}

#[derive(Clone, Copy, Debug)]
enum Plan {
    Kill,
    Stop,
    RestartFast,
    RestartImmediate,
    Outage,
}

/// The faults interleaved: kills spread out, stops and PostgreSQL faults between them.
fn schedule(kills: usize, stops: usize, pg: usize) -> Vec<Plan> {
    let mut others: Vec<Plan> = (0..stops).map(|_| Plan::Stop).collect();
    for i in 0..pg {
        others.push([Plan::RestartFast, Plan::RestartImmediate, Plan::Outage][i % 3]);
    }
    let mut plan = Vec::new();
    let (mut k, mut o) = (0, 0);
    while k < kills || o < others.len() {
        if k < kills {
            plan.push(Plan::Kill);
            k += 1;
        }
        if o < others.len() {
            plan.push(others[o]);
            o += 1;
        }
    }
    plan
}

async fn now(pool: &PgPool) -> DateTime<Utc> {
    until(Duration::from_secs(30), "the database clock", async || {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(pool)
            .await
            .ok()
    })
    .await
}

/// How long each live replica took to heartbeat again after the server came back.
async fn reconnect_times(pool: &PgPool, replicas: &[Replica], back: Instant) -> Vec<Duration> {
    let started: DateTime<Utc> = until(Duration::from_secs(30), "the server", async || {
        sqlx::query_scalar("SELECT pg_postmaster_start_time()")
            .fetch_one(pool)
            .await
            .ok()
    })
    .await;
    let mut times = Vec::new();
    for r in replicas {
        until(
            Duration::from_secs(15),
            "a replica to heartbeat after the restart",
            async || {
                let at: DateTime<Utc> =
                    sqlx::query_scalar("SELECT heartbeat_at FROM replicas WHERE id = $1")
                        .bind(&r.id)
                        .fetch_one(pool)
                        .await
                        .ok()?;
                (at > started).then_some(())
            },
        )
        .await;
        times.push(back.elapsed());
    }
    times
}

#[tokio::test]
async fn chaos_every_task_once_through_kills_stops_and_postgres_faults() {
    let tasks = setting("CHAOS_TASKS", 3000);
    let kills = setting("CHAOS_KILLS", 4);
    let stops = setting("CHAOS_STOPS", 1);
    let pg_faults = setting("CHAOS_PG_FAULTS", 3);
    let replicas_n = setting("CHAOS_REPLICAS", 4);
    let started = Instant::now();

    let mut pg = common::RestartableServer::start(DATABASE).await;
    let url = pg.url(DATABASE);
    let pool = harness::db::connect(&url, 4).await.unwrap();
    let q = Queue::new(pool.clone(), 20);

    let dir = common::agent_writable_dir("harness-chaos-");
    let logs = tempfile::tempdir().unwrap();
    let effects = common::agent_writable_file(&dir.path().join("effects"));

    // Two thirds in-process sleeps, one third sandboxed commands that leave a mark; both
    // last long enough (0.2–1 s) to be caught mid-run by the faults.
    let new_tasks: Vec<NewTask> = (0..tasks)
        .map(|i| {
            let key = format!("chaos-{i}");
            let ms = 200 + (i * 7919) % 800;
            let task = if i % 3 == 2 {
                NewTask::new(
                    "command",
                    json!({"argv": [
                        "sh", "-c",
                        format!("echo \"$0 $(date +%s%N)\" >> {}; sleep {}", effects.display(), ms as f64 / 1000.0),
                        key,
                    ]}),
                )
            } else {
                NewTask::new("sleep", json!({ "ms": ms }))
            };
            task.idempotency_key(key).max_retries(20)
        })
        .collect();
    for chunk in new_tasks.chunks(1000) {
        q.enqueue_many(chunk.to_vec()).await.unwrap();
    }
    // Enqueued again: every one deduplicated by its key.
    let again = q
        .enqueue_many(new_tasks[..500.min(tasks)].to_vec())
        .await
        .unwrap();
    assert!(again.iter().all(|e| e.deduplicated));

    let mut replicas = Vec::new();
    for _ in 0..replicas_n {
        replicas.push(start_replica(&url, logs.path()).await);
    }

    let mut faults = Vec::new();
    let mut next = 0usize;
    for plan in schedule(kills, stops, pg_faults) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        match plan {
            Plan::Kill => {
                let i = next % replicas.len();
                next += 1;
                let mut r = replicas.remove(i);
                let at = now(&pool).await;
                kill(r.pid(), Signal::SIGKILL).unwrap();
                let _ = r.child.wait_for_exit(Duration::from_secs(30));
                faults.push(Fault::Kill {
                    replica: r.id.clone(),
                    at,
                });
                replicas.insert(i, start_replica(&url, logs.path()).await);
            }
            Plan::Stop => {
                let i = next % replicas.len();
                next += 1;
                let from = now(&pool).await;
                kill(replicas[i].pid(), Signal::SIGSTOP).unwrap();
                tokio::time::sleep(Duration::from_secs(2 * RESCUE_AFTER_S + 1)).await;
                kill(replicas[i].pid(), Signal::SIGCONT).unwrap();
                let to = now(&pool).await;
                faults.push(Fault::Stop {
                    replica: replicas[i].id.clone(),
                    from,
                    to,
                });
            }
            Plan::RestartFast | Plan::RestartImmediate | Plan::Outage => {
                let how = match plan {
                    Plan::RestartFast => {
                        pg.down().await;
                        "restart -m fast"
                    }
                    Plan::RestartImmediate => {
                        pg.crash().await;
                        "restart -m immediate"
                    }
                    _ => {
                        pg.down().await;
                        tokio::time::sleep(Duration::from_secs(2 * RESCUE_AFTER_S)).await;
                        "outage of 2 x rescue_after"
                    }
                };
                pg.up().await;
                let back = Instant::now();
                let reconnect = reconnect_times(&pool, &replicas, back).await;
                faults.push(Fault::Postgres { how, reconnect });
            }
        }
    }
    let faults_done = started.elapsed();

    let mut last_report = Instant::now();
    // About 0.6 s of work per task over 32 slots, with room for the machine being slow.
    let deadline = Duration::from_secs(240 + tasks as u64 / 20);
    until(deadline, "every task to complete", async || {
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM tasks GROUP BY 1 ORDER BY 1")
                .fetch_all(&pool)
                .await
                .ok()?;
        let left: i64 = by_status
            .iter()
            .filter(|(s, _)| s != "completed")
            .map(|(_, n)| n)
            .sum();
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            let fleet: Vec<(String, i32, i32, String, f64)> = sqlx::query_as(
                "SELECT id, running, capacity, governor_state, \
                     EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 FROM replicas",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            let stuck: Vec<(i64, Option<String>, i32, Value)> = sqlx::query_as(
                "SELECT id, locked_by, attempt, attempts FROM tasks \
                     WHERE status = 'running' AND started_at < now() - interval '20 s'",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            eprintln!(
                "chaos: waiting after {:?}; {by_status:?}; fleet (id, running, capacity, \
                     state, heartbeat age) {fleet:?}; running for over 20 s: {stuck:?}",
                started.elapsed()
            );
        }
        (left == 0).then_some(())
    })
    .await;
    let finished = started.elapsed();

    // The record of every task: its key, when it completed, its lost attempts, its id.
    let rows: Vec<(String, DateTime<Utc>, Value, i32, i64)> =
        sqlx::query_as("SELECT idempotency_key, completed_at, attempts, attempt, id FROM tasks")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), tasks, "one task per key");
    let mut lost_by_replica: HashMap<String, Vec<DateTime<Utc>>> = HashMap::new();
    let mut lost_total = 0usize;
    let mut completed_at = HashMap::new();
    let mut id_of = HashMap::new();
    for (key, done, attempts, _, id) in &rows {
        completed_at.insert(key.clone(), *done);
        id_of.insert(key.clone(), (*id, attempts.clone()));
        for a in attempts.as_array().unwrap() {
            assert_eq!(
                a["status"], "lost",
                "{key}: only lost attempts in a clean run: {a}"
            );
            let at: DateTime<Utc> = serde_json::from_value(a["ended_at"].clone()).unwrap();
            lost_by_replica
                .entry(a["replica"].as_str().unwrap().to_string())
                .or_default()
                .push(at);
            lost_total += 1;
        }
    }

    // Executions of command tasks, from their marks.
    let mut runs: HashMap<String, Vec<DateTime<Utc>>> = HashMap::new();
    for line in std::fs::read_to_string(&effects).unwrap().lines() {
        let (key, ns) = line.split_once(' ').unwrap();
        let ns: i64 = ns.parse().unwrap();
        runs.entry(key.to_string())
            .or_default()
            .push(DateTime::from_timestamp_nanos(ns));
    }
    let commands: Vec<&String> = completed_at
        .keys()
        .filter(|k| k.trim_start_matches("chaos-").parse::<usize>().unwrap() % 3 == 2)
        .collect();
    let mut reexecutions = 0;
    for key in &commands {
        let marks = runs.get(*key).map(Vec::as_slice).unwrap_or_default();
        assert!(!marks.is_empty(), "{key} completed without running");
        reexecutions += marks.len() - 1;
        let done = completed_at[*key];
        for m in marks {
            // The mark is written by the command's first line; the completion comes after
            // the command ends. Same host, so the clocks agree (to within a few ms).
            assert!(
                *m <= done + chrono::Duration::milliseconds(50),
                "{key} started again at {m} after it completed at {done}; faults {faults:?}; \
                 its runs {marks:?}; its lost attempts {}; the replicas about task {}:{}",
                id_of[*key].1,
                id_of[*key].0,
                said_about(logs.path(), id_of[*key].0)
            );
        }
    }
    let lost_commands: usize = rows
        .iter()
        .filter(|r| commands.contains(&&r.0))
        .map(|r| r.2.as_array().unwrap().len())
        .sum();
    assert!(
        reexecutions <= lost_commands,
        "{reexecutions} command re-executions but only {lost_commands} of their attempts were lost"
    );

    // Every lost attempt belongs to a replica that was killed, or to the stopped one while it
    // was stopped (rescued within rescue_after + a few ticks of its resumption).
    let mut report = Vec::new();
    let mut faulted = HashSet::new();
    let killed_at: HashMap<&String, DateTime<Utc>> = faults
        .iter()
        .filter_map(|f| match f {
            Fault::Kill { replica, at } => Some((replica, *at)),
            _ => None,
        })
        .collect();
    for f in &faults {
        match f {
            Fault::Kill { replica, at } => {
                faulted.insert(replica.clone());
                let lost: Vec<&DateTime<Utc>> = lost_by_replica
                    .get(replica)
                    .map(|l| l.iter().filter(|t| *t >= at).collect())
                    .unwrap_or_default();
                let recovered = lost
                    .iter()
                    .max()
                    .map(|t| (**t - *at).to_std().unwrap_or_default());
                report.push(format!(
                    "kill -9 {replica}: {} attempts lost, all rescued {:?} after the kill",
                    lost.len(),
                    recovered
                ));
            }
            Fault::Stop { replica, from, to } => {
                faulted.insert(replica.clone());
                let lost = lost_by_replica
                    .get(replica)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                // (A replica stopped once may be killed later: its tasks are lost then too.)
                let killed = killed_at.get(replica);
                for t in lost {
                    assert!(
                        (*t >= *from && *t <= *to + chrono::Duration::seconds(2))
                            || killed.is_some_and(|k| t >= k),
                        "a task of {replica} was rescued at {t}, outside its stop ({from} .. {to})"
                    );
                }
                let during = lost
                    .iter()
                    .filter(|t| killed.is_none_or(|k| *t < k))
                    .count();
                report.push(format!(
                    "SIGSTOP {replica} for {:?}: {during} attempts lost",
                    (*to - *from).to_std().unwrap_or_default(),
                ));
            }
            Fault::Postgres { how, reconnect } => {
                let worst = reconnect.iter().max().copied().unwrap_or_default();
                assert!(
                    worst < Duration::from_secs(5),
                    "PostgreSQL {how}: a replica heartbeat only {worst:?} after the server was back"
                );
                report.push(format!(
                    "PostgreSQL {how}: replicas heartbeating again after {:?}",
                    reconnect
                ));
            }
        }
    }
    let innocent: Vec<_> = lost_by_replica
        .keys()
        .filter(|r| !faulted.contains(*r))
        .collect();
    assert!(
        innocent.is_empty(),
        "tasks of replicas that stayed alive were rescued (and run again): {innocent:?}"
    );

    eprintln!(
        "chaos: {tasks} tasks ({} commands) on {replicas_n} replicas, {} faults in {faults_done:?}, \
         all completed after {finished:?}; {lost_total} attempts lost to kills and stops, \
         {reexecutions} command re-executions (of {lost_commands} lost command attempts)",
        commands.len(),
        faults.len()
    );
    for line in report {
        eprintln!("  {line}");
    }
    drop(replicas);
    pool.close().await;
    pg.down().await;
}
