//! What someone who writes agents relies on, through real `harness` processes and a real
//! PostgreSQL: an agent's own config on every run, run output kept (head and tail) for failed
//! and timed-out runs, output followed live from another replica (CLI and Server-Sent
//! Events), progress mid-run, permanent errors, quarantine of one bad agent while other work
//! flows, and the task commands.

mod common;

use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use harness::queue::{Queue, Status};
use serde_json::{Value, json};

const TOKEN: &str = "agent-runs-token-0123456789";

fn harness(db: &TestDb) -> Command {
    let mut cmd = common::harness_at(&db.url);
    cmd.env(
        "HARNESS_API__TOKENS",
        format!(r#"[{{"token":"{TOKEN}","scope":"admin"}}]"#),
    );
    cmd
}

fn cli(db: &TestDb, args: &[&str]) -> Output {
    harness(db).args(args).output().unwrap()
}

/// Stdout of a command that must succeed.
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn serve(db: &TestDb, env: &[(&str, &str)]) -> common::Proc {
    let mut cmd = harness(db);
    cmd.args(["serve", "--no-api"])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    common::Proc::spawn(&mut cmd)
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

async fn task(db: &TestDb, id: i64) -> harness::queue::Task {
    Queue::new(db.pool.clone(), 0).get(id).await.unwrap()
}

async fn final_task(db: &TestDb, id: i64) -> harness::queue::Task {
    common::wait_final(&db.pool, id, Duration::from_secs(60)).await
}

async fn until_running(db: &TestDb, id: i64) {
    common::eventually("the task to run", Duration::from_secs(30), async || {
        (task(db, id).await.status == Status::Running).then_some(())
    })
    .await;
}

/// Registers Python agent `name` with `code` (written to a directory every account may
/// read) and `args`; the directory.
fn add_python(db: &TestDb, name: &str, code: &str, args: &[&str]) -> tempfile::TempDir {
    let dir = common::agent_writable_dir(&format!("{name}-"));
    let file = write(&dir, "agent.py", code);
    let mut all = vec!["agents", "add", name, "--file", &file];
    all.extend_from_slice(args);
    ok(&cli(db, &all));
    dir
}

/// Enqueues a task through the CLI; its id.
fn enqueue(db: &TestDb, kind: &str, payload: &str, args: &[&str]) -> i64 {
    let mut all = vec!["enqueue", kind, payload];
    all.extend_from_slice(args);
    json_of(&cli(db, &all))["id"].as_i64().unwrap()
}

fn run_id(db: &TestDb, agent: &str, input: Option<&str>) -> i64 {
    let mut args = vec!["agents", "run", agent, "--json"];
    if let Some(i) = input {
        args.extend(["--input", i]);
    }
    json_of(&cli(db, &args))["id"].as_i64().unwrap()
}

const CONFIGURED: &str = "\
import os
class Agent:
    def __init__(self, config):
        self.config = config
    def execute(self):
        marker = (self.input or {}).get('fail_once')
        if marker and not os.path.exists(marker):
            open(marker, 'w').close()
            raise RuntimeError('the first attempt fails')
        return {'name': self.config.get('name')}
";

#[tokio::test]
async fn every_run_receives_the_agents_config_scheduled_manual_and_retried() {
    let db = TestDb::new().await;
    let dir = common::agent_writable_dir("config-");
    let file = write(&dir, "agent.py", CONFIGURED);
    let added = ok(&cli(
        &db,
        &[
            "agents",
            "add",
            "ada",
            "--file",
            &file,
            "--config",
            r#"{"name": "Ada"}"#,
            "--schedule",
            "* * * * * *",
            "--max-retries",
            "1",
        ],
    ));
    // A short confirmation, not the agent's code as JSON.
    assert!(added.starts_with("added agent ada (id "), "{added}");
    assert!(added.contains("next run 20"), "{added}");
    assert!(!added.contains("class Agent"), "{added}");
    let shown = json_of(&cli(&db, &["agents", "show", "ada", "--json"]));
    assert_eq!(shown["config"], json!({"name": "Ada"}));
    assert_eq!(shown["settings"]["schedule"], "* * * * * *");

    let _replica = serve(&db, &[("HARNESS_BULK__RETRY_DELAY_SECONDS", "0")]);
    // A scheduled run.
    let scheduled: i64 = common::eventually(
        "a scheduled run to complete",
        Duration::from_secs(30),
        async || {
            sqlx::query_scalar(
                "SELECT id FROM tasks WHERE fire_at IS NOT NULL AND status = 'completed' LIMIT 1",
            )
            .fetch_optional(&db.pool)
            .await
            .unwrap()
        },
    )
    .await;
    let t = task(&db, scheduled).await;
    assert_eq!(t.result.unwrap()["result"], json!({"name": "Ada"}));
    ok(&cli(&db, &["agents", "pause", "ada"]));

    // A manual run whose first attempt fails: the retry gets the config too.
    let marker = dir.path().join("failed-once");
    let input = json!({"fail_once": marker}).to_string();
    let id = run_id(&db, "ada", Some(&input));
    let t = final_task(&db, id).await;
    assert_eq!(t.status, Status::Completed, "{t:?}");
    assert_eq!((t.attempt, t.retry_count), (2, 1), "it was retried");
    assert_eq!(t.result.unwrap()["result"], json!({"name": "Ada"}));

    // A new config from a file reaches the next run.
    let config_file = write(&dir, "config.json", r#"{"name": "Grace"}"#);
    let updated = ok(&cli(
        &db,
        &["agents", "update", "ada", "--config-file", &config_file],
    ));
    assert!(updated.starts_with("updated agent ada (id "), "{updated}");
    let t = final_task(&db, run_id(&db, "ada", None)).await;
    assert_eq!(t.result.unwrap()["result"], json!({"name": "Grace"}));

    // A command finds the config in its input (stdin).
    ok(&cli(
        &db,
        &[
            "agents",
            "add",
            "cat",
            "--command",
            "cat",
            "--config",
            r#"{"name": "Ada"}"#,
        ],
    ));
    let t = final_task(&db, run_id(&db, "cat", Some(r#"{"n": 1}"#))).await;
    let result = t.result.unwrap()["result"].clone();
    assert_eq!(result["config"], json!({"name": "Ada"}), "{result}");
    assert_eq!(result["input"], json!({"n": 1}), "{result}");

    // Bad configs are refused, naming the option.
    let bad = cli(&db, &["agents", "update", "ada", "--config", "[1, 2]"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--config must be a JSON object"),
        "{bad:?}"
    );
    let bad = cli(&db, &["agents", "update", "ada", "--config", "{nope"]);
    assert!(
        stderr(&bad).contains("--config is not valid JSON"),
        "{bad:?}"
    );
}

const NOISY: &str = "\
import sys
class Agent:
    def execute(self):
        print('first line')
        for i in range(20000):
            print('middle %05d' % i)
        print('last line before the error')
        sys.stderr.write('to stderr\\n')
        raise ValueError('boom')
";

const SLOW: &str = "\
import time
class Agent:
    def execute(self):
        print('started')
        for i in range(20000):
            print('filler %05d' % i)
        for i in range(100):
            print('progress %d/100' % i)
            time.sleep(0.1)
        return {}
";

#[tokio::test]
async fn failed_and_timed_out_runs_keep_the_head_and_tail_of_their_output() {
    let db = TestDb::new().await;
    let dir = common::agent_writable_dir("noisy-");
    let noisy = write(&dir, "noisy.py", NOISY);
    let slow = write(&dir, "slow.py", SLOW);
    for (name, file, timeout) in [("noisy", &noisy, "60s"), ("slow", &slow, "2s")] {
        ok(&cli(
            &db,
            &[
                "agents",
                "add",
                name,
                "--file",
                file,
                "--timeout",
                timeout,
                "--max-retries",
                "0",
            ],
        ));
    }
    let _replica = serve(&db, &[("HARNESS_EXECUTOR__OUTPUT_LIMIT_KB", "16")]);

    let id = run_id(&db, "noisy", None);
    let t = final_task(&db, id).await;
    assert_eq!(t.status, Status::Failed, "{t:?}");
    let logs = cli(&db, &["logs", &id.to_string()]);
    let out = ok(&logs);
    let err = stderr(&logs);
    assert!(
        out.starts_with("first line\nmiddle 00000\n"),
        "the head: {}",
        &out[..100]
    );
    assert!(
        out.trim_end().ends_with("last line before the error"),
        "the tail: {}",
        &out[out.len() - 200..]
    );
    assert!(out.contains(" bytes skipped …]"), "the marker");
    assert!(out.len() < 40 * 1024, "{} bytes shown of 260 KB", out.len());
    assert!(err.contains("to stderr"), "{err}");
    assert!(err.contains("ValueError: boom"), "{err}");
    assert!(
        err.contains(&format!("task {id} failed: ValueError: boom")),
        "{err}"
    );
    // What is stored stays within the limit per stream, whatever the run printed.
    let stored: i64 =
        sqlx::query_scalar("SELECT sum(length(data))::bigint FROM task_logs WHERE task_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        stored <= 2 * 16 * 1024,
        "{stored} bytes stored: the limit per stream"
    );
    // The traceback shows once, without the harness's own frames.
    let inspected = ok(&cli(&db, &["inspect", &id.to_string()]));
    assert_eq!(
        inspected
            .matches("Traceback (most recent call last)")
            .count(),
        1,
        "{inspected}"
    );
    assert!(!inspected.contains("<string>"), "{inspected}");
    assert!(
        inspected.contains(&format!("harness logs {id}")),
        "{inspected}"
    );

    let id = run_id(&db, "slow", None);
    let t = final_task(&db, id).await;
    assert_eq!(t.status, Status::Timeout, "{t:?}");
    let logs = cli(&db, &["logs", &id.to_string()]);
    let out = ok(&logs);
    assert!(
        out.starts_with("started\nfiller 00000\n"),
        "the head: {}",
        &out[..100]
    );
    assert!(out.contains(" bytes skipped …]"), "the marker");
    assert!(
        out.contains("progress 0/100\nprogress 1/100\n") && out.contains("progress 10/100"),
        "the tail, what it printed before the kill: {}",
        &out[out.len() - 400..]
    );
    // The tail is the stream's last 8 KiB: the end of the filler too.
    let tail = out.split(" bytes skipped …]\n").nth(1).unwrap();
    assert!(tail.len() >= 8 * 1024 - 16, "{} bytes of tail", tail.len());
    assert!(
        stderr(&logs).contains(&format!("task {id} timeout")),
        "{logs:?}"
    );
    let json = json_of(&cli(&db, &["logs", &id.to_string(), "--json"]));
    assert_eq!(json["status"], "timeout");
    assert_eq!(json["chunks"][0]["stream"], "stdout");
}

const WAITING: &str = "\
import os, time
class Agent:
    def __init__(self, config):
        self.release = config['release']
    def execute(self):
        print('line one of ' + str(self.input))
        self.progress(0.4, 'fetched 40 pages')
        while not os.path.exists(self.release):
            time.sleep(0.05)
        print('line two')
        return {'ok': True}
";

/// Lines of a child's stdout, as they come.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let done = line.contains(want);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }
    panic!("{want:?} not seen; saw {seen:?}");
}

/// An API with no worker of its own, on this database: another replica's.
async fn api_without_worker(db: &TestDb) -> (String, tokio_util::sync::CancellationToken) {
    let cfg = db.fast_config(&[(
        "HARNESS_API__TOKENS",
        &format!(r#"[{{"token":"{TOKEN}","scope":"admin"}}]"#),
    )]);
    let state = Arc::new(harness::api::ApiState {
        queue: Queue::new(db.pool.clone(), 0),
        agents: None,
        pool: db.pool.clone(),
        tokens: cfg.api.tokens.clone(),
        registry: Default::default(),
        config: cfg.clone(),
        draining: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(harness::api::serve(
        listener,
        harness::api::router(state),
        harness::api::server::ServerLimits::from_config(&cfg.api),
        stop.clone().cancelled_owned(),
    ));
    (format!("http://{addr}"), stop)
}

#[tokio::test]
async fn output_and_progress_are_seen_live_from_another_replica_before_the_run_ends() {
    let db = TestDb::new().await;
    let dir = common::agent_writable_dir("live-");
    let file = write(&dir, "agent.py", WAITING);
    let release = dir.path().join("release");
    let config = json!({"release": release}).to_string();
    ok(&cli(
        &db,
        &[
            "agents",
            "add",
            "live",
            "--file",
            &file,
            "--config",
            &config,
            "--overlap",
            "allow",
        ],
    ));
    let _replica = serve(&db, &[]);
    let (api, _stop) = api_without_worker(&db).await;
    let client = reqwest::Client::new();

    // Two runs, both waiting for the release file.
    let a = run_id(&db, "live", Some(r#""a""#));
    let b = run_id(&db, "live", Some(r#""b""#));
    until_running(&db, a).await;
    until_running(&db, b).await;

    // The CLI follows run a.
    let mut follow = common::Proc::spawn(
        harness(&db)
            .args(["logs", &a.to_string(), "--follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let lines = lines_of(&mut follow.child);
    wait_line(&lines, "line one of a");

    // The API follows run b, as Server-Sent Events.
    let mut sse = client
        .get(format!("{api}/api/tasks/{b}/logs?follow=true"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(
        sse.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut events = String::new();
    while !events.contains("line one of b") || !events.contains("fetched 40 pages") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), sse.chunk())
            .await
            .expect("an event within 30 s")
            .unwrap()
            .expect("the stream goes on");
        events.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(events.contains("event: output"), "{events}");
    assert!(events.contains("event: progress"), "{events}");

    // Progress, mid-run: on the task for the CLI and the API.
    let inspected = json_of(&cli(&db, &["inspect", &a.to_string(), "--json"]));
    assert_eq!(inspected["status"], "running");
    assert_eq!(inspected["progress"]["fraction"], json!(0.4), "{inspected}");
    assert_eq!(inspected["progress"]["message"], "fetched 40 pages");
    let shown: Value = client
        .get(format!("{api}/api/tasks/{b}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["progress"]["message"], "fetched 40 pages", "{shown}");
    // Both lines were seen while both runs still ran.
    assert_eq!(task(&db, a).await.status, Status::Running);
    assert_eq!(task(&db, b).await.status, Status::Running);

    std::fs::write(&release, "").unwrap();
    wait_line(&lines, "line two");
    let status = follow
        .wait_for_exit(Duration::from_secs(30))
        .expect("logs --follow ends with the task");
    assert!(status.success(), "exit 0 for a completed task");
    let mut err = String::new();
    std::io::Read::read_to_string(follow.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains(&format!("task {a} completed")), "{err}");
    while !events.contains("event: end") {
        let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), sse.chunk())
            .await
            .expect("the end within 30 s")
            .unwrap()
        else {
            break;
        };
        events.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(events.contains("line two"), "{events}");
    assert!(events.contains("event: end"), "{events}");
    assert!(events.contains(r#""status":"completed""#), "{events}");

    // The whole record, without follow: JSON with the chunks and the progress.
    let all: Value = client
        .get(format!("{api}/api/tasks/{a}/logs"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["status"], "completed", "{all}");
    assert_eq!(all["progress"]["fraction"], json!(0.4));
    let text: String = all["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["stream"] == "stdout")
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "line one of a\nline two\n");
    // A reconnecting reader resumes after the last chunk it saw (Last-Event-ID, or `after`).
    let first = &all["chunks"][0];
    let seen = format!("{}:{}", first["attempt"], first["seq"]);
    for req in [
        client
            .get(format!("{api}/api/tasks/{a}/logs"))
            .header("last-event-id", &seen),
        client.get(format!("{api}/api/tasks/{a}/logs?after={seen}")),
    ] {
        let rest: Value = req
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rest = rest["chunks"].as_array().unwrap();
        assert_eq!(rest.len() + 1, all["chunks"].as_array().unwrap().len());
        assert!(rest.iter().all(|c| c["seq"] != first["seq"]), "{rest:?}");
    }
    // A bad position is refused, naming the parameter.
    let bad = client
        .get(format!("{api}/api/tasks/{a}/logs?after=later"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    assert!(bad.text().await.unwrap().contains("after"));
}

#[tokio::test]
async fn a_command_reports_progress_through_its_file() {
    let db = TestDb::new().await;
    let dir = common::agent_writable_dir("cmd-progress-");
    let release = dir.path().join("release");
    let script = format!(
        "echo '{{\"fraction\": 0.25, \"message\": \"a quarter\"}}' > \"$HARNESS_PROGRESS_FILE\"; \
         while [ ! -e {} ]; do sleep 0.05; done; \
         echo '{{\"fraction\": 0.5, \"message\": \"half\"}}' > \"$HARNESS_PROGRESS_FILE\"",
        release.display()
    );
    let payload = json!({"argv": ["sh", "-c", script]}).to_string();
    let id = enqueue(&db, "command", &payload, &[]);
    let _replica = serve(&db, &[]);
    let q = Queue::new(db.pool.clone(), 0);
    let p = common::eventually("progress", Duration::from_secs(30), async || {
        q.get_with_progress(id).await.unwrap().progress
    })
    .await;
    assert_eq!(
        (p.progress.fraction, p.progress.message.as_deref()),
        (Some(0.25), Some("a quarter"))
    );
    assert_eq!(task(&db, id).await.status, Status::Running);
    std::fs::write(&release, "").unwrap();
    assert_eq!(final_task(&db, id).await.status, Status::Completed);
    // The report written just before the end is read, and only the latest one is kept.
    let p = q.get_with_progress(id).await.unwrap().progress.unwrap();
    assert_eq!(p.progress.message.as_deref(), Some("half"));
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_logs WHERE task_id = $1 AND stream = 'progress'",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, 1);
}

const PERMANENT: &str = "\
import harness
class Agent:
    def execute(self):
        raise harness.PermanentError('the API key was revoked')
";

#[tokio::test]
async fn a_permanent_error_is_not_retried_and_a_payload_that_can_never_run_is_refused() {
    let db = TestDb::new().await;
    let _dir = add_python(&db, "revoked", PERMANENT, &["--max-retries", "3"]);
    let _replica = serve(&db, &[("HARNESS_BULK__RETRY_DELAY_SECONDS", "0")]);
    let once = |t: &harness::queue::Task| (t.status, t.attempt, t.retry_count);

    let t = final_task(&db, run_id(&db, "revoked", None)).await;
    assert_eq!(once(&t), (Status::Failed, 1, 0), "{t:?}");
    // An agent task enqueued by hand is that agent's run too (its history, its quarantine).
    let agent = json_of(&cli(&db, &["agents", "show", "revoked", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let by_hand = enqueue(&db, "agent", &json!({"agent_id": agent}).to_string(), &[]);
    assert_eq!(task(&db, by_hand).await.agent_id, Some(agent));
    assert!(
        t.error
            .as_deref()
            .unwrap()
            .contains("PermanentError: the API key was revoked"),
        "{t:?}"
    );

    // A command says so with exit code 78 (HARNESS_PERMANENT_EXIT_CODE).
    let payload = json!({"argv": ["sh", "-c", "exit $HARNESS_PERMANENT_EXIT_CODE"]}).to_string();
    let id = enqueue(&db, "command", &payload, &["--max-retries", "3"]);
    let t = final_task(&db, id).await;
    assert_eq!(once(&t), (Status::Failed, 1, 0), "{t:?}");
    // A plain failure is still retried.
    let payload = json!({"argv": ["sh", "-c", "exit 1"]}).to_string();
    let id = enqueue(&db, "command", &payload, &["--max-retries", "2"]);
    assert_eq!(once(&final_task(&db, id).await), (Status::Failed, 3, 2));

    // A program that does not exist (on the replica that runs it): permanent.
    let payload = json!({"argv": ["no-such-program-anywhere"]}).to_string();
    let id = enqueue(&db, "command", &payload, &["--max-retries", "3"]);
    let t = final_task(&db, id).await;
    assert_eq!(once(&t), (Status::Failed, 1, 0), "{t:?}");
    assert!(t.error.unwrap().contains("was not found"));

    // A program the agent's account may not execute: permanent, naming the user and path.
    if nix::unistd::Uid::effective().is_root() {
        let private = tempfile::tempdir().unwrap();
        let script = private.path().join("job.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let payload = json!({"argv": [script]}).to_string();
        let id = enqueue(&db, "command", &payload, &["--max-retries", "3"]);
        let t = final_task(&db, id).await;
        assert_eq!(once(&t), (Status::Failed, 1, 0), "{t:?}");
        let e = t.error.unwrap();
        assert!(e.contains("permission denied"), "{e}");
        assert!(e.contains("uid "), "names the account: {e}");
        assert!(
            e.contains(&script.display().to_string()),
            "names the path: {e}"
        );
    }

    // Payloads a kind can never run are refused before anything is stored.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for (kind, payload, says) in [
        ("sleep", r#"{"ms": "abc"}"#, "payload.ms"),
        (
            "command",
            r#"{"argv": ["ls"], "timeout_s": 0}"#,
            "payload.timeout_s",
        ),
        ("command", r#"{"argv": "ls"}"#, "payload.argv"),
        ("agent", r#"{"input": 1}"#, "payload.agent_id"),
    ] {
        let o = cli(&db, &["enqueue", kind, payload]);
        assert!(!o.status.success(), "{kind} {payload}");
        assert!(
            stderr(&o).contains(says),
            "{kind} {payload}: {}",
            stderr(&o)
        );
    }
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(before, after);
}

const BROKEN: &str = "\
class Agent:
    def execute(self):
        raise RuntimeError('always broken')
";

async fn events(db: &TestDb, event: &str) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT reason, detail FROM governance_events WHERE event = $1 ORDER BY id")
        .bind(event)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_failing_agent_is_quarantined_fleet_wide_while_other_work_flows() {
    let db = TestDb::new().await;
    let _dir = add_python(
        &db,
        "broken",
        BROKEN,
        &["--max-retries", "0", "--overlap", "allow"],
    );
    let _replica = serve(
        &db,
        &[
            (
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__THRESHOLD",
                "4",
            ),
            (
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__DURATION_S",
                "120",
            ),
            ("HARNESS_GOVERNANCE__WINDOW_S", "60"),
            ("HARNESS_GOVERNANCE__HUMAN_REVIEW_AFTER_PAUSE_BURSTS", "2"),
        ],
    );
    for _ in 0..4 {
        run_id(&db, "broken", None);
    }
    let quarantined = common::eventually("a quarantine", Duration::from_secs(30), async || {
        events(&db, "quarantined").await.pop()
    })
    .await;
    assert!(quarantined.0.contains("4 of 4 failures"), "{quarantined:?}");

    // The replica goes on: an unrelated task completes within a second of being enqueued.
    let replica: (String,) = sqlx::query_as("SELECT governor_state FROM replicas")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(replica.0, "normal");
    let echo = enqueue(&db, "echo", r#"{"v": 1}"#, &[]);
    let t = final_task(&db, echo).await;
    assert_eq!(t.status, Status::Completed);
    let took = t.completed_at.unwrap() - t.created_at;
    assert!(took < chrono::TimeDelta::seconds(1), "the echo took {took}");

    // The agent's next run waits (not run, not failed); everybody can see why.
    let waiting = run_id(&db, "broken", None);
    common::eventually(
        "the run to be put back",
        Duration::from_secs(30),
        async || {
            let t = task(&db, waiting).await;
            (t.status == Status::Pending && t.scheduled_at > chrono::Utc::now()).then_some(())
        },
    )
    .await;
    let listed = ok(&cli(&db, &["agents", "list"]));
    assert!(listed.starts_with("NAME"), "a header: {listed}");
    assert!(listed.contains("quarantined until"), "{listed}");
    let listed = json_of(&cli(&db, &["agents", "list", "--json"]));
    assert!(listed[0]["quarantine"]["until"].is_string(), "{listed}");
    let fleet = ok(&cli(&db, &["fleet"]));
    assert!(fleet.contains("quarantined: agent broken until"), "{fleet}");

    // A person lifts it: the waiting run runs (and fails) again.
    let resumed = ok(&cli(&db, &["agents", "resume", "broken"]));
    assert!(resumed.contains("lifted its quarantine"), "{resumed}");
    assert_eq!(final_task(&db, waiting).await.status, Status::Failed);

    // A second burst of the same agent within the escalation window: escalated, and held
    // until a person lifts it.
    for _ in 0..4 {
        run_id(&db, "broken", None);
    }
    let escalated = common::eventually("an escalation", Duration::from_secs(30), async || {
        events(&db, "escalated").await.pop()
    })
    .await;
    assert_eq!(
        escalated.1["target"]["agent_id"], quarantined.1["agent_id"],
        "{escalated:?}"
    );
    let fleet = ok(&cli(&db, &["fleet"]));
    assert!(fleet.contains("until a person lifts it"), "{fleet}");
    let replica: (String,) = sqlx::query_as("SELECT governor_state FROM replicas")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(replica.0, "normal", "the replica itself does not hold");
}

#[tokio::test]
async fn tasks_can_be_listed_cancelled_retried_and_removed_from_the_cli() {
    let db = TestDb::new().await;
    let later = enqueue(&db, "echo", "{}", &["--delay", "1h"]);
    let failing = json!({"argv": ["sh", "-c", "echo nope >&2; exit 1"]}).to_string();
    let failed = enqueue(&db, "command", &failing, &["--max-retries", "0"]);
    let _replica = serve(&db, &[]);
    assert_eq!(final_task(&db, failed).await.status, Status::Failed);

    let listed = ok(&cli(&db, &["tasks", "list"]));
    let mut lines = listed.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{listed}"
    );
    assert_eq!(lines.count(), 2, "{listed}");
    assert!(listed.contains("nope"), "the error's last line: {listed}");
    let stats = ok(&cli(&db, &["stats"]));
    assert!(stats.starts_with("STATUS"), "a header: {stats}");
    let fleet = ok(&cli(&db, &["fleet"]));
    assert!(fleet.starts_with("REPLICA"), "a header: {fleet}");
    let pending = json_of(&cli(
        &db,
        &["tasks", "list", "--status", "pending", "--json"],
    ));
    assert_eq!(pending.as_array().unwrap().len(), 1);
    assert_eq!(pending[0]["id"], later);
    let bad = cli(&db, &["tasks", "list", "--status", "done"]);
    assert!(stderr(&bad).contains("allowed pending, running"), "{bad:?}");

    let retried = ok(&cli(&db, &["tasks", "retry", &failed.to_string()]));
    assert!(
        retried.starts_with(&format!("retrying task {failed} as task ")),
        "{retried}"
    );
    let new: i64 = retried.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert_eq!(final_task(&db, new).await.status, Status::Failed);

    let cancelled = ok(&cli(&db, &["tasks", "cancel", &later.to_string()]));
    assert_eq!(cancelled.trim(), format!("task {later} is cancelled"));
    ok(&cli(&db, &["tasks", "rm", &later.to_string()]));
    let gone = cli(&db, &["inspect", &later.to_string()]);
    assert!(!gone.status.success());
    ok(&cli(&db, &["tasks", "rm", &failed.to_string()]));
    let logs: i64 = sqlx::query_scalar("SELECT count(*) FROM task_logs WHERE task_id = $1")
        .bind(failed)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(logs, 0, "its output went with it");
}

#[tokio::test]
async fn a_manual_run_that_overlap_will_skip_says_so_and_agents_list_shows_the_last_run() {
    let db = TestDb::new().await;
    let dir = common::agent_writable_dir("overlap-");
    let release = dir.path().join("release");
    let config = json!({"release": release}).to_string();
    let _agent_dir = add_python(&db, "slowpoke", WAITING, &["--config", &config]);
    let _replica = serve(&db, &[]);
    let first = run_id(&db, "slowpoke", None);
    until_running(&db, first).await;
    let second = cli(&db, &["agents", "run", "slowpoke"]);
    let said = ok(&second);
    assert!(
        said.starts_with("enqueued run of agent slowpoke as task "),
        "{said}"
    );
    let warned = stderr(&second);
    assert!(
        warned.contains(&format!("agent slowpoke is running now (task {first})"))
            && warned.contains("will be skipped"),
        "{warned}"
    );
    let skipped: i64 = said.split_whitespace().nth(7).unwrap().parse().unwrap();
    let t = final_task(&db, skipped).await;
    assert_eq!(t.status, Status::Cancelled, "{t:?}");
    assert!(t.error.unwrap().contains("overlap: skip"));
    std::fs::write(&release, "").unwrap();
    assert_eq!(final_task(&db, first).await.status, Status::Completed);
    // The newest run is the skipped one: the table says so, with a header.
    let listed = ok(&cli(&db, &["agents", "list"]));
    let header = listed.lines().next().unwrap();
    for column in [
        "NAME", "STATE", "SCHEDULE", "NEXT RUN", "LAST RUN", "RUNTIME",
    ] {
        assert!(header.contains(column), "{listed}");
    }
    assert!(
        listed.contains("cancelled 20"),
        "the last run and when: {listed}"
    );
    let listed = json_of(&cli(&db, &["agents", "list", "--json"]));
    assert_eq!(listed[0]["last_run"]["status"], "cancelled", "{listed}");
}
