//! Replicas behind PgBouncer in transaction mode: `database.url` through the pooler,
//! `database.session_url` straight to PostgreSQL for what needs a session (LISTEN, the leader
//! lock, the heartbeat, migrations). Real processes, a real PgBouncer, `kill -9`, counted.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pgbouncer::{self, PgBouncer};
use common::{Log, Proc, RestartableServer, TestDb, eventually};
use futures::StreamExt;
use harness::db;
use harness::queue::{NewTask, Queue, Status};
use nix::sys::signal::Signal;
use serde_json::json;
use sqlx::PgPool;

/// Server connections PgBouncer may open to the database: fewer than the replicas' pools
/// (10 each) ask for, so clients share them.
const POOL_SIZE: u32 = 4;

fn harness(pooled: &str, direct: &str) -> Command {
    let mut cmd = common::harness_at(pooled);
    cmd.env("HARNESS_DATABASE__SESSION_URL", direct)
        .env("HARNESS_SCHEDULER__ELECT_INTERVAL_S", "1")
        .env("HARNESS_SCHEDULER__IDLE_SESSION_TIMEOUT_S", "4")
        // No polling to speak of: work is found through LISTEN wake-ups, or not in time.
        .env("HARNESS_BULK__POLL_INTERVAL_MS", "30000");
    cmd
}

fn cli(pooled: &str, direct: &str, args: &[&str]) {
    let o = harness(pooled, direct).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn serve(pooled: &str, direct: &str) -> (Proc, Log) {
    let mut cmd = harness(pooled, direct);
    cmd.arg("serve")
        .env("HARNESS_BULK__MAX_CONCURRENT", "16")
        .stdout(Stdio::null());
    Proc::spawn_logged(&mut cmd)
}

/// A private PostgreSQL and a PgBouncer in front of it, or `None` when no PgBouncer 1.21+
/// is installed (see [`pgbouncer::binary`]).
async fn pooled_server() -> Option<(RestartableServer, PgBouncer)> {
    let binary = pgbouncer::binary()?;
    let server = RestartableServer::start("harness").await;
    let bouncer = PgBouncer::start(&binary, server.server(), POOL_SIZE).await;
    Some((server, bouncer))
}

/// The one replica recorded as leader (pid, id); two fail the test.
async fn leader(pool: &PgPool) -> Option<(i32, String)> {
    let rows: Vec<(i32, String)> = sqlx::query_as("SELECT pid, id FROM replicas WHERE is_leader")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(rows.len() <= 1, "two replicas claim to lead: {rows:?}");
    rows.into_iter().next()
}

/// `SHOW <what>` rows of the database `harness`, by column name.
fn pooler_rows(bouncer: &PgBouncer, what: &str) -> Vec<HashMap<String, String>> {
    bouncer
        .show(what)
        .into_iter()
        .filter(|r| r.get("database").map(String::as_str) == Some("harness"))
        .collect()
}

/// Sessions of the replicas straight to PostgreSQL, by `application_name` prefix.
async fn direct_sessions(pool: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT split_part(application_name, ' ', 1), count(*) FROM pg_stat_activity \
         WHERE datname = 'harness' AND application_name LIKE 'harness-%' GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test]
async fn migrations_through_a_transaction_pooler_take_their_lock_on_the_session_url() {
    let Some((server, bouncer)) = pooled_server().await else {
        return;
    };
    db::create_database(server.server(), "fresh").await.unwrap();
    let (pooled, direct) = (bouncer.url("fresh"), server.url("fresh"));
    // Twice: the second finds nothing to do (and must not wait on a lock left behind).
    for _ in 0..2 {
        let t0 = Instant::now();
        cli(&pooled, &direct, &["migrate"]);
        assert!(t0.elapsed() < Duration::from_secs(30));
    }
    let pool = db::connect(&direct, 1).await.unwrap();
    assert!(db::migrations_current(&pool).await.unwrap());
    let advisory: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(advisory, 0, "a migration lock outlived `harness migrate`");
    pool.close().await;
}

#[tokio::test]
async fn replicas_behind_a_transaction_pooler_run_every_task_once_and_fail_over() {
    let Some((server, bouncer)) = pooled_server().await else {
        return;
    };
    let (pooled, direct) = (bouncer.url("harness"), server.url("harness"));
    let inspect = db::connect(&direct, 2).await.unwrap();

    let mut replicas = vec![serve(&pooled, &direct), serve(&pooled, &direct)];
    common::add_ticker(harness(&pooled, &direct), "ticker", "* * * * * *");
    let logs = |replicas: &[(Proc, Log)]| {
        replicas
            .iter()
            .map(|(_, l)| l.text())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let (leader_pid, leader_id) = eventually("a leader", Duration::from_secs(20), async || {
        leader(&inspect).await
    })
    .await;

    // The library through the pooler; a task found within seconds while replicas poll every
    // 30 s was announced by a NOTIFY sent through the pooler and heard on a direct session.
    let queue = Queue::new(db::connect(&pooled, 16).await.unwrap(), 3);
    let id = queue
        .enqueue(NewTask::new("noop", json!({})))
        .await
        .unwrap()
        .id;
    let t0 = Instant::now();
    eventually("the woken task", Duration::from_secs(5), async || {
        (queue.get(id).await.unwrap().status == Status::Completed).then_some(())
    })
    .await;
    eprintln!("picked up and completed {:?} after enqueue", t0.elapsed());

    // Sessions straight to PostgreSQL: a listener and a heartbeat per replica, and the
    // leader's lock session (`harness-scheduler`) with its own listener.
    let expected: HashMap<String, i64> = [
        ("harness-heartbeat", 2),
        ("harness-listener", 3),
        ("harness-scheduler", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut seen = HashMap::new();
    let t0 = Instant::now();
    while seen != expected {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "direct sessions {seen:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = direct_sessions(&inspect).await;
    }

    // 2,000 tasks of 50 ms, each key enqueued twice at once, through the pooler; the leader
    // is killed while they run.
    const N: usize = 2000;
    let ids: Vec<i64> = futures::stream::iter((0..2 * N).map(|i| {
        let queue = queue.clone();
        async move {
            let task =
                NewTask::new("sleep", json!({"ms": 50})).idempotency_key(format!("k{}", i % N));
            queue.enqueue(task).await.unwrap().id
        }
    }))
    .buffer_unordered(64)
    .collect()
    .await;
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), N, "one task per idempotency key");

    let completed = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE kind = 'sleep' AND status = 'completed'",
        )
        .fetch_one(&inspect)
        .await
        .unwrap()
    };
    eventually("a quarter done", Duration::from_secs(60), async || {
        (completed().await >= (N / 4) as i64).then_some(())
    })
    .await;
    let at = replicas
        .iter()
        .position(|(p, _)| p.pid() == leader_pid)
        .expect("the leader is one of ours");
    let (mut killed, _) = replicas.remove(at);
    killed.signal(Signal::SIGKILL);
    assert!(completed().await < N as i64, "all done before the kill");
    killed.wait_for_exit(Duration::from_secs(5)).unwrap();
    let killed_at = chrono::Utc::now();
    let t0 = Instant::now();
    let (_, new_id) = eventually("a new leader", Duration::from_secs(15), async || {
        leader(&inspect).await.filter(|l| l.1 != leader_id)
    })
    .await;
    eprintln!("new leader {:?} after kill -9", t0.elapsed());

    let deadline = Instant::now() + Duration::from_secs(120);
    while completed().await < N as i64 {
        assert!(
            Instant::now() < deadline,
            "{} of {N} completed; replicas' logs:\n{}",
            completed().await,
            logs(&replicas)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Only what the killed replica held ran again, once more.
    let rerun: Vec<(i64, i32)> =
        sqlx::query_as("SELECT id, attempt FROM tasks WHERE kind = 'sleep' AND attempt > 1")
            .fetch_all(&inspect)
            .await
            .unwrap();
    for (id, attempt) in &rerun {
        assert_eq!(*attempt, 2, "task {id}");
        let t = queue.get(*id).await.unwrap();
        assert_eq!(
            t.attempts[0].replica.as_deref(),
            Some(leader_id.as_str()),
            "task {id} ran again though its first replica lived"
        );
    }
    eprintln!("{} tasks of the killed replica ran again", rerun.len());
    assert!(!rerun.is_empty(), "the killed replica held no task");

    // Ticks go on under the new leader, none twice.
    eventually(
        "a tick of the new leader",
        Duration::from_secs(10),
        async || {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE fire_at > $1 AND payload->>'scheduled_by' = $2",
            )
            .bind(killed_at)
            .bind(&new_id)
            .fetch_one(&inspect)
            .await
            .unwrap();
            (n > 0).then_some(())
        },
    )
    .await;
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT fire_at FROM tasks WHERE fire_at IS NOT NULL \
         GROUP BY agent_id, fire_at HAVING count(*) > 1) d",
    )
    .fetch_one(&inspect)
    .await
    .unwrap();
    assert_eq!(twice, 0, "a tick was enqueued twice");

    // The statements did go through the pooler, over no more server connections than its
    // pool has, while more clients than that were connected to it.
    let servers = pooler_rows(&bouncer, "SERVERS");
    assert!(
        servers.len() <= POOL_SIZE as usize,
        "{} server connections: {servers:?}",
        servers.len()
    );
    let clients = pooler_rows(&bouncer, "CLIENTS");
    assert!(
        clients.len() > POOL_SIZE as usize,
        "only {} clients on the pooler",
        clients.len()
    );
    drop(replicas);
}

