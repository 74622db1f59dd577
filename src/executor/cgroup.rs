//! A control group per run: a real memory limit over all its processes, a process ceiling,
//! a CPU rate, and one write that kills everything in it (`setsid` escapees included).
//!
//! Detected at start, in order of preference:
//! - **cgroup v2** with the memory, pids and cpu controllers (`/sys/fs/cgroup` is cgroup2):
//!   `memory.max` + `memory.swap.max`, `pids.max`, `cpu.max`, `cgroup.kill`;
//! - **hybrid**: the v1 `memory`, `pids` and `cpu` hierarchies under `/sys/fs/cgroup/*` for
//!   the limits, and the v2 hierarchy at `/sys/fs/cgroup/unified` for `cgroup.kill`;
//! - **none**: rlimits only (see the executor).
//!
//! Layout, in every hierarchy used: `<this process's cgroup>/harness/<session>/<run>`, where
//! `<session>` is the executor session's name (see `session`). A session whose process died
//! leaves cgroups behind; [`Cgroups::reap_dead`] kills what is in them and removes them.
//!
//! A run joins its cgroups in the forked child before user code starts (writing `0` to each
//! `cgroup.procs`): nothing the agent runs is ever outside them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The CFS period the CPU rate is expressed in, microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// The directory under this process's cgroup that holds the sessions.
const ROOT: &str = "harness";

/// Which cgroup interface a hierarchy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V1,
    V2,
}

/// One hierarchy in use: where our sessions go, and its interface.
#[derive(Debug, Clone)]
struct Hierarchy {
    base: PathBuf,
    flavor: Flavor,
}

/// What the host offers, found once at start.
#[derive(Debug, Clone, Default)]
pub struct Cgroups {
    memory: Option<Hierarchy>,
    pids: Option<Hierarchy>,
    cpu: Option<Hierarchy>,
    /// A v2 hierarchy: `cgroup.kill`, `cgroup.procs` of a whole subtree.
    kill: Option<Hierarchy>,
}

/// What a run's cgroups limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    pub cpu_percent: u32,
}

