//! Real `harness serve` processes sharing one database: killed, stopped, and counted.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use harness::queue::{NewTask, Queue, Status};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const RESCUE_AFTER_S: u64 = 3;

fn harness(db: &TestDb) -> Command {
    let mut cmd = common::harness_command();
    cmd.env("DATABASE_URL", &db.url)
        .env("HARNESS_TELEMETRY__SAMPLE_INTERVAL_S", "1")
        .env(
            "HARNESS_PERSISTENCE__RESCUE_AFTER_S",
            RESCUE_AFTER_S.to_string(),
        )
        .env("HARNESS_BULK__POLL_INTERVAL_MS", "100")
        .env("HARNESS_BULK__RETRY_ATTEMPTS", "3");
    cmd
}

/// A `harness serve` process, SIGKILLed if the test forgets it.
struct Replica(Child);

impl Replica {
    fn start(db: &TestDb, extra: &[(&str, &str)]) -> Replica {
        let mut cmd = harness(db);
        cmd.arg("serve").stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Replica(cmd.spawn().unwrap())
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.pid()), s).unwrap();
    }
    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} did not exit",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `probe` returns Some, polling the database.
async fn until<T>(within: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn replica_id_of(db: &TestDb, pid: i32) -> String {
    until(
        Duration::from_secs(20),
        "the replica to register",
        async || {
            sqlx::query_scalar::<_, String>("SELECT id FROM replicas WHERE pid = $1")
                .bind(pid)
                .fetch_optional(&db.pool)
                .await
                .unwrap()
        },
    )
    .await
}

#[tokio::test]
async fn kill_9_mid_task_completes_on_another_replica() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let mut a = Replica::start(&db, &[]);
    let a_id = replica_id_of(&db, a.pid()).await;
    let id = q
        .enqueue(NewTask::new("sleep", json!({"ms": 1500})))
        .await
        .unwrap()
        .id;
    until(Duration::from_secs(10), "a to start the task", async || {
        let t = q.get(id).await.unwrap();
        (t.status == Status::Running).then_some(())
    })
    .await;
    assert_eq!(
        q.get(id).await.unwrap().replica.as_deref(),
        Some(a_id.as_str())
    );

    let b = Replica::start(&db, &[]);
    let b_id = replica_id_of(&db, b.pid()).await;
    a.signal(Signal::SIGKILL);
    a.wait(Duration::from_secs(5));
    let killed = Instant::now();

    let t = until(
        Duration::from_secs(20),
        "the task to complete",
        async || {
            let t = q.get(id).await.unwrap();
            (t.status == Status::Completed).then_some(t)
        },
    )
    .await;
    let took = killed.elapsed();
    // rescue_after + a heartbeat/rescue interval + the poll interval + the task's own 1.5 s.
    assert!(
        took < Duration::from_secs(RESCUE_AFTER_S + 1) + Duration::from_millis(100 + 1500 + 1000),
        "completed {took:?} after the kill"
    );
    assert_eq!(t.attempt, 2);
    let history = t.attempts.as_array().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["status"], "lost");
    assert_eq!(history[0]["replica"], a_id.as_str());
    // The completing replica was b: its row is the only one.
    let live: Vec<String> = sqlx::query_scalar("SELECT id FROM replicas")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(live.contains(&b_id));
    drop(b);
}

#[tokio::test]
async fn a_task_longer_than_rescue_after_on_a_live_replica_runs_once() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let _a = Replica::start(&db, &[]);
    let _b = Replica::start(&db, &[]);
    let ms = RESCUE_AFTER_S * 1000 * 2 + 500;
    let id = q
        .enqueue(NewTask::new("sleep", json!({ "ms": ms })))
        .await
        .unwrap()
        .id;
    let t = until(
        Duration::from_secs(30),
        "the long task to finish",
        async || {
            let t = q.get(id).await.unwrap();
            t.status.is_final().then_some(t)
        },
    )
    .await;
    assert_eq!(t.status, Status::Completed);
    assert_eq!(
        t.attempt, 1,
        "never rescued while its replica heartbeats: {t:?}"
    );
    assert!(t.attempts.as_array().unwrap().is_empty());
}

#[tokio::test]
async fn three_replicas_complete_five_thousand_tasks_exactly_once() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let tasks: Vec<NewTask> = (0..5000)
        .map(|i| NewTask::new("echo", json!({ "i": i })).idempotency_key(format!("job-{i}")))
        .collect();
    q.enqueue_many(tasks).await.unwrap();
    let replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&db, &[("HARNESS_BULK__MAX_CONCURRENT", "16")]))
        .collect();
    until(
        Duration::from_secs(120),
        "all 5000 tasks to complete",
        async || {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status <> 'completed'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (left == 0).then_some(())
        },
    )
    .await;
    let (count, max_attempt, histories): (i64, i32, i64) =
        sqlx::query_as("SELECT count(*), max(attempt), count(DISTINCT attempts::text) FROM tasks")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(count, 5000);
    assert_eq!(max_attempt, 1, "every task was claimed exactly once");
    assert_eq!(
        histories, 1,
        "one (empty) attempt history: nothing failed or was rescued"
    );
    // Every result is its own payload: each task ran its own handler once.
    let mismatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE result IS DISTINCT FROM payload")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(mismatched, 0);
    // All three were serving throughout.
    let owners: i64 = sqlx::query_scalar("SELECT count(*) FROM replicas")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(owners, 3);
    drop(replicas);
}

