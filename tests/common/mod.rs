//! Test support: every test gets its own database, created from a migrated template.
//!
//! With `DATABASE_URL` set, databases are created on that server (the role needs CREATEDB).
//! Otherwise one private PostgreSQL serves the whole test run: the first test binary starts
//! it, later binaries and parallel tests join it (the private server's lock files), and the
//! last process to exit stops it.
#![allow(dead_code)]

pub mod browser;
pub mod pgbouncer;

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use harness::db::{self, PrivateServer, ServerOptions};
use sqlx::{Connection, PgConnection, PgPool};

static SERVER: OnceLock<Mutex<Option<PrivateServer>>> = OnceLock::new();
static ADMIN_URL: OnceLock<String> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

extern "C" fn stop_server_at_exit() {
    if let Some(server) = SERVER
        .get()
        .and_then(|l| l.lock().ok().and_then(|mut s| s.take()))
    {
        let _ = server.stop();
    }
}

/// Where the test run's private server lives: outside the checkout, because PostgreSQL runs
/// as an unprivileged user when the tests run as root and must be able to reach its data.
pub fn test_home() -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    env!("CARGO_TARGET_TMPDIR").hash(&mut h);
    std::env::temp_dir().join(format!(
        "harness-test-{:012x}",
        h.finish() & 0xffff_ffff_ffff
    ))
}

/// The home (logs, runs) of every harness the suite starts, in-process or as a process: in
/// the system temp directory, so a test run changes nothing in the checkout.
pub fn scratch_home() -> PathBuf {
    let home = test_home().with_extension("home");
    std::fs::create_dir_all(&home).expect("create the suite's scratch home");
    home
}

/// A directory every account may write, for tests that watch what agents do: outside
/// /tmp, /var/tmp and /dev/shm, which runs see as private tmpfs of their own.
pub fn agent_writable_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a directory in the target's tmp");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("open the directory to every account");
    dir
}

/// An empty file at `path` every account may append to: runs have uids of their own, and a
/// file the first run created would be closed to the next.
pub fn agent_writable_file(path: &std::path::Path) -> std::path::PathBuf {
    std::fs::write(path, "").expect("create the shared file");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("open the file to every account");
    path.to_path_buf()
}

/// URL of a database on the test server from which databases can be created.
pub fn admin_url() -> String {
    ADMIN_URL
        .get_or_init(|| {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return url;
            }
            let server = PrivateServer::start(
                &test_home(),
                &ServerOptions {
                    bindir: None,
                    ephemeral: true,
                    port: None,
                },
            )
            .expect("start the private PostgreSQL for tests");
            let url = server.url("postgres");
            SERVER.set(Mutex::new(Some(server))).expect("set once");
            // SAFETY: registering a plain extern "C" function with atexit has no preconditions.
            unsafe {
                nix::libc::atexit(stop_server_at_exit);
            }
            url
        })
        .clone()
}

/// `url` with its database name replaced.
pub fn url_for(admin: &str, database: &str) -> String {
    let mut u = url::Url::parse(admin).expect("admin url");
    u.set_path(&format!("/{database}"));
    u.to_string()
}