/// A session URL that cannot be reached is an error that names it, before anything runs.
#[tokio::test]
async fn an_unreachable_session_url_is_named() {
    let db = TestDb::new().await;
    let closed = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/x",
        common::free_port()
    );
    for args in [&["migrate"][..], &["serve"][..]] {
        let o = common::harness_at(&db.url)
            .env("HARNESS_DATABASE__SESSION_URL", &closed)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("database.session_url"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("hunter2"), "{args:?}: {stderr}");
    }
}

/// `harness bench` with a session URL: its databases are made and migrated on the session
/// URL, and its replicas and its own statements go through the pooler.
#[tokio::test]
async fn the_queue_benchmark_runs_through_a_transaction_pooler() {
    let Some((server, bouncer)) = pooled_server().await else {
        return;
    };
    let child = common::harness_at(&bouncer.url("harness"))
        .env("HARNESS_DATABASE__SESSION_URL", server.url("harness"))
        .args([
            "bench",
            "--tasks",
            "2000",
            "--latency-samples",
            "20",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["process_per_s"].as_f64().unwrap() > 0.0, "{report}");
    // The pooler served the benchmark's database: its log names each client login.
    let name = format!("harness_bench_{pid}_0");
    let logins = bouncer
        .log
        .text()
        .lines()
        .filter(|l| l.contains(&format!(" {name}/")) && l.contains("login attempt"))
        .count();
    assert!(
        logins > 2,
        "{logins} logins to {name}:\n{}",
        bouncer.log.text()
    );
    let left = db::database_exists(&server.url("postgres"), &name)
        .await
        .unwrap();
    assert!(!left, "the benchmark's database {name} is dropped");
}
