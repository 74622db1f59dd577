//! The command line as a user meets it: `down`, the second Ctrl-C of `up`, one-shot commands
//! on a home without a database, `doctor`, `completions`, and `resume` that is no command.
//! Every test runs the real `harness` binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Proc;
use nix::sys::signal::Signal;

/// A command for the harness binary with a clean harness environment and `home`.
fn harness(home: &Path) -> Command {
    let mut cmd = common::harness_command();
    cmd.env("HARNESS_HOME", home);
    cmd
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn completions_print_a_script_naming_the_subcommands_and_reject_an_unknown_shell() {
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    for word in [
        "harness",
        "enqueue",
        "agents",
        "fleet",
        "completions",
        "doctor",
        "down",
    ] {
        assert!(script.contains(word), "{word} missing from the script");
    }
    // A hidden command is not offered.
    assert!(!script.contains("harness__resume"), "resume offered");

    let out = harness(home.path())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a clap usage error");
    assert!(
        stderr(&out).contains("invalid value 'tcsh'"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("bash"),
        "lists the shells: {}",
        stderr(&out)
    );
}

#[test]
fn completions_need_no_valid_configuration() {
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .args(["completions", "zsh"])
        .env("HARNESS_GOVERNANCE__CPU_HIGH_PCT", "250")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("harness"));
}

#[test]
fn resume_is_no_command_and_points_to_agents_and_fleet_resume() {
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .args(["resume", "counter"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("harness agents resume counter"), "{err}");
    assert!(err.contains("harness fleet resume"), "{err}");
    assert!(!err.contains("Usage: harness serve"), "{err}");
    assert!(!home.path().join("pg").exists(), "no database started");

    // `serve` no longer answers to `resume`, and help does not list it.
    let help = harness(home.path()).arg("--help").output().unwrap();
    let help = stdout(&help);
    assert!(!help.contains("alias"), "{help}");
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("resume")),
        "{help}"
    );
}

/// A one-shot command in the wrong directory (or with a mistyped `HARNESS_HOME`) used to
/// initdb an empty 47 MB database there and report 0 tasks.
#[test]
fn one_shot_commands_on_a_home_without_a_database_fail_and_create_nothing() {
    let parent = tempfile::tempdir().unwrap();
    let home = parent.path().join("typo");
    for args in [
        &["stats"][..],
        &["fleet"],
        &["inspect", "1"],
        &["enqueue", "noop", "{}"],
        &["agents", "list"],
    ] {
        let out = harness(&home).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("there is no database under {}", home.display())),
            "{args:?}: {err}"
        );
        for fix in [
            "harness up",
            "harness migrate",
            "HARNESS_HOME",
            "DATABASE_URL",
        ] {
            assert!(err.contains(fix), "{args:?} does not suggest {fix}: {err}");
        }
        assert!(!home.exists(), "{args:?} created {}", home.display());
    }
    // An existing but empty home stays without a data directory.
    let out = harness(parent.path()).arg("stats").output().unwrap();
    assert!(!out.status.success());
    assert!(!parent.path().join("pg").exists());
}

/// A home the unprivileged PostgreSQL user can reach (tests run as root), whose private
/// server is stopped when the test ends, passed or failed: it runs in a process group of its
/// own, which stopping the test's processes does not reach.
struct Home(tempfile::TempDir);

