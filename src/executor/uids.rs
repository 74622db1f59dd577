//! A uid per concurrent run, leased from `executor.uid_range`.
//!
//! A lease is a lock file `<dir>/<uid>` held with `flock` for as long as the run lives.
//! Harness processes on one host share the directory (it sits in the runs directory), so no
//! two runs on the host hold one uid at once, and a lease dies with its process.
//!
//! A lease that is released cleanly says so by emptying its file: the run's processes are all
//! dead. A lease taken over from a process that died mid-run finds its file still marked, and
//! every process of that uid is killed before the uid is handed out again: an escaped process
//! of an earlier run never shares a uid with a later one.
//!
//! Runs get the uid as their gid too, and no supplementary groups: no passwd entry is needed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A block of uids, both ends included: `200000-200999`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

/// The lowest uid a range may start at: below it live system and login accounts.
pub const MIN_UID: u32 = 10_000;

impl FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<UidRange, String> {
        let usage = || format!("{s:?} is not a uid range; write FIRST-LAST, e.g. 200000-200999");
        let (a, b) = s.trim().split_once('-').ok_or_else(usage)?;
        let first: u32 = a.trim().parse().map_err(|_| usage())?;
        let last: u32 = b.trim().parse().map_err(|_| usage())?;
        if first < MIN_UID {
            return Err(format!(
                "{s:?} starts below {MIN_UID}, among system and login accounts; use a block of \
                 its own, e.g. 200000-200999"
            ));
        }
        if last < first || last >= u32::MAX - 1 {
            return Err(format!(
                "{s:?}: the last uid must be at least the first and below {}",
                u32::MAX - 1
            ));
        }
        Ok(UidRange { first, last })
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl UidRange {
    pub fn len(&self) -> u32 {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The leases of one host.
#[derive(Debug)]
pub struct UidPool {
    dir: PathBuf,
    range: UidRange,
}

/// One run's uid, held until dropped (or [`Lease::release`]d).
#[derive(Debug)]
pub struct Lease {
    pub uid: u32,
    file: File,
}

impl UidPool {
    /// The pool whose lease files live in `dir` (created 0700 when missing).
    pub fn open(dir: &Path, range: UidRange) -> std::io::Result<UidPool> {
        match std::fs::create_dir(dir) {
            Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(UidPool {
            dir: dir.to_path_buf(),
            range,
        })
    }

    pub fn range(&self) -> UidRange {
        self.range
    }

    /// A free uid. Starts at a random place so that concurrent processes rarely contend for
    /// one file. Blocking (a few file operations; a process kill after a crash).
    pub fn lease(&self) -> std::io::Result<Lease> {
        let n = self.range.len();
        let start = rand::random::<u32>() % n;
        for i in 0..n {
            let uid = self.range.first + (start + i) % n;
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(self.dir.join(uid.to_string()))?;
            if file.try_lock().is_err() {
                continue;
            }
            let mut mark = String::new();
            file.read_to_string(&mut mark)?;
            if !mark.is_empty() {
                // Its last holder died (or could not kill) with the run alive: what it left
                // goes first; a uid whose processes cannot be killed is not handed out.
                let Some(killed) = kill_uid(uid) else {
                    continue;
                };
                if killed > 0 {
                    tracing::warn!(
                        uid,
                        killed,
                        "killed processes a dead harness process left under a run uid"
                    );
                }
            }
            file.rewind()?;
            file.write_all(b"in use\n")?;
            return Ok(Lease { uid, file });
        }
        Err(std::io::Error::other(format!(
            "all {n} uids of executor.uid_range ({}) are in use by runs on this host; widen \
             the range or lower the concurrency",
            self.range
        )))
    }
}

impl Lease {
    /// Marks the lease clean (every process of the run is dead) and gives it back.
    pub fn release(self) {
        let _ = self.file.set_len(0);
    }
}

/// Kills every process running as `uid` (the run's uid: nothing else runs as it), escapees
/// included, and returns how many signal rounds found someone (`None`: the helper could not
/// take the uid). A forked helper takes the uid and signals everything it may (`kill(-1)`),
/// until nothing is left. Blocking.
pub fn kill_uid(uid: u32) -> Option<usize> {
    let rounds = super::sandbox::in_child(|| unsafe {
        // SAFETY: plain system calls.
        use nix::libc;
        if libc::setresgid(uid, uid, uid) != 0 || libc::setresuid(uid, uid, uid) != 0 {
            return 255;
        }
        // kill(-1) spares the caller; a process forking meanwhile is caught next round.
        let mut rounds = 0;
        while rounds < 200 && libc::kill(-1, libc::SIGKILL) == 0 {
            rounds += 1;
        }
        rounds
    });
    match rounds {
        Some(n) if n != 255 => Some(n as usize),
        _ => {
            tracing::error!(uid, "could not take uid {uid} to kill its processes");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_with_the_reason() {
        assert_eq!(
            "200000-200999".parse::<UidRange>().unwrap(),
            UidRange {
                first: 200000,
                last: 200999
            }
        );
        assert_eq!("200000-200999".parse::<UidRange>().unwrap().len(), 1000);
        assert!(
            "100-200"
                .parse::<UidRange>()
                .unwrap_err()
                .contains("system")
        );
        assert!(
            "2-1x"
                .parse::<UidRange>()
                .unwrap_err()
                .contains("FIRST-LAST")
        );
        assert!(
            "300000-200000"
                .parse::<UidRange>()
                .unwrap_err()
                .contains("at least the first")
        );
    }

    #[test]
    fn concurrent_leases_differ_and_a_released_uid_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = UidPool::open(
            &dir.path().join("uids"),
            UidRange {
                first: 300000,
                last: 300001,
            },
        )
        .unwrap();
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        assert_ne!(a.uid, b.uid);
        let err = pool.lease().unwrap_err().to_string();
        assert!(err.contains("all 2 uids"), "{err}");
        let uid = a.uid;
        a.release();
        // A fork elsewhere in this process (another test's helper) may hold a copy of the
        // lock for an instant.
        let again = (0..100)
            .find_map(|_| {
                pool.lease().ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                })
            })
            .expect("the released uid comes back");
        assert_eq!(again.uid, uid);
    }

    #[test]
    fn a_lease_left_marked_by_a_dead_process_is_cleared_of_processes_first() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to run a process as a run uid");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let uid = 300500;
        let pool = UidPool::open(
            &dir.path().join("uids"),
            UidRange {
                first: uid,
                last: uid,
            },
        )
        .unwrap();
        // A holder that died mid-run: its file still says "in use", and a process of the uid
        // is still running.
        std::fs::write(dir.path().join("uids").join(uid.to_string()), "in use\n").unwrap();
        let mut leftover = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::uid(&mut leftover, uid);
        std::os::unix::process::CommandExt::gid(&mut leftover, uid);
        let mut leftover = leftover.arg("300").spawn().unwrap();
        let lease = pool.lease().unwrap();
        assert_eq!(lease.uid, uid);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            leftover.wait().unwrap().signal(),
            Some(9),
            "the leftover was killed"
        );
        // A clean release leaves nothing to clear.
        lease.release();
        let text = std::fs::read_to_string(dir.path().join("uids").join(uid.to_string())).unwrap();
        assert!(text.is_empty(), "{text:?}");
    }
}
