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
//! attaches to it; [`shut_down_home`] (`harness down`) stops such a server from outside, and
//! refuses while users remain unless forced. A [`Stopper`] leaves the server on its owner's
//! behalf from another task (a replica's second Ctrl-C). As root, `initdb` and `postgres` run as `postgres` (or `nobody`) because
//! PostgreSQL refuses to run as root.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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
    /// Held shared for as long as this process uses the server; shared with its
    /// [`Stopper`]s, and taken by whichever leaves first.
    users_lock: UsersLock,
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

/// How long a fast shutdown may take before the server is stopped in immediate mode.
const FAST_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How long an immediate shutdown (SIGQUIT) is waited for.
const IMMEDIATE_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// This process's shared lock on `pg.users`, until one leaves the server with it.
#[derive(Clone)]
struct UsersLock(Arc<Mutex<Option<File>>>);

impl UsersLock {
    fn new(file: File) -> UsersLock {
        UsersLock(Arc::new(Mutex::new(Some(file))))
    }

    /// The lock, for the one caller that leaves; `None` once taken.
    fn take(&self) -> Option<File> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Leaves a [`PrivateServer`] from elsewhere than its owner: a replica's second Ctrl-C exits
/// at once, while the owner may be anywhere in its drain.
#[derive(Clone)]
pub struct Stopper {
    home: PathBuf,
    users_lock: UsersLock,
}

/// What leaving the server did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// This was its last user: the server (this postmaster pid) is stopped.
    Stopped { pid: i32 },
    /// Other processes use it: it keeps running for them.
    InUse,
    /// The server was not running (anymore), or this process had already left it.
    Nothing,
}

impl Stopper {
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Leaves the server now; when no other process uses it, stops it: fast shutdown for
    /// `grace`, then immediate. Blocking, for at most `grace` and the immediate stop.
    pub fn stop_now(&self, grace: Duration) -> Result<Left, Error> {
        match self.users_lock.take() {
            Some(users) => leave_server(&self.home, users, Signal::SIGINT, grace, None),
            None => Ok(Left::Nothing),
        }
    }
}

/// What [`shut_down_home`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    /// The server (this postmaster pid) was running and has exited; `users` are the pids of
    /// processes that were still using it (stopped under them with `force`).
    Stopped { pid: i32, users: Vec<i32> },
    /// No server runs under the home.
    NotRunning,
    /// Other processes use the server (their pids, as far as `/proc/locks` tells, possibly
    /// none); nothing was done.
    InUse { pid: i32, users: Vec<i32> },
}

/// Stops the private server under `home`, whoever started it (`harness down`): fast shutdown,
/// waiting until the postmaster has exited. Refuses while other processes use it unless
/// `force`. Creates nothing in a home without a server. Blocking.
pub fn shut_down_home(home: &Path, force: bool) -> Result<Shutdown, Error> {
    if !home.join("pg").is_dir() {
        return Ok(Shutdown::NotRunning);
    }
    let home = home.canonicalize().map_err(io_err(home))?;
    // No process starts, joins or leaves the server while this holds the start-up lock.
    let lock_path = home.join("pg.lock");
    let startup = open_lock(&lock_path)?;
    startup.lock().map_err(io_err(&lock_path))?;
    let Some(pid) = postmaster_pid(&home.join("pg")).filter(|p| is_postmaster(*p)) else {
        return Ok(Shutdown::NotRunning);
    };
    let users_path = home.join("pg.users");
    let users = open_lock(&users_path)?;
    let mut holders = Vec::new();
    if users.try_lock().is_err() {
        holders = lock_holders(&users_path);
        if !force {
            return Ok(Shutdown::InUse {
                pid,
                users: holders,
            });
        }
    }
    shut_down(pid);
    let _ = fs::remove_file(home.join("pg.port"));
    Ok(Shutdown::Stopped {
        pid,
        users: holders,
    })
}

/// Whether `pid` is alive and a PostgreSQL server (not another process that got the pid of
/// one that crashed). Where `/proc` cannot tell, alive is enough.
fn is_postmaster(pid: i32) -> bool {
    process_alive(pid)
        && fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_or(true, |comm| comm.trim() == "postgres")
}

/// The pids holding a `flock` on `path`, from `/proc/locks` (empty where it cannot tell).
fn lock_holders(path: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(locks)) = (fs::metadata(path), fs::read_to_string("/proc/locks")) else {
        return Vec::new();
    };
    flock_holders(&locks, meta.ino(), std::process::id() as i32)
}