impl Home {
    fn new() -> Home {
        let dir = tempfile::Builder::new()
            .prefix("harness-cli-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Home(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// The pid in the server's `postmaster.pid`, if the file is there.
    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path().join("pg/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Pids of live processes whose command line names this home (the postmaster's `-D`).
    fn processes(&self) -> Vec<i32> {
        let home = self.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&home))
            })
            .filter(|pid| alive(*pid))
            .collect()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = harness(self.path())
            .args(["down", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // pid (comm) STATE …: the state follows the last parenthesis.
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// `harness up` on `home` with its stderr collected, once it says it is up.
fn spawn_up(home: &Path, extra: &[(&str, &str)]) -> (Proc, common::Log) {
    let mut cmd = harness(home);
    cmd.arg("up").stdout(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let (up, log) = Proc::spawn_logged(&mut cmd);
    wait_for(Duration::from_secs(60), "harness up to be up", || {
        log.contains("is up")
    });
    (up, log)
}

/// Polls `done` every 20 ms until it holds; panics naming `what` after `within`.
fn wait_for(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn down_stops_a_private_server_left_running_and_says_when_there_is_none() {
    let home = Home::new();
    let out = harness(home.path()).arg("down").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!(
            "no private PostgreSQL is running under {}",
            home.path().display()
        )
    );
    assert!(!home.path().join("pg").exists(), "down created nothing");

    // `up` killed with SIGKILL cannot stop its server: it is left running with no user.
    let (mut up, _log) = spawn_up(home.path(), &[]);
    let pid = home.postmaster_pid().expect("the server runs");
    up.signal(Signal::SIGKILL);
    up.wait_for_exit(Duration::from_secs(10)).expect("killed");
    assert!(alive(pid), "the server outlives a killed user");

    let out = harness(home.path()).arg("down").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!(
            "stopped the private PostgreSQL under {} (pid {pid})",
            home.path().display()
        )
    );
    // `down` returns once the server has exited: nothing of it is left, at once.
    assert!(!alive(pid), "the postmaster {pid} is still alive");
    assert_eq!(
        home.processes(),
        Vec::<i32>::new(),
        "processes of the home remain"
    );

    let again = harness(home.path()).arg("down").output().unwrap();
    assert!(again.status.success());
    assert!(stdout(&again).contains("no private PostgreSQL is running"));
}

#[test]
fn down_refuses_while_a_replica_uses_the_server_unless_forced() {
    let home = Home::new();
    let (up, _log) = spawn_up(home.path(), &[]);
    let pid = home.postmaster_pid().expect("the server runs");

    let out = harness(home.path()).arg("down").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("(pid {pid}) is in use")), "{err}");
    assert!(
        err.contains(&up.pid().to_string()),
        "names the replica: {err}"
    );
    assert!(err.contains("harness down --force"), "{err}");
    assert!(alive(pid), "refused: the server runs on");

    let out = harness(home.path())
        .args(["down", "--force"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("(pid {pid})")),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains(&up.pid().to_string()),
        "{}",
        stderr(&out)
    );
    assert!(!alive(pid), "forced: the server is gone");
}

#[test]
fn down_with_a_database_url_refuses_since_nothing_private_runs() {
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .arg("down")
        .env("DATABASE_URL", "postgres://harness@db.example/harness")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("database.url is set"), "{err}");
    assert!(err.contains("no private PostgreSQL to stop"), "{err}");
}

/// A second Ctrl-C exited at once and left the private server running, with no word.
#[test]
fn a_second_sigint_on_up_stops_the_private_server_before_exiting() {
    let home = Home::new();
    let (mut up, log) = spawn_up(
        home.path(),
        &[
            ("HARNESS_BULK__SHUTDOWN_GRACE_S", "60"),
            ("HARNESS_BULK__POLL_INTERVAL_MS", "100"),
            ("RUST_LOG", "info"),
        ],
    );
    let pid = home.postmaster_pid().expect("the server runs");
    // A task that outlasts the test keeps the first signal's drain going.
    let out = harness(home.path())
        .args(["enqueue", "sleep", r#"{"ms": 600000}"#])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(Duration::from_secs(30), "the sleep task to run", || {
        let out = harness(home.path())
            .args(["stats", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| v["running"] == 1)
    });

    up.signal(Signal::SIGINT);
    wait_for(Duration::from_secs(20), "up to start draining", || {
        log.contains("shutting down: no new claims")
    });
    assert!(up.alive(), "first signal: draining, not gone");
    let t0 = Instant::now();
    up.signal(Signal::SIGINT);
    let status = up
        .wait_for_exit(Duration::from_secs(20))
        .expect("up exits after the second signal");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "exited {:?} after the second signal",
        t0.elapsed()
    );
    assert_eq!(status.code(), Some(130));
    let text = log.text();
    assert!(
        text.contains(&format!(
            "stopped the private PostgreSQL under {} (pid {pid})",
            home.path().canonicalize().unwrap().display()
        )),
        "{text}"
    );
    assert!(!alive(pid), "the postmaster {pid} outlived up: {text}");
    assert_eq!(
        home.processes(),
        Vec::<i32>::new(),
        "processes of the home remain"
    );
}

/// The line of `check` in doctor's output.
fn doctor_line<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(check))
        .unwrap_or_else(|| panic!("no {check} line in:\n{out}"))
}