impl Cgroups {
    /// Looks at `/sys/fs/cgroup` and this process's place in it. Only root (or an owner of a
    /// delegated subtree) can use what it finds: a hierarchy where `harness/` cannot be
    /// created is left out.
    pub fn detect() -> Cgroups {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mounts = Path::new("/sys/fs/cgroup");
        let place = |controller: &str| -> Option<PathBuf> {
            own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
                let hit = if controller.is_empty() {
                    list.is_empty()
                } else {
                    list.split(',').any(|c| c == controller)
                };
                hit.then(|| PathBuf::from(path.trim_start_matches('/')))
            })
        };
        let usable = |dir: PathBuf, flavor| -> Option<Hierarchy> {
            let base = dir.join(ROOT);
            match std::fs::create_dir(&base) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(_) => return None,
            }
            Some(Hierarchy { base, flavor })
        };
        let mut found = Cgroups::default();
        if mounts.join("cgroup.controllers").exists() {
            // Pure v2: one hierarchy for everything.
            let Some(own) = place("") else {
                return found;
            };
            let dir = mounts.join(own);
            let Some(h) = usable(dir.clone(), Flavor::V2) else {
                return found;
            };
            let enabled = enable_controllers(&dir, &h.base);
            found.kill = Some(h.clone());
            for c in enabled {
                match c {
                    "memory" => found.memory = Some(h.clone()),
                    "pids" => found.pids = Some(h.clone()),
                    "cpu" => found.cpu = Some(h.clone()),
                    _ => {}
                }
            }
            return found;
        }
        if mounts.join("unified/cgroup.procs").exists()
            && let Some(own) = place("")
        {
            found.kill = usable(mounts.join("unified").join(own), Flavor::V2);
        }
        for (controller, slot) in [
            ("memory", &mut found.memory),
            ("pids", &mut found.pids),
            ("cpu", &mut found.cpu),
        ] {
            if let Some(own) = place(controller) {
                *slot = usable(mounts.join(controller).join(own), Flavor::V1);
            }
        }
        found
    }

    /// Sets `favordynmods` on the cgroup v2 mount in use, unless it is set. Moving a process
    /// into a cgroup takes a lock whose writer waits for an RCU grace period — 13 ms per run on
    /// the development machine, measured with strace — unless the hierarchy favours dynamic
    /// changes, at a small cost to every fork and exit (kernel 6.0+; the lock is shared by
    /// all hierarchies, so this also speeds the v1 moves of a hybrid host). Returns whether
    /// it is set now.
    pub fn favor_dynamic_moves(&self) -> bool {
        let Some(kill) = &self.kill else {
            return false;
        };
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        // The cgroup2 mount that holds our base: the longest mount point that prefixes it.
        let Some((point, options)) = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 3 && f[2] == "cgroup2" && kill.base.starts_with(f[1]))
                    .then(|| (f[1].to_string(), f[3].to_string()))
            })
            .max_by_key(|(p, _)| p.len())
        else {
            return false;
        };
        let Some((flags, data)) = remount_with_favordynmods(&options) else {
            return true; // set already
        };
        let done = nix::mount::mount(
            None::<&str>,
            point.as_str(),
            None::<&str>,
            flags,
            Some(data.as_str()),
        );
        match done {
            Ok(()) => {
                tracing::info!(mount = %point, "set favordynmods on the cgroup v2 mount: moving a run into its cgroup no longer waits for an RCU grace period");
                true
            }
            Err(e) => {
                tracing::info!(mount = %point, error = %e, "could not set favordynmods: each run start waits for an RCU grace period");
                false
            }
        }
    }

    /// Whether nothing is usable.
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.pids.is_none() && self.cpu.is_none() && self.kill.is_none()
    }

    /// `cgroup_v2`, `hybrid` or `none`.
    pub fn mode(&self) -> &'static str {
        if self.is_empty() {
            "none"
        } else if self.hierarchies().all(|h| h.flavor == Flavor::V2) {
            "cgroup_v2"
        } else {
            "hybrid"
        }
    }

    pub fn memory(&self) -> bool {
        self.memory.is_some()
    }
    pub fn pids(&self) -> bool {
        self.pids.is_some()
    }
    pub fn cpu(&self) -> bool {
        self.cpu.is_some()
    }
    pub fn kill(&self) -> bool {
        self.kill.is_some()
    }

    /// Each hierarchy once (pure v2 uses one for everything).
    fn hierarchies(&self) -> impl Iterator<Item = &Hierarchy> {
        let mut seen: Vec<&Hierarchy> = Vec::new();
        for h in [&self.kill, &self.memory, &self.pids, &self.cpu]
            .into_iter()
            .flatten()
        {
            if !seen.iter().any(|s| s.base == h.base) {
                seen.push(h);
            }
        }
        seen.into_iter()
    }

    /// Creates the session's directory in every hierarchy.
    pub fn open_session(&self, session: &str) -> std::io::Result<()> {
        for h in self.hierarchies() {
            let dir = h.base.join(session);
            std::fs::create_dir(&dir)?;
            if h.flavor == Flavor::V2 {
                // Children of a v2 cgroup get only the controllers its parent hands down.
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), self.v2_controllers(h));
            }
        }
        Ok(())
    }

    fn v2_controllers(&self, h: &Hierarchy) -> String {
        let mut s = Vec::new();
        for (name, slot) in [
            ("+memory", &self.memory),
            ("+pids", &self.pids),
            ("+cpu", &self.cpu),
        ] {
            if slot.as_ref().is_some_and(|x| x.base == h.base) {
                s.push(name);
            }
        }
        s.join(" ")
    }

    /// Removes the session's directories (its runs are gone).
    pub fn close_session(&self, session: &str) {
        for h in self.hierarchies() {
            let _ = std::fs::remove_dir(h.base.join(session));
        }
    }

    /// Creates the cgroups of one run, with its limits set. The run joins them through
    /// [`RunCgroup::procs_files`] before its code starts.
    pub fn create(&self, session: &str, run: &str, limits: Limits) -> std::io::Result<RunCgroup> {
        let mut cg = RunCgroup {
            dirs: Vec::new(),
            memory: None,
            kill: None,
        };
        for h in self.hierarchies() {
            let dir = h.base.join(session).join(run);
            std::fs::create_dir(&dir)?;
            cg.dirs.push(dir);
        }
        let dir_of = |h: &Hierarchy| h.base.join(session).join(run);
        if let Some(h) = &self.memory {
            let dir = dir_of(h);
            match h.flavor {
                Flavor::V2 => {
                    write(&dir, "memory.max", limits.memory_bytes)?;
                    // Not every kernel has swap accounting; without it there is no swap to use.
                    let _ = write(&dir, "memory.swap.max", 0);
                }
                Flavor::V1 => {
                    write(&dir, "memory.limit_in_bytes", limits.memory_bytes)?;
                    // Memory plus swap: the same bound, so swap gives no room (absent when
                    // swap accounting is off).
                    let _ = write(&dir, "memory.memsw.limit_in_bytes", limits.memory_bytes);
                }
            }
            cg.memory = Some((dir, h.flavor));
        }
        if let Some(h) = &self.pids {
            write(&dir_of(h), "pids.max", limits.pids)?;
        }
        if let Some(h) = &self.cpu {
            let quota = CPU_PERIOD_US * limits.cpu_percent as u64 / 100;
            let dir = dir_of(h);
            match h.flavor {
                Flavor::V2 => {
                    std::fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?
                }
                Flavor::V1 => {
                    write(&dir, "cpu.cfs_period_us", CPU_PERIOD_US)?;
                    write(&dir, "cpu.cfs_quota_us", quota)?;
                }
            }
        }
        cg.kill = self.kill.as_ref().map(dir_of);
        Ok(cg)
    }

    /// Kills what is left in the cgroups of sessions that `alive` says are dead, and removes
    /// them. Returns how many sessions were reaped.
    pub fn reap_dead(&self, alive: impl Fn(&str) -> bool) -> usize {
        let mut reaped = std::collections::BTreeSet::new();
        for h in self.hierarchies() {
            let Ok(entries) = std::fs::read_dir(&h.base) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !entry.path().is_dir() || alive(&name) {
                    continue;
                }
                for run in std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if run.path().is_dir() {
                        empty(&run.path(), h.flavor);
                        let _ = std::fs::remove_dir(run.path());
                    }
                }
                let _ = std::fs::remove_dir(entry.path());
                reaped.insert(name);
            }
        }
        reaped.len()
    }
}

