//! Bounds that several layers check — the configuration, the queue, the agent registry, the
//! API and its document — defined once, here, so they cannot drift apart.

use std::time::Duration;

/// Retries a task (or an agent's run, or `bulk.retry_attempts`) may ask for.
pub const MAX_RETRIES: u32 = 1000;
/// An agent run's timeout, and `executor.default_timeout_s`, in seconds (1 s to 24 h).
pub const TIMEOUT_S: (u64, u64) = (1, 86_400);
/// An agent's memory limit, and `executor.max_memory_mb`, in MB (16 MB to 64 GB).
pub const MEMORY_MB: (u64, u64) = (16, 65_536);
/// An agent's CPU share, and `executor.max_cpu_percent`, in percent.
pub const CPU_PERCENT: (u32, u32) = (1, 100);
/// A task's own timeout (1 ms to 7 days).
pub const TASK_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(7 * 86_400));
/// The longest delay before a task may run (a year).
pub const MAX_DELAY: Duration = Duration::from_secs(365 * 86_400);
/// An agent's own config (`Agent(config)`), as JSON text.
pub const AGENT_CONFIG_BYTES: usize = 64 * 1024;

/// The most tasks one replica runs at once (`bulk.max_concurrent`, or its queues' capacities
/// added up).
pub const MAX_SLOTS: u32 = 10_000;
