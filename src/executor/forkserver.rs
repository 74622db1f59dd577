//! The fork server: one warm Python process per executor that has imported the runner, json
//! and asyncio, and forks a child per Python run instead of starting an interpreter.
//!
//! The child applies every isolation step of an exec'd run before the agent's code loads,
//! in the same order (`forkserver.py`, `_become_run`): cgroups, mount and network
//! namespaces with private tmpfs, the run's uid and gid, parent-death signal, rlimits, no new
//! privileges, the working directory and the scrubbed environment. The server never reads a
//! run's request (the child does, after the fork), so no run's environment is in the memory
//! the next one is forked from.
//!
//! The server is a child of the spawner thread (it dies with the harness) and its children
//! die with it (their parent-death signal). Should it die or fail to start, a run that was
//! not forked yet starts the old way (an exec'd interpreter), and the next run starts a new
//! server.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recv, sendmsg, socketpair,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

/// The runner's definitions with the fork server's loop after them.
const PROGRAM: &str = concat!(include_str!("runner.py"), include_str!("forkserver.py"));

/// What the child needs to become the run (the JSON the child reads, `_become_run`).
#[derive(Serialize)]
pub(super) struct Request {
    /// The server's pid: the child checks it is still its parent once its death signal is
    /// armed.
    pub parent: i32,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub cgroup_procs: Vec<String>,
    pub tmpfs: Vec<String>,
    pub tmpfs_options: String,
    pub new_network: bool,
    pub ids: Option<(u32, u32)>,
    pub limits: RequestLimits,
}

#[derive(Serialize)]
pub(super) struct RequestLimits {
    pub address_space: Option<u64>,
    pub cpu_seconds: Option<u64>,
    pub processes: u64,
    pub file_bytes: u64,
}

/// One executor's fork server, started on first use.
#[derive(Debug)]
pub struct ForkServer {
    python: PathBuf,
    running: Mutex<Option<Arc<Server>>>,
    /// Starts that failed in a row (a server that died before forking anything counts);
    /// at [`MAX_FAILED_STARTS`] the executor stops trying and execs every run.
    failed_starts: AtomicU32,
}

const MAX_FAILED_STARTS: u32 = 3;

/// How long a fork and the child's set-up may take before the server counts as stuck.
const FORK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// What became of a request to fork.
enum Forking {
    Forked(Forked),
    /// The server is gone and forked nothing.
    Gone,
    /// The fork failed (a process limit): this run fails, the server goes on.
    Failed(String),
}

#[derive(Debug)]
struct Server {
    pid: i32,
    control: AsyncFd<OwnedFd>,
    /// Killed when the last run holding the server lets go of it (kill_on_drop).
    _process: tokio::process::Child,
}

/// A run forked by the server.
pub(super) struct Forked {
    pub pid: i32,
    conn: AsyncFd<OwnedFd>,
    exit: Option<ExitStatus>,
    /// Messages read before the pid (the child may answer before the server does).
    early: Vec<Message>,
    /// The server the run came from, alive at least as long as the run.
    _server: Option<Arc<Server>>,
}

/// Why a run did not come from the fork server.
pub(super) enum NotForked {
    /// The server is unusable and nothing of the run started: start it the old way.
    Unavailable(String),
    /// The child could not isolate itself; it ran none of the agent's code.
    Setup(String),
}

impl ForkServer {
    pub fn new(python: &Path) -> ForkServer {
        ForkServer {
            python: python.to_path_buf(),
            running: Mutex::new(None),
            failed_starts: AtomicU32::new(0),
        }
    }

    /// The pid of the running server, if one runs.
    pub fn pid(&self) -> Option<i32> {
        self.running.lock().ok()?.as_ref().map(|s| s.pid)
    }

    /// Whether starts failed so often that runs no longer try the server.
    pub fn given_up(&self) -> bool {
        self.failed_starts.load(Ordering::Relaxed) >= MAX_FAILED_STARTS
    }

