//! Resource sampling (the predecessor's `ResourceMonitor`): CPU and memory of the host or,
//! inside a cgroup with a limit (a Kubernetes pod), of that limit.
//!
//! Sampling reads `/proc` and `/sys`: callers on the async runtime run it with
//! `spawn_blocking` (see [`ResourceMonitor::check_resources`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sysinfo::{MemoryRefreshKind, System};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One sample, in the predecessor's shape.
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

/// Limits and warning thresholds (the predecessor's `ResourceLimits`).
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
        let root = Path::new("/sys/fs/cgroup");
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
        let now = Instant::now();
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
    slots: Arc<Semaphore>,
    last: Arc<Mutex<Option<Resources>>>,
    /// Whether memory / CPU were above their warning thresholds at the last sample, so a
    /// warning is logged when a threshold is crossed, not at every sample above it.
    above: (bool, bool),
}

impl ResourceMonitor {
    pub fn new(limits: ResourceLimits) -> Result<ResourceMonitor, String> {
        let mut system = System::new().map_err(|e| format!("cannot read system resources: {e}"))?;
        system.refresh_cpu_usage();
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        Ok(ResourceMonitor {
            slots: Arc::new(Semaphore::new(limits.max_concurrent_agents)),
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
    pub async fn check_resources(monitor: Arc<Mutex<ResourceMonitor>>) -> Resources {
        tokio::task::spawn_blocking(move || monitor.lock().expect("monitor lock").read())
            .await
            .expect("sampling panicked")
    }

    /// An execution slot; at most `max_concurrent_agents` are held at once.
    pub async fn acquire_slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("slots are never closed")
    }

    /// Whether the last sample leaves room for another run: memory and CPU below their
    /// warning thresholds, and a free slot.
    pub fn is_resource_available(&self) -> bool {
        let last = *self.last.lock().expect("last sample lock");
        self.slots.available_permits() > 0
            && last.is_none_or(|r| {
                r.memory_percent < self.limits.memory_warning_threshold
                    && r.cpu_percent < self.limits.cpu_warning_threshold
            })
    }

    /// Samples every 0.5 s until resources are available or `timeout` passes.
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
}
