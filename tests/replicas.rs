//! Real `harness serve` processes sharing one database: killed, stopped, and counted.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, RESCUE_AFTER_S, TestDb, eventually};
use harness::queue::{AttemptStatus, NewTask, Queue, Status};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

fn harness(db: &TestDb) -> Command {
    harness_at(&db.url)
}

fn harness_at(url: &str) -> Command {
    let mut cmd = common::harness_at(url);
    cmd.env("HARNESS_BULK__RETRY_ATTEMPTS", "3");
    cmd
}

/// A `harness serve` process (stopped with its group when dropped), and its log when kept.
struct Replica(Proc, Option<common::Log>);

impl Replica {
    fn start(db: &TestDb, extra: &[(&str, &str)]) -> Replica {
        Replica::start_at(&db.url, extra)
    }
    fn start_at(url: &str, extra: &[(&str, &str)]) -> Replica {
        let mut cmd = harness_at(url);
        cmd.arg("serve").stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Replica(Proc::spawn(&mut cmd), None)
    }
    /// Started with its warnings collected (see [`Replica::log_contains`]).
    fn start_logged(db: &TestDb, extra: &[(&str, &str)]) -> Replica {
        let mut cmd = harness(db);
        cmd.arg("serve").stdout(Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let (p, log) = Proc::spawn_logged(&mut cmd);
        Replica(p, Some(log))
    }
    fn log_contains(&self, text: &str) -> bool {
        self.1.as_ref().is_some_and(|l| l.contains(text))
    }
    fn pid(&self) -> i32 {
        self.0.pid()
    }
    fn signal(&self, s: Signal) {
        self.0.signal(s);
    }
    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.pid();
        self.0
            .wait_for_exit(within)
            .unwrap_or_else(|| panic!("replica {pid} did not exit within {within:?}"))
    }
}

/// Waits until `probe` returns Some, polling the database.
async fn until<T>(within: Duration, what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    eventually(what, within, probe).await
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

    // The second attempt runs on b, the only replica alive.
    let second = until(Duration::from_secs(20), "the second attempt", async || {
        let t = q.get(id).await.unwrap();
        (t.attempt == 2 && t.status == Status::Running).then_some(t)
    })
    .await;
    assert_eq!(second.replica.as_deref(), Some(b_id.as_str()));
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
    let history = &t.attempts;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, AttemptStatus::Lost);
    assert_eq!(history[0].replica.as_deref(), Some(a_id.as_str()));
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
    assert!(t.attempts.is_empty());
}

#[tokio::test]
async fn three_replicas_complete_five_thousand_tasks_exactly_once() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&db, &[("HARNESS_BULK__MAX_CONCURRENT", "16")]))
        .collect();
    // All three listen before the work arrives, so all three take part.
    replica_ids(&db.pool, 3).await;
    let tasks: Vec<NewTask> = (0..5000)
        .map(|i| NewTask::new("echo", json!({ "i": i })).idempotency_key(format!("job-{i}")))
        .collect();
    q.enqueue_many(tasks).await.unwrap();
    let mut workers = std::collections::HashSet::new();
    until(
        Duration::from_secs(120),
        "all 5000 tasks to complete",
        async || {
            let (left, running): (i64, Vec<String>) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status <> 'completed'), \
                        coalesce(array_agg(DISTINCT locked_by) FILTER (WHERE locked_by IS NOT NULL), '{}') \
                 FROM tasks",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            workers.extend(running);
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
    // The work was shared: each of the three was seen running tasks.
    assert_eq!(workers.len(), 3, "replicas seen running tasks: {workers:?}");
    drop(replicas);
}

