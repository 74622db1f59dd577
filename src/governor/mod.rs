//! The governor of one replica: watches CPU, memory and error bursts, grants its worker pool
//! the capacity it can afford, escalates to a person, and reports the replica's health where
//! the whole fleet can see it.
//!
//! - [`machine`]: the pure state machine (throttle, pause, escalate, hold, recover).
//! - [`monitor`]: resource sampling, container-aware.
//! - [`escalation`]: webhook and e-mail delivery.
//!
//! [`run`] samples every `telemetry.sample_interval_s` (on a blocking thread: sampling never
//! blocks the async runtime), feeds the machine, sets the worker's
//! [`Capacity`](crate::worker::Capacity), and writes (through `fleet`, which owns the tables):
//! a `metrics` row and a `metrics.jsonl` line every `telemetry.log_interval_s`; a
//! `governance_events` row and an `agent.jsonl` line for every change. It only *grants
//! capacity*: it never reaches into the worker.

pub mod escalation;
pub mod machine;
pub mod monitor;
mod reporter;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::EscalationConfig;
use crate::executor::Isolation;
use crate::fleet::{self, EventKind, MetricsRow};
use crate::ticks::Ticks;
use crate::worker::WorkerHandle;
pub use machine::{Event, Machine, Settings, State};
pub use monitor::{ResourceLimits, ResourceMonitor, Resources, Sampler};
use reporter::{JsonLines, Reporter};

/// Settings of a replica's governor.
#[derive(Debug, Clone)]
pub struct GovernorOptions {
    pub replica: String,
    pub settings: Settings,
    pub sample_interval: Duration,
    pub log_interval: Duration,
    pub retention: Duration,
    pub logs_dir: PathBuf,
    pub escalation: EscalationConfig,
    /// The executor's isolation mode, shown by `harness fleet`.
    pub isolation: Option<Isolation>,
    /// The queues the replica serves: their runnable gauge is reported even while 0.
    pub queues: Vec<String>,
}

impl GovernorOptions {
    pub fn from_config(
        cfg: &crate::config::Config,
        replica: &str,
        isolation: Option<Isolation>,
    ) -> GovernorOptions {
        GovernorOptions {
            replica: replica.to_string(),
            settings: Settings::from_config(cfg),
            sample_interval: Duration::from_secs(cfg.telemetry.sample_interval_s),
            log_interval: Duration::from_secs(cfg.telemetry.log_interval_s),
            retention: Duration::from_secs(cfg.telemetry.retention_days as u64 * 86_400),
            logs_dir: cfg.logs_dir(),
            escalation: cfg.escalation.clone(),
            isolation,
            queues: cfg.queues().into_iter().map(|(q, _)| q).collect(),
        }
    }
}

/// Recent samples and events kept for an escalation's payload.
const KEEP_SAMPLES: usize = 30;
const KEEP_EVENTS: usize = 20;
/// How often metrics and events past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Runs the governor of one replica until `stop`.
pub async fn run(
    pool: PgPool,
    handle: WorkerHandle,
    sampler: Box<dyn Sampler>,
    opts: GovernorOptions,
    stop: CancellationToken,
) {
    let mut g = Governor::new(pool, handle, opts);
    if let Err(e) = fleet::replicas::set_governor_state(
        &g.pool,
        &g.opts.replica,
        g.machine.state(),
        g.opts.isolation.map(|i| i.describe()).as_deref(),
    )
    .await
    {
        tracing::debug!(error = %e, "could not record the governor state yet");
    }
    let sampler = Arc::new(Mutex::new(sampler));
    let mut ticks = Ticks::new(g.opts.sample_interval, stop);
    while ticks.next().await {
        // Sampling reads /proc and cgroup files: off the async runtime.
        let s = sampler.clone();
        let Ok(r) =
            tokio::task::spawn_blocking(move || s.lock().expect("sampler lock").sample()).await
        else {
            continue;
        };
        g.step(r).await;
    }
}

