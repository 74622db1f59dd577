//! The governor in a real replica with an injected sampler: throttling, pausing on error
//! bursts, escalation to a test webhook and a test SMTP server, holding until a person
//! resumes, and health rows the whole fleet can see.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDb;
use harness::governor::{Resources, Sampler};
use harness::queue::{NewTask, Status};
use harness::{Config, Harness};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// A sampler whose readings the test sets.
#[derive(Clone)]
struct Scripted(Arc<Mutex<Resources>>);

impl Scripted {
    fn new() -> Scripted {
        Scripted(Arc::new(Mutex::new(Resources {
            memory_percent: 30.0,
            memory_available_mb: 4096,
            cpu_percent: 10.0,
        })))
    }
    fn cpu(&self, pct: f64) {
        self.0.lock().unwrap().cpu_percent = pct;
    }
    fn memory(&self, pct: f64) {
        self.0.lock().unwrap().memory_percent = pct;
    }
}

impl Sampler for Scripted {
    fn sample(&mut self) -> Resources {
        *self.0.lock().unwrap()
    }
}

fn config(db: &TestDb, extra: &[(&str, &str)]) -> Config {
    let logs = common::scratch_home().join(format!("logs-{}", db.name));
    let logs = logs.to_string_lossy().into_owned();
    let mut all = vec![
        ("HARNESS_TELEMETRY__LOG_INTERVAL_S", "1"),
        ("HARNESS_TELEMETRY__LOGS_DIR", logs.as_str()),
        ("HARNESS_GOVERNANCE__WINDOW_S", "2"),
    ];
    all.extend_from_slice(extra);
    db.fast_config(&all)
}

struct Serving {
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    replica: String,
}

impl Serving {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap();
    }
}

/// A replica with `work` (sleeps 200 ms, counts concurrency) and two failing kinds, `fail`
/// and `fail2` (a burst spread over both pauses the replica; one kind's own burst
/// quarantines that kind instead: see tests/agent_runs.rs).
async fn replica(
    db: &TestDb,
    cfg: Config,
    sampler: Scripted,
    work: common::Concurrency,
) -> Serving {
    let h = Harness::builder()
        .config(cfg)
        .pool(db.pool.clone())
        .sampler(Box::new(sampler))
        .handler_with("work", work.handler(200))
        .handler("fail", |_p: Value| async { Err::<Value, _>("boom") })
        .handler("fail2", |_p: Value| async { Err::<Value, _>("bang") })
        .build()
        .await
        .unwrap();
    let replica = h.replica_id().to_string();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        h.serve(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Serving {
        stop: Some(tx),
        done,
        replica,
    }
}

async fn state(db: &TestDb, replica: &str) -> (String, i32) {
    sqlx::query_as("SELECT governor_state, capacity FROM replicas WHERE id = $1")
        .bind(replica)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .unwrap_or(("?".into(), -1))
}

/// `harness <args>` against the test's database.
fn fleet_cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    common::harness_command()
        .args(args)
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap()
}

async fn until(within: Duration, what: &str, mut probe: impl AsyncFnMut() -> bool) {
    common::eventually(what, within, async || probe().await.then_some(())).await
}

/// 400 `work` tasks (200 ms each), and a wait until 8 of them run at once (the replica's
/// capacity in the throttling tests).
async fn fill(db: &TestDb, work: &common::Concurrency) -> harness::queue::Queue {
    let q = harness::queue::Queue::new(db.pool.clone(), 0);
    q.enqueue_many(vec![NewTask::new("work", json!({})); 400])
        .await
        .unwrap();
    until(Duration::from_secs(20), "8 running", async || {
        work.peak() == 8
    })
    .await;
    q
}

#[tokio::test]
async fn high_cpu_lowers_how_many_tasks_run_at_once_and_recovery_restores_it() {
    let db = TestDb::new().await;
    let work = common::Concurrency::default();
    let sampler = Scripted::new();
    let r = replica(
        &db,
        config(&db, &[("HARNESS_BULK__MAX_CONCURRENT", "8")]),
        sampler.clone(),
        work.clone(),
    )
    .await;
    fill(&db, &work).await;

    sampler.cpu(97.0);
    // Two windows of high CPU: 8 → 6 → 4.
    until(Duration::from_secs(15), "throttled to 4", async || {
        state(&db, &r.replica).await == ("throttled".into(), 4)
    })
    .await;
    // Tasks started before the change end; then a few dozen tasks run under the new grant.
    until(Duration::from_secs(20), "at most 4 running", async || {
        work.running() <= 4
    })
    .await;
    work.reset_peak();
    let done = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks WHERE status = 'completed'")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let before = done().await;
    until(Duration::from_secs(30), "40 more tasks done", async || {
        done().await >= before + 40
    })
    .await;
    let p = work.peak();
    assert!(
        (3..=4).contains(&p),
        "after throttling to 4, {p} ran at once"
    );

    sampler.cpu(10.0);
    until(Duration::from_secs(20), "recovered", async || {
        state(&db, &r.replica).await == ("normal".into(), 8)
    })
    .await;
    let events: Vec<String> =
        sqlx::query_scalar("SELECT event FROM governance_events WHERE replica_id = $1 ORDER BY id")
            .bind(&r.replica)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        events.iter().filter(|e| *e == "capacity_changed").count() >= 4,
        "{events:?}"
    );
    r.stop().await;
}

