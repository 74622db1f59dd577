//! A PgBouncer in transaction mode in front of a test's private PostgreSQL.
//!
//! The binary is `$PGBOUNCER`, else `pgbouncer` on PATH, else `/usr/sbin/pgbouncer`, and must
//! be 1.21 or later (sqlx names its prepared statements; older PgBouncers cannot track them
//! in transaction mode). `.ci/pgbouncer` installs one. Without one the tests that need it say
//! so and pass, unless `PGBOUNCER_REQUIRED` is set (CI sets it).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::db::PrivateServer;

use super::{Log, Proc, free_port};

/// The oldest PgBouncer that keeps sqlx's prepared statements apart in transaction mode
/// (`max_prepared_statements`).
pub const OLDEST: (u32, u32) = (1, 21);

/// A usable PgBouncer binary, or `None` (after saying why) when the test cannot run here.
pub fn binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PGBOUNCER")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("pgbouncer"))
                .collect::<Vec<_>>()
        }))
        .chain([PathBuf::from("/usr/sbin/pgbouncer")]);
    let mut seen = Vec::new();
    for path in candidates.filter(|p| p.is_file()) {
        let version = version_of(&path);
        if version.is_some_and(|v| v >= OLDEST) {
            return Some(path);
        }
        seen.push(format!("{} ({version:?})", path.display()));
    }
    let why = format!(
        "no PgBouncer {}.{} or later (found: {}); .ci/pgbouncer installs one",
        OLDEST.0,
        OLDEST.1,
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    );
    if std::env::var_os("PGBOUNCER_REQUIRED").is_some() {
        panic!("{why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// `pgbouncer --version`'s major and minor.
fn version_of(path: &Path) -> Option<(u32, u32)> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().next()?.strip_prefix("PgBouncer ")?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// A running PgBouncer (transaction mode, `pool_size` server connections per database) in
/// front of `server`; stopped when dropped.
pub struct PgBouncer {
    pub port: u16,
    pub log: Log,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    pub async fn start(binary: &Path, server: &PrivateServer, pool_size: u32) -> PgBouncer {
        // PgBouncer refuses to run as root: it runs as the server's own account, which can
        // enter the socket's directory, and the server's peer map is told to admit it.
        let data = server.home().join("pg");
        let meta = std::fs::metadata(&data).expect("the server's data directory");
        let (uid, gid) = (meta.uid(), meta.gid());
        admit_account(server, &data, uid).await;

        let dir = tempfile::Builder::new()
            .prefix("harness-pgbouncer-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = free_port();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 * = host={socket} port={server_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 admin_users = postgres\n\
                 pool_mode = transaction\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 1000\n\
                 max_prepared_statements = 200\n",
                socket = data.display(),
                server_port = server.port(),
                users = users.display(),
            ),
        )
        .unwrap();
        for f in [&users, &ini] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let mut cmd = Command::new(binary);
        cmd.arg(&ini).stdout(Stdio::null());
        if nix::unistd::Uid::effective().is_root() {
            cmd.uid(uid).gid(gid);
        }
        let (proc, log) = Proc::spawn_logged(&mut cmd);
        let proc = proc.grace(Duration::from_secs(2));
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "PgBouncer did not listen on {port} within 10 s: {}",
                log.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        PgBouncer {
            port,
            log,
            _proc: proc,
            _dir: dir,
        }
    }

    /// A URL of `database` through the pooler.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `SHOW <what>` on the admin console, a map of column to value per row (through psql:
    /// the console speaks only the simple query protocol).
    pub fn show(&self, what: &str) -> Vec<std::collections::HashMap<String, String>> {
        let bindir = harness::db::private::find_bindir(None).expect("PostgreSQL binaries");
        let out = Command::new(bindir.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "pgbouncer",
                "-A",
                "-P",
                "footer=off",
                "-c",
            ])
            .arg(format!("SHOW {what}"))
            .env_remove("PGPASSWORD")
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "SHOW {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split('|').collect();
        lines
            .map(|l| {
                header
                    .iter()
                    .zip(l.split('|'))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }
}

/// Adds the account `uid` to the peer map of `server` (which admits only the account that
/// started it), until the server's next start rewrites the map.
async fn admit_account(server: &PrivateServer, data: &Path, uid: u32) {
    let me = nix::unistd::Uid::effective();
    if me.as_raw() == uid {
        return;
    }
    let name = nix::unistd::User::from_uid(uid.into())
        .unwrap()
        .expect("the server's account has a name")
        .name;
    let ident = data.join("pg_ident.conf");
    let mut text = std::fs::read_to_string(&ident).unwrap();
    text.push_str(&format!("harness {name} postgres\n"));
    std::fs::write(&ident, text).unwrap();
    let admin = harness::db::connect(&server.url("postgres"), 1)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
}
