//! The harness as PID 1 (a container without an init): it forks, the parent stays PID 1
//! and does an init's work, the child is the harness.
//!
//! An init reaps every orphan re-parented to it. Agents' orphans (a daemon whose parent
//! exited) end up there; unreaped they stay zombies, keep their pid and count against process
//! limits. The parent also forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to
//! the harness, and exits with its status. It never touches anything else: it does no I/O,
//! holds no database connection and starts no threads.
//!
//! Must run first in `main`, before any thread exists (a fork copies only the calling
//! thread).

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// The harness's pid, for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

extern "C" fn forward(sig: i32) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            nix::libc::kill(child, sig);
        }
    }
}

/// When this process is PID 1, becomes its init and never returns (the harness continues in
/// the child). Otherwise returns at once. `HARNESS_NO_INIT=1` turns it off (a real init is
/// present after all).
pub fn become_init_if_pid1() {
    if std::process::id() != 1 || std::env::var_os("HARNESS_NO_INIT").is_some_and(|v| v == "1") {
        return;
    }
    // SAFETY: no other thread exists yet (see the module doc).
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {}
        Ok(ForkResult::Parent { child }) => init(child),
        Err(e) => {
            eprintln!("harness: cannot fork an init process ({e}); orphans will not be reaped")
        }
    }
}

fn init(child: Pid) -> ! {
    CHILD.store(child.as_raw(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in FORWARDED {
        // SAFETY: the handler only calls kill.
        let _ = unsafe { sigaction(sig, &action) };
    }
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                std::process::exit(128 + sig as i32)
            }
            // An orphan reaped, or an interrupted wait: go on.
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => std::process::exit(1),
        }
    }
}