/// The governor between two samples: the machine, and what it reports.
struct Governor {
    pool: PgPool,
    handle: WorkerHandle,
    opts: GovernorOptions,
    machine: Machine,
    reporter: Reporter,
    metrics_log: JsonLines,
    recent_samples: VecDeque<(DateTime<Utc>, Resources)>,
    recent_events: VecDeque<Value>,
    /// Attempt counts at the last metrics row, and at the last sample.
    logged: (u64, u64),
    /// Timed pick-ups (count, µs total) at the last metrics row.
    logged_pickups: (u64, u64),
    /// Queues the runnable gauge reports: those served, and those seen with runnable tasks
    /// (each is reported 0 while it has none).
    queues_seen: std::collections::BTreeSet<String>,
    /// Limits the held-back gauge has reported (each is reported 0 once removed).
    limits_seen: std::collections::BTreeSet<(String, String)>,
    last_log: Instant,
    last_prune: Option<Instant>,
    held_since: Option<DateTime<Utc>>,
    granted: usize,
}

impl Governor {
    fn new(pool: PgPool, handle: WorkerHandle, opts: GovernorOptions) -> Governor {
        let (completed, failed) = handle.counts();
        Governor {
            machine: Machine::new(opts.settings.clone(), Instant::now()),
            reporter: Reporter::new(pool.clone(), &opts.replica, &opts.logs_dir),
            metrics_log: JsonLines::new(&opts.logs_dir, "metrics.jsonl"),
            recent_samples: VecDeque::new(),
            recent_events: VecDeque::new(),
            logged: (completed, failed),
            logged_pickups: handle.pickups(),
            queues_seen: opts.queues.iter().cloned().collect(),
            limits_seen: Default::default(),
            last_log: Instant::now(),
            last_prune: None,
            held_since: None,
            granted: handle.capacity().granted(),
            pool,
            handle,
            opts,
        }
    }

    /// One sample: feed the machine, act on its events, grant capacity, report.
    async fn step(&mut self, r: Resources) {
        let now = Instant::now();
        self.recent_samples.push_back((Utc::now(), r));
        if self.recent_samples.len() > KEEP_SAMPLES {
            self.recent_samples.pop_front();
        }
        let (completed, failed) = self.handle.counts();
        self.machine
            .observe_sample(now, r.cpu_percent, r.memory_percent);
        for (target, n) in self.handle.take_failures() {
            self.machine.observe_failures_of(now, &target, n);
        }
        // Quarantines decided by other replicas (or lifted by a person) take effect here.
        match fleet::quarantines::active(&self.pool).await {
            Ok(q) => self
                .handle
                .set_quarantines(q.iter().map(|q| (q.target(), q.ends())).collect()),
            Err(e) => tracing::debug!(error = %e, "could not read the quarantines"),
        }
        let mut events = self.machine.evaluate(now);
        // A person's `harness fleet resume` lifts a hold (or a pause).
        if matches!(self.machine.state(), State::Holding | State::Paused)
            && let Ok(Some(asked)) =
                fleet::replicas::resume_requested(&self.pool, &self.opts.replica).await
            && self.held_since.is_none_or(|h| asked >= h)
        {
            events.extend(self.machine.resume(now));
        }
        for e in &events {
            self.on_event(e).await;
        }
        let g = self.machine.granted();
        if g != self.granted {
            self.handle.capacity().set(g);
            self.granted = g;
        }
        let m = crate::telemetry::metrics();
        m.capacity.record(self.granted as i64, &[]);
        m.running.record(self.handle.running() as i64, &[]);
        m.governor_state.record(self.machine.state().code(), &[]);
        m.cpu.record(r.cpu_percent, &[]);
        m.memory.record(r.memory_percent, &[]);
        if self.last_log.elapsed() >= self.opts.log_interval {
            self.last_log = Instant::now();
            self.log_health(r, completed, failed).await;
        }
        if self.last_prune.is_none_or(|p| p.elapsed() >= PRUNE_EVERY) {
            self.last_prune = Some(Instant::now());
            if let Err(e) = fleet::health::prune(&self.pool, self.opts.retention).await {
                tracing::warn!(error = %e, "could not prune old metrics");
            }
            if let Err(e) = fleet::quarantines::prune(&self.pool).await {
                tracing::warn!(error = %e, "could not prune ended quarantines");
            }
        }
    }