#[tokio::test]
async fn high_memory_throttles_too_and_a_failing_webhook_never_stops_the_replica() {
    let db = TestDb::new().await;
    let work = common::Concurrency::default();
    let sampler = Scripted::new();
    // Escalation goes to a port where nothing listens: every delivery fails.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hook = format!("http://127.0.0.1:{dead_port}/hook");
    let r = replica(
        &db,
        config(
            &db,
            &[
                ("HARNESS_BULK__MAX_CONCURRENT", "8"),
                ("HARNESS_ESCALATION__ENABLED", "true"),
                ("HARNESS_ESCALATION__WEBHOOK_URL", &hook),
                ("HARNESS_ESCALATION__ALLOW_HOSTS", r#"["127.0.0.1"]"#),
                (
                    "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__THRESHOLD",
                    "1",
                ),
                ("HARNESS_GOVERNANCE__HUMAN_REVIEW_AFTER_PAUSE_BURSTS", "1"),
                // The replica's own escalation: no quarantine of the one failing kind.
                (
                    "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__QUARANTINE_SHARE",
                    "0",
                ),
            ],
        ),
        sampler.clone(),
        work.clone(),
    )
    .await;
    let q = fill(&db, &work).await;
    sampler.memory(97.0);
    until(Duration::from_secs(30), "throttled by memory", async || {
        state(&db, &r.replica).await == ("throttled".into(), 4)
    })
    .await;
    sampler.memory(30.0);
    until(Duration::from_secs(30), "recovered", async || {
        state(&db, &r.replica).await == ("normal".into(), 8)
    })
    .await;

    // A failure escalates at once (one burst asks for a person); the webhook is down.
    q.enqueue(NewTask::new("fail", json!({}))).await.unwrap();
    until(Duration::from_secs(30), "holding", async || {
        state(&db, &r.replica).await.0 == "holding"
    })
    .await;
    // The delivery failed, and says so.
    until(
        Duration::from_secs(60),
        "the failed delivery recorded",
        async || {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM governance_events WHERE replica_id = $1 \
             AND event = 'escalation_failed'",
            )
            .bind(&r.replica)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            n >= 1
        },
    )
    .await;
    // The replica goes on: it still heartbeats and answers a resume.
    let beat = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT heartbeat_at FROM replicas WHERE id = $1",
        )
        .bind(&r.replica)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let first = beat().await;
    until(Duration::from_secs(30), "a later heartbeat", async || {
        beat().await > first
    })
    .await;
    let out = fleet_cli(&db, &["fleet", "resume", &r.replica]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until(Duration::from_secs(30), "resumed", async || {
        state(&db, &r.replica).await.0 != "holding"
    })
    .await;
    r.stop().await;
}

/// A test webhook receiver: each request's JSON body arrives on the channel.
async fn webhook() -> (u16, mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if let Some((_, body)) = common::read_http_request(&mut sock, &mut buf).await {
                    let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                }
            });
        }
    });
    (port, rx)
}