    /// Forks a run: `stdout` and `stderr` become its fds 1 and 2, `request` (built by
    /// `make_request` with the server's pid) says how to isolate it.
    pub(super) async fn fork(
        &self,
        make_request: impl Fn(i32) -> Request,
        stdout: &OwnedFd,
        stderr: &OwnedFd,
    ) -> Result<Forked, NotForked> {
        // A server that died since the last run is replaced once; one that cannot start is
        // given up on after a few tries.
        for _ in 0..2 {
            let server = self.server().await.map_err(NotForked::Unavailable)?;
            let request = serde_json::to_vec(&make_request(server.pid))
                .map_err(|e| NotForked::Unavailable(e.to_string()))?;
            // A server that forks nothing in this long is stuck (stopped, say): it is left to
            // the runs it has, and this run starts the old way. Dropping what was forked
            // meanwhile makes the child exit before any of the agent's code (no "go").
            let forking = async {
                match server.fork(&request, stdout, stderr).await? {
                    Forking::Forked(mut forked) => Ok(match forked.until_ready().await {
                        Ok(()) => Forking::Forked(forked),
                        Err(why) => Forking::Failed(why),
                    }),
                    other => Ok::<_, io::Error>(other),
                }
            };
            match tokio::time::timeout(FORK_DEADLINE, forking).await {
                Ok(Ok(Forking::Forked(forked))) => {
                    self.failed_starts.store(0, Ordering::Relaxed);
                    return Ok(forked);
                }
                Ok(Ok(Forking::Failed(why))) => return Err(NotForked::Setup(why)),
                // Nothing was forked: the server is gone.
                Ok(Ok(Forking::Gone)) => self.forget(&server),
                // The request could not be sent (too big for the socket, say): this run
                // starts the old way; the server is fine.
                Ok(Err(e)) => return Err(NotForked::Unavailable(e.to_string())),
                Err(_) => {
                    self.forget(&server);
                    return Err(NotForked::Unavailable(format!(
                        "the fork server did not fork the run within {FORK_DEADLINE:?}"
                    )));
                }
            }
        }
        Err(NotForked::Unavailable(
            "the fork server ended before forking the run".into(),
        ))
    }

    fn forget(&self, server: &Arc<Server>) {
        let mut running = self.running.lock().expect("not poisoned");
        if running.as_ref().is_some_and(|s| Arc::ptr_eq(s, server)) {
            *running = None;
            tracing::warn!(pid = server.pid, "the agents' fork server is gone");
            self.failed();
        }
    }

    /// Counts a start that failed (or a server that died before forking anything).
    fn failed(&self) {
        if self.failed_starts.fetch_add(1, Ordering::Relaxed) + 1 == MAX_FAILED_STARTS {
            tracing::error!(
                python = %self.python.display(),
                "the agents' fork server failed {MAX_FAILED_STARTS} times in a row: Python runs \
                 start their own interpreter from now on"
            );
        }
    }

    async fn server(&self) -> Result<Arc<Server>, String> {
        if let Some(s) = self.running.lock().expect("not poisoned").as_ref() {
            return Ok(s.clone());
        }
        if self.given_up() {
            return Err(format!(
                "the fork server failed {MAX_FAILED_STARTS} times; runs start their own interpreter"
            ));
        }
        let server = Arc::new(self.start().await.map_err(|e| {
            self.failed();
            format!("cannot start the fork server: {e}")
        })?);
        let mut running = self.running.lock().expect("not poisoned");
        // Two runs may have started one at once: keep the first.
        Ok(running.get_or_insert(server).clone())
    }