#[tokio::test]
async fn sigterm_drains_and_returns_unstarted_work() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut r = Replica::start(
        &db,
        &[
            ("HARNESS_BULK__MAX_CONCURRENT", "2"),
            ("HARNESS_BULK__SHUTDOWN_GRACE_S", "5"),
            ("HARNESS_API__BIND", &bind),
        ],
    );
    let rid = replica_id_of(&db, r.pid()).await;
    let ids: Vec<i64> = q
        .enqueue_many(vec![NewTask::new("sleep", json!({"ms": 3000})); 6])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let running: Vec<i64> = until(Duration::from_secs(20), "two tasks running", async || {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM tasks WHERE status = 'running'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        (ids.len() == 2).then_some(ids)
    })
    .await;
    r.signal(Signal::SIGTERM);
    // While it drains, the replica says it is not ready (Services stop routing to it) and
    // stays healthy (liveness does not kill it mid-drain).
    until(
        Duration::from_secs(5),
        "/readyz to say draining",
        async || {
            let ready = http_get(&bind, "/readyz");
            ready.starts_with("HTTP/1.1 503").then_some(())
        },
    )
    .await;
    assert!(http_get(&bind, "/readyz").contains("draining"));
    for path in ["/healthz", "/metrics", "/api/tasks/stats/summary"] {
        assert!(
            http_get(&bind, path).starts_with("HTTP/1.1 200"),
            "{path} during the drain"
        );
    }
    let status = r.wait(Duration::from_secs(20));
    assert!(status.success(), "clean exit: {status}");
    // The drain's promise, exactly: the two running finished, nothing more was claimed,
    // and the rest is back to pending with no attempt counted.
    for id in &ids {
        let t = q.get(*id).await.unwrap();
        if running.contains(id) {
            assert_eq!((t.status, t.attempt), (Status::Completed, 1), "{t:?}");
        } else {
            assert_eq!((t.status, t.attempt), (Status::Pending, 0), "{t:?}");
        }
    }
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

    // No replica runs against this database: enqueue says the task will wait; with one
    // running it says nothing.
    let lonely = run(&db, &["enqueue", "noop", "{}"]);
    assert!(
        String::from_utf8_lossy(&lonely.stderr).contains("no replica is running"),
        "{}",
        String::from_utf8_lossy(&lonely.stderr)
    );
    let r = Replica::start(&db, &[]);
    replica_id_of(&db, r.pid()).await;
    let served = run(&db, &["enqueue", "noop", "{}"]);
    assert!(
        !String::from_utf8_lossy(&served.stderr).contains("no replica"),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 3);
    let mut r = Replica::start_logged(
        &db,
        &[
            ("HARNESS_BULK__SHUTDOWN_GRACE_S", "60"),
            ("RUST_LOG", "info"),
        ],
    );
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
    until(
        Duration::from_secs(20),
        "the replica to start draining",
        async || r.log_contains("shutting down: no new claims").then_some(()),
    )
    .await;
    assert!(r.0.alive(), "first signal: draining, not gone");
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

async fn replica_ids(pool: &sqlx::PgPool, n: usize) -> Vec<String> {
    until(
        Duration::from_secs(20),
        "the replicas to register",
        async || {
            let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM replicas ORDER BY id")
                .fetch_all(pool)
                .await
                .ok()?;
            (ids.len() == n).then_some(ids)
        },
    )
    .await
}

#[tokio::test]
async fn an_outage_longer_than_rescue_after_reruns_nothing_of_live_replicas() {
    let mut pg = common::RestartableServer::start("outage").await;
    let url = pg.url("outage");
    let replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start_at(&url, &[("HARNESS_BULK__MAX_CONCURRENT", "4")]))
        .collect();
    let pool = harness::db::connect(&url, 2).await.unwrap();
    let ids = replica_ids(&pool, 3).await;
    let q = Queue::new(pool.clone(), 3);
    // Long enough to outlast the outage: 12 tasks fill the three replicas' 4 slots each.
    let tasks = q
        .enqueue_many(vec![NewTask::new("sleep", json!({"ms": 14_000})); 12])
        .await
        .unwrap();
    until(Duration::from_secs(10), "all 12 running", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'running'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 12).then_some(())
    })
    .await;
    pool.close().await;

    pg.down().await;
    // Down for twice rescue_after: every heartbeat is stale when the server comes back.
    tokio::time::sleep(Duration::from_secs(2 * RESCUE_AFTER_S + 2)).await;
    pg.up().await;
    let back = Instant::now();
    let pool = harness::db::connect(&url, 2).await.unwrap();
    let q = Queue::new(pool.clone(), 3);
    let server_back: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT pg_postmaster_start_time()")
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut reconnected = Vec::new();
    for id in &ids {
        until(
            Duration::from_secs(10),
            "each replica to heartbeat",
            async || {
                let at: chrono::DateTime<chrono::Utc> =
                    sqlx::query_scalar("SELECT heartbeat_at FROM replicas WHERE id = $1")
                        .bind(id)
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                (at > server_back).then_some(())
            },
        )
        .await;
        reconnected.push(back.elapsed());
    }
    eprintln!("replicas heartbeating again after {reconnected:?}");
    for e in &tasks {
        let t = until(Duration::from_secs(40), "the task to finish", async || {
            let t = q.get(e.id).await.unwrap();
            t.status.is_final().then_some(t)
        })
        .await;
        assert_eq!(t.status, Status::Completed);
        assert_eq!(
            (t.attempt, t.attempts.len()),
            (1, 0),
            "its owner was alive through the outage: never rescued, never run twice: {:?}",
            t.attempts
        );
    }
    drop(replicas);
    pool.close().await;
    pg.down().await;
}

