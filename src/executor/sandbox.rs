//! What this host lets the executor do to isolate a run, found once at start, and the
//! set-up the forked child makes before the agent's code starts.
//!
//! In order, in the child (as root, before the uid change, which would lose the rights):
//! 1. join the run's cgroups (`cgroup`);
//! 2. a new mount namespace with size-limited tmpfs on `/tmp`, `/var/tmp`, `/dev/shm` and
//!    `/run/lock` (the places any account may write), and for `network: none` a new, empty
//!    network namespace;
//! 3. the run's uid and gid, no supplementary groups;
//! 4. parent-death signal, rlimits, no new privileges (see `Limits`).
//!
//! Every step is a system call on memory prepared before the fork: the child allocates
//! nothing.

use std::ffi::CString;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use serde::Serialize;

/// The places every account may write; a run gets each as a private tmpfs.
pub const SHARED_WRITABLE: [&str; 4] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"];

/// How agents are isolated on this replica, as `harness fleet` and `/api/fleet` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Isolation {
    /// `cgroup_v2`, `hybrid` (v1 controllers + v2 kill) or `rlimit` (no cgroups).
    pub mode: &'static str,
    /// Each concurrent run has a uid of its own from `executor.uid_range`.
    pub uid_per_run: bool,
    /// Agents run as the harness's own user (it is not root).
    pub shared_user: bool,
    /// A memory limit over all the run's processes (else RLIMIT_AS per process).
    pub cgroup_memory: bool,
    /// A process ceiling per run (else RLIMIT_NPROC, per uid).
    pub cgroup_pids: bool,
    /// `cpu_percent` as a rate (else a CPU-seconds budget, RLIMIT_CPU).
    pub cgroup_cpu: bool,
    /// Everything the run started is killed at its end, `setsid` escapees included.
    pub cgroup_kill: bool,
    /// `/tmp`, `/var/tmp`, `/dev/shm`, `/run/lock` private to the run.
    pub private_tmp: bool,
    /// `network: none` is available.
    pub network_none: bool,
}

impl Isolation {
    /// `hybrid: uid-per-run, cgroup-memory, …`: the mode and the guarantees that hold.
    pub fn describe(&self) -> String {
        let mut held = Vec::new();
        for (on, name) in [
            (self.uid_per_run, "uid-per-run"),
            (self.shared_user, "shared-user"),
            (self.cgroup_memory, "cgroup-memory"),
            (self.cgroup_pids, "cgroup-pids"),
            (self.cgroup_cpu, "cgroup-cpu"),
            (self.cgroup_kill, "cgroup-kill"),
            (self.private_tmp, "private-tmp"),
            (self.network_none, "network-none"),
        ] {
            if on {
                held.push(name);
            }
        }
        format!("{}: {}", self.mode, held.join(", "))
    }

    /// What is missing, for a warning at start; `None` when every guarantee holds.
    pub fn missing(&self) -> Option<String> {
        let mut gaps = Vec::new();
        if !self.uid_per_run {
            gaps.push(if self.shared_user {
                "agents share the harness's own user"
            } else {
                "agents share one account (executor.run_as)"
            });
        }
        if !self.cgroup_memory {
            gaps.push("memory is limited per process (RLIMIT_AS), not per run");
        }
        if !self.cgroup_pids {
            gaps.push("processes are limited per account (RLIMIT_NPROC), not per run");
        }
        if !self.cgroup_cpu {
            gaps.push("CPU is a CPU-seconds budget (timeout × cpu_percent), not a rate");
        }
        if !self.cgroup_kill {
            gaps.push("a process that leaves the run's process group is killed only by uid");
        }
        if !self.private_tmp {
            gaps.push("/tmp, /var/tmp and /dev/shm are shared (a run's files there are removed at its end only with a uid per run)");
        }
        if !self.network_none {
            gaps.push("network: none is not available");
        }
        (!gaps.is_empty()).then(|| gaps.join("; "))
    }
}

static DEGRADED: std::sync::Once = std::sync::Once::new();

impl Isolation {
    /// Logs, once per process, what this host's isolation cannot guarantee (called by
    /// replicas).
    pub fn warn_if_degraded(&self) {
        if let Some(gaps) = self.missing() {
            DEGRADED.call_once(|| {
                tracing::warn!(isolation = %self.describe(), "agent isolation is partial: {gaps}")
            });
        }
    }
}

/// Whether a child of this process may make a mount namespace with tmpfs mounts, and a
/// network namespace (root with CAP_SYS_ADMIN; not in most unprivileged containers).
pub fn probe_namespaces() -> (bool, bool) {
    let tmp = CString::new("/tmp").expect("no NUL");
    let opts = CString::new("size=1m").expect("no NUL");
    let private = probe(|| {
        unshare(CloneFlags::CLONE_NEWNS).is_ok()
            && mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .is_ok()
            && mount(
                Some(c"tmpfs"),
                tmp.as_c_str(),
                Some(c"tmpfs"),
                MsFlags::empty(),
                Some(opts.as_c_str()),
            )
            .is_ok()
    });
    let network = probe(|| unshare(CloneFlags::CLONE_NEWNET).is_ok());
    (private, network)
}