/// The pids in a `/proc/locks` listing that hold a `FLOCK` on inode `ino`, but `own_pid`.
/// Waiters (lines with `->`) hold nothing yet. Matched on the inode alone: the device numbers
/// of overlay filesystems differ between `stat` and `/proc/locks`.
fn flock_holders(locks: &str, ino: u64, own_pid: i32) -> Vec<i32> {
    let mut pids: Vec<i32> = locks
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // 1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid: i32 = fields.get(4)?.parse().ok()?;
            let file_ino: u64 = fields.get(5)?.rsplit(':').next()?.parse().ok()?;
            (file_ino == ino && pid != own_pid && pid > 0).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
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
                    users_lock: UsersLock::new(users),
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
            users_lock: UsersLock::new(users),
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

    /// A handle that leaves the server on this process's behalf from elsewhere.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            home: self.home.clone(),
            users_lock: self.users_lock.clone(),
        }
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
        leave_server(
            &self.home,
            users,
            mode,
            FAST_SHUTDOWN_GRACE,
            self.child.take(),
        )
        .map(|_| ())
    }
}

/// Gives up this process's shared lock `users` on the server under `home`, and stops the
/// server (`mode`, then immediate after `grace`) when no other process holds one. `child` is
/// the server's process when this process started it, to reap.
fn leave_server(
    home: &Path,
    users: File,
    mode: Signal,
    grace: Duration,
    mut child: Option<Child>,
) -> Result<Left, Error> {
    let lock_path = home.join("pg.lock");
    let startup = open_lock(&lock_path)?;
    startup.lock().map_err(io_err(&lock_path))?;
    drop(users);
    let users = open_lock(&home.join("pg.users"))?;
    if users.try_lock().is_err() {
        tracing::debug!("private PostgreSQL still in use by another process; leaving it running");
        return Ok(Left::InUse);
    }
    let data = home.join("pg");
    let mut left = Left::Nothing;
    if let Some(pid) = postmaster_pid(&data).filter(|p| is_postmaster(*p)) {
        // SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        let _ = signal::kill(Pid::from_raw(pid), mode);
        if !exits_within(pid, &mut child, grace) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGQUIT);
            exits_within(pid, &mut child, IMMEDIATE_SHUTDOWN_GRACE);
        }
        left = Left::Stopped { pid };
    }
    if let Some(mut child) = child {
        let _ = child.wait();
    }
    let _ = fs::remove_file(home.join("pg.port"));
    tracing::info!(home = %home.display(), "stopped private PostgreSQL");
    Ok(left)
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

/// Waits up to `within` for the server `pid` to exit; whether it did. A server this process
/// started is reaped (by `child` when held, else by pid): unreaped, it would stay a zombie
/// that still answers to its pid.
fn exits_within(pid: i32, child: &mut Option<Child>, within: Duration) -> bool {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = Instant::now() + within;
    loop {
        let reaped = match child {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            // Not our child: ECHILD, and the liveness check below decides.
            None => matches!(
                waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
            ),
        };
        if reaped || !process_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn process_alive(pid: i32) -> bool {
    // EPERM means it exists but belongs to another user (postgres, when we are root).
    let exists = !matches!(
        signal::kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    );
    // A zombie has exited and only waits for its parent's wait (a server stopped under the
    // replica that started it, by `harness down --force`); waiting for it to go would hang.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // pid (comm) STATE …: the state follows the last parenthesis.
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            == Some("Z")
    })
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
    let deadline = Instant::now() + FAST_SHUTDOWN_GRACE;
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
    fn lock_holders_are_the_flock_holders_of_the_inode_but_ourselves_and_waiters() {
        let locks = "1: FLOCK  ADVISORY  READ  4242 fd:01:777 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 5151 fd:01:777 0 EOF\n\
                     2: FLOCK  ADVISORY  READ  4343 00:2f:777 0 EOF\n\
                     3: FLOCK  ADVISORY  READ  99 fd:01:777 0 EOF\n\
                     4: POSIX  ADVISORY  WRITE 4444 fd:01:777 0 EOF\n\
                     5: FLOCK  ADVISORY  WRITE 4545 fd:01:778 0 EOF\n\
                     6: FLOCK  ADVISORY  READ  4242 fd:01:777 0 EOF\n";
        assert_eq!(flock_holders(locks, 777, 99), vec![4242, 4343]);
        assert_eq!(flock_holders("", 777, 99), Vec::<i32>::new());
    }

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