/// The flags and data of a remount that adds `favordynmods` to a cgroup2 mount with
/// `options` (as `/proc/self/mounts` lists them), keeping what it has: a remount replaces both
/// the per-mount flags and the cgroup2 options. `None` when it is set already.
fn remount_with_favordynmods(options: &str) -> Option<(nix::mount::MsFlags, String)> {
    use nix::mount::MsFlags;
    let has = |name: &str| options.split(',').any(|o| o == name);
    if has("favordynmods") {
        return None;
    }
    const KEPT: [&str; 5] = [
        "nsdelegate",
        "memory_localevents",
        "memory_recursiveprot",
        "memory_hugetlb_accounting",
        "pids_localevents",
    ];
    let mut data: Vec<&str> = options.split(',').filter(|o| KEPT.contains(o)).collect();
    data.push("favordynmods");
    let mut flags = MsFlags::MS_REMOUNT;
    for (name, flag) in [
        ("nosuid", MsFlags::MS_NOSUID),
        ("nodev", MsFlags::MS_NODEV),
        ("noexec", MsFlags::MS_NOEXEC),
        ("relatime", MsFlags::MS_RELATIME),
        ("noatime", MsFlags::MS_NOATIME),
        ("ro", MsFlags::MS_RDONLY),
    ] {
        if has(name) {
            flags |= flag;
        }
    }
    Some((flags, data.join(",")))
}

/// Writes `"+memory +pids +cpu"` (what the host has) into the subtree controls from `own`
/// down to `base`, so that runs under `base` get them. A cgroup with processes cannot hand
/// controllers down (v2's no-internal-process rule): this process then moves itself into a
/// leaf `<own>/supervisor` first. Returns the controllers that reached `base`.
fn enable_controllers(own: &Path, base: &Path) -> Vec<&'static str> {
    let available = std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<&'static str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    if wanted.is_empty() {
        return wanted;
    }
    let line = wanted
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let enable = |dir: &Path| std::fs::write(dir.join("cgroup.subtree_control"), &line);
    if enable(own).is_err() {
        // Every process of our cgroup moves (ours, and the init that forked us as PID 1).
        let leaf = own.join("supervisor");
        let _ = std::fs::create_dir(&leaf);
        let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
        }
        if enable(own).is_err() {
            return Vec::new();
        }
    }
    if enable(base).is_err() {
        return Vec::new();
    }
    wanted
}

fn write(dir: &Path, file: &str, value: u64) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

/// Kills every process in the cgroup at `dir` and waits (up to a second) until it is empty.
fn empty(dir: &Path, flavor: Flavor) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    let procs = dir.join("cgroup.procs");
    let mut killed = false;
    loop {
        let pids = std::fs::read_to_string(&procs).unwrap_or_default();
        if pids.trim().is_empty() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        match flavor {
            Flavor::V2 if !killed => {
                killed = std::fs::write(dir.join("cgroup.kill"), "1").is_ok();
            }
            _ => {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One run's cgroups; killed and removed when dropped.
#[derive(Debug)]
pub struct RunCgroup {
    dirs: Vec<PathBuf>,
    memory: Option<(PathBuf, Flavor)>,
    kill: Option<PathBuf>,
}

impl RunCgroup {
    /// The `cgroup.procs` files the child writes `0` to, to join (built before the fork: the
    /// child may not allocate).
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).expect("no NUL"))
            .collect()
    }

    /// Kills everything in the run (the v2 `cgroup.kill` where there is one) and waits until
    /// it is empty. Returns false when something survived a second of trying.
    pub fn kill_all(&self) -> bool {
        match &self.kill {
            Some(dir) => empty(dir, Flavor::V2),
            None => self.dirs.iter().all(|d| empty(d, Flavor::V1)),
        }
    }

    /// Whether the kernel's OOM killer killed a process of the run (its memory limit).
    pub fn oom_killed(&self) -> bool {
        let Some((dir, flavor)) = &self.memory else {
            return false;
        };
        let file = match flavor {
            Flavor::V2 => "memory.events",
            Flavor::V1 => "memory.oom_control",
        };
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        if !self.kill_all() {
            tracing::error!(cgroup = ?self.dirs, "a run's cgroup could not be emptied");
        }
        for d in &self.dirs {
            // A cgroup whose last process just exited may be busy for a moment.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::MsFlags;

    #[test]
    fn the_favordynmods_remount_keeps_the_mounts_flags_and_options() {
        let (flags, data) = remount_with_favordynmods(
            "rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot",
        )
        .unwrap();
        assert_eq!(
            flags,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_RELATIME
        );
        assert_eq!(data, "nsdelegate,memory_recursiveprot,favordynmods");
        assert_eq!(remount_with_favordynmods("rw,relatime,favordynmods"), None);
    }
}