/// A test SMTP server (no TLS): each message's text arrives on the channel.
async fn smtp() -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 test ESMTP\r\n").await;
                let mut data = None::<String>;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(d) = data.as_mut() {
                        if line == "." {
                            let _ = tx.send(data.take().unwrap());
                            let _ = w.write_all(b"250 queued\r\n").await;
                        } else {
                            d.push_str(&line);
                            d.push('\n');
                        }
                        continue;
                    }
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 test\r\n",
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go on\r\n"
                        }
                        "QUIT" => {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    let _ = w.write_all(reply).await;
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn error_bursts_pause_then_escalate_and_hold_until_a_person_resumes() {
    let db = TestDb::new().await;
    let (hook_port, mut hooks) = webhook().await;
    let (smtp_port, mut mails) = smtp().await;
    let cfg = config(
        &db,
        &[
            ("HARNESS_BULK__MAX_CONCURRENT", "4"),
            (
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__THRESHOLD",
                "3",
            ),
            (
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__DURATION_S",
                "3",
            ),
            ("HARNESS_GOVERNANCE__HUMAN_REVIEW_AFTER_PAUSE_BURSTS", "3"),
            ("HARNESS_ESCALATION__ENABLED", "true"),
            (
                "HARNESS_ESCALATION__WEBHOOK_URL",
                &format!("http://127.0.0.1:{hook_port}/hook"),
            ),
            ("HARNESS_ESCALATION__ALLOW_HOSTS", r#"["127.0.0.1"]"#),
            ("HARNESS_ESCALATION__EMAIL_TO", "ops@example.test"),
            (
                "HARNESS_ESCALATION__SMTP_URL",
                &format!("smtp://127.0.0.1:{smtp_port}"),
            ),
        ],
    );
    let r = replica(&db, cfg, Scripted::new(), Default::default()).await;
    let q = harness::queue::Queue::new(db.pool.clone(), 0);

    // A burst spread over two kinds (neither has 80% of it) pauses the replica.
    let spread = || {
        vec![
            NewTask::new("fail", json!({})),
            NewTask::new("fail2", json!({})),
            NewTask::new("fail", json!({})),
        ]
    };
    // Burst 1: claims stop for the pause duration, then work resumes.
    q.enqueue_many(spread()).await.unwrap();
    until(Duration::from_secs(10), "paused", async || {
        state(&db, &r.replica).await.0 == "paused"
    })
    .await;
    let paused_at = Instant::now();
    let probe = q.enqueue(NewTask::new("work", json!({}))).await.unwrap().id;
    until(
        Duration::from_secs(10),
        "the probe task to run",
        async || q.get(probe).await.unwrap().status == Status::Completed,
    )
    .await;
    let waited = paused_at.elapsed();
    assert!(
        waited >= Duration::from_millis(2000),
        "work resumed after only {waited:?} of a 3 s pause"
    );

    // Bursts 2 and 3: escalation, then the replica holds.
    for burst in 2..=3 {
        q.enqueue_many(spread()).await.unwrap();
        let want = if burst == 3 { "holding" } else { "paused" };
        until(Duration::from_secs(15), want, async || {
            state(&db, &r.replica).await.0 == want
        })
        .await;
        if burst == 2 {
            until(Duration::from_secs(10), "pause over", async || {
                state(&db, &r.replica).await.0 == "normal"
            })
            .await;
        }
    }
    let hook = tokio::time::timeout(Duration::from_secs(10), hooks.recv())
        .await
        .expect("webhook delivered")
        .unwrap();
    assert_eq!(hook["replica"], r.replica.as_str());
    assert!(
        hook["reason"].as_str().unwrap().contains("error bursts"),
        "{hook}"
    );
    assert_eq!(hook["state"], "holding");
    assert!(
        !hook["samples"].as_array().unwrap().is_empty(),
        "recent samples in {hook}"
    );
    assert!(
        !hook["events"].as_array().unwrap().is_empty(),
        "recent events in {hook}"
    );
    assert_eq!(
        hook["resume_with"],
        format!("harness fleet resume {}", r.replica)
    );
    let mail = tokio::time::timeout(Duration::from_secs(10), mails.recv())
        .await
        .expect("e-mail delivered")
        .unwrap();
    assert!(
        mail.contains("needs review") && mail.contains("ops@example.test"),
        "{mail}"
    );

    // Holding: nothing is claimed, however long it waits.
    let held = q.enqueue(NewTask::new("work", json!({}))).await.unwrap().id;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(q.get(held).await.unwrap().status, Status::Pending);
    assert_eq!(state(&db, &r.replica).await, ("holding".into(), 0));

    // A person resumes it with the CLI.
    let out = fleet_cli(&db, &["fleet", "resume", &r.replica]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until(
        Duration::from_secs(10),
        "the held task to run",
        async || q.get(held).await.unwrap().status == Status::Completed,
    )
    .await;
    assert_eq!(state(&db, &r.replica).await.0, "normal");
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM governance_events WHERE event = 'escalation_delivered'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(delivered, 2, "webhook and e-mail recorded");
    r.stop().await;
}

#[tokio::test]
async fn metrics_rows_of_two_replicas_appear_in_fleet() {
    let db = TestDb::new().await;
    let a = replica(&db, config(&db, &[]), Scripted::new(), Default::default()).await;
    let b = replica(&db, config(&db, &[]), Scripted::new(), Default::default()).await;
    until(Duration::from_secs(10), "metrics from both", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT replica_id) FROM metrics")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        n == 2
    })
    .await;
    let out = fleet_cli(&db, &["fleet", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for id in [&a.replica, &b.replica] {
        let r = fleet
            .iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} missing from {fleet:?}"));
        assert_eq!(r["cpu_percent"], 10.0, "{r}");
        assert_eq!(r["memory_percent"], 30.0, "{r}");
        assert_eq!(r["governor_state"], "normal");
    }
    // And the JSON lines log.
    let logs = common::scratch_home()
        .join(format!("logs-{}", db.name))
        .join("metrics.jsonl");
    let text = std::fs::read_to_string(&logs).unwrap();
    assert!(text.lines().any(|l| l.contains(&a.replica)), "{text}");
    // The operator's, not the agents': nobody else may read them.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&logs), 0o600);
    assert_eq!(mode(logs.parent().unwrap()), 0o700);
    a.stop().await;
    b.stop().await;
}