#[tokio::test]
async fn doctor_on_a_working_setup_passes_every_check_it_prints() {
    let db = common::TestDb::new().await;
    let out = common::harness_at(&db.url).arg("doctor").output().unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(doctor_line(&text, "python").starts_with("ok"), "{text}");
    assert!(
        doctor_line(&text, "python").contains("(Python 3."),
        "{text}"
    );
    for check in ["account", "isolation"] {
        assert!(!doctor_line(&text, check).starts_with("FAIL"), "{text}");
    }
    assert!(doctor_line(&text, "database").starts_with("ok    database   reachable"));
    assert!(doctor_line(&text, "migrations").starts_with("ok"), "{text}");
    assert!(doctor_line(&text, "api.bind").starts_with("ok"), "{text}");
    assert!(
        doctor_line(&text, "api.tokens").starts_with("warn"),
        "{text}"
    );

    let out = common::harness_at(&db.url)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "python",
            "account",
            "isolation",
            "database",
            "migrations",
            "api.bind",
            "api.tokens"
        ]
    );
}

#[tokio::test]
async fn doctor_with_a_bogus_python_fails_naming_the_setting() {
    let db = common::TestDb::new().await;
    let out = common::harness_at(&db.url)
        .arg("doctor")
        .env("HARNESS_EXECUTOR__PYTHON", "/nonexistent")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = doctor_line(&text, "python");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(
        line.contains("executor.python = \"/nonexistent\""),
        "{line}"
    );
    assert!(line.contains("HARNESS_EXECUTOR__PYTHON"), "{line}");
    // The rest is still checked.
    assert!(doctor_line(&text, "database").starts_with("ok"), "{text}");
}

#[test]
fn doctor_names_who_holds_api_bind_and_sets_up_no_database() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let parent = tempfile::tempdir().unwrap();
    let home = parent.path().join("home");
    let out = harness(&home)
        .arg("doctor")
        .env("HARNESS_API__BIND", &addr)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = doctor_line(&text, "api.bind");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(
        line.contains(&format!("{addr} is in use by"))
            && line.contains(&format!("(pid {})", std::process::id())),
        "names this test as the holder: {line}"
    );
    assert!(line.contains("HARNESS_API__BIND"), "{line}");
    let db = doctor_line(&text, "database");
    assert!(db.starts_with("warn"), "{db}");
    assert!(
        db.contains("harness up") && db.contains("harness migrate"),
        "{db}"
    );
    assert!(!home.exists(), "doctor created {}", home.display());
}

#[tokio::test]
async fn doctor_fails_an_open_api_beyond_loopback_and_warns_of_missing_migrations() {
    let db = common::TestDb::empty().await;
    let out = common::harness_at(&db.url)
        .arg("doctor")
        .env("HARNESS_API__BIND", "0.0.0.0:0")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let tokens = doctor_line(&text, "api.tokens");
    assert!(tokens.starts_with("FAIL"), "{tokens}");
    assert!(tokens.contains("HARNESS_API__TOKENS"), "{tokens}");
    let migrations = doctor_line(&text, "migrations");
    assert!(
        migrations.starts_with("warn  migrations missing ["),
        "{migrations}"
    );
    assert!(migrations.contains("harness migrate"), "{migrations}");
    // Doctor applied nothing.
    assert!(
        !harness::db::migrations_current(&db.pool).await.unwrap(),
        "doctor migrated the database"
    );
}

#[test]
fn bench_agent_times_forked_and_execd_runs_against_the_bare_interpreter() {
    let home = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for agent in ["hello_agent.py", "async_agent.py"] {
        let o = harness(home.path())
            .args(["bench", "--agent"])
            .arg(examples.join(agent))
            .args(["--runs", "5", "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["runs"], 5, "{v}");
        let bare = v["bare_p50_ms"].as_f64().unwrap();
        assert!(bare > 0.0, "{v}");
        for path in ["forked", "exec"] {
            let p50 = v[path]["run_p50_ms"].as_f64().unwrap();
            assert!(
                p50 > 0.0 && v[path]["run_p99_ms"].as_f64().unwrap() >= p50,
                "{v}"
            );
            let overhead = v[path]["overhead_p50_ms"].as_f64().unwrap();
            assert!((overhead - (p50 - bare)).abs() < 0.01, "{v}");
        }
    }
    // Without the fork server, only the exec'd runs.
    let o = harness(home.path())
        .env("HARNESS_EXECUTOR__FORK_SERVER", "false")
        .args(["bench", "--agent"])
        .arg(examples.join("hello_agent.py"))
        .args(["--runs", "3", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v.get("forked").is_none() && v["exec"].is_object(), "{v}");
}