fn template_name() -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in db::MIGRATOR.iter() {
        m.version.hash(&mut h);
        m.checksum.hash(&mut h);
    }
    format!("harness_tpl_{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Creates the migrated template once per server (serialised across processes by an
/// advisory lock) and returns its name.
async fn ensure_template(admin: &mut PgConnection) -> String {
    let name = template_name();
    sqlx::query("SELECT pg_advisory_lock(727274)")
        .execute(&mut *admin)
        .await
        .unwrap();
    let ready: Option<bool> =
        sqlx::query_scalar("SELECT datistemplate FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_optional(&mut *admin)
            .await
            .unwrap();
    if ready != Some(true) {
        if ready.is_some() {
            // A half-built template from an interrupted run.
            sqlx::query(&format!(
                "DROP DATABASE {} WITH (FORCE)",
                db::quote_ident(&name)
            ))
            .execute(&mut *admin)
            .await
            .unwrap();
        }
        sqlx::query(&format!("CREATE DATABASE {}", db::quote_ident(&name)))
            .execute(&mut *admin)
            .await
            .unwrap();
        let pool = db::connect(&url_for(&admin_url(), &name), 2).await.unwrap();
        db::migrate(&pool).await.unwrap();
        pool.close().await;
        sqlx::query(&format!(
            "ALTER DATABASE {} WITH is_template true",
            db::quote_ident(&name)
        ))
        .execute(&mut *admin)
        .await
        .unwrap();
    }
    sqlx::query("SELECT pg_advisory_unlock(727274)")
        .execute(&mut *admin)
        .await
        .unwrap();
    name
}

/// A database of one test's own, dropped when the value is dropped.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// A fresh, migrated database.
    pub async fn new() -> TestDb {
        Self::create(true).await
    }

    /// A fresh database with no tables at all.
    pub async fn empty() -> TestDb {
        Self::create(false).await
    }

    async fn create(migrated: bool) -> TestDb {
        let admin_url = tokio::task::spawn_blocking(admin_url).await.unwrap();
        let mut admin = PgConnection::connect(&admin_url).await.unwrap();
        let name = format!(
            "harness_test_{}_{}_{:06x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>() & 0xffffff
        );
        let sql = if migrated {
            let template = ensure_template(&mut admin).await;
            format!(
                "CREATE DATABASE {} TEMPLATE {}",
                db::quote_ident(&name),
                db::quote_ident(&template)
            )
        } else {
            format!("CREATE DATABASE {}", db::quote_ident(&name))
        };
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
        admin.close().await.unwrap();
        let url = url_for(&admin_url, &name);
        let pool = db::connect(&url, 10).await.unwrap();
        TestDb { pool, url, name }
    }

    /// A configuration for fast tests on this database: quick polls (50 ms) and heartbeats
    /// (1 s), no retries; `extra` variables go on top.
    pub fn fast_config(&self, extra: &[(&str, &str)]) -> harness::Config {
        let mut env: Vec<(String, String)> = [
            ("HARNESS_BULK__POLL_INTERVAL_MS", "50"),
            ("HARNESS_BULK__RETRY_ATTEMPTS", "0"),
            ("HARNESS_TELEMETRY__SAMPLE_INTERVAL_S", "1"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.push(("DATABASE_URL".to_string(), self.url.clone()));
        env.push((
            "HARNESS_HOME".to_string(),
            scratch_home().display().to_string(),
        ));
        harness::Config::load_from(None, env).expect("test config")
    }

    /// A configuration pointing at this database, with defaults elsewhere (but the home).
    pub fn config(&self) -> harness::Config {
        harness::Config::load_from(
            None,
            [
                ("DATABASE_URL".to_string(), self.url.clone()),
                (
                    "HARNESS_HOME".to_string(),
                    scratch_home().display().to_string(),
                ),
            ],
        )
        .expect("test config")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = admin_url();
        // Drop runs outside any async context we could borrow; use a small runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        db::quote_ident(&name)
                    ))
                    .execute(&mut c)
                    .await;
                }
            });
        })
        .join();
    }
}

/// The `harness` binary built for this test run.
/// A loopback port free right now (the listener that found it is closed again).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn harness_bin() -> &'static str {
    env!("CARGO_BIN_EXE_harness")
}

/// A private PostgreSQL of a test's own that it can stop and start again on the same socket
/// (clients keep their URL), for tests of outages.
pub struct RestartableServer {
    // Fields drop in order: the server is left (and stopped) before its home is deleted.
    server: Option<PrivateServer>,
    options: ServerOptions,
    home: tempfile::TempDir,
}