/// The whole answer to `GET path` from the API at `addr` (empty when it does not answer).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A directory every account may write to (commands run as run uids under root).
fn shared_dir() -> tempfile::TempDir {
    common::agent_writable_dir("harness-effects-")
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Runs a command beside `effects` on whichever replica serves, and waits for it to complete:
/// by then a replica has had time to start anything it was about to.
async fn run_a_marker(q: &Queue, effects: &std::path::Path) {
    let marker = q
        .enqueue(NewTask::new(
            "command",
            json!({"argv": ["sh", "-c", format!("echo marker >> {}.marker", effects.display())]}),
        ))
        .await
        .unwrap()
        .id;
    until(
        Duration::from_secs(20),
        "a to run the next task",
        async || (q.get(marker).await.unwrap().status == Status::Completed).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn a_claim_that_returns_after_a_long_stop_is_not_started() {
    let db = TestDb::new().await;
    // The first claim of this task commits slowly (2 s inside COMMIT), so the test can stop
    // the replica while the claim is committed on the server but not yet answered.
    sqlx::raw_sql(
        "CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.payload ? 'slow_claim' AND NEW.status = 'running' AND NEW.attempt = 1 THEN
                 PERFORM pg_sleep(2);
             END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER slow_claim AFTER UPDATE ON tasks
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_claim();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let dir = shared_dir();
    let effects = common::agent_writable_file(&dir.path().join("effects"));
    let a = Replica::start_logged(&db, &[]);
    let a_id = replica_id_of(&db, a.pid()).await;
    let q = Queue::new(db.pool.clone(), 3);
    let id = q
        .enqueue(NewTask::new(
            "command",
            json!({
                "argv": ["sh", "-c", format!("echo ran >> {}", effects.display())],
                "slow_claim": true,
            }),
        ))
        .await
        .unwrap()
        .id;
    until(Duration::from_secs(10), "the claim's COMMIT", async || {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query = 'COMMIT'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    a.signal(Signal::SIGSTOP);
    // Another replica takes the task over once a's heartbeat is stale, and runs it.
    let mut b = Replica::start(&db, &[]);
    let t = until(
        Duration::from_secs(30),
        "b to complete the task",
        async || {
            let t = q.get(id).await.unwrap();
            (t.status == Status::Completed).then_some(t)
        },
    )
    .await;
    assert_eq!(t.attempt, 2);
    assert_eq!(t.attempts[0].replica.as_deref(), Some(a_id.as_str()));
    assert_eq!(lines(&effects), 1);
    b.signal(Signal::SIGTERM);
    b.wait(Duration::from_secs(10));

    // a wakes up with a claim 'returned' long after it was made.
    a.signal(Signal::SIGCONT);
    until(
        Duration::from_secs(20),
        "a to drop its stale claim (or to run it again)",
        async || (a.log_contains("not starting") || lines(&effects) > 1).then_some(()),
    )
    .await;
    // Give a started command time to leave its mark, should one have been started.
    run_a_marker(&q, &effects).await;
    assert_eq!(
        lines(&effects),
        1,
        "the task ran again on the replica that had been stopped"
    );
}

/// A sandboxed run held up between its attempt's start and its process's start (here: reading
/// the agent's handoff behind a table lock) while its replica is stopped; its task is rescued
/// and completed elsewhere meanwhile. Once resumed, the replica must not start the process —
/// neither a command nor a Python agent (forked from the fork server).
#[tokio::test]
async fn a_run_held_up_before_its_start_does_not_start_after_its_task_was_rescued() {
    let db = TestDb::new().await;
    let dir = shared_dir();
    let effects = common::agent_writable_file(&dir.path().join("effects"));
    let code = dir.path().join("marker.py");
    std::fs::write(
        &code,
        format!(
            "class Agent:\n    def execute(self):\n        open({:?}, 'a').write('py\\n')\n        return {{}}\n",
            effects.display().to_string()
        ),
    )
    .unwrap();
    let command = format!("sh -c 'echo sh >> {}'", effects.display());
    for (name, how, what) in [
        ("marker-sh", "--command", command.as_str()),
        ("marker-py", "--file", code.to_str().unwrap()),
    ] {
        let out = harness(&db)
            .args(["agents", "add", name, "--overlap", "allow", how, what])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A run reads the agent's last handoff before it starts its process: a table lock holds
    // it there, its attempt started but nothing of it spawned.
    let mut handoffs = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE handoffs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *handoffs)
        .await
        .unwrap();
    let a = Replica::start_logged(&db, &[("RUST_LOG", "info")]);
    replica_id_of(&db, a.pid()).await;
    let mut ids = Vec::new();
    for name in ["marker-sh", "marker-py"] {
        let run = harness(&db)
            .args(["agents", "run", name, "--json"])
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        ids.push(
            serde_json::from_slice::<Value>(&run.stdout).unwrap()["id"]
                .as_i64()
                .unwrap(),
        );
    }
    until(
        Duration::from_secs(10),
        "both runs to wait for the handoffs",
        async || {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%FROM handoffs%'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (n >= 2).then_some(())
        },
    )
    .await;
    // The replica stops there; its tasks are rescued and run to the end elsewhere (here, by
    // the test acting as another replica).
    a.signal(Signal::SIGSTOP);
    let q = Queue::new(db.pool.clone(), 3);
    let mut rescued = Vec::new();
    until(
        Duration::from_secs(20),
        "the tasks to be rescued",
        async || {
            rescued.extend(q.rescue(Duration::from_secs(RESCUE_AFTER_S)).await.unwrap());
            (rescued.len() == 2).then_some(())
        },
    )
    .await;
    let claimed = q.claim("other", 2, &["agent".to_string()]).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let completions: Vec<harness::queue::Completion> = claimed
        .iter()
        .map(|c| harness::queue::Completion {
            id: c.id,
            attempt: c.attempt,
            outcome: harness::queue::Outcome::Success(json!({"by": "other"})),
            retry_at: chrono::Utc::now(),
            handoff: None,
        })
        .collect();
    assert_eq!(q.complete("other", &completions).await.unwrap(), 2);
    // The stopped replica's reads are answered; then it runs again, its reconciliation (which
    // would stop the runs once it learns the tasks are gone) held up by a lock on the tasks.
    let mut tasks = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tasks)
        .await
        .unwrap();
    handoffs.commit().await.unwrap();
    a.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    tasks.commit().await.unwrap();
    // Give a started process time to leave its mark, should one have been started.
    run_a_marker(&q, &effects).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::read_to_string(&effects).unwrap(),
        "",
        "the stopped replica started runs after their tasks were rescued and completed"
    );
    assert!(a.log_contains("not starting the run"));
    for id in ids {
        let t = q.get(id).await.unwrap();
        assert_eq!((t.status, t.attempt), (Status::Completed, 2));
        assert_eq!(t.result, Some(json!({"by": "other"})));
    }
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes: only its parent has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn read_pid(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test]
async fn a_killed_replicas_agent_processes_die_with_it_or_at_the_next_start() {
    let db = TestDb::new().await;
    let dir = shared_dir();
    let (sh_pid, bg_pid, cwd) = (
        dir.path().join("sh.pid"),
        dir.path().join("bg.pid"),
        dir.path().join("cwd"),
    );
    let mut a = Replica::start(&db, &[]);
    replica_id_of(&db, a.pid()).await;
    let q = Queue::new(db.pool.clone(), 3);
    let script = format!(
        "pwd > {cwd}; echo $$ > {sh}.tmp && mv {sh}.tmp {sh}; \
         sleep 300 & echo $! > {bg}.tmp && mv {bg}.tmp {bg}; wait",
        cwd = cwd.display(),
        sh = sh_pid.display(),
        bg = bg_pid.display()
    );
    q.enqueue(NewTask::new(
        "command",
        json!({"argv": ["sh", "-c", script]}),
    ))
    .await
    .unwrap();
    let (sh, bg) = until(
        Duration::from_secs(10),
        "the command to start",
        async || Some((read_pid(&sh_pid)?, read_pid(&bg_pid)?)),
    )
    .await;
    let run_dir = std::path::PathBuf::from(std::fs::read_to_string(&cwd).unwrap().trim());
    assert!(run_dir.is_dir());
    a.signal(Signal::SIGKILL);
    a.wait(Duration::from_secs(5));
    // The run's own process dies with its replica (parent-death signal)...
    until(
        Duration::from_secs(3),
        "the command to die with its replica",
        async || (!alive(sh)).then_some(()),
    )
    .await;
    assert!(
        alive(bg),
        "a background child outlives a kill -9 until the next start"
    );
    // ...and what it left behind is reaped by the next replica on this host.
    let _b = Replica::start(&db, &[]);
    until(
        Duration::from_secs(10),
        "the leftover process to be reaped",
        async || (!alive(bg)).then_some(()),
    )
    .await;
    until(
        Duration::from_secs(5),
        "the killed run's directory to be removed",
        async || (!run_dir.exists()).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn a_replica_resumed_after_its_task_was_rescued_stops_its_own_run() {
    let db = TestDb::new().await;
    let dir = shared_dir();
    let pids = common::agent_writable_file(&dir.path().join("pids"));
    let a = Replica::start(&db, &[]);
    let a_id = replica_id_of(&db, a.pid()).await;
    let q = Queue::new(db.pool.clone(), 3);
    let id = q
        .enqueue(NewTask::new(
            "command",
            json!({"argv": ["sh", "-c", format!("echo $$ >> {}; exec sleep 300", pids.display())]}),
        ))
        .await
        .unwrap()
        .id;
    let first = until(
        Duration::from_secs(10),
        "a to start the command",
        async || {
            std::fs::read_to_string(&pids)
                .ok()?
                .lines()
                .next()?
                .trim()
                .parse::<i32>()
                .ok()
        },
    )
    .await;
    // a stops; its run goes on (nothing can stop it while a is stopped) and b takes the
    // task over once a's heartbeat is stale.
    a.signal(Signal::SIGSTOP);
    let _b = Replica::start(&db, &[]);
    until(
        Duration::from_secs(30),
        "b to run the task again",
        async || {
            let t = q.get(id).await.unwrap();
            (t.attempt == 2 && lines(&pids) == 2).then_some(())
        },
    )
    .await;
    assert!(alive(first), "a's run went on while a was stopped");
    assert_eq!(
        q.get(id).await.unwrap().attempts[0].replica.as_deref(),
        Some(a_id.as_str())
    );
    // Once a runs again it learns that the task is no longer its own, and stops its run.
    a.signal(Signal::SIGCONT);
    until(
        Duration::from_secs(10),
        "a to stop the run it no longer owns",
        async || (!alive(first)).then_some(()),
    )
    .await;
    let t = q.get(id).await.unwrap();
    assert_eq!(
        (t.status, t.attempt),
        (Status::Running, 2),
        "b's run is untouched"
    );
}

#[tokio::test]
async fn a_row_a_live_replica_holds_without_knowing_is_given_back_and_run() {
    let db = TestDb::new().await;
    let a = Replica::start_logged(&db, &[("RUST_LOG", "info")]);
    let a_id = replica_id_of(&db, a.pid()).await;
    let q = Queue::new(db.pool.clone(), 3);
    // What a claim whose COMMIT went through but whose answer was lost leaves behind: a row
    // held by a replica that heartbeats and never heard of it. No one would rescue it.
    let id = q
        .enqueue(NewTask::new("echo", json!({"orphan": true})).delay(Duration::from_secs(3600)))
        .await
        .unwrap()
        .id;
    sqlx::query(
        "UPDATE tasks SET status = 'running', locked_by = $2, attempt = 1, started_at = now(), \
         scheduled_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(&a_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let t = until(
        Duration::from_secs(15),
        "the row to be given back and run",
        async || {
            let t = q.get(id).await.unwrap();
            if t.status != Status::Completed {
                eprintln!("{}", a.1.as_ref().unwrap().text());
            }
            (t.status == Status::Completed).then_some(t)
        },
    )
    .await;
    assert_eq!(t.result, Some(json!({"orphan": true})));
    assert_eq!(
        t.attempt, 1,
        "given back without counting an attempt, then run once"
    );
    drop(a);
}
