//! Agents: the sandboxed executor against hostile code, the registry's validation, and runs
//! handing state to each other through real `harness serve` processes.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use harness::executor::{ExecStatus, Executor, RunSpec, Runtime};
use serde_json::{Value, json};

fn executor() -> Executor {
    let cfg = harness::Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
    Executor::new(&cfg.executor).unwrap()
}

fn python(code: &str) -> RunSpec {
    RunSpec::new(
        Runtime::Python {
            code: code.to_string(),
        },
        &executor(),
    )
}

#[tokio::test]
async fn success_with_config_input_and_handoff() {
    let mut spec = python(
        "class Agent:\n    def __init__(self, config):\n        self.config = config\n\
         \x20   async def execute(self):\n        print('noise on stdout')\n\
         \x20       return {'name': self.config['name'], 'input': self.input,\n\
         \x20               'prev': self.handoff['state']['count']}\n",
    );
    spec.config = json!({"name": "Ada"});
    spec.input = json!({"n": 1});
    spec.handoff = json!({"run_number": 4, "state": {"count": 41}});
    let r = executor().run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    assert_eq!(
        r.result,
        Some(json!({"name": "Ada", "input": {"n": 1}, "prev": 41}))
    );
    assert_eq!(
        r.stdout, "noise on stdout\n",
        "prints never corrupt the result"
    );
    assert_eq!(r.exit_code, Some(0));
}

#[tokio::test]
async fn an_agent_without_config_parameter_is_built_with_none() {
    let r = executor()
        .run(&python(
            "class Agent:\n    def execute(self):\n        return {'ok': True}\n",
        ))
        .await
        .unwrap();
    assert_eq!(r.result, Some(json!({"ok": true})), "{r:?}");
}

#[tokio::test]
async fn exceptions_and_bad_results_are_errors_with_the_reason() {
    let e = executor();
    let r = e
        .run(&python(
            "class Agent:\n    def execute(self):\n        raise ValueError('bad things')\n",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, ExecStatus::Error);
    let err = r.error.unwrap();
    assert!(
        err.contains("Traceback") && err.contains("ValueError: bad things"),
        "{err}"
    );

    let r = e
        .run(&python(
            "class Agent:\n    def execute(self):\n        return [1, 2]\n",
        ))
        .await
        .unwrap();
    assert!(r.error.unwrap().contains("must return a dict"));

    let r = e
        .run(&python(
            "class Agent:\n    def execute(self):\n        return {'x': object()}\n",
        ))
        .await
        .unwrap();
    assert!(r.error.unwrap().contains("not JSON-serialisable"));

    let r = e.run(&python("class NotAgent:\n    pass\n")).await.unwrap();
    assert!(r.error.unwrap().contains("class named Agent"));
}

fn gone(pid: i32) -> bool {
    // Dead, or a zombie waiting for init to reap it: either way it runs no more.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn timeout_kills_the_agent_and_its_grandchild() {
    let mut spec = python(
        "import subprocess, time, os\nclass Agent:\n    def execute(self):\n\
         \x20       p = subprocess.Popen(['sleep', '300'])\n\
         \x20       print(os.getpid(), p.pid, flush=True)\n\
         \x20       time.sleep(300)\n        return {}\n",
    );
    spec.timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let r = executor().run(&spec).await.unwrap();
    // The timeout and the kill grace, with slack for a busy machine: far from the 300 s the
    // agent would sleep.
    assert!(
        t0.elapsed() < Duration::from_secs(1 + executor().kill_grace.as_secs() + 10),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(r.status, ExecStatus::Timeout, "{r:?}");
    let pids: Vec<i32> = r
        .stdout
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{r:?}");
    common::eventually(
        "the agent and its grandchild to die",
        Duration::from_secs(10),
        async || pids.iter().all(|p| gone(*p)).then_some(()),
    )
    .await;
}

/// An executor with rlimits only (no cgroups), whatever the host offers.
fn rlimit_executor() -> Executor {
    let cfg = harness::Config::load_from(
        None,
        [("HARNESS_EXECUTOR__CGROUPS".to_string(), "false".to_string())],
    )
    .unwrap();
    Executor::new(&cfg.executor).unwrap()
}

#[tokio::test]
async fn a_two_gigabyte_allocation_under_256_mb_is_an_error_and_the_host_is_fine() {
    for e in [executor(), rlimit_executor()] {
        let mut spec = python(
            "class Agent:\n    def execute(self):\n        x = bytearray(2 * 1024**3)\n        return {'n': len(x)}\n",
        );
        spec.memory_mb = 256;
        let r = e.run(&spec).await.unwrap();
        assert_eq!(r.status, ExecStatus::Error);
        let error = r.error.unwrap();
        if e.isolation.cgroup_memory {
            // The cgroup's OOM killer ends the run.
            assert!(
                error.starts_with("memory limit exceeded (256 MB)"),
                "{error}"
            );
        } else {
            // RLIMIT_AS refuses the allocation.
            assert!(error.contains("MemoryError"), "{error}");
        }
        // The executor carries on.
        let ok = e
            .run(&python(
                "class Agent:\n    def execute(self):\n        return {}\n",
            ))
            .await
            .unwrap();
        assert_eq!(ok.status, ExecStatus::Success);
    }
}

#[tokio::test]
async fn a_hundred_megabytes_of_stdout_is_truncated_and_the_run_completes() {
    let mut spec = python(
        "import sys\nclass Agent:\n    def execute(self):\n        line = 'x' * 1023 + '\\n'\n\
         \x20       for _ in range(100 * 1024):\n            sys.stdout.write(line)\n\
         \x20       return {'done': True}\n",
    );
    spec.timeout = Duration::from_secs(60);
    let r = executor().run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{:?}", r.error);
    assert_eq!(r.result, Some(json!({"done": true})));
    assert!(r.stdout.len() < 300 * 1024, "kept {} bytes", r.stdout.len());
    // The first and the last 128 KiB are kept; the middle is counted.
    let marker = format!("\n[… {} bytes skipped …]\n", 100 * 1024 * 1024 - 256 * 1024);
    let (head, tail) = r.stdout.split_once(&marker).expect("the skipped marker");
    assert_eq!((head.len(), tail.len()), (128 * 1024, 128 * 1024));
    assert!(tail.ends_with(&format!("{}\n", "x".repeat(1023))));
}

#[tokio::test]
async fn a_command_gets_its_input_and_reports_through_stdout_or_the_result_file() {
    let e = executor();
    let mut spec = RunSpec::new(
        Runtime::Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "read line; echo progress; echo \"{\\\"got\\\": $line}\"".into(),
            ],
        },
        &e,
    );
    spec.input = json!({"n": 7});
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    assert_eq!(r.result.unwrap()["got"]["input"], json!({"n": 7}));

    let spec = RunSpec::new(
        Runtime::Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo '{\"via\": \"file\"}' > \"$HARNESS_RESULT_FILE\"; echo not-json".into(),
            ],
        },
        &e,
    );
    assert_eq!(
        e.run(&spec).await.unwrap().result,
        Some(json!({"via": "file"}))
    );

    let spec = RunSpec::new(
        Runtime::Command {
            argv: vec!["sh".into(), "-c".into(), "echo oops >&2; exit 3".into()],
        },
        &e,
    );
    let r = e.run(&spec).await.unwrap();
    assert_eq!((r.status, r.exit_code), (ExecStatus::Error, Some(3)));
    assert!(r.error.unwrap().contains("exit code 3; stderr:\noops"));
}