impl RestartableServer {
    pub async fn start(database: &str) -> RestartableServer {
        let home = tempfile::Builder::new()
            .prefix("harness-outage-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        // The server may run as another account (tests as root): it must enter the home.
        std::fs::set_permissions(
            home.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let options = ServerOptions {
            bindir: None,
            ephemeral: true,
            port: None,
        };
        let mut s = RestartableServer {
            home,
            options,
            server: None,
        };
        s.up().await;
        let server = s.server.as_ref().unwrap();
        db::create_database(server, database).await.unwrap();
        let pool = db::connect(&server.url(database), 2).await.unwrap();
        db::migrate(&pool).await.unwrap();
        pool.close().await;
        s
    }

    pub fn url(&self, database: &str) -> String {
        self.server.as_ref().expect("server up").url(database)
    }

    /// The running server.
    pub fn server(&self) -> &PrivateServer {
        self.server.as_ref().expect("server up")
    }

    pub async fn down(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::task::spawn_blocking(move || s.stop().unwrap())
                .await
                .unwrap();
        }
    }

    /// Stops the server in PostgreSQL's immediate mode (a crash: no checkpoint).
    pub async fn crash(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::task::spawn_blocking(move || s.stop_immediately().unwrap())
                .await
                .unwrap();
        }
    }

    pub async fn up(&mut self) {
        let (home, options) = (self.home.path().to_path_buf(), self.options.clone());
        let server = tokio::task::spawn_blocking(move || PrivateServer::start(&home, &options))
            .await
            .unwrap()
            .unwrap();
        self.server = Some(server);
    }
}

/// A command for the harness binary (or a copy of it at `program`) that inherits none of the
/// caller's `HARNESS_*`, `DATABASE_URL` or `OTEL_*` variables, logs warnings only, keeps its
/// home in [`scratch_home`] and puts the API on a free port (so several replicas can run
/// side by side).
pub fn harness_command_at(program: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("HARNESS_") || k.starts_with("OTEL_") || k == "DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .env("HARNESS_HOME", scratch_home())
        // Run by a developer who is not root, the suite's replicas share that user.
        .env("HARNESS_EXECUTOR__ALLOW_SHARED_USER", "true")
        .env("HARNESS_API__BIND", "127.0.0.1:0");
    cmd
}