#[tokio::test]
async fn sigterm_drains_and_returns_unstarted_work() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let mut r = Replica::start(
        &db,
        &[
            ("HARNESS_BULK__MAX_CONCURRENT", "2"),
            ("HARNESS_BULK__SHUTDOWN_GRACE_S", "5"),
        ],
    );
    let rid = replica_id_of(&db, r.pid()).await;
    let ids: Vec<i64> = q
        .enqueue_many(vec![NewTask::new("sleep", json!({"ms": 700})); 6])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    until(Duration::from_secs(10), "two tasks running", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'running'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (n == 2).then_some(())
    })
    .await;
    r.signal(Signal::SIGTERM);
    let status = r.wait(Duration::from_secs(10));
    assert!(status.success(), "clean exit: {status}");
    let mut by_status = std::collections::HashMap::<Status, usize>::new();
    for id in &ids {
        let t = q.get(*id).await.unwrap();
        if t.status == Status::Pending {
            assert_eq!(t.attempt, 0, "returned without counting an attempt");
        }
        *by_status.entry(t.status).or_default() += 1;
    }
    assert!(
        by_status.get(&Status::Completed).copied().unwrap_or(0) >= 2,
        "{by_status:?}"
    );
    assert_eq!(
        by_status.get(&Status::Completed).copied().unwrap_or(0)
            + by_status.get(&Status::Pending).copied().unwrap_or(0),
        6,
        "{by_status:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM replicas WHERE id = $1")
        .bind(&rid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "deregistered");
}

fn run(db: &TestDb, args: &[&str]) -> Output {
    harness(db).args(args).output().unwrap()
}

fn json_out(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test]
async fn cli_enqueue_stats_inspect() {
    let db = TestDb::new().await;
    let first = json_out(&run(
        &db,
        &[
            "enqueue",
            "echo",
            r#"{"value": 42}"#,
            "--idempotency-key",
            "k1",
            "--priority",
            "3",
        ],
    ));
    assert_eq!(first["status"], "pending");
    assert_eq!(first["deduplicated"], false);
    let again = json_out(&run(
        &db,
        &[
            "enqueue",
            "echo",
            r#"{"value": 43}"#,
            "--idempotency-key",
            "k1",
        ],
    ));
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["deduplicated"], true);

    let delayed = json_out(&run(
        &db,
        &[
            "enqueue",
            "noop",
            "{}",
            "--delay",
            "1h",
            "--max-retries",
            "0",
        ],
    ));
    let id = delayed["id"].as_i64().unwrap();
    let t = json_out(&run(&db, &["inspect", &id.to_string(), "--json"]));
    assert_eq!(t["max_retries"], 0);
    let created: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(t["created_at"].clone()).unwrap();
    let scheduled: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(t["scheduled_at"].clone()).unwrap();
    assert!((scheduled - created).num_seconds() >= 3599);

    // Bad input: named, non-zero exit, nothing stored.
    let bad = run(&db, &["enqueue", "echo", "{not json"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("the payload is not valid JSON"));
    let unknown = run(&db, &["enqueue", "nope", "{}"]);
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("unknown kind \"nope\"") && err.contains("echo"),
        "{err}"
    );
    let bad_delay = run(&db, &["enqueue", "noop", "{}", "--delay", "soon"]);
    assert!(!bad_delay.status.success());
    assert!(String::from_utf8_lossy(&bad_delay.stderr).contains("--delay"));

    let stats = json_out(&run(&db, &["stats", "--json"]));
    assert_eq!(stats["total"], 2);
    assert_eq!(stats["pending"], 2);

    // The human forms work too.
    let text = run(&db, &["inspect", &id.to_string()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("status        pending"));
    let missing = run(&db, &["inspect", "999999"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("task 999999 not found"));
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let mut r = Replica::start(&db, &[("HARNESS_BULK__SHUTDOWN_GRACE_S", "60")]);
    replica_id_of(&db, r.pid()).await;
    let id = q
        .enqueue(NewTask::new("sleep", json!({"ms": 60_000})))
        .await
        .unwrap()
        .id;
    until(Duration::from_secs(10), "the task to start", async || {
        (q.get(id).await.unwrap().status == Status::Running).then_some(())
    })
    .await;
    r.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        r.0.try_wait().unwrap().is_none(),
        "first signal: draining, not gone"
    );
    let t0 = Instant::now();
    r.signal(Signal::SIGINT);
    let status = r.wait(Duration::from_secs(5));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "exited {:?} after the second signal",
        t0.elapsed()
    );
    assert_eq!(status.code(), Some(130));
    // The abandoned task is left running for other replicas to rescue.
    assert_eq!(q.get(id).await.unwrap().status, Status::Running);
}