/// Runs `test` in a forked child and says whether it returned true.
fn probe(test: impl Fn() -> bool) -> bool {
    in_child(|| if test() { 0 } else { 1 }) == Some(0)
}

/// Runs `f` in a forked child and returns its exit code (`None`: no fork, or it did not
/// exit). The child closes its copies of every descriptor first, so that it never keeps a
/// lock (a uid lease) alive; `f` may only make async-signal-safe system calls on memory
/// prepared before the fork (other threads may hold the allocator's lock).
pub fn in_child(f: impl Fn() -> i32) -> Option<i32> {
    // SAFETY: the child runs `f` (system calls only, see above) and `_exit`s.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => unsafe {
            nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            nix::libc::_exit(f())
        },
        Ok(nix::unistd::ForkResult::Parent { child }) => match nix::sys::wait::waitpid(child, None)
        {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => Some(code),
            _ => None,
        },
        Err(e) => {
            tracing::error!(error = %e, "could not fork a helper process");
            None
        }
    }
}

/// Marks every descriptor above stderr close-on-exec, in a child between fork and exec: a
/// descriptor the harness inherited without the flag (a parent's jobserver pipe, say) must
/// not reach an agent. Not closed at once: std reports a failed exec through one of them.
/// Best effort (Linux 5.11+).
pub fn close_inherited_on_exec() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: one system call, no memory touched.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            3u32,
            u32::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Everything the forked child does before exec, prepared in the parent.
pub struct ChildSetup {
    /// `cgroup.procs` files to write `0` to.
    pub cgroup_procs: Vec<CString>,
    /// Mount points to cover with a private tmpfs (empty: no mount namespace).
    pub tmpfs: Vec<CString>,
    pub tmpfs_options: CString,
    pub new_network: bool,
    /// The run's uid and gid (none: stay who we are).
    pub ids: Option<(u32, u32)>,
    pub limits: super::Limits,
}

impl ChildSetup {
    /// Private tmpfs mounts of `size_mb` each on the shared writable places this host has.
    pub fn private_tmp(size_mb: u64) -> (Vec<CString>, CString) {
        let targets = SHARED_WRITABLE
            .iter()
            .filter(|p| Path::new(p).is_dir())
            .map(|p| CString::new(*p).expect("no NUL"))
            .collect();
        let options = CString::new(format!("size={size_mb}m,mode=1777")).expect("no NUL");
        (targets, options)
    }

    /// The same set-up as a fork server's request (`forkserver.py` applies it in the same
    /// order), for a child of the server `parent` that runs in `cwd` with `env`.
    pub fn fork_request(
        &self,
        parent: i32,
        cwd: &Path,
        env: &[(String, String)],
    ) -> super::forkserver::Request {
        let text = |c: &CString| c.to_string_lossy().into_owned();
        super::forkserver::Request {
            parent,
            cwd: cwd.to_path_buf(),
            env: env.to_vec(),
            cgroup_procs: self.cgroup_procs.iter().map(text).collect(),
            tmpfs: self.tmpfs.iter().map(text).collect(),
            tmpfs_options: text(&self.tmpfs_options),
            new_network: self.new_network,
            ids: self.ids,
            limits: super::forkserver::RequestLimits {
                address_space: self.limits.address_space,
                cpu_seconds: self.limits.cpu_seconds,
                processes: self.limits.processes,
                file_bytes: self.limits.file_bytes,
            },
        }
    }

    /// Runs in the child between fork and exec.
    pub fn apply(&self) -> std::io::Result<()> {
        use nix::libc;
        close_inherited_on_exec();
        for path in &self.cgroup_procs {
            // SAFETY: open/write/close on a NUL-terminated path prepared before the fork.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, c"0".as_ptr().cast(), 1) == 1;
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if !ok {
                    return Err(err);
                }
            }
        }
        let mut flags = CloneFlags::empty();
        if !self.tmpfs.is_empty() {
            flags |= CloneFlags::CLONE_NEWNS;
        }
        if self.new_network {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        if !flags.is_empty() {
            unshare(flags)?;
        }
        if !self.tmpfs.is_empty() {
            // Our mounts must not propagate back to the host's namespace.
            mount(
                None::<&str>,
                c"/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            for target in &self.tmpfs {
                mount(
                    Some(c"tmpfs"),
                    target.as_c_str(),
                    Some(c"tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(self.tmpfs_options.as_c_str()),
                )?;
            }
        }
        if let Some((uid, gid)) = self.ids {
            // SAFETY: plain system calls.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        self.limits.apply()
    }
}