    async fn start(&self) -> io::Result<Server> {
        let (ours, theirs) = seqpacket_pair()?;
        let theirs_fd = theirs.as_raw_fd();
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.arg("-c")
            .arg(PROGRAM)
            .current_dir("/")
            .env_clear()
            .env("PATH", super::AGENT_PATH)
            .env("LANG", "C.UTF-8")
            .env("TZ", "UTC")
            .env("PYTHONUNBUFFERED", "1")
            // No user site-packages from an account's home, as for an exec'd run (whose home
            // is its fresh run directory).
            .env("HOME", "/nonexistent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own group: a Ctrl-C at the terminal goes to the harness, which ends its runs
            // in order, not to the server, which would take them all down at once.
            .process_group(0)
            .kill_on_drop(true);
        let parent = nix::unistd::getpid();
        // SAFETY: system calls only, on values prepared before the fork.
        unsafe {
            cmd.as_std_mut().pre_exec(move || {
                // The control socket as fd 3 (dup2 clears close-on-exec on the copy), and no
                // other descriptor of ours.
                super::sandbox::close_inherited_on_exec();
                let kept = if theirs_fd == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0)
                } else {
                    nix::libc::dup2(theirs_fd, 3)
                };
                if kept < 0 {
                    return Err(io::Error::last_os_error());
                }
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
                }
                Ok(())
            });
        }
        let process = super::spawner::spawn(cmd).await?;
        drop(theirs);
        let pid = process.id().map_or(0, |p| p as i32);
        tracing::debug!(pid, "started the agents' fork server");
        Ok(Server {
            pid,
            control: register(ours)?,
            _process: process,
        })
    }
}

impl Server {
    /// Writes the request on a new connection and asks the server to fork a child for it.
    async fn fork(
        self: &Arc<Self>,
        request: &[u8],
        stdout: &OwnedFd,
        stderr: &OwnedFd,
    ) -> io::Result<Forking> {
        let (ours, theirs) = seqpacket_pair()?;
        let conn = register(ours)?;
        let pipes = [stdout.as_raw_fd(), stderr.as_raw_fd()];
        send(&conn, request, &pipes).await?;
        match send(&self.control, b"f", &[theirs.as_raw_fd()]).await {
            Ok(()) => {}
            Err(e) if is_gone(&e) => return Ok(Forking::Gone),
            Err(e) => return Err(e),
        }
        drop(theirs);
        let mut forked = Forked {
            pid: 0,
            conn,
            exit: None,
            early: Vec::new(),
            _server: Some(self.clone()),
        };
        Ok(match forked.until_pid().await? {
            Pid::Forked => Forking::Forked(forked),
            Pid::Gone => Forking::Gone,
            Pid::Failed(why) => Forking::Failed(why),
        })
    }
}

/// What came instead of the pid, or the pid.
enum Pid {
    Forked,
    Gone,
    Failed(String),
}

enum Message {
    Pid(i32),
    Ready,
    Fail(String),
    Exit(ExitStatus),
}

impl Forked {
    /// Reads the pid the server sends right after the fork. `Gone`: the connection ended
    /// first, so the server died before forking (a child cannot outlive it: the request names
    /// it as the parent the child checks for). `Failed`: the fork failed, or the child's
    /// set-up did before its pid came.
    async fn until_pid(&mut self) -> io::Result<Pid> {
        loop {
            match self.receive().await? {
                Some(Message::Pid(pid)) => {
                    self.pid = pid;
                    return Ok(Pid::Forked);
                }
                Some(Message::Fail(why)) => return Ok(Pid::Failed(why)),
                // The child's answer may come first: kept for `until_ready`.
                Some(m) => self.early.push(m),
                None => return Ok(Pid::Gone),
            }
        }
    }