    async fn on_event(&mut self, e: &Event) {
        let v = serde_json::to_value(e).expect("events serialise");
        self.recent_events
            .push_back(json!({ "at": Utc::now(), "event": v }));
        if self.recent_events.len() > KEEP_EVENTS {
            self.recent_events.pop_front();
        }
        let replica = &self.opts.replica;
        match e {
            Event::StateChanged { from, to, reason } => {
                let span = tracing::info_span!(
                    "governor.transition",
                    from = from.as_str(),
                    to = to.as_str()
                );
                span.in_scope(|| tracing::warn!(%replica, from = from.as_str(), to = to.as_str(), %reason, "governor state changed"));
                if matches!(to, State::Paused | State::Holding) && self.held_since.is_none() {
                    self.held_since = Some(Utc::now());
                }
                if matches!(to, State::Normal | State::Throttled) {
                    self.held_since = None;
                    let _ = fleet::replicas::clear_resume(&self.pool, replica).await;
                }
                self.reporter
                    .record(e.kind(), Some(*from), Some(*to), reason, json!({}))
                    .await;
                let _ = fleet::replicas::set_governor_state(
                    &self.pool,
                    replica,
                    *to,
                    self.opts.isolation.map(|i| i.describe()).as_deref(),
                )
                .await;
            }
            Event::CapacityChanged { from, to, reason } => {
                tracing::info!(%replica, from, to, %reason, "governor changed capacity");
                let detail = json!({"from": from, "to": to});
                self.reporter
                    .record(e.kind(), None, None, reason, detail)
                    .await;
            }
            Event::Escalated { reason, target } => self.escalate(reason, target.as_ref()).await,
            Event::Quarantined {
                target,
                seconds,
                reason,
            } => self.quarantine(target, *seconds, reason).await,
        }
    }

    /// Stores the quarantine for the whole fleet and applies it here at once.
    async fn quarantine(
        &mut self,
        target: &crate::worker::Target,
        seconds: Option<u64>,
        reason: &str,
    ) {
        let replica = &self.opts.replica;
        tracing::warn!(%replica, %target, %reason, "quarantined");
        let held = seconds.is_none();
        let until = Utc::now() + Duration::from_secs(seconds.unwrap_or(0));
        if let Err(e) =
            fleet::quarantines::put(&self.pool, target, until, held, reason, replica).await
        {
            tracing::warn!(error = %e, "could not store the quarantine; it holds on this replica only");
        }
        self.handle.quarantine(
            target.clone(),
            if held {
                DateTime::<Utc>::MAX_UTC
            } else {
                until
            },
        );
        let detail = json!({"kind": target.kind, "agent_id": target.agent_id,
                            "until": (!held).then_some(until), "held": held});
        self.reporter
            .record(EventKind::Quarantined, None, None, reason, detail)
            .await;
    }

    /// Records the escalation and delivers it off the loop: delivery must never stop the
    /// replica.
    async fn escalate(&mut self, reason: &str, target: Option<&crate::worker::Target>) {
        tracing::error!(replica = %self.opts.replica, %reason, "escalating to a person");
        let resume_with = match target {
            None => format!("harness fleet resume {}", self.opts.replica),
            Some(t) if t.agent_id.is_some() => {
                format!(
                    "harness agents resume <the agent> (agent id {})",
                    t.agent_id.unwrap_or(0)
                )
            }
            Some(_) => "harness fleet resume --all".to_string(),
        };
        let payload = json!({
            "replica": self.opts.replica,
            "reason": reason,
            "target": target,
            "state": self.machine.state(),
            "at": Utc::now(),
            "samples": self.recent_samples.iter().map(|(t, r)| json!({"at": t, "cpu_percent": r.cpu_percent, "memory_percent": r.memory_percent, "memory_available_mb": r.memory_available_mb})).collect::<Vec<_>>(),
            "events": self.recent_events.iter().cloned().collect::<Vec<_>>(),
            "resume_with": resume_with,
        });
        self.reporter
            .record(
                EventKind::Escalated,
                None,
                target.is_none().then_some(State::Holding),
                reason,
                payload.clone(),
            )
            .await;
        let cfg = self.opts.escalation.clone();
        let mut delivery =
            Reporter::new(self.pool.clone(), &self.opts.replica, &self.opts.logs_dir);
        tokio::spawn(async move {
            for d in escalation::deliver(&cfg, &payload).await {
                let kind = if d.ok {
                    tracing::info!(channel = d.channel, detail = %d.detail, "escalation delivered");
                    EventKind::EscalationDelivered
                } else {
                    tracing::error!(channel = d.channel, detail = %d.detail, "escalation not delivered");
                    EventKind::EscalationFailed
                };
                delivery
                    .record(kind, None, None, &d.detail, json!({"channel": d.channel}))
                    .await;
            }
        });
    }

