//! This process's share of the runs directory, and the reaping of what dead processes left.
//!
//! Layout: `<tmp>/harness-runs-<uid>/<session>/` per process that runs agents, holding
//! `session.lock` (locked with `flock` for as long as the process lives), one `run-*`
//! directory per run (the agent's working directory) and, while a run lives, a `run-*.pgid`
//! record of its process group and that group's start time.
//!
//! Guarantees: a session whose lock can be taken belongs to a dead process (a `kill -9` or a
//! crash); [`Session::open`] and [`reap_dead`] kill every process still in the recorded
//! groups (only processes of the agents' account, started no earlier than the group) and
//! remove the session's directories. A live session is never touched: the lock says so.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid};

/// Name of the lock file inside a session directory.
const LOCK: &str = "session.lock";
/// Suffix of a run's process-group record.
const PGID: &str = ".pgid";
/// Prefix of a session directory still being set up (skipped by reapers).
const NEW: &str = ".new-";

/// A session directory, locked while this value lives; removed when it is dropped.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    _lock: File,
}

impl Session {
    /// Reaps the dead sessions under `root`, then creates and locks one of our own.
    /// `agent_uid` is the account agents run as (ours when not root).
    pub fn open(root: &Path, agent_uid: u32) -> std::io::Result<Session> {
        let reaped = reap_dead(root, agent_uid);
        if reaped.processes > 0 {
            tracing::warn!(
                sessions = reaped.sessions,
                processes = reaped.processes,
                "killed agent processes left running by dead harness processes"
            );
        } else if reaped.sessions > 0 {
            tracing::info!(
                sessions = reaped.sessions,
                "removed run directories left by dead harness processes"
            );
        }
        // Set up under a name reapers skip, then renamed: no reaper ever sees a session
        // directory without its lock held.
        let name = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let building = root.join(format!("{NEW}{name}"));
        fs::create_dir(&building)?;
        // Agents must enter their own run directory inside it, nothing more.
        fs::set_permissions(&building, fs::Permissions::from_mode(0o711))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(building.join(LOCK))?;
        lock.try_lock()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let dir = root.join(name);
        fs::rename(&building, &dir)?;
        Ok(Session { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The session's name (its directory's), which names its cgroups too.
    pub fn name(&self) -> &str {
        self.dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// Records the process group of the run in `run_dir` (whose leader is `pgid`), so that
    /// a later process can kill what is left of it if we die.
    pub fn record(&self, run_dir: &Path, pgid: i32) -> std::io::Result<PathBuf> {
        let start = start_time(pgid).unwrap_or(0);
        let path = record_path(run_dir);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(f, "{pgid} {start}")?;
        Ok(path)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn record_path(run_dir: &Path) -> PathBuf {
    let mut name = run_dir.file_name().unwrap_or_default().to_os_string();
    name.push(PGID);
    run_dir.with_file_name(name)
}

/// Whether the session `name` under `root` belongs to a live process (its lock is held).
/// A session being set up counts as alive; one whose directory is gone, as dead.
pub fn is_alive(root: &Path, name: &str) -> bool {
    if name.starts_with(NEW) {
        return true;
    }
    if root.join(format!("{NEW}{name}")).exists() {
        return true;
    }
    match OpenOptions::new()
        .write(true)
        .open(root.join(name).join(LOCK))
    {
        Ok(lock) => lock.try_lock().is_err(),
        Err(_) => false,
    }
}

/// What [`reap_dead`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub sessions: usize,
    pub processes: usize,
}

/// Kills the leftover processes of every dead session under `root` and removes the
/// session's directories. Sessions of live processes (their lock is held) are left alone.
pub fn reap_dead(root: &Path, agent_uid: u32) -> Reaped {
    let mut reaped = Reaped::default();
    let Ok(entries) = fs::read_dir(root) else {
        return reaped;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue;
        };
        // Only our own directories: the runs root is ours, but be sure.
        if !meta.is_dir() || meta.uid() != Uid::effective().as_raw() {
            continue;
        }
        if name.starts_with(NEW) {
            // A set-up interrupted by a crash; a live one is renamed within microseconds.
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            if old {
                let _ = fs::remove_dir_all(&dir);
            }
            continue;
        }
        let Ok(lock) = OpenOptions::new().write(true).open(dir.join(LOCK)) else {
            // Not a session (a run directory of an older version): not ours to judge.
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // alive
        }
        for record in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = record.path();
            if !path.to_string_lossy().ends_with(PGID) {
                continue;
            }
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let mut parts = text.split_whitespace();
            let (Some(Ok(pgid)), Some(Ok(start))) = (
                parts.next().map(str::parse::<i32>),
                parts.next().map(str::parse::<u64>),
            ) else {
                continue;
            };
            reaped.processes += kill_group(pgid, start, agent_uid);
        }
        let _ = fs::remove_dir_all(&dir);
        reaped.sessions += 1;
    }
    reaped
}

/// SIGKILLs what is left of one run: every process in group `pgid` that runs as `uid` and
/// started no earlier than the group's leader did (`start`, clock ticks since boot). A group
/// whose leader is alive but started at another time is someone else's (the number was
/// reused), and is left alone. Returns how many were signalled.
fn kill_group(pgid: i32, start: u64, uid: u32) -> usize {
    if pgid <= 1 {
        return 0;
    }
    if let Some(leader) = proc_stat(pgid)
        && leader.start != start
    {
        return 0;
    }
    let mut killed = 0;
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(stat) = proc_stat(pid) else {
            continue;
        };
        let owner = fs::metadata(entry.path()).map(|m| m.uid()).ok();
        if stat.pgrp == pgid && stat.start >= start && owner == Some(uid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

struct Stat {
    pgrp: i32,
    start: u64,
}

/// Fields of `/proc/<pid>/stat`: the process group (5th) and start time (22nd).
fn proc_stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (2nd field) may hold spaces and parentheses: split after its end.
    let (_, rest) = text.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    Some(Stat {
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// When process `pid` started, in clock ticks since boot.
fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_session_is_left_alone_and_a_dead_one_is_reaped() {
        let root = tempfile::tempdir().unwrap();
        let me = Uid::effective().as_raw();
        let live = Session::open(root.path(), me).unwrap();
        // A dead session: its directory and lock file exist, nobody holds the lock.
        let dead = root.path().join("999999-deadbeef");
        fs::create_dir(&dead).unwrap();
        File::create(dead.join(LOCK)).unwrap();
        fs::create_dir(dead.join("run-x")).unwrap();
        // A process of ours, in a group of its own, recorded as that run's.
        let mut child = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(&mut child, 0);
        let mut child = child.arg("30").spawn().unwrap();
        let pgid = child.id() as i32;
        fs::write(
            dead.join("run-x.pgid"),
            format!("{pgid} {}\n", start_time(pgid).unwrap()),
        )
        .unwrap();

        let reaped = reap_dead(root.path(), me);
        assert_eq!(
            reaped,
            Reaped {
                sessions: 1,
                processes: 1
            }
        );
        assert!(!dead.exists());
        assert!(live.dir().exists(), "the live session stays");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(9));

        let dir = live.dir().to_path_buf();
        drop(live);
        assert!(!dir.exists(), "a session removes itself when dropped");
    }

    #[test]
    fn a_group_whose_leader_started_at_another_time_is_not_killed() {
        let mut child = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(&mut child, 0);
        let mut child = child.arg("30").spawn().unwrap();
        let pgid = child.id() as i32;
        let start = start_time(pgid).unwrap();
        // Recorded with another start time: the number was reused by someone else.
        assert_eq!(kill_group(pgid, start + 1, Uid::effective().as_raw()), 0);
        assert_eq!(kill_group(pgid, start, Uid::effective().as_raw()), 1);
        let _ = child.wait();
    }
}