    /// Waits until the child is isolated and about to load the agent's code. `Err`: it
    /// could not isolate itself (or died first), and ran none of the agent's code.
    pub(super) async fn until_ready(&mut self) -> Result<(), String> {
        loop {
            match self.message().await {
                Ok(Some(Message::Ready)) => return Ok(()),
                Ok(Some(Message::Fail(why))) => return Err(why),
                Ok(Some(Message::Exit(status))) => {
                    self.exit = Some(status);
                    return Err(format!(
                        "the forked child ended before its set-up: {status}"
                    ));
                }
                Ok(Some(Message::Pid(_))) => {}
                Ok(None) => return Err("the fork server died during the run's set-up".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Lets the child load the agent's code: call once the run's process group is recorded
    /// for killing. Until then, dropping this value (the run cancelled) makes the child exit
    /// without running any of it.
    pub(super) async fn start(&self) -> io::Result<()> {
        send(&self.conn, b"go", &[]).await
    }

    /// Waits for the run's end: its wait status, or `None` when the server died first (the
    /// child died with it).
    pub(super) async fn wait(&mut self) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.exit {
                return Some(status);
            }
            match self.message().await {
                Ok(Some(Message::Exit(status))) => self.exit = Some(status),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next message: one kept from before the pid first, then the connection's.
    async fn message(&mut self) -> io::Result<Option<Message>> {
        if !self.early.is_empty() {
            return Ok(Some(self.early.remove(0)));
        }
        self.receive().await
    }

    /// The next message on the connection.
    async fn receive(&mut self) -> io::Result<Option<Message>> {
        let mut buf = [0u8; 4096];
        let n = loop {
            let mut ready = self.conn.readable().await?;
            match ready.try_io(|fd| {
                recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
            }) {
                // The peer closed with our request unread: the kernel reports that once,
                // ahead of the messages still queued for us. They (then the end) come next.
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ECONNRESET) => continue,
                Ok(r) => break r?,
                Err(_would_block) => continue,
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        let (word, rest) = text.split_once(' ').unwrap_or((&text, ""));
        Ok(Some(match word {
            "pid" => Message::Pid(rest.parse().map_err(io::Error::other)?),
            "ready" => Message::Ready,
            "fail" => Message::Fail(rest.to_string()),
            "exit" => Message::Exit(ExitStatus::from_raw(
                rest.parse().map_err(io::Error::other)?,
            )),
            _ => return Err(io::Error::other(format!("the fork server said {text:?}"))),
        }))
    }
}

/// Sends `data` with `fds` attached, waiting while the socket is full.
async fn send(sock: &AsyncFd<OwnedFd>, data: &[u8], fds: &[i32]) -> io::Result<()> {
    let iov = [io::IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsg: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        let mut ready = sock.writable().await?;
        match ready.try_io(|fd| {
            sendmsg::<()>(
                fd.as_fd().as_raw_fd(),
                &iov,
                cmsg,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        }) {
            Ok(r) => return r.map(|_| ()),
            Err(_would_block) => continue,
        }
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EPIPE | nix::libc::ECONNRESET | nix::libc::ECONNREFUSED)
    )
}

/// A connected pair of SOCK_SEQPACKET sockets, both close-on-exec: ours (non-blocking) and
/// the one to hand over.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    set_nonblocking(&ours)?;
    Ok((ours, theirs))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let fd = fd.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` stays open, and the same descriptor, for as long as it is owned.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request for a child of `parent` that runs `dir/agent.py` as we are, with no cgroup,
    /// namespace or uid change.
    fn plain_request(parent: i32, dir: &Path) -> Request {
        let file = |name: &str| dir.join(name).display().to_string();
        Request {
            parent,
            cwd: dir.to_path_buf(),
            env: vec![
                ("HARNESS_RESULT_FILE".into(), file("result.json")),
                ("HARNESS_INPUT_FILE".into(), file("input.json")),
                ("HARNESS_PROGRESS_FILE".into(), file("progress.json")),
            ],
            cgroup_procs: vec![],
            tmpfs: vec![],
            tmpfs_options: String::new(),
            new_network: false,
            ids: None,
            limits: RequestLimits {
                address_space: None,
                cpu_seconds: None,
                processes: 4096,
                file_bytes: 1 << 30,
            },
        }
    }

    #[tokio::test]
    async fn no_agent_code_runs_until_the_harness_says_go() {
        let server = ForkServer::new(Path::new("/usr/bin/python3"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("input.json"), "{}").unwrap();
        let marker = dir.path().join("ran");
        std::fs::write(
            dir.path().join("agent.py"),
            format!(
                "open({:?}, 'a').write('x')\nclass Agent:\n    def execute(self):\n        return {{}}\n",
                marker.display().to_string()
            ),
        )
        .unwrap();
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        drop(out_r);
        let request = |parent| plain_request(parent, dir.path());
        // Isolated and ready, then let go of (a cancelled run): the child exits.
        let Ok(forked) = server.fork(request, &out_w, &out_w).await else {
            panic!("not forked")
        };
        let pid = forked.pid;
        drop(forked);
        let t = std::time::Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "the child lives on"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!marker.exists(), "the agent's code ran without go");
        // With go, it runs.
        let Ok(mut forked) = server.fork(request, &out_w, &out_w).await else {
            panic!("not forked")
        };
        forked.start().await.unwrap();
        let status = forked.wait().await.unwrap();
        assert!(status.success(), "{status}");
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "x");
    }

    #[tokio::test]
    async fn a_fork_the_system_refuses_fails_that_run_and_the_server_goes_on() {
        // A pids cgroup of one process for the server: its fork fails with EAGAIN.
        let pids = Path::new("/sys/fs/cgroup/pids");
        let cage = pids.join(format!("harness-fork-test-{:08x}", rand::random::<u32>()));
        if std::fs::create_dir(&cage).is_err() {
            eprintln!("skipped: no writable v1 pids hierarchy");
            return;
        }
        let server = ForkServer::new(Path::new("/usr/bin/python3"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("input.json"), "{}").unwrap();
        std::fs::write(
            dir.path().join("agent.py"),
            "class Agent:\n    def execute(self):\n        return {}\n",
        )
        .unwrap();
        let (_out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let request = |parent| plain_request(parent, dir.path());
        // Started by a first run.
        let Ok(mut first) = server.fork(request, &out_w, &out_w).await else {
            panic!("not forked")
        };
        first.start().await.unwrap();
        assert!(first.wait().await.unwrap().success());
        let pid = server.pid().unwrap();
        std::fs::write(cage.join("pids.max"), "1").unwrap();
        std::fs::write(cage.join("cgroup.procs"), pid.to_string()).unwrap();
        let refused = server.fork(request, &out_w, &out_w).await;
        std::fs::write(pids.join("cgroup.procs"), pid.to_string()).unwrap();
        std::fs::remove_dir(&cage).unwrap();
        match refused {
            Err(NotForked::Setup(why)) => assert!(why.contains("fork"), "{why}"),
            Err(NotForked::Unavailable(why)) => panic!("unavailable: {why}"),
            Ok(_) => panic!("the refused fork did not fail its run"),
        }
        // The same server forks the next run.
        let Ok(mut next) = server.fork(request, &out_w, &out_w).await else {
            panic!("not forked")
        };
        next.start().await.unwrap();
        assert!(next.wait().await.unwrap().success());
        assert_eq!(server.pid(), Some(pid));
    }

    // Before the fix, reading the pid after an early "ready" spun for ever without yielding:
    // this test then never ends (the timeouts cannot fire), as the runs did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_childs_answer_may_come_before_the_servers_pid() {
        let (ours, theirs) = seqpacket_pair().unwrap();
        let mut forked = Forked {
            pid: 0,
            conn: register(ours).unwrap(),
            exit: None,
            early: Vec::new(),
            _server: None,
        };
        // The child is fast: isolated, and even ended, before the server says its pid.
        for m in ["ready", "pid 4242", "exit 768"] {
            let n = nix::sys::socket::send(theirs.as_raw_fd(), m.as_bytes(), MsgFlags::empty())
                .unwrap();
            assert_eq!(n, m.len());
        }
        drop(theirs);
        let within = std::time::Duration::from_secs(5);
        use tokio::time::timeout;
        let reading = tokio::spawn(async move {
            let got = matches!(forked.until_pid().await.unwrap(), Pid::Forked);
            (forked, got)
        });
        let (mut forked, got) = timeout(within, reading)
            .await
            .expect("the pid is read")
            .unwrap();
        assert!(got);
        assert_eq!(forked.pid, 4242);
        timeout(within, forked.until_ready())
            .await
            .unwrap()
            .unwrap();
        let status = timeout(within, forked.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(3));
        // Then the end of the connection: nothing more.
        let end = timeout(within, forked.receive()).await.unwrap().unwrap();
        assert!(end.is_none());
    }
}
