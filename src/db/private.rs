//! A private PostgreSQL server for development and tests, run from the installed binaries.
//!
//! Layout under the harness home (`.harness/` or `$HARNESS_HOME`):
//! `pg/` (data directory and Unix socket), `pg.log` (server log), `pg.port` (the number in
//! the socket's name), `pg.lock` (held exclusively while a process starts or stops the
//! server) and `pg.users` (held *shared* by every process that uses the server).
//!
//! Who gets in: nobody but the harness's own OS account. The server listens on no TCP port
//! (`listen_addresses=''`), only on its Unix socket inside the 0700 data directory, and its
//! `pg_hba.conf` (rewritten at every start) has one rule: `local` connections with `peer`
//! authentication, mapped in `pg_ident.conf` from the harness's own account to the `postgres`
//! role. An agent — another account — cannot enter the directory, and would be refused at the
//! socket if it could. `pg.port` and `pg.log` are readable by the harness's account only.
//!
//! Guarantees: several `harness` processes on one home share one server; the server is
//! stopped by the last process that leaves it (an exclusive `pg.users` lock succeeds only
//! then). A process killed with `kill -9` leaves the server running, and the next process
//! attaches to it. As root, `initdb` and `postgres` run as `postgres` (or `nobody`) because
//! PostgreSQL refuses to run as root.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, Uid, User};

use super::Error;

/// The port a private server uses unless told otherwise. It listens on no TCP port: the number
/// only names its socket (`.s.PGSQL.5432`) in its own data directory.
pub const SOCKET_PORT: u16 = 5432;

/// Settings of a private server beyond PostgreSQL's defaults.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Where `initdb`/`postgres` live; `None` searches (see [`find_bindir`]).
    pub bindir: Option<PathBuf>,
    /// Trade durability against a crash of the *machine* for speed (fsync and full-page
    /// writes off); for throwaway test servers only. A commit that was acknowledged still
    /// survives a crash of PostgreSQL itself (`synchronous_commit` stays on), which crash
    /// tests rely on.
    pub ephemeral: bool,
    /// Name the socket with this port rather than [`SOCKET_PORT`].
    pub port: Option<u16>,
}

/// A handle on the shared private server. Dropping it leaves the server to the other users,
/// or stops it when this was the last one.
pub struct PrivateServer {
    home: PathBuf,
    port: u16,
    /// Held shared for as long as this process uses the server.
    users_lock: Option<File>,
    /// Present when this process started the server, so it can reap it.
    child: Option<Child>,
}

impl std::fmt::Debug for PrivateServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateServer")
            .field("home", &self.home)
            .field("port", &self.port)
            .finish()
    }
}

/// Locates the PostgreSQL server binaries: the explicit directory, else `pg_config --bindir`,
/// else `/usr/lib/postgresql/<version>/bin` (highest version first), else `$PATH`.
pub fn find_bindir(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    search_bindir(
        explicit,
        pg_config,
        Path::new("/usr/lib/postgresql"),
        std::env::var_os("PATH"),
    )
}

/// The search of [`find_bindir`], with every input given (so it can be tested).
pub fn search_bindir(
    explicit: Option<&Path>,
    pg_config_bindir: Option<PathBuf>,
    versions_root: &Path,
    path_var: Option<std::ffi::OsString>,
) -> Result<PathBuf, Error> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = explicit {
        return if has_server(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(Error::NoBinaries {
                searched: format!("{} (database.pg_bindir)", dir.display()),
            })
        };
    }
    let mut searched = Vec::new();
    if let Some(dir) = pg_config_bindir {
        if has_server(&dir) {
            return Ok(dir);
        }
        searched.push(format!("{} (pg_config --bindir)", dir.display()));
    } else {
        searched.push("pg_config (not on PATH)".to_string());
    }
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir(versions_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    if let Some((_, dir)) = versioned.iter().find(|(_, d)| has_server(d)) {
        return Ok(dir.clone());
    }
    searched.push(format!("{}/*/bin", versions_root.display()));
    if let Some(dir) = path_var.and_then(|p| std::env::split_paths(&p).find(|d| has_server(d))) {
        return Ok(dir);
    }
    searched.push("$PATH".to_string());
    Err(Error::NoBinaries {
        searched: searched.join(", "),
    })
}

