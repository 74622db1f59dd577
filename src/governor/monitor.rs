//! Resource sampling ([`ResourceMonitor`], a public library API with the shape library users
//! already call): CPU and memory of the host or, inside a cgroup with a limit (a Kubernetes
//! pod), of that limit. Its execution slots are the worker's [`Capacity`], not a limiter of
//! their own, so a slot taken here is a task the worker does not claim.
//!
//! Sampling reads `/proc` and `/sys`: callers on the async runtime run it with
//! `spawn_blocking` (see [`ResourceMonitor::check_resources`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sysinfo::{MemoryRefreshKind, System};
use tokio::sync::OwnedSemaphorePermit;

use crate::worker::Capacity;

/// One sample: memory and CPU use in percent, and the memory still available.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Resources {
    pub memory_percent: f64,
    pub memory_available_mb: u64,
    pub cpu_percent: f64,
}

/// Something that samples resources: the real monitor, or a test's script.
pub trait Sampler: Send {
    fn sample(&mut self) -> Resources;
}

/// Limits and warning thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceLimits {
    pub max_concurrent_agents: usize,
    pub max_memory_mb: u64,
    pub max_cpu_percent: f64,
    pub memory_warning_threshold: f64,
    pub cpu_warning_threshold: f64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            max_concurrent_agents: 5,
            max_memory_mb: 256,
            max_cpu_percent: 50.0,
            memory_warning_threshold: 80.0,
            cpu_warning_threshold: 75.0,
        }
    }
}

/// CPU time consumed by a cgroup, and the CPUs it may use.
struct CgroupCpu {
    usage_path: std::path::PathBuf,
    /// Microseconds per read unit (v2 `usage_usec` = 1, v1 `cpuacct.usage` ns = 0.001).
    unit_us: f64,
    cpus: f64,
    last: Option<(Instant, f64)>,
}

impl CgroupCpu {
    /// The container's CPU quota and usage counter, when a quota is set.
    fn detect() -> Option<CgroupCpu> {
        Self::detect_in(Path::new("/sys/fs/cgroup"))
    }

