//! The ground the rest stands on: migrations, the private server, configuration at the edge.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, TestDb, harness_bin};
use harness::db::{self, PrivateServer, ServerOptions};

const TABLES: [&str; 6] = [
    "agents",
    "tasks",
    "handoffs",
    "replicas",
    "metrics",
    "governance_events",
];

async fn tables(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

fn assert_has_all_tables(found: &[String]) {
    for t in TABLES {
        assert!(
            found.iter().any(|f| f == t),
            "table {t} missing from {found:?}"
        );
    }
}

/// A command for the harness binary with a clean harness environment.
fn harness(home: &Path) -> Command {
    let mut cmd = common::harness_command();
    cmd.env("HARNESS_HOME", home);
    cmd
}

#[tokio::test]
async fn migrations_apply_twice_without_change() {
    let test = TestDb::empty().await;
    assert!(tables(&test.pool).await.is_empty());
    assert!(!db::migrations_current(&test.pool).await.unwrap());
    db::migrate(&test.pool).await.unwrap();
    let first = tables(&test.pool).await;
    assert_has_all_tables(&first);
    db::migrate(&test.pool).await.unwrap();
    assert_eq!(tables(&test.pool).await, first);
    assert!(db::migrations_current(&test.pool).await.unwrap());
}

#[tokio::test]
async fn tasks_table_has_the_documented_columns_and_constraints() {
    let test = TestDb::new().await;
    let cols: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'tasks'",
    )
    .fetch_all(&test.pool)
    .await
    .unwrap();
    for c in [
        "id",
        "agent_id",
        "status",
        "scheduled_at",
        "started_at",
        "completed_at",
        "result",
        "error",
        "retry_count",
        "created_at",
        "kind",
        "payload",
        "priority",
        "attempt",
        "max_retries",
        "idempotency_key",
        "locked_by",
        "fire_at",
    ] {
        assert!(cols.iter().any(|x| x == c), "tasks.{c} missing");
    }
    // Unique idempotency key.
    let insert = "INSERT INTO tasks (kind, idempotency_key) VALUES ('noop', 'k')";
    sqlx::query(insert).execute(&test.pool).await.unwrap();
    assert!(sqlx::query(insert).execute(&test.pool).await.is_err());
    // Unknown status refused.
    assert!(
        sqlx::query("INSERT INTO tasks (kind, status) VALUES ('noop', 'bogus')")
            .execute(&test.pool)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn harness_migrate_against_database_url() {
    let test = TestDb::empty().await;
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .arg("migrate")
        .env("DATABASE_URL", &test.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_has_all_tables(&tables(&test.pool).await);
    // Did not start a private server, since a URL was given.
    assert!(!home.path().join("pg").exists());
    // Twice is fine.
    let again = harness(home.path())
        .arg("migrate")
        .env("DATABASE_URL", &test.url)
        .output()
        .unwrap();
    assert!(again.status.success());
}

/// A replica of this release against the schema of a newer one (a `helm rollback`, or an
/// old pod restarting after the upgrade's migration Job): it starts and serves.
#[tokio::test]
async fn a_replica_starts_against_a_newer_schema_and_no_migrate_needs_a_current_one() {
    let test = TestDb::empty().await;
    let home = tempfile::tempdir().unwrap();
    // --no-migrate on a database without this binary's migrations: a clear refusal.
    let out = harness(home.path())
        .args(["serve", "--no-api", "--no-migrate"])
        .env("DATABASE_URL", &test.url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lacks migrations") && stderr.contains("harness migrate"),
        "{stderr}"
    );
    assert!(
        tables(&test.pool).await.is_empty(),
        "--no-migrate applied something"
    );

    harness::db::migrate(&test.pool).await.unwrap();
    // A newer release's migration this binary does not know.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&test.pool)
    .await
    .unwrap();
    for args in [
        &["serve", "--no-api"][..],
        &["serve", "--no-api", "--no-migrate"][..],
    ] {
        let mut cmd = harness(home.path());
        cmd.args(args).env("DATABASE_URL", &test.url);
        let (mut replica, log) = common::Proc::spawn_logged(&mut cmd);
        common::eventually(
            "the replica to register",
            Duration::from_secs(20),
            async || {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM replicas WHERE pid = $1")
                    .bind(replica.pid())
                    .fetch_one(&test.pool)
                    .await
                    .unwrap();
                (n == 1).then_some(())
            },
        )
        .await;
        assert!(replica.alive(), "{args:?}: {}", log.text());
        assert!(!log.contains("previously applied"), "{}", log.text());
    }
    // `harness migrate` (the chart's Job of the older release) is fine with it too.
    let out = harness(home.path())
        .arg("migrate")
        .env("DATABASE_URL", &test.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn concurrent_migrations_apply_once_and_all_succeed() {
    let test = TestDb::empty().await;
    let home = tempfile::tempdir().unwrap();
    let children: Vec<Proc> = (0..4)
        .map(|_| {
            Proc::spawn(
                harness(home.path())
                    .arg("migrate")
                    .env("DATABASE_URL", &test.url)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            )
        })
        .collect();
    for mut c in children {
        let status = c
            .wait_for_exit(Duration::from_secs(60))
            .expect("migrate finishes");
        let mut err = String::new();
        use std::io::Read;
        c.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{err}");
    }
    assert_has_all_tables(&tables(&test.pool).await);
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&test.pool)
        .await
        .unwrap();
    assert_eq!(applied, db::MIGRATOR.iter().count() as i64);
}

/// A home directory that the unprivileged PostgreSQL user can reach.
fn reachable_home() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("harness-home-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

async fn tables_in_private(home: &Path) -> Vec<String> {
    let home = home.to_path_buf();
    let server =
        tokio::task::spawn_blocking(move || PrivateServer::start(&home, &ServerOptions::default()))
            .await
            .unwrap()
            .unwrap();
    let pool = db::connect(&server.url(db::PRIVATE_DATABASE), 1)
        .await
        .unwrap();
    let found = tables(&pool).await;
    pool.close().await;
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
    found
}

fn postmaster_pid(home: &Path) -> Option<i32> {
    std::fs::read_to_string(home.join("pg/postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

#[tokio::test]
async fn migrate_without_url_creates_tables_in_a_private_server_and_stops_it() {
    let home = reachable_home();
    let out = harness(home.path()).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(home.path().join("pg/PG_VERSION").is_file(), "initdb ran");
    // The process was the only user, so it stopped the server on exit.
    assert!(postmaster_pid(home.path()).is_none_or(|p| !alive(p)));
    assert_has_all_tables(&tables_in_private(home.path()).await);
}

/// Starts `harness up` (stopped with its group if the test fails) and waits until it says
/// it is up; returns it and its log.
fn spawn_up_with(cmd: &mut Command) -> (Proc, common::Log) {
    let (child, log) = Proc::spawn_logged(cmd.arg("up").stdout(Stdio::null()));
    let t0 = Instant::now();
    while !log.contains("is up") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "harness up did not report being up within 60 s: {}",
            log.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, log)
}

fn spawn_up(home: &Path) -> Proc {
    spawn_up_with(&mut harness(home)).0
}

/// SIGTERM, and a clean exit within 30 s.
fn terminate(child: &mut Proc) {
    child.signal(nix::sys::signal::Signal::SIGTERM);
    let status = child
        .wait_for_exit(Duration::from_secs(30))
        .expect("harness exits within 30 s of SIGTERM");
    assert!(status.success(), "harness exited with {status}");
}

#[tokio::test]
async fn two_processes_share_one_private_server() {
    let home = reachable_home();
    let mut a = spawn_up(home.path());
    let pid = postmaster_pid(home.path()).expect("server running");
    let mut b = spawn_up(home.path());
    assert_eq!(
        postmaster_pid(home.path()),
        Some(pid),
        "b joined a's server"
    );

    terminate(&mut a);
    assert!(
        alive(pid),
        "server must outlive its starter while b uses it"
    );
    // b still works: a second `migrate` joins the same server.
    let out = harness(home.path()).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(alive(pid));

    terminate(&mut b);
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "the last user stops the server");
}

#[tokio::test]
async fn server_killed_users_leave_it_for_the_next_process() {
    let home = reachable_home();
    let mut a = spawn_up(home.path());
    let pid = postmaster_pid(home.path()).unwrap();
    a.signal(nix::sys::signal::Signal::SIGKILL); // no chance to stop the server
    a.wait_for_exit(Duration::from_secs(10)).expect("killed");
    assert!(alive(pid));
    // The next process attaches to the orphaned server instead of fighting over the data.
    let out = harness(home.path()).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "the last user stopped it");
}

#[test]
fn private_server_runs_as_an_unprivileged_user() {
    use nix::unistd::{Uid, User};
    let home = reachable_home();
    let out = harness(home.path()).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data_owner = std::fs::metadata(home.path().join("pg")).unwrap();
    use std::os::unix::fs::MetadataExt;
    if Uid::effective().is_root() {
        assert_ne!(
            data_owner.uid(),
            0,
            "as root, the data directory belongs to the server user"
        );

        // And as a non-root user, the same binary runs the server as itself.
        let nobody = User::from_name("nobody").unwrap().expect("user nobody");
        let dir = reachable_home();
        let bin = dir.path().join("harness");
        std::fs::copy(harness_bin(), &bin).unwrap();
        let own_home = dir.path().join("home");
        std::fs::create_dir(&own_home).unwrap();
        std::os::unix::fs::chown(
            &own_home,
            Some(nobody.uid.as_raw()),
            Some(nobody.gid.as_raw()),
        )
        .unwrap();
        let mut cmd = common::harness_command_at(&bin);
        let out = cmd
            .arg("migrate")
            .env("HARNESS_HOME", &own_home)
            .current_dir(dir.path())
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let owner = std::fs::metadata(own_home.join("pg")).unwrap().uid();
        assert_eq!(owner, nobody.uid.as_raw());
    } else {
        assert_eq!(data_owner.uid(), Uid::effective().as_raw());
        eprintln!(
            "not root: the root-to-postgres switch is exercised when the suite runs as root (CI)"
        );
    }
}

#[test]
fn missing_binaries_give_one_clear_error() {
    let home = reachable_home();
    let empty = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .arg("migrate")
        .env("HARNESS_DATABASE__PG_BINDIR", empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no PostgreSQL server binaries were found"),
        "{err}"
    );
    assert!(err.contains("install PostgreSQL"), "{err}");
    assert!(err.contains("DATABASE_URL"), "{err}");
    assert!(!home.path().join("pg").exists(), "nothing half-made");
}

#[test]
fn config_command_prints_effective_values_with_secrets_redacted() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("h.yml");
    std::fs::write(&file, "bulk:\n  max_concurrent: 5\n  retry_attempts: 6\n").unwrap();
    let out = harness(home.path())
        .args(["config", "--config"])
        .arg(&file)
        .env("HARNESS_BULK__MAX_CONCURRENT", "4")
        .env(
            "DATABASE_URL",
            "postgres://app:hunter2@db.internal:5432/harness",
        )
        .env(
            "HARNESS_API__TOKENS",
            r#"[{"token":"tok-0123456789abcdef","scope":"admin"}]"#,
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(v["bulk"]["max_concurrent"], 4);
    assert_eq!(v["bulk"]["retry_attempts"], 6);
    assert_eq!(v["bulk"]["retry_delay_seconds"], 15);
    assert!(
        !yaml.contains("hunter2") && !yaml.contains("tok-0123"),
        "{yaml}"
    );
    assert!(
        yaml.contains("db.internal"),
        "non-secret parts of the URL stay: {yaml}"
    );
}

#[test]
fn bad_configuration_exits_non_zero_naming_the_key() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("h.yml");
    std::fs::write(&file, "governance:\n  cpu_high_pct: 250\n").unwrap();
    let out = harness(home.path())
        .args(["migrate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("governance.cpu_high_pct"), "{err}");
    assert!(err.contains("allowed 1 to 100"), "{err}");
    assert!(err.contains("h.yml"), "{err}");
}

/// A one-shot command logs warnings only (no INFO line about the private server on every
/// call); `-v` brings info back.
#[test]
fn one_shot_commands_are_quiet_unless_verbose() {
    // A private server of its own: starting and stopping it is what logs at info. `migrate`
    // sets it up (one-shot commands refuse to).
    let home = reachable_home();
    let migrated = harness(home.path()).arg("migrate").output().unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let stats = |verbose: bool| {
        let mut cmd = harness(home.path());
        cmd.env_remove("RUST_LOG");
        if verbose {
            cmd.arg("-v");
        }
        cmd.arg("stats").output().unwrap()
    };
    let quiet = stats(false);
    assert!(quiet.status.success());
    assert!(
        !String::from_utf8_lossy(&quiet.stderr).contains("INFO"),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    let loud = stats(true);
    assert!(loud.status.success());
    assert!(
        String::from_utf8_lossy(&loud.stderr).contains("INFO"),
        "-v logs at info: {}",
        String::from_utf8_lossy(&loud.stderr)
    );
}

/// `HARNESS_API_BIND` (one underscore) used to be ignored without a word.
#[test]
fn a_harness_variable_that_is_no_setting_is_an_error_naming_the_setting_meant() {
    let home = tempfile::tempdir().unwrap();
    for (var, expected) in [
        ("HARNESS_API_BIND", "did you mean `api.bind`"),
        ("HARNESS_FROBNICATE", "HARNESS_<SECTION>__<KEY>"),
    ] {
        let out = harness(home.path())
            .arg("config")
            .env(var, "127.0.0.1:9")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var) && err.contains(expected), "{var}: {err}");
    }
    // The variables that are not settings are still fine.
    let out = harness(home.path())
        .arg("config")
        .env("HARNESS_NO_INIT", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn up_on_a_reachable_address_without_tokens_prints_an_admin_token() {
    let home = reachable_home();
    let (mut child, log) =
        spawn_up_with(harness(home.path()).env("HARNESS_API__BIND", "0.0.0.0:0"));
    let text = log.text();
    let line = text
        .lines()
        .find(|l| l.contains("admin token"))
        .unwrap_or_else(|| panic!("no admin token printed: {text}"));
    let token = line
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .to_string();
    assert!(text.contains("(the console at http://0.0.0.0:"), "{text}");
    // The port it listens on, from "API on http://0.0.0.0:PORT".
    let port: u16 = text
        .split("API on http://0.0.0.0:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no API address printed: {text}"));
    let url = format!("http://127.0.0.1:{port}/api/tasks/stats/summary");
    let client = reqwest::Client::new();
    let without = client.get(&url).send().await.unwrap();
    assert_eq!(without.status(), reqwest::StatusCode::UNAUTHORIZED);
    let with = client.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(with.status(), reqwest::StatusCode::OK, "token {token}");
    tokio::task::spawn_blocking(move || terminate(&mut child))
        .await
        .unwrap();
}

#[test]
fn the_readmes_config_error_example_is_what_harness_prints() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let example = readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("error: unknown key `bulk.max_concurent`"))
        .expect("the README shows a config error");
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .arg("config")
        .env("HARNESS_BULK__MAX_CONCURENT", "4")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let printed = String::from_utf8_lossy(&out.stderr);
    assert_eq!(printed.trim(), example);
}

#[test]
fn serve_and_enqueue_help_name_every_kind_the_binary_runs() {
    let home = tempfile::tempdir().unwrap();
    for cmd in ["serve", "enqueue"] {
        let out = harness(home.path()).args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        // The kinds the binary registers, from the constants it registers them with.
        let kinds: Vec<&str> = harness::replica::BUILTIN_KINDS
            .iter()
            .copied()
            .chain([harness::agents::AGENT_KIND, harness::agents::COMMAND_KIND])
            .collect();
        let listed = format!("built in: {}", kinds.join(", "));
        assert!(
            help.contains(&listed),
            "{cmd} --help lacks {listed:?}: {help}"
        );
    }
}

const ORPHANS: &str = r#"import os, time
class Agent:
    def execute(self):
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(0.2)
                os._exit(0)
            os._exit(0)
        os.wait()
        time.sleep(1.5)
        zombies = []
        for p in os.listdir('/proc'):
            if p.isdigit():
                try:
                    if open('/proc/%s/stat' % p).read().rsplit(')', 1)[1].split()[0] == 'Z':
                        zombies.append(int(p))
                except OSError:
                    pass
        return {'zombies': zombies, 'me': os.getpid()}
"#;

/// The harness as PID 1 of a PID namespace (a container without an init): the orphan an
/// agent leaves is reaped, not kept as a zombie. `HARNESS_NO_INIT=1` is the control.
#[test]
fn as_pid_1_the_harness_reaps_the_orphans_of_agents() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: a PID namespace needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("orphans.py");
    std::fs::write(&agent, ORPHANS).unwrap();
    let zombies = |no_init: bool| -> Vec<i64> {
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc", harness_bin(), "exec"])
            .arg(&agent)
            .env("HARNESS_HOME", common::scratch_home())
            .env("RUST_LOG", "error");
        if no_init {
            cmd.env("HARNESS_NO_INIT", "1");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value(r["result"]["zombies"].clone()).unwrap()
    };
    assert_eq!(
        zombies(false),
        Vec::<i64>::new(),
        "an orphan stayed a zombie"
    );
    assert!(
        !zombies(true).is_empty(),
        "without the init the orphan should stay a zombie: this test proves nothing"
    );
}