    /// A `metrics` row, a `metrics.jsonl` line and the queue-depth gauges.
    async fn log_health(&mut self, r: Resources, completed: u64, failed: u64) {
        let pickups = self.handle.pickups();
        let row = MetricsRow {
            cpu_percent: r.cpu_percent,
            memory_percent: r.memory_percent,
            memory_available_mb: r.memory_available_mb,
            capacity: self.granted,
            running: self.handle.running(),
            completed: completed - self.logged.0,
            failed: failed - self.logged.1,
            timed: pickups.0 - self.logged_pickups.0,
            pickup_ms_total: (pickups.1 - self.logged_pickups.1) as f64 / 1000.0,
            state: self.machine.state(),
        };
        self.metrics_log.append(&json!({
            "at": Utc::now(), "replica": self.opts.replica, "cpu_percent": row.cpu_percent,
            "memory_percent": row.memory_percent, "memory_available_mb": row.memory_available_mb,
            "capacity": row.capacity, "running": row.running, "completed": row.completed,
            "failed": row.failed, "timed": row.timed,
            "pickup_ms_total": row.pickup_ms_total, "state": row.state,
        }));
        if let Err(e) = fleet::health::record_metrics(&self.pool, &self.opts.replica, &row).await {
            tracing::warn!(error = %e, "could not write the metrics row");
        }
        self.logged = (completed, failed);
        self.logged_pickups = pickups;
        if let Ok(depth) = crate::queue::depth(&self.pool).await {
            let m = crate::telemetry::metrics();
            for status in crate::queue::Status::ALL {
                if status == crate::queue::Status::Completed {
                    continue;
                }
                let n = depth
                    .iter()
                    .find(|(s, _)| *s == status)
                    .map_or(0, |(_, n)| *n);
                m.queue_depth.record(
                    n,
                    &[opentelemetry::KeyValue::new("status", status.as_str())],
                );
            }
        }
        let m = crate::telemetry::metrics();
        if let Ok(runnable) = crate::queue::queues::runnable(&self.pool).await {
            // A queue seen before and empty now is reported 0, not left at its last count.
            for q in &self.queues_seen {
                if !runnable.iter().any(|(name, _)| name == q) {
                    m.queue_runnable
                        .record(0, &[opentelemetry::KeyValue::new("queue", q.clone())]);
                }
            }
            for (q, n) in runnable {
                m.queue_runnable
                    .record(n, &[opentelemetry::KeyValue::new("queue", q.clone())]);
                self.queues_seen.insert(q);
            }
        }
        if let Ok(limits) = crate::queue::limits::list(&self.pool).await {
            let now: std::collections::BTreeMap<(String, String), i64> = limits
                .into_iter()
                .map(|l| {
                    let key = (l.limit.scope.as_str().to_string(), l.limit.target);
                    (key, l.waiting)
                })
                .collect();
            // A limit removed since is reported 0, not left at its last count.
            for (key, n) in self
                .limits_seen
                .iter()
                .filter(|k| !now.contains_key(*k))
                .map(|k| (k, 0))
                .chain(now.iter().map(|(k, n)| (k, *n)))
            {
                m.limit_waiting.record(
                    n,
                    &[
                        opentelemetry::KeyValue::new("scope", key.0.clone()),
                        opentelemetry::KeyValue::new("target", key.1.clone()),
                    ],
                );
            }
            self.limits_seen.extend(now.into_keys());
        }
        match crate::queue::waiting(&self.pool).await {
            Ok(w) => {
                m.queue_due.record(w.due, &[]);
                m.queue_delayed.record(w.delayed, &[]);
                m.oldest_due_age.record(w.oldest_due_s, &[]);
                m.database_up.record(1, &[]);
            }
            Err(_) => m.database_up.record(0, &[]),
        }
    }
}