    /// [`CgroupCpu::detect`] under `root` (a cgroup v2 directory, or the v1 mount point).
    fn detect_in(root: &Path) -> Option<CgroupCpu> {
        // cgroup v2: cpu.max is "quota period" or "max period".
        if let Ok(max) = std::fs::read_to_string(root.join("cpu.max")) {
            let mut parts = max.split_whitespace();
            let (q, p) = (parts.next()?, parts.next()?);
            let cpus = q.parse::<f64>().ok()? / p.parse::<f64>().ok()?;
            return Some(CgroupCpu {
                usage_path: root.join("cpu.stat"),
                unit_us: 1.0,
                cpus,
                last: None,
            });
        }
        // cgroup v1.
        let quota: f64 = std::fs::read_to_string(root.join("cpu/cpu.cfs_quota_us"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let period: f64 = std::fs::read_to_string(root.join("cpu/cpu.cfs_period_us"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (quota > 0.0 && period > 0.0).then(|| CgroupCpu {
            usage_path: root.join("cpuacct/cpuacct.usage"),
            unit_us: 0.001,
            cpus: quota / period,
            last: None,
        })
    }

    fn usage_us(&self) -> Option<f64> {
        let text = std::fs::read_to_string(&self.usage_path).ok()?;
        let raw: f64 = if self.unit_us == 1.0 {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?
        } else {
            text.trim().parse().ok()?
        };
        Some(raw * self.unit_us)
    }

    /// Percent of the quota used since the previous call.
    fn percent(&mut self) -> Option<f64> {
        self.percent_at(Instant::now())
    }

    fn percent_at(&mut self, now: Instant) -> Option<f64> {
        let used = self.usage_us()?;
        let pct = self.last.map(|(t, u)| {
            let elapsed_us = now.duration_since(t).as_secs_f64() * 1e6;
            ((used - u) / (elapsed_us * self.cpus) * 100.0).clamp(0.0, 100.0)
        });
        self.last = Some((now, used));
        pct
    }
}

/// Samples the host (or its container limits) with sysinfo.
pub struct ResourceMonitor {
    system: System,
    cgroup_cpu: Option<CgroupCpu>,
    limits: ResourceLimits,
    slots: Arc<Capacity>,
    last: Arc<Mutex<Option<Resources>>>,
    /// Whether memory / CPU were above their warning thresholds at the last sample, so a
    /// warning is logged when a threshold is crossed, not at every sample above it.
    above: (bool, bool),
}

impl ResourceMonitor {
    /// A monitor with `max_concurrent_agents` slots of its own (for library use without a
    /// worker).
    ///
    /// ```
    /// use harness::governor::monitor::{ResourceLimits, ResourceMonitor};
    /// let m = ResourceMonitor::new(ResourceLimits::default()).unwrap();
    /// assert_eq!(m.limits().max_concurrent_agents, 5);
    /// ```
    pub fn new(limits: ResourceLimits) -> Result<ResourceMonitor, String> {
        let slots = Capacity::new(limits.max_concurrent_agents);
        Self::with_capacity(limits, slots)
    }

    /// A monitor whose slots are `capacity`: a serving replica passes its worker's, so
    /// [`ResourceMonitor::acquire_slot`] and the claimer draw on the same permits.
    pub fn with_capacity(
        limits: ResourceLimits,
        capacity: Arc<Capacity>,
    ) -> Result<ResourceMonitor, String> {
        let mut system = System::new().map_err(|e| format!("cannot read system resources: {e}"))?;
        system.refresh_cpu_usage();
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        Ok(ResourceMonitor {
            slots: capacity,
            system,
            cgroup_cpu: CgroupCpu::detect(),
            limits,
            last: Arc::new(Mutex::new(None)),
            above: (false, false),
        })
    }

    pub fn limits(&self) -> &ResourceLimits {
        &self.limits
    }

    /// Whether a container limit (not the host's size) is what percentages refer to.
    pub fn container_limited(&self) -> bool {
        self.cgroup_cpu.is_some() || self.system.cgroup_limits().is_some()
    }

    fn read(&mut self) -> Resources {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let host_total = self.system.total_memory();
        let (total, available) = match self.system.cgroup_limits() {
            Some(c) if c.total_memory > 0 && c.total_memory < host_total => {
                (c.total_memory, c.free_memory)
            }
            _ => (host_total, self.system.available_memory()),
        };
        let memory_percent = if total == 0 {
            0.0
        } else {
            (total.saturating_sub(available)) as f64 * 100.0 / total as f64
        };
        let cpu_percent = self
            .cgroup_cpu
            .as_mut()
            .and_then(CgroupCpu::percent)
            .unwrap_or_else(|| self.system.global_cpu_usage() as f64);
        let r = Resources {
            memory_percent,
            memory_available_mb: available / (1024 * 1024),
            cpu_percent,
        };
        let above = (
            r.memory_percent >= self.limits.memory_warning_threshold,
            r.cpu_percent >= self.limits.cpu_warning_threshold,
        );
        match (self.above.0, above.0) {
            (false, true) => tracing::warn!(
                memory_percent = r.memory_percent,
                threshold = self.limits.memory_warning_threshold,
                "memory use crossed the warning threshold"
            ),
            (true, false) => tracing::info!(
                memory_percent = r.memory_percent,
                "memory use back under the warning threshold"
            ),
            _ => {}
        }
        match (self.above.1, above.1) {
            (false, true) => tracing::warn!(
                cpu_percent = r.cpu_percent,
                threshold = self.limits.cpu_warning_threshold,
                "CPU use crossed the warning threshold"
            ),
            (true, false) => tracing::info!(
                cpu_percent = r.cpu_percent,
                "CPU use back under the warning threshold"
            ),
            _ => {}
        }
        self.above = above;
        *self.last.lock().expect("last sample lock") = Some(r);
        r
    }

    /// Samples without blocking the async runtime.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::sync::{Arc, Mutex};
    /// use harness::governor::monitor::{ResourceLimits, ResourceMonitor};
    /// let m = Arc::new(Mutex::new(ResourceMonitor::new(ResourceLimits::default()).unwrap()));
    /// let r = ResourceMonitor::check_resources(m).await;
    /// assert!((0.0..=100.0).contains(&r.memory_percent));
    /// # })
    /// ```
    pub async fn check_resources(monitor: Arc<Mutex<ResourceMonitor>>) -> Resources {
        tokio::task::spawn_blocking(move || monitor.lock().expect("monitor lock").read())
            .await
            .expect("sampling panicked")
    }

    /// An execution slot, held until the permit drops: at most the capacity's grant are held
    /// at once (counting the tasks a worker sharing it runs).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use harness::governor::monitor::{ResourceLimits, ResourceMonitor};
    /// let limits = ResourceLimits { max_concurrent_agents: 1, ..ResourceLimits::default() };
    /// let m = ResourceMonitor::new(limits).unwrap();
    /// let slot = m.acquire_slot().await;
    /// assert!(!m.is_resource_available());
    /// drop(slot);
    /// assert!(m.is_resource_available());
    /// # })
    /// ```
    pub async fn acquire_slot(&self) -> OwnedSemaphorePermit {
        self.slots.acquire().await
    }

    /// Whether the last sample leaves room for another run: memory and CPU below their
    /// warning thresholds, and a free slot.
    pub fn is_resource_available(&self) -> bool {
        let last = *self.last.lock().expect("last sample lock");
        self.slots.available() > 0
            && last.is_none_or(|r| {
                r.memory_percent < self.limits.memory_warning_threshold
                    && r.cpu_percent < self.limits.cpu_warning_threshold
            })
    }

    /// Samples every 0.5 s until resources are available or `timeout` passes.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// use harness::governor::monitor::{ResourceLimits, ResourceMonitor};
    /// let limits = ResourceLimits {
    ///     memory_warning_threshold: 100.1,
    ///     cpu_warning_threshold: 100.1,
    ///     ..ResourceLimits::default()
    /// };
    /// let m = Arc::new(Mutex::new(ResourceMonitor::new(limits).unwrap()));
    /// assert!(ResourceMonitor::wait_for_resources(m, Duration::from_secs(1)).await);
    /// # })
    /// ```
    pub async fn wait_for_resources(
        monitor: Arc<Mutex<ResourceMonitor>>,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            Self::check_resources(monitor.clone()).await;
            if monitor
                .lock()
                .expect("monitor lock")
                .is_resource_available()
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Sampler for ResourceMonitor {
    fn sample(&mut self) -> Resources {
        self.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn a_cgroup_quota_is_what_cpu_percentages_refer_to() {
        // v2: half a CPU; usage in microseconds.
        let v2 = cgroup(&[
            ("cpu.max", "50000 100000\n"),
            ("cpu.stat", "usage_usec 1000000\nuser_usec 1\n"),
        ]);
        let mut cpu = CgroupCpu::detect_in(v2.path()).unwrap();
        assert_eq!(cpu.cpus, 0.5);
        let t0 = Instant::now();
        assert_eq!(cpu.percent_at(t0), None, "the first read is the baseline");
        // A quarter of a CPU-second in one second is half the quota.
        std::fs::write(v2.path().join("cpu.stat"), "usage_usec 1250000\n").unwrap();
        let pct = cpu.percent_at(t0 + Duration::from_secs(1)).unwrap();
        assert!((pct - 50.0).abs() < 1e-6, "{pct}");
        // v2 without a quota: the host's figures apply.
        let unlimited = cgroup(&[("cpu.max", "max 100000\n"), ("cpu.stat", "usage_usec 1\n")]);
        assert!(CgroupCpu::detect_in(unlimited.path()).is_none());
        // v1: two CPUs; usage in nanoseconds.
        let v1 = cgroup(&[
            ("cpu/cpu.cfs_quota_us", "200000\n"),
            ("cpu/cpu.cfs_period_us", "100000\n"),
            ("cpuacct/cpuacct.usage", "0\n"),
        ]);
        let mut cpu = CgroupCpu::detect_in(v1.path()).unwrap();
        assert_eq!(cpu.cpus, 2.0);
        assert_eq!(cpu.percent_at(t0), None);
        std::fs::write(v1.path().join("cpuacct/cpuacct.usage"), "3000000000\n").unwrap();
        let pct = cpu.percent_at(t0 + Duration::from_secs(2)).unwrap();
        assert!((pct - 75.0).abs() < 1e-6, "{pct}");
        let no_quota = cgroup(&[
            ("cpu/cpu.cfs_quota_us", "-1\n"),
            ("cpu/cpu.cfs_period_us", "100000\n"),
        ]);
        assert!(CgroupCpu::detect_in(no_quota.path()).is_none());
    }

    #[test]
    fn samples_are_percentages() {
        let mut m = ResourceMonitor::new(ResourceLimits::default()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let r = m.sample();
        assert!((0.0..=100.0).contains(&r.memory_percent), "{r:?}");
        assert!((0.0..=100.0).contains(&r.cpu_percent), "{r:?}");
        assert!(r.memory_available_mb > 0);
    }

    #[tokio::test]
    async fn slots_bound_concurrency() {
        let m = ResourceMonitor::new(ResourceLimits {
            max_concurrent_agents: 2,
            ..ResourceLimits::default()
        })
        .unwrap();
        let a = m.acquire_slot().await;
        let _b = m.acquire_slot().await;
        assert!(!m.is_resource_available(), "no slot left");
        drop(a);
        assert!(m.is_resource_available());
    }

    #[tokio::test]
    async fn slots_are_the_workers_capacity_and_follow_its_grant() {
        let cap = Capacity::new(3);
        let m = ResourceMonitor::with_capacity(ResourceLimits::default(), cap.clone()).unwrap();
        // The worker runs one task; the library caller takes a slot.
        let task = cap.acquire().await;
        let slot = m.acquire_slot().await;
        assert!(m.is_resource_available(), "one of three left");
        // The governor lowers the grant to 2: both holders are within it, nothing is free.
        cap.set(2);
        assert!(!m.is_resource_available());
        drop(task);
        assert!(m.is_resource_available());
        let other = m.acquire_slot().await;
        assert!(!m.is_resource_available());
        drop((slot, other));
        assert_eq!(cap.available(), 2);
    }
}