// ---- through the binary -------------------------------------------------------------

fn harness(db: &TestDb) -> Command {
    let mut cmd = common::harness_at(&db.url);
    cmd.env(
        "HARNESS_API__TOKENS",
        r#"[{"token":"secret-token-0123456789","scope":"admin"}]"#,
    );
    cmd
}

fn run(db: &TestDb, args: &[&str]) -> Output {
    harness(db).args(args).output().unwrap()
}

fn ok_json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn serve(db: &TestDb) -> common::Proc {
    common::Proc::spawn(
        harness(db)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

async fn finished(db: &TestDb, id: i64) -> harness::queue::Task {
    let q = harness::queue::Queue::new(db.pool.clone(), 0);
    let what = format!("task {id} to finish");
    common::eventually(&what, Duration::from_secs(60), async || {
        let t = q.get(id).await.unwrap();
        t.status.is_final().then_some(t)
    })
    .await
}

async fn running(db: &TestDb, id: i64) {
    let q = harness::queue::Queue::new(db.pool.clone(), 0);
    let what = format!("task {id} to run");
    common::eventually(&what, Duration::from_secs(30), async || {
        (q.get(id).await.unwrap().status == harness::queue::Status::Running).then_some(())
    })
    .await
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[tokio::test]
async fn bad_agents_are_refused_before_anything_is_stored() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let syntax = write(
        &dir,
        "s.py",
        "class Agent:\n    def execute(self)\n        return {}\n",
    );
    let noclass = write(&dir, "n.py", "def execute():\n    return {}\n");
    let good = write(
        &dir,
        "g.py",
        "class Agent:\n    def execute(self):\n        return {}\n",
    );
    for (args, needle) in [
        (
            vec!["agents", "add", "a1", "--file", &syntax],
            "invalid code: line 2",
        ),
        (
            vec!["agents", "add", "a2", "--file", &noclass],
            "invalid code: defines no top-level class Agent",
        ),
        (
            vec![
                "agents",
                "add",
                "a3",
                "--command",
                "no-such-program-xyz --flag",
            ],
            "invalid command: program \"no-such-program-xyz\" not found",
        ),
        (
            vec![
                "agents",
                "add",
                "a4",
                "--file",
                &good,
                "--schedule",
                "61 * * * *",
            ],
            "invalid schedule",
        ),
        (
            vec![
                "agents",
                "add",
                "a5",
                "--file",
                &good,
                "--schedule",
                "* * *",
            ],
            "expected 5",
        ),
        (
            vec!["agents", "add", "a6", "--file", &good, "--timeout", "25h"],
            "invalid timeout",
        ),
        (
            vec!["agents", "add", "a7", "--file", &good, "--memory-mb", "8"],
            "invalid memory_mb: 8 is out of range; allowed 16 to 65536",
        ),
        (
            vec![
                "agents",
                "add",
                "a8",
                "--file",
                &good,
                "--cpu-percent",
                "150",
            ],
            "invalid cpu_percent",
        ),
        (
            vec!["agents", "add", "bad name", "--file", &good],
            "invalid name",
        ),
        (
            vec![
                "agents",
                "add",
                "a9",
                "--file",
                &good,
                "--timezone",
                "Mars/Base",
            ],
            "invalid timezone",
        ),
        (
            vec![
                "agents",
                "add",
                "a10",
                "--file",
                &good,
                "--env",
                "HARNESS_X=1",
            ],
            "invalid env",
        ),
        (
            vec![
                "agents",
                "add",
                "a11",
                "--file",
                &good,
                "--overlap",
                "sometimes",
            ],
            "\"sometimes\" is not an overlap; use skip, queue or allow",
        ),
    ] {
        let o = run(&db, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // A good one is stored, and a second of the same name is refused.
    ok_json(&run(
        &db,
        &["agents", "add", "good", "--file", &good, "--json"],
    ));
    let dup = run(&db, &["agents", "add", "good", "--file", &good]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
}

#[tokio::test]
async fn runs_hand_state_forward_and_a_failed_run_keeps_it() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = write(
        &dir,
        "counter.py",
        "import os\nclass Agent:\n    def execute(self):\n\
         \x20       prev = (self.handoff or {}).get('state') or {}\n\
         \x20       if (self.input or {}).get('fail'):\n            raise RuntimeError('asked to fail')\n\
         \x20       leaked = [k for k in os.environ if 'DATABASE' in k or 'TOKEN' in k]\n\
         \x20       return {'state': {'count': prev.get('count', 0) + 1}, 'summary': 'ok',\n\
         \x20               'leaked': leaked, 'env': os.environ.get('GREETING')}\n",
    );
    ok_json(&run(
        &db,
        &[
            "agents",
            "add",
            "counter",
            "--file",
            &agent,
            "--env",
            "GREETING=hi",
            "--max-retries",
            "0",
            "--json",
        ],
    ));
    let _replica = serve(&db);
    let mut runs = Vec::new();
    for _ in 0..3 {
        let id = ok_json(&run(&db, &["agents", "run", "counter", "--json"]))["id"]
            .as_i64()
            .unwrap();
        let t = finished(&db, id).await;
        assert_eq!(t.status, harness::queue::Status::Completed, "{t:?}");
        runs.push(t);
    }
    let last = runs[2].result.clone().unwrap();
    assert_eq!(last["result"]["state"]["count"], 3);
    assert_eq!(
        last["result"]["leaked"],
        json!([]),
        "the agent saw no database URL or token"
    );
    assert_eq!(last["result"]["env"], "hi");
    let h = ok_json(&run(&db, &["agents", "handoff", "counter", "--json"]));
    assert_eq!(
        (h["run_number"].as_i64(), &h["state"]),
        (Some(3), &json!({"count": 3}))
    );
    assert_eq!(h["summary"], "ok");

    // A failing run leaves the handoff as it was.
    let id = ok_json(&run(
        &db,
        &[
            "agents",
            "run",
            "counter",
            "--input",
            r#"{"fail": true}"#,
            "--json",
        ],
    ))["id"]
        .as_i64()
        .unwrap();
    let t = finished(&db, id).await;
    assert_eq!(t.status, harness::queue::Status::Failed);
    assert!(t.error.unwrap().contains("asked to fail"));
    let h = ok_json(&run(&db, &["agents", "handoff", "counter", "--json"]));
    assert_eq!(
        (h["run_number"].as_i64(), &h["state"]),
        (Some(3), &json!({"count": 3}))
    );

    // --clear forgets it: the next run starts from nothing.
    assert!(
        run(&db, &["agents", "handoff", "counter", "--clear"])
            .status
            .success()
    );
    let id = ok_json(&run(&db, &["agents", "run", "counter", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let t = finished(&db, id).await;
    assert_eq!(t.result.unwrap()["result"]["state"]["count"], 1);
}

#[tokio::test]
async fn the_readme_example_runs_through_agents_add_and_run() {
    let db = TestDb::new().await;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello_agent.py");
    ok_json(&run(
        &db,
        &[
            "agents",
            "add",
            "hello",
            "--file",
            example,
            "--schedule",
            "*/15 * * * *",
            "--json",
        ],
    ));
    let list = run(&db, &["agents", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("hello"));
    let _replica = serve(&db);
    let id = ok_json(&run(&db, &["agents", "run", "hello", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let t = finished(&db, id).await;
    assert_eq!(t.status, harness::queue::Status::Completed, "{t:?}");
    assert_eq!(t.result.unwrap()["result"]["greeting"], "Hello, world!");
    // `exec` runs the same file without a database.
    let o = common::harness_command()
        .args([
            "exec",
            example,
            "--config",
            r#"{"name": "Ada"}"#,
            "--state",
            r#"{"count": 41}"#,
        ])
        .output()
        .unwrap();
    let r = ok_json(&o);
    assert_eq!(r["result"]["state"]["count"], 42);
    assert_eq!(r["result"]["greeting"], "Hello, Ada!");
}

#[tokio::test]
async fn overlapping_runs_are_skipped_by_default() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let slow = write(
        &dir,
        "slow.py",
        "import time\nclass Agent:\n    def execute(self):\n        time.sleep(1.5)\n        return {}\n",
    );
    ok_json(&run(
        &db,
        &["agents", "add", "slow", "--file", &slow, "--json"],
    ));
    let _replica = serve(&db);
    let first = ok_json(&run(&db, &["agents", "run", "slow", "--json"]))["id"]
        .as_i64()
        .unwrap();
    running(&db, first).await;
    let second = ok_json(&run(&db, &["agents", "run", "slow", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let t2 = finished(&db, second).await;
    assert_eq!(t2.status, harness::queue::Status::Cancelled, "{t2:?}");
    assert!(t2.error.unwrap().contains("still running (overlap: skip)"));
    assert_eq!(
        finished(&db, first).await.status,
        harness::queue::Status::Completed
    );
}

#[tokio::test]
async fn overlap_allow_runs_alongside() {
    let db = TestDb::new().await;
    let dir = common::agent_writable_dir("harness-pair-");
    // Each run waits until the other has started, so only runs alongside each other finish.
    let marker = dir.path().join("started");
    let code = format!(
        "import os, time\nclass Agent:\n    def execute(self):\n\
         \x20       open('{m}-' + str(os.getpid()), 'w').close()\n\
         \x20       d = os.path.dirname('{m}')\n\
         \x20       while len([f for f in os.listdir(d) if f.startswith('started-')]) < 2:\n\
         \x20           time.sleep(0.05)\n        return {{}}\n",
        m = marker.display()
    );
    let file = write(&dir, "pair.py", &code);
    ok_json(&run(
        &db,
        &[
            "agents",
            "add",
            "pair",
            "--file",
            &file,
            "--overlap",
            "allow",
            "--timeout",
            "60s",
            "--json",
        ],
    ));
    let _replica = serve(&db);
    let first = ok_json(&run(&db, &["agents", "run", "pair", "--json"]))["id"]
        .as_i64()
        .unwrap();
    running(&db, first).await;
    let second = ok_json(&run(&db, &["agents", "run", "pair", "--json"]))["id"]
        .as_i64()
        .unwrap();
    for id in [first, second] {
        let t = finished(&db, id).await;
        assert_eq!(t.status, harness::queue::Status::Completed, "{t:?}");
    }
}

#[tokio::test]
async fn agents_update_changes_the_schedule_and_a_resumed_agent_owes_no_catch_up_run() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "a.py",
        "class Agent:\n    def execute(self):\n        return {}\n",
    );
    ok_json(&run(
        &db,
        &["agents", "add", "sched", "--file", &file, "--json"],
    ));
    let updated = ok_json(&run(
        &db,
        &[
            "agents",
            "update",
            "sched",
            "--schedule",
            "* * * * * *",
            "--json",
        ],
    ));
    assert_eq!(updated["settings"]["schedule"], "* * * * * *");
    let shown = ok_json(&run(&db, &["agents", "show", "sched", "--json"]));
    assert_eq!(shown["settings"]["schedule"], "* * * * * *");
    assert!(shown["next_fire_at"].is_string(), "{shown}");

    // Paused for a few seconds of ticks, then resumed: no run for the ticks it was paused.
    assert!(run(&db, &["agents", "pause", "sched"]).status.success());
    let fires = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT fire_at FROM tasks WHERE fire_at IS NOT NULL ORDER BY fire_at",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let _replica = serve(&db);
    let leader = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM replicas WHERE is_leader")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    common::eventually("a leader", Duration::from_secs(30), async || {
        (leader().await == 1).then_some(())
    })
    .await;
    // Three ticks pass while it is paused: this wait is the scenario.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(fires().await.is_empty(), "a paused agent fired");
    let resumed = chrono::Utc::now();
    assert!(run(&db, &["agents", "resume", "sched"]).status.success());
    let f = common::eventually("a run after resume", Duration::from_secs(30), async || {
        let f = fires().await;
        (!f.is_empty()).then_some(f)
    })
    .await;
    // Every run is for a tick after the resume (to the second the tick is on).
    assert!(
        f[0] > resumed - chrono::Duration::seconds(1),
        "a catch-up run for {} (resumed {resumed})",
        f[0]
    );
}

#[tokio::test]
async fn awkward_json_round_trips_through_the_runner() {
    let deep = (0..100).fold(json!("bottom"), |v, _| json!([v]));
    let input = json!({
        "quotes": "she said \"hi\" \\ back",
        "controls": "tab\tnew\nline\u{1}\u{1f}",
        "unicode": "héllo ✓ 😀 \u{2028}",
        "big": 12345678901234567890u64,
        "neg": -42,
        "float": 1.5e-7,
        "flags": [true, false, null],
        "nested": {"a": {"b": [1, {"c": "d"}]}},
        "deep": deep,
    });
    let mut spec = python(
        "class Agent:\n    def execute(self):\n        return {'echo': self.input, 'tuple': (1, 'x'), 'none': None}\n",
    );
    spec.input = input.clone();
    let r = executor().run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{:?}", r.error);
    let out = r.result.unwrap();
    assert_eq!(out["echo"], input);
    assert_eq!(out["tuple"], json!([1, "x"]));
    assert_eq!(out["none"], Value::Null);
    // Input nested past Python's literal parser (the runner falls back to json), and a
    // result nested past what the harness accepts (an error, not a crash).
    let mut spec = python(
        "class Agent:\n    def execute(self):\n        d, v = 0, self.input\n\
         \x20       while isinstance(v, list):\n            d, v = d + 1, v[0]\n\
         \x20       deep = []\n        for _ in range(500):\n            deep = [deep]\n\
         \x20       return {'deep': deep} if v == 'make it deep' else {'depth': d, 'bottom': v}\n",
    );
    spec.input = (0..250).fold(json!("bottom"), |v, _| json!([v]));
    let r = executor().run(&spec).await.unwrap();
    assert_eq!(
        r.result,
        Some(json!({"depth": 250, "bottom": "bottom"})),
        "{:?}",
        r.error
    );
    spec.input = json!("make it deep");
    let r = executor().run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Error);
    assert!(r.error.unwrap().contains("nested deeper than"));
    // NaN is refused, as json.dumps(allow_nan=False) does.
    let r = executor()
        .run(&python(
            "class Agent:\n    def execute(self):\n        return {'x': float('nan')}\n",
        ))
        .await
        .unwrap();
    assert!(r.error.unwrap().contains("not JSON-serialisable"));
}

#[tokio::test]
async fn execute_agent_code_runs_one_sandboxed_agent() {
    let r = harness::executor::execute_agent_code(
        &executor(),
        "class Agent:\n    def __init__(self, config):\n        self.config = config\n\
         \x20   async def execute(self):\n        return {'status': 'success', 'result': 'Hello, World!'}\n",
        json!({}),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let v = serde_json::to_value(&r).unwrap();
    for k in [
        "status",
        "result",
        "error",
        "stdout",
        "stderr",
        "exit_code",
        "duration",
    ] {
        assert!(v.get(k).is_some(), "{k} missing from {v}");
    }
    assert_eq!(v["status"], "success");
    assert_eq!(v["result"]["result"], "Hello, World!");
}

#[tokio::test]
async fn queued_overlap_waits_and_command_tasks_run_in_the_sandbox() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let slow = write(
        &dir,
        "slow.py",
        "import time\nclass Agent:\n    def execute(self):\n        time.sleep(1)\n        return {'at': time.time()}\n",
    );
    ok_json(&run(
        &db,
        &[
            "agents",
            "add",
            "queued",
            "--file",
            &slow,
            "--overlap",
            "queue",
            "--json",
        ],
    ));
    let _replica = serve(&db);
    let a = ok_json(&run(&db, &["agents", "run", "queued", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let b = ok_json(&run(&db, &["agents", "run", "queued", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let (ta, tb) = (finished(&db, a).await, finished(&db, b).await);
    assert_eq!(
        (ta.status, tb.status),
        (
            harness::queue::Status::Completed,
            harness::queue::Status::Completed
        )
    );
    assert!(
        tb.started_at.unwrap() >= ta.completed_at.unwrap() - chrono::Duration::milliseconds(50),
        "the second run waited for the first: {ta:?} {tb:?}"
    );
    assert_eq!(tb.attempt, 1, "waiting does not count as an attempt");

    let id = ok_json(&run(
        &db,
        &[
            "enqueue",
            "command",
            r#"{"argv": ["sh", "-c", "echo '{\"n\": 5}'"]}"#,
        ],
    ))["id"]
        .as_i64()
        .unwrap();
    let t = finished(&db, id).await;
    assert_eq!(t.status, harness::queue::Status::Completed, "{t:?}");
    assert_eq!(t.result.unwrap()["result"], json!({"n": 5}));
}

#[tokio::test]
async fn handoff_history_keeps_the_last_twenty_and_fences_run_numbers() {
    use harness::handoff::{HandoffManager, HandoffWrite, write_in};
    let db = TestDb::new().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO agents (name, runtime, code) VALUES ('h', 'python', 'x') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let w = |n: i64| HandoffWrite {
        agent_id: id,
        run_number: n,
        state: json!({"n": n}),
        summary: None,
        metadata: json!({}),
        compressed: false,
    };
    let mut conn = db.pool.acquire().await.unwrap();
    for n in 1..=25 {
        assert_eq!(write_in(&mut conn, &[w(n)]).await.unwrap(), 1);
    }
    // A racing run that computed the same next run number loses.
    let m = HandoffManager::new(db.pool.clone());
    assert!(!m.save_artifact(&w(25)).await.unwrap());
    assert!(m.save_artifact(&w(26)).await.unwrap());
    let history = m.history(id).await.unwrap();
    assert_eq!(history.len(), 20);
    assert_eq!(history[0].run_number, 26);
    assert_eq!(history[19].run_number, 7);
    assert_eq!(
        m.load_artifact(id).await.unwrap().unwrap().state,
        json!({"n": 26})
    );
}

#[tokio::test]
async fn the_harness_does_not_follow_what_an_agent_plants_as_its_result() {
    let e = executor();
    // A file only the harness's account may read, shaped like a successful result.
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        secret.path(),
        r#"{"ok": true, "result": {"secret": "hunter2"}}"#,
    )
    .unwrap();
    let cases = [
        format!("ln -s {} \"$HARNESS_RESULT_FILE\"", secret.path().display()),
        "ln -s /dev/zero \"$HARNESS_RESULT_FILE\"".to_string(),
        "mkfifo \"$HARNESS_RESULT_FILE\"".to_string(),
    ];
    for script in cases {
        let mut spec = RunSpec::new(
            Runtime::Command {
                argv: vec!["sh".into(), "-c".into(), script.clone()],
            },
            &e,
        );
        spec.timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(15), e.run(&spec))
            .await
            .expect("did not hang")
            .unwrap();
        // Refused at once, not after waiting out the run's 10 s timeout.
        assert!(
            t0.elapsed() < Duration::from_secs(9),
            "{script}: {:?}",
            t0.elapsed()
        );
        assert_eq!(r.status, ExecStatus::Error, "{script}: {r:?}");
        assert!(
            r.error.as_deref().unwrap_or("").contains("regular file"),
            "{script}: {r:?}"
        );
        assert!(
            !serde_json::to_string(&r).unwrap().contains("hunter2"),
            "{script} leaked the file"
        );
    }
    // A hard link is refused whatever it links to (where the kernel lets an account link
    // files it does not own, it could be one the harness may read).
    let spec = RunSpec::new(
        Runtime::Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo '{\"v\": 1}' > own.json && ln own.json \"$HARNESS_RESULT_FILE\"".into(),
            ],
        },
        &e,
    );
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Error, "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("hard link"),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_dropped_run_takes_its_whole_process_group_with_it() {
    let e = executor();
    let dir = common::agent_writable_dir("harness-drop-");
    let pidfile = dir.path().join("bg.pid");
    let mut spec = RunSpec::new(
        Runtime::Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display()),
            ],
        },
        &e,
    );
    spec.timeout = Duration::from_secs(600);
    let run = tokio::spawn(async move { e.run(&spec).await });
    let t0 = Instant::now();
    // The shell creates the file before it writes the number: wait for the number.
    let pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    run.abort(); // as a cancel or the pool's timeout would drop it
    let _ = run.await;
    common::eventually(
        "the dropped run's background process to die",
        Duration::from_secs(10),
        async || gone(pid).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn the_sandbox_gives_what_the_readme_lists_and_nothing_more() {
    // The rlimits checked below are the fallback's: no cgroups.
    let e = rlimit_executor();
    let mut spec = python(
        "import os, resource, sys\nclass Agent:\n    def execute(self):\n\
         \x20       sys.stderr.write('e' * (300 * 1024))\n\
         \x20       return {'env': dict(os.environ), 'cwd': os.getcwd(),\n\
         \x20               'stdin': sys.stdin.read(),\n\
         \x20               'nofile': resource.getrlimit(resource.RLIMIT_NOFILE)[0],\n\
         \x20               'cpu': resource.getrlimit(resource.RLIMIT_CPU)[0],\n\
         \x20               'core': resource.getrlimit(resource.RLIMIT_CORE)[0],\n\
         \x20               'input': open(os.environ['HARNESS_INPUT_FILE']).read()}\n",
    );
    spec.timeout = Duration::from_secs(10);
    spec.cpu_percent = 50;
    spec.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    spec.input = json!({"n": 7});
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let v = r.result.unwrap();
    let env = v["env"].as_object().unwrap();
    let mut keys: Vec<&str> = env.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "HARNESS_INPUT_FILE",
            "HARNESS_PERMANENT_EXIT_CODE",
            "HARNESS_PROGRESS_FILE",
            "HARNESS_RESULT_FILE",
            "HOME",
            "LANG",
            "PATH",
            "PYTHONUNBUFFERED",
            "TRACEPARENT",
            "TZ"
        ],
        "{env:?}"
    );
    assert_eq!(env["PATH"], "/usr/local/bin:/usr/bin:/bin");
    assert_eq!(env["HOME"], v["cwd"], "HOME is the run directory");
    assert_eq!(env["TRACEPARENT"], json!(spec.traceparent));
    assert_eq!(v["stdin"], "", "stdin is closed");
    assert_eq!(v["nofile"], 256);
    assert_eq!(v["cpu"], 5, "timeout × cpu_percent");
    assert_eq!(v["core"], 0);
    let input: Value = serde_json::from_str(v["input"].as_str().unwrap()).unwrap();
    assert_eq!(input["input"], json!({"n": 7}));
    // The run directory is gone; stderr was kept up to the limit: head, marker, tail.
    let cwd = std::path::Path::new(v["cwd"].as_str().unwrap());
    assert!(!cwd.exists(), "{} was left behind", cwd.display());
    let marker = format!("\n[… {} bytes skipped …]\n", 300 * 1024 - e.output_limit);
    assert_eq!(
        r.stderr.replace(&marker, "").len(),
        e.output_limit,
        "{}",
        &r.stderr[r.stderr.len().saturating_sub(100)..]
    );

    // A command also gets its input in HARNESS_INPUT.
    let spec = RunSpec::new(
        Runtime::Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo \"{\\\"env\\\": $HARNESS_INPUT, \\\"file\\\": $(cat \"$HARNESS_INPUT_FILE\")}\""
                    .into(),
            ],
        },
        &e,
    );
    let r = e.run(&spec).await.unwrap();
    let v = r.result.clone().unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(v["env"], v["file"]);
    assert!(v["env"].get("input").is_some(), "{v}");
}

/// `harness exec --timeout 1s` of an agent that sleeps, by a harness without CAP_KILL (as a
/// container without it would run it), with `settings`. Returns the result, the exit code
/// and the agent's pid.
fn timeout_without_cap_kill(settings: &[(&str, &str)]) -> (Value, Option<i32>, i32) {
    let dir = common::agent_writable_dir("harness-nokill-");
    let pidfile = dir.path().join("pid");
    let agent = dir.path().join("sleepy.py");
    std::fs::write(
        &agent,
        format!(
            "import os, time\nclass Agent:\n    def execute(self):\n\
             \x20       open('{}', 'w').write(str(os.getpid()))\n\
             \x20       time.sleep(300)\n        return {{}}\n",
            pidfile.display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--inh-caps=-kill", "--bounding-set=-kill", "--"])
        .arg(common::harness_bin())
        .args(["exec", "--timeout", "1s"])
        .arg(&agent)
        .env("RUST_LOG", "error")
        .env("HARNESS_HOME", common::scratch_home())
        .envs(settings.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut run = common::Proc::spawn(&mut cmd);
    let status = run
        .wait_for_exit(Duration::from_secs(30))
        .expect("the run did not end: its timeout waited for a kill that was refused");
    let mut out = String::new();
    use std::io::Read;
    run.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (r, status.code(), pid)
}

/// A harness that may not signal its agents: with a shared agent account and no cgroups a
/// timeout must still end the run, with the failed kill in its error, instead of waiting for
/// ever; with a uid per run or a cgroup, the kill needs no signal right and happens.
#[test]
fn a_kill_the_harness_may_not_send_is_an_error_not_a_timeout_that_never_fires() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root (agents run as another account only then)");
        return;
    }
    let (r, code, pid) = timeout_without_cap_kill(&[
        ("HARNESS_EXECUTOR__CGROUPS", "false"),
        ("HARNESS_EXECUTOR__UID_RANGE", ""),
    ]);
    assert_eq!(code, Some(124), "{r}");
    assert_eq!(r["status"], "timeout", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("could not be killed") && error.contains("EPERM"),
        "{error}"
    );
    // Nothing could signal the agent, not even its parent-death signal when the harness
    // exited (the kernel checks that as a kill too): this test, with CAP_KILL, cleans up.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    // A uid per run: the harness kills as that uid. A cgroup: one write kills the run.
    for settings in [
        [("HARNESS_EXECUTOR__CGROUPS", "false")],
        [("HARNESS_EXECUTOR__CGROUPS", "true")],
    ] {
        let (r, code, pid) = timeout_without_cap_kill(&settings);
        assert_eq!(code, Some(124), "{settings:?}: {r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.contains("was terminated"), "{settings:?}: {error}");
        assert!(gone(pid), "{settings:?}: the agent survived its timeout");
    }
}

/// `harness` run as an unprivileged user (nobody), with a clean environment and a home of
/// its own; `None` when the test does not run as root.
fn as_nobody(home: &std::path::Path) -> Option<Command> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to run the harness as another user");
        return None;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", nobody.uid))
        .arg(format!("--regid={}", nobody.gid))
        .args(["--clear-groups", "--"])
        .arg(common::harness_bin())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HARNESS_HOME", home)
        .env("RUST_LOG", "error");
    Some(cmd)
}

#[test]
fn not_root_serve_refuses_unless_a_shared_user_is_allowed() {
    let home = tempfile::tempdir().unwrap();
    let Some(mut cmd) = as_nobody(home.path()) else {
        return;
    };
    let out = cmd
        .args(["serve", "--no-api"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("executor.allow_shared_user"), "{err}");
    // Allowed: it goes on to the database (which is not there) instead.
    let out = as_nobody(home.path())
        .unwrap()
        .args(["serve", "--no-api"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("HARNESS_EXECUTOR__ALLOW_SHARED_USER", "true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("allow_shared_user"), "{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

#[test]
fn not_root_agents_cannot_read_the_harness_environment() {
    let home = tempfile::tempdir().unwrap();
    let Some(mut cmd) = as_nobody(home.path()) else {
        return;
    };
    let agent = home.path().join("peek.py");
    // Every ancestor: the harness (or, for a forked run, the fork server and then the
    // harness) and up.
    std::fs::write(
        &agent,
        r#"import os
def parent(pid):
    return int(open('/proc/%d/stat' % pid).read().rsplit(') ', 1)[1].split()[1])
class Agent:
    def execute(self):
        seen = []
        pid = parent(os.getpid())
        while pid > 1:
            try:
                text = open('/proc/%d/environ' % pid, 'rb').read()
                seen.append('secret' if b'SECRET_TOKEN' in text else 'read')
            except OSError:
                seen.append('denied')
            pid = parent(pid)
        return {'ancestors': seen}
"#,
    )
    .unwrap();
    let out = cmd
        .arg("exec")
        .arg(&agent)
        .env("SECRET_TOKEN", "hunter2-0123456789")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agents run as this same user"), "{err}");
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{err}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(r["status"], "success", "{r}");
    let ancestors = r["result"]["ancestors"].as_array().unwrap();
    assert!(!ancestors.contains(&json!("secret")), "{r}");
    // The parent is not readable: the fork server (python, started by the harness, not
    // dumpable), and above it the harness itself.
    assert_eq!(ancestors[..2], [json!("denied"), json!("denied")], "{r}");
}

const UNIDECODE_AGENT: &str = "import os, sys\nfrom text_unidecode import unidecode\n\
class Agent:\n    def execute(self):\n\
\x20       try:\n            open(os.path.join(sys.prefix, 'planted'), 'w')\n\
\x20           env = 'written'\n        except OSError as e:\n            env = e.strerror\n\
\x20       return {'text': unidecode('Ærøskøbing'), 'prefix': sys.prefix, 'env': env}\n";

#[tokio::test]
async fn an_agent_with_requirements_runs_in_its_own_environment_and_bad_ones_are_refused() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = write(&dir, "deco.py", UNIDECODE_AGENT);
    // Without its requirements the import fails, and the error says what to do.
    ok_json(&run(
        &db,
        &[
            "agents",
            "add",
            "bare",
            "--file",
            &agent,
            "--max-retries",
            "0",
            "--json",
        ],
    ));
    // With them (from PyPI; the environment is cached on the host by hash, so later runs of
    // this test reuse it).
    let good = write(&dir, "requirements.txt", "text-unidecode==1.3\n");
    let added = run(
        &db,
        &[
            "agents",
            "add",
            "deco",
            "--file",
            &agent,
            "--requirements",
            &good,
        ],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    // A requirement no index has is refused at registration with the installer's error.
    let bad = write(&dir, "bad.txt", "harness-no-such-package-anywhere==9.9.9\n");
    let refused = run(
        &db,
        &[
            "agents",
            "add",
            "broken",
            "--file",
            &agent,
            "--requirements",
            &bad,
        ],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("requirements"), "{stderr}");
    assert!(
        stderr.contains("harness-no-such-package-anywhere"),
        "the installer's error is shown: {stderr}"
    );
    let listed = ok_json(&run(&db, &["agents", "list", "--json"]));
    assert!(
        !listed.to_string().contains("\"broken\""),
        "a refused agent is not stored: {listed}"
    );
    // A requirement for a command agent makes no sense.
    let refused = run(
        &db,
        &[
            "agents",
            "add",
            "cmd",
            "--command",
            "true",
            "--requirements",
            &good,
        ],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Python agents only"),
        "{refused:?}"
    );

    let _replica = serve(&db);
    let with = ok_json(&run(&db, &["agents", "run", "deco", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let without = ok_json(&run(&db, &["agents", "run", "bare", "--json"]))["id"]
        .as_i64()
        .unwrap();
    let t = finished(&db, with).await;
    assert_eq!(t.status, harness::queue::Status::Completed, "{t:?}");
    let v = t.result.unwrap()["result"].clone();
    assert_eq!(v["text"], "AEroskobing", "{v}");
    assert_ne!(
        v["env"], "written",
        "a run could write into its environment: {v}"
    );
    let t = finished(&db, without).await;
    assert_eq!(t.status, harness::queue::Status::Failed, "{t:?}");
    let error = t.error.unwrap_or_default();
    assert!(
        error.contains("ModuleNotFoundError") && error.contains("--requirements"),
        "{error}"
    );
}

/// `harness exec --input` reaches the agent as `self.input`, like a queued run's input.
#[test]
fn exec_passes_its_input_to_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("echo.py");
    std::fs::write(
        &file,
        "class Agent:\n    def execute(self):\n        return {'got': self.input}\n",
    )
    .unwrap();
    let out = common::harness_command()
        .args(["exec", file.to_str().unwrap(), "--input", r#"{"n": 3}"#])
        .env("HARNESS_HOME", common::scratch_home())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["result"]["got"], json!({"n": 3}));
}