/// The unprivileged account PostgreSQL runs as when we are root.
fn run_as_user() -> Option<User> {
    if !Uid::effective().is_root() {
        return None;
    }
    User::from_name("postgres")
        .ok()
        .flatten()
        .or_else(|| User::from_name("nobody").ok().flatten())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_lock(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

impl PrivateServer {
    /// Starts the server under `home`, or attaches to the one already running there.
    /// Blocking: call it from `spawn_blocking` inside an async runtime.
    pub fn start(home: &Path, options: &ServerOptions) -> Result<PrivateServer, Error> {
        fs::create_dir_all(home).map_err(io_err(home))?;
        let home = home.canonicalize().map_err(io_err(home))?;
        let startup = open_lock(&home.join("pg.lock"))?;
        startup.lock().map_err(io_err(&home.join("pg.lock")))?;
        let users = open_lock(&home.join("pg.users"))?;
        users
            .lock_shared()
            .map_err(io_err(&home.join("pg.users")))?;

        let data = home.join("pg");
        let mut port_wanted = options.port;
        match running(&home, &data) {
            Some(r) if r.tcp.is_empty() => {
                tracing::info!(port = r.port, home = %home.display(), "attached to the running private PostgreSQL");
                return Ok(PrivateServer {
                    home,
                    port: r.port,
                    users_lock: Some(users),
                    child: None,
                });
            }
            Some(r) => {
                // Started by an older version with a TCP port and trust authentication: any
                // local process could connect as superuser. Restart it locked down, on the same
                // socket, so its clients reconnect to the new one.
                tracing::warn!(
                    pid = r.pid,
                    listen = %r.tcp,
                    "the running private PostgreSQL listens on TCP; restarting it on its Unix socket only"
                );
                shut_down(r.pid);
                port_wanted = port_wanted.or(Some(r.port));
            }
            None => {}
        }

        let bindir = find_bindir(options.bindir.as_deref())?;
        let user = run_as_user();
        if let Some(u) = &user {
            check_reachable(&home, u)?;
        }
        if !data.join("PG_VERSION").is_file() {
            init_data_dir(&bindir, &data, user.as_ref())?;
        }
        // Every start, so a data directory made by an older version is locked down too.
        write_auth_config(&data, user.as_ref())?;

        // The number only names the socket file in our own directory: nothing else can take it.
        let port = port_wanted.unwrap_or(SOCKET_PORT);
        let child = spawn_server(&bindir, &home, &data, port, user.as_ref(), options)?;
        write_private(&home.join("pg.port"), port.to_string().as_bytes())?;
        tracing::info!(port, home = %home.display(), "started private PostgreSQL");
        Ok(PrivateServer {
            home,
            port,
            users_lock: Some(users),
            child: Some(child),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// A connection URL for `database` over the server's Unix socket.
    pub fn url(&self, database: &str) -> String {
        let socket_dir = self.home.join("pg");
        let host: String =
            url::form_urlencoded::byte_serialize(socket_dir.to_string_lossy().as_bytes()).collect();
        format!(
            "postgres://postgres@localhost/{database}?host={host}&port={}",
            self.port
        )
    }

    /// A `psql` command line for `database` (the server listens on its Unix socket only, and
    /// admits only this OS account).
    pub fn psql_command(&self, database: &str) -> String {
        format!(
            "psql -h {} -p {} -U postgres {database}",
            self.home.join("pg").display(),
            self.port
        )
    }

    /// Leaves the server; stops it when no other process uses it. Blocking.
    pub fn stop(mut self) -> Result<(), Error> {
        self.leave(Signal::SIGINT)
    }

    /// [`PrivateServer::stop`] in PostgreSQL's "immediate" mode (SIGQUIT): no checkpoint,
    /// crash recovery at the next start. For tests of crashes.
    pub fn stop_immediately(mut self) -> Result<(), Error> {
        self.leave(Signal::SIGQUIT)
    }

    fn leave(&mut self, mode: Signal) -> Result<(), Error> {
        let Some(users) = self.users_lock.take() else {
            return Ok(());
        };
        let lock_path = self.home.join("pg.lock");
        let startup = open_lock(&lock_path)?;
        startup.lock().map_err(io_err(&lock_path))?;
        drop(users);
        let users = open_lock(&self.home.join("pg.users"))?;
        if users.try_lock().is_err() {
            tracing::debug!(
                "private PostgreSQL still in use by another process; leaving it running"
            );
            return Ok(());
        }
        let data = self.home.join("pg");
        if let Some(pid) = postmaster_pid(&data) {
            // SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
            let _ = signal::kill(Pid::from_raw(pid), mode);
            let deadline = Instant::now() + Duration::from_secs(30);
            while process_alive(pid) && Instant::now() < deadline {
                if let Some(child) = &mut self.child
                    && let Ok(Some(_)) = child.try_wait()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if process_alive(pid) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGQUIT);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.home.join("pg.port"));
        tracing::info!(home = %self.home.display(), "stopped private PostgreSQL");
        Ok(())
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Err(e) = self.leave(Signal::SIGINT) {
            tracing::warn!(error = %e, "could not stop the private PostgreSQL");
        }
    }
}

/// Whether `home` holds an initialised data directory (`initdb` has run there), without
/// creating or starting anything.
pub fn is_initialised(home: &Path) -> bool {
    home.join("pg").join("PG_VERSION").is_file()
}

fn process_alive(pid: i32) -> bool {
    // EPERM means it exists but belongs to another user (postgres, when we are root).
    !matches!(
        signal::kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// A server found running on `data` and accepting connections.
struct Running {
    pid: i32,
    port: u16,
    /// Its first TCP listen address (line 6 of `postmaster.pid`), empty when it has none.
    tcp: String,
}

/// The server that is running on `data` and accepting connections, if any.
fn running(home: &Path, data: &Path) -> Option<Running> {
    let recorded: u16 = fs::read_to_string(home.join("pg.port"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let pid: i32 = lines.first()?.trim().parse().ok()?;
    let port: u16 = lines.get(3)?.trim().parse().ok()?;
    let tcp = lines
        .get(5)
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let ready = lines.get(7).is_some_and(|s| s.trim() == "ready");
    (process_alive(pid) && ready && port == recorded).then_some(Running { pid, port, tcp })
}

/// Fast shutdown of a server we did not start (no child handle): SIGINT, then SIGQUIT.
fn shut_down(pid: i32) {
    let _ = signal::kill(Pid::from_raw(pid), Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if process_alive(pid) {
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGQUIT);
        while process_alive(pid) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// PostgreSQL, running as `user`, must be able to enter every directory above its data.
fn check_reachable(home: &Path, user: &User) -> Result<(), Error> {
    for dir in home.ancestors() {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        let ok = if meta.uid() == user.uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(Error::Unreachable {
                user: user.name.clone(),
                path: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn as_user(cmd: &mut Command, user: Option<&User>) {
    if let Some(u) = user {
        // std drops root's supplementary groups (setgroups(0)) when it changes the uid.
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        cmd.env("HOME", &u.dir).env("USER", &u.name);
    }
}

fn chown_to(path: &Path, user: Option<&User>) -> Result<(), Error> {
    if let Some(u) = user {
        std::os::unix::fs::chown(path, Some(u.uid.as_raw()), Some(u.gid.as_raw()))
            .map_err(io_err(path))?;
    }
    Ok(())
}

fn init_data_dir(bindir: &Path, data: &Path, user: Option<&User>) -> Result<(), Error> {
    fs::create_dir_all(data).map_err(io_err(data))?;
    fs::set_permissions(data, fs::Permissions::from_mode(0o700)).map_err(io_err(data))?;
    chown_to(data, user)?;
    let mut cmd = Command::new(bindir.join("initdb"));
    cmd.arg("-D")
        .arg(data)
        .args([
            "-U",
            "postgres",
            // Replaced by write_auth_config before the first start; never trust, even meanwhile.
            "--auth-local=peer",
            "--auth-host=reject",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(data)
        .stdin(Stdio::null());
    as_user(&mut cmd, user);
    let out = cmd.output().map_err(|e| Error::Server {
        what: format!("running {}", bindir.join("initdb").display()),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        // Leave no half-initialised directory behind: the next start would trust it.
        let _ = fs::remove_dir_all(data);
        return Err(Error::Server {
            what: "initdb".into(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

/// Writes `path` readable and writable by this account only.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))
}

/// The only way in: Unix socket, peer authentication, and only this process's OS account
/// mapped to the `postgres` role. PostgreSQL reads both files at start-up.
fn write_auth_config(data: &Path, user: Option<&User>) -> Result<(), Error> {
    let me = User::from_uid(Uid::effective())
        .ok()
        .flatten()
        .ok_or_else(|| Error::Server {
            what: "the private PostgreSQL admits only this process's OS account".into(),
            detail: format!(
                "uid {} has no user name (no entry in /etc/passwd), so peer authentication cannot                  name it; add one or set DATABASE_URL to a server of your own",
                Uid::effective()
            ),
        })?;
    let hba = "# Written by Agent Harness at every start: Unix socket only, this OS account only.
               local all all peer map=harness
";
    let ident = format!(
        "# Written by Agent Harness at every start.
harness {} postgres
",
        me.name
    );
    for (name, text) in [("pg_hba.conf", hba.to_string()), ("pg_ident.conf", ident)] {
        let path = data.join(name);
        write_private(&path, text.as_bytes())?;
        chown_to(&path, user)?;
    }
    Ok(())
}

fn spawn_server(
    bindir: &Path,
    home: &Path,
    data: &Path,
    port: u16,
    user: Option<&User>,
    options: &ServerOptions,
) -> Result<Child, Error> {
    let log_path = home.join("pg.log");
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(io_err(&log_path))?
    };
    // A log made by an older version may be world-readable.
    fs::set_permissions(&log_path, fs::Permissions::from_mode(0o600)).map_err(io_err(&log_path))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    // A crashed server may leave a stale pid file behind; postgres itself checks whether
    // that pid is alive, so only a dead one is removed here.
    if let Some(pid) = postmaster_pid(data)
        && !process_alive(pid)
    {
        let _ = fs::remove_file(data.join("postmaster.pid"));
    }
    let mut cmd = Command::new(bindir.join("postgres"));
    cmd.arg("-D")
        .arg(data)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(data)
        // No TCP listener: the socket in the 0700 data directory is the only way in.
        .args(["-c", "listen_addresses=", "-c", "max_connections=200"]);
    if options.ephemeral {
        cmd.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
    }
    cmd.current_dir(data)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_err(&log_path))?)
        .stderr(log)
        // Its own process group: Ctrl-C in our terminal must not stop a server that other
        // processes may still be using; the last user stops it.
        .process_group(0);
    as_user(&mut cmd, user);
    let mut child = cmd.spawn().map_err(|e| Error::Server {
        what: format!("starting {}", bindir.join("postgres").display()),
        detail: e.to_string(),
    })?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Server {
                what: format!("PostgreSQL exited during start-up ({status})"),
                detail: log_tail(&log_path, log_start),
            });
        }
        let text = fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
        if text.lines().nth(7).is_some_and(|s| s.trim() == "ready") {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Server {
                what: "PostgreSQL did not become ready within 60 s".into(),
                detail: log_tail(&log_path, log_start),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the server logged since `from`, at most the last 4 KiB.
fn log_tail(path: &Path, from: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(4096));
    let mut buf = String::new();
    let _ = f.seek(SeekFrom::Start(start));
    let _ = f.read_to_string(&mut buf);
    format!("server log {}:\n{}", path.display(), buf.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_reports_everything_it_looked_at() {
        let empty = tempfile::tempdir().unwrap();
        let err = search_bindir(
            None,
            None,
            &empty.path().join("nothing"),
            Some(empty.path().as_os_str().to_owned()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("pg_config"), "{err}");
        assert!(err.contains("nothing/*/bin"), "{err}");
        assert!(err.contains("$PATH"), "{err}");
        assert!(err.contains("install PostgreSQL"), "{err}");
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn search_prefers_the_highest_version() {
        let root = tempfile::tempdir().unwrap();
        for v in ["9", "15", "13"] {
            let bin = root.path().join(v).join("bin");
            fs::create_dir_all(&bin).unwrap();
            fs::write(bin.join("initdb"), "").unwrap();
            fs::write(bin.join("postgres"), "").unwrap();
        }
        let found = search_bindir(None, None, root.path(), None).unwrap();
        assert_eq!(found, root.path().join("15").join("bin"));
    }

    #[test]
    fn explicit_bindir_without_binaries_is_an_error() {
        let empty = tempfile::tempdir().unwrap();
        let err = search_bindir(Some(empty.path()), None, Path::new("/nonexistent"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.pg_bindir"), "{err}");
    }
}