/// Adds, with `harness` (a command for the harness binary, its environment set), a Python
/// agent `name` that returns `{}`, fired on `schedule`.
pub fn add_ticker(mut harness: std::process::Command, name: &str, schedule: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tick.py");
    std::fs::write(
        &file,
        "class Agent:\n    def execute(self):\n        return {}\n",
    )
    .unwrap();
    let o = harness
        .args(["agents", "add", name, "--file", file.to_str().unwrap()])
        .args(["--schedule", schedule])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "agents add {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// How long a replica the suite starts waits before rescuing a silent replica's tasks.
pub const RESCUE_AFTER_S: u64 = 3;

/// [`harness_command`] on the database at `url`, with the suite's fast settings: polls every
/// 100 ms, a governor sample a second, rescue after [`RESCUE_AFTER_S`].
pub fn harness_at(url: &str) -> std::process::Command {
    let mut cmd = harness_command();
    cmd.env("DATABASE_URL", url)
        .env("HARNESS_TELEMETRY__SAMPLE_INTERVAL_S", "1")
        .env(
            "HARNESS_PERSISTENCE__RESCUE_AFTER_S",
            RESCUE_AFTER_S.to_string(),
        )
        .env("HARNESS_BULK__POLL_INTERVAL_MS", "100");
    cmd
}

/// [`harness_command_at`] for the binary built for this test run.
pub fn harness_command() -> std::process::Command {
    harness_command_at(std::path::Path::new(harness_bin()))
}

/// Counts how many attempts of a handler run at once, and the peak.
#[derive(Clone, Default)]
pub struct Concurrency {
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Concurrency {
    /// A handler that sleeps `ms` and counts itself while it runs.
    pub fn handler(&self, ms: u64) -> harness::pool::Handler {
        use std::sync::atomic::Ordering::SeqCst;
        let c = self.clone();
        harness::pool::Handler::from_payload(move |_p: serde_json::Value| {
            let c = c.clone();
            async move {
                let running = c.now.fetch_add(1, SeqCst) + 1;
                c.peak.fetch_max(running, SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                c.now.fetch_sub(1, SeqCst);
                Ok::<_, String>(serde_json::json!({}))
            }
        })
    }

    /// Attempts running right now.
    pub fn running(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most attempts seen running at once since the last reset.
    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn reset_peak(&self) {
        self.peak.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Reads one HTTP request (head, then `Content-Length` bytes of body) from `sock`; bytes past
/// it stay in `buf` for the next request on a kept-alive connection. `None` at end of stream.
pub async fn read_http_request(
    sock: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 65536];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buf.len() < end + 4 + len {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[end + 4..end + 4 + len].to_vec();
    buf.drain(..end + 4 + len);
    Some((head, body))
}

/// Polls `probe` every 25 ms until it gives a value, and returns it. Panics naming `what`
/// (and the last probe's state) after `within`: deadlines are generous, a wait ends at the
/// event it waits for.
pub async fn eventually<T>(
    what: &str,
    within: std::time::Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Waits until task `id` is final (completed, failed, timeout or cancelled) and returns it.
pub async fn wait_final(
    pool: &PgPool,
    id: i64,
    within: std::time::Duration,
) -> harness::queue::Task {
    let q = harness::queue::Queue::new(pool.clone(), 0);
    let what = format!("task {id} to finish");
    eventually(&what, within, async || {
        let t = q.get(id).await.unwrap();
        t.status.is_final().then_some(t)
    })
    .await
}

/// Waits until every task of `ids` is final, each within `within`.
pub async fn wait_all_final(pool: &PgPool, ids: &[i64], within: std::time::Duration) {
    for id in ids {
        wait_final(pool, *id, within).await;
    }
}

/// Enqueues `tasks` in one batch; their ids, in order.
pub async fn enqueue_ids(
    q: &harness::queue::Queue,
    tasks: Vec<harness::queue::NewTask>,
) -> Vec<i64> {
    q.enqueue_many(tasks)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// The one number `sql` (a count, a sum) reads.
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A process a test started, in a process group of its own. Dropped (a test that ends or
/// fails), it is continued if stopped, asked to stop (SIGTERM), and killed with its whole
/// group after `grace`: nothing a test starts outlives it.
pub struct Proc {
    pub child: std::process::Child,
    grace: std::time::Duration,
}

impl Proc {
    /// Spawns `cmd` in a new process group; on drop it gets 10 s to exit after SIGTERM.
    pub fn spawn(cmd: &mut std::process::Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let child = cmd.process_group(0).spawn().expect("spawn a test process");
        Proc {
            child,
            grace: std::time::Duration::from_secs(10),
        }
    }

    /// Spawns `cmd` like [`Proc::spawn`] with its stderr collected into a [`Log`].
    pub fn spawn_logged(cmd: &mut std::process::Command) -> (Proc, Log) {
        cmd.stderr(std::process::Stdio::piped());
        let mut p = Proc::spawn(cmd);
        let stderr = p.child.stderr.take().expect("piped stderr");
        let log = Log::default();
        let sink = log.0.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        (p, log)
    }

    /// How long drop waits after SIGTERM before killing the group.
    pub fn grace(mut self, grace: std::time::Duration) -> Proc {
        self.grace = grace;
        self
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, s: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), s).expect("signal");
    }

    /// Whether the process has not exited yet.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `within` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_for_exit(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let t0 = std::time::Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if t0.elapsed() >= within {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// What a process wrote to stderr so far.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<Mutex<String>>);

impl Log {
    pub fn contains(&self, text: &str) -> bool {
        self.0.lock().unwrap().contains(text)
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill, killpg};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.pid());
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGTERM);
            let grace = self.grace;
            let _ = self.wait_for_exit(grace);
        }
        // Whatever is left of its group (agents, helpers) goes with it.
        let _ = killpg(pid, Signal::SIGCONT);
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `harness` in the background until the returned sender is used or dropped; see
/// [`stop`].
pub fn serve(
    harness: harness::Harness,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        harness
            .serve(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (tx, handle)
}

/// Stops replicas [`serve`] started, each after the one before has drained.
pub async fn stop(
    replicas: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
) {
    for (tx, handle) in replicas {
        let _ = tx.send(());
        handle.await.unwrap();
    }
}
