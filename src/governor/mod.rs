//! The governor of one replica: watches CPU, memory and error bursts, grants its worker pool
//! the capacity it can afford, escalates to a person, and reports the replica's health where
//! the whole fleet can see it.
//!
//! - [`machine`]: the pure state machine (throttle, pause, escalate, hold, recover).
//! - [`monitor`]: resource sampling, container-aware.
//! - [`escalation`]: webhook and e-mail delivery.
//!
//! [`run`] samples every `telemetry.sample_interval_s` (on a blocking thread: sampling never
//! blocks the async runtime), feeds the machine, sets the worker's [`Capacity`](crate::worker::Capacity), and writes:
//! a `metrics` row and a `logs/metrics.jsonl` line every `telemetry.log_interval_s`; a
//! `governance_events` row and a `logs/agent.jsonl` line for every change. It only *grants
//! capacity*: it never reaches into the pool.

pub mod escalation;
pub mod machine;
pub mod monitor;

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::EscalationConfig;
use crate::worker::WorkerHandle;
pub use machine::{Event, Machine, Settings, State};
pub use monitor::{ResourceLimits, ResourceMonitor, Resources, Sampler};

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
    pub isolation: Option<String>,
}

impl GovernorOptions {
    pub fn from_config(
        cfg: &crate::Config,
        replica: &str,
        isolation: Option<String>,
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
        }
    }
}

/// Appends JSON lines to a file under the logs directory; a failure is logged once.
struct JsonLines {
    path: PathBuf,
    warned: bool,
}

impl JsonLines {
    fn new(dir: &Path, name: &str) -> JsonLines {
        JsonLines {
            path: dir.join(name),
            warned: false,
        }
    }
    /// Appends one line. The directory is made 0700 and the file 0600: these logs are the
    /// operator's (failure messages, escalations), not the agents'.
    fn append(&mut self, v: &Value) {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let result = (|| -> std::io::Result<()> {
            if let Some(d) = self.path.parent()
                && !d.is_dir()
            {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            if !self.warned {
                // A file an older version left readable by everyone.
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            writeln!(f, "{v}")
        })();
        if let Err(e) = result
            && !self.warned
        {
            self.warned = true;
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the JSON log");
        }
    }
}

const INSERT_EVENT: &str = "INSERT INTO governance_events (replica_id, event, from_state, to_state, reason, detail) \
     VALUES ($1, $2, $3, $4, $5, $6)";

/// Where governance events go: the `governance_events` table and `logs/agent.jsonl`.
struct Reporter {
    pool: PgPool,
    replica: String,
    log: JsonLines,
}

impl Reporter {
    async fn record(
        &mut self,
        event: &str,
        from: Option<State>,
        to: Option<State>,
        reason: &str,
        detail: Value,
    ) {
        self.log.append(&json!({
            "at": Utc::now(), "replica": self.replica, "event": event, "from": from, "to": to,
            "reason": reason, "detail": detail,
        }));
        if let Err(e) = sqlx::query(INSERT_EVENT)
            .bind(&self.replica)
            .bind(event)
            .bind(from.map(State::as_str))
            .bind(to.map(State::as_str))
            .bind(reason)
            .bind(&detail)
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "could not record a governance event");
        }
    }
}

/// Runs the governor of one replica until `stop`.
pub async fn run(
    pool: PgPool,
    handle: WorkerHandle,
    sampler: Box<dyn Sampler>,
    opts: GovernorOptions,
    stop: CancellationToken,
) {
    let sampler = Arc::new(Mutex::new(sampler));
    let started = Instant::now();
    let mut machine = Machine::new(opts.settings.clone(), started);
    let mut metrics_log = JsonLines::new(&opts.logs_dir, "metrics.jsonl");
    let mut reporter = Reporter {
        pool: pool.clone(),
        replica: opts.replica.clone(),
        log: JsonLines::new(&opts.logs_dir, "agent.jsonl"),
    };
    let mut recent_samples: VecDeque<(DateTime<Utc>, Resources)> = VecDeque::new();
    let mut recent_events: VecDeque<Value> = VecDeque::new();
    let (mut logged_completed, mut seen_failed) = handle.counts();
    let mut logged_failed = seen_failed;
    let mut last_log = Instant::now();
    let mut last_prune: Option<Instant> = None;
    let mut held_since: Option<DateTime<Utc>> = None;
    let mut granted = handle.capacity().granted();
    if let Err(e) = set_replica_state(
        &pool,
        &opts.replica,
        machine.state(),
        opts.isolation.as_deref(),
    )
    .await
    {
        tracing::debug!(error = %e, "could not record the governor state yet");
    }
    let mut tick = tokio::time::interval(opts.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let s = sampler.clone();
        let Ok(r) =
            tokio::task::spawn_blocking(move || s.lock().expect("sampler lock").sample()).await
        else {
            continue;
        };
        let now = Instant::now();
        recent_samples.push_back((Utc::now(), r));
        if recent_samples.len() > 30 {
            recent_samples.pop_front();
        }
        let (completed, failed) = handle.counts();
        machine.observe_sample(now, r.cpu_percent, r.memory_percent);
        machine.observe_failures(now, failed.saturating_sub(seen_failed));
        seen_failed = failed;
        let mut events = machine.evaluate(now);

        // A person's `harness fleet resume` lifts a hold (or a pause).
        if matches!(machine.state(), State::Holding | State::Paused)
            && let Ok(Some(asked)) = resume_requested(&pool, &opts.replica).await
            && held_since.is_none_or(|h| asked >= h)
        {
            events.extend(machine.resume(now));
        }

        for e in &events {
            let v = serde_json::to_value(e).expect("events serialise");
            recent_events.push_back(json!({ "at": Utc::now(), "event": v }));
            if recent_events.len() > 20 {
                recent_events.pop_front();
            }
            match e {
                Event::StateChanged { from, to, reason } => {
                    let span = tracing::info_span!(
                        "governor.transition",
                        from = from.as_str(),
                        to = to.as_str()
                    );
                    span.in_scope(|| tracing::warn!(replica = %opts.replica, from = from.as_str(), to = to.as_str(), %reason, "governor state changed"));
                    if matches!(to, State::Paused | State::Holding) && held_since.is_none() {
                        held_since = Some(Utc::now());
                    }
                    if matches!(to, State::Normal | State::Throttled) {
                        held_since = None;
                        let _ = clear_resume(&pool, &opts.replica).await;
                    }
                    reporter
                        .record("state_changed", Some(*from), Some(*to), reason, json!({}))
                        .await;
                    let _ = set_replica_state(&pool, &opts.replica, *to, opts.isolation.as_deref())
                        .await;
                }
                Event::CapacityChanged { from, to, reason } => {
                    tracing::info!(replica = %opts.replica, from, to, %reason, "governor changed capacity");
                    reporter
                        .record(
                            "capacity_changed",
                            None,
                            None,
                            reason,
                            json!({"from": from, "to": to}),
                        )
                        .await;
                }
                Event::Escalated { reason } => {
                    tracing::error!(replica = %opts.replica, %reason, "escalating to a person");
                    let payload = json!({
                        "replica": opts.replica,
                        "reason": reason,
                        "state": machine.state(),
                        "at": Utc::now(),
                        "samples": recent_samples.iter().map(|(t, r)| json!({"at": t, "cpu_percent": r.cpu_percent, "memory_percent": r.memory_percent, "memory_available_mb": r.memory_available_mb})).collect::<Vec<_>>(),
                        "events": recent_events.iter().cloned().collect::<Vec<_>>(),
                        "resume_with": format!("harness fleet resume {}", opts.replica),
                    });
                    reporter
                        .record(
                            "escalated",
                            None,
                            Some(State::Holding),
                            reason,
                            payload.clone(),
                        )
                        .await;
                    // Delivery must never stop the replica: off the governor's loop.
                    let cfg = opts.escalation.clone();
                    let mut delivery = Reporter {
                        pool: pool.clone(),
                        replica: opts.replica.clone(),
                        log: JsonLines::new(&opts.logs_dir, "agent.jsonl"),
                    };
                    tokio::spawn(async move {
                        for d in escalation::deliver(&cfg, &payload).await {
                            let event = if d.ok {
                                "escalation_delivered"
                            } else {
                                "escalation_failed"
                            };
                            if d.ok {
                                tracing::info!(channel = d.channel, detail = %d.detail, "escalation delivered");
                            } else {
                                tracing::error!(channel = d.channel, detail = %d.detail, "escalation not delivered");
                            }
                            delivery
                                .record(event, None, None, &d.detail, json!({"channel": d.channel}))
                                .await;
                        }
                    });
                }
            }
        }
        let g = machine.granted();
        if g != granted {
            handle.capacity().set(g);
            granted = g;
        }
        let m = crate::telemetry::metrics();
        m.capacity.record(granted as i64, &[]);
        m.running.record(handle.running() as i64, &[]);
        m.governor_state.record(machine.state().code(), &[]);
        m.cpu.record(r.cpu_percent, &[]);
        m.memory.record(r.memory_percent, &[]);

        if last_log.elapsed() >= opts.log_interval {
            last_log = Instant::now();
            let row = json!({
                "at": Utc::now(), "replica": opts.replica, "cpu_percent": r.cpu_percent,
                "memory_percent": r.memory_percent, "memory_available_mb": r.memory_available_mb,
                "capacity": granted, "running": handle.running(),
                "completed": completed - logged_completed, "failed": failed - logged_failed,
                "state": machine.state(),
            });
            metrics_log.append(&row);
            if let Err(e) = sqlx::query(
                "INSERT INTO metrics (replica_id, cpu_percent, memory_percent, memory_available_mb, \
                 capacity, running, completed, failed, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&opts.replica)
            .bind(r.cpu_percent as f32)
            .bind(r.memory_percent as f32)
            .bind(r.memory_available_mb as i64)
            .bind(granted as i32)
            .bind(handle.running() as i32)
            .bind((completed - logged_completed) as i64)
            .bind((failed - logged_failed) as i64)
            .bind(machine.state().as_str())
            .execute(&pool)
            .await
            {
                tracing::warn!(error = %e, "could not write the metrics row");
            }
            (logged_completed, logged_failed) = (completed, failed);
            if let Ok(depth) = crate::queue::depth(&pool).await {
                for status in crate::queue::Status::ALL {
                    let n = depth
                        .iter()
                        .find(|(s, _)| *s == status)
                        .map_or(0, |(_, n)| *n);
                    if status != crate::queue::Status::Completed {
                        m.queue_depth.record(
                            n,
                            &[opentelemetry::KeyValue::new("status", status.as_str())],
                        );
                    }
                }
            }
        }
        if last_prune.is_none_or(|p| p.elapsed() >= Duration::from_secs(3600)) {
            last_prune = Some(Instant::now());
            if let Err(e) = prune(&pool, opts.retention).await {
                tracing::warn!(error = %e, "could not prune old metrics");
            }
        }
    }
}

async fn set_replica_state(
    pool: &PgPool,
    replica: &str,
    state: State,
    isolation: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE replicas SET governor_state = $2, isolation = COALESCE($3, isolation) WHERE id = $1")
        .bind(replica)
        .bind(state.as_str())
        .bind(isolation)
        .execute(pool)
        .await
        .map(|_| ())
}

async fn resume_requested(
    pool: &PgPool,
    replica: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT resume_requested_at FROM replicas WHERE id = $1")
        .bind(replica)
        .fetch_optional(pool)
        .await
        .map(Option::flatten)
}

async fn clear_resume(pool: &PgPool, replica: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE replicas SET resume_requested_at = NULL WHERE id = $1")
        .bind(replica)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Deletes metrics and events past their retention, one replica at a time.
async fn prune(pool: &PgPool, retention: Duration) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mine: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('harness:prune-metrics'))")
            .fetch_one(&mut *tx)
            .await?;
    if mine {
        for table in ["metrics", "governance_events"] {
            let column = if table == "metrics" {
                "recorded_at"
            } else {
                "at"
            };
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE {column} < now() - make_interval(secs => $1)"
            ))
            .bind(retention.as_secs_f64())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await
}

/// Asks a replica (or every replica) to leave its hold; it does so at its next sample.
/// Returns how many replicas were asked.
pub async fn request_resume(pool: &PgPool, replica: Option<&str>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE replicas SET resume_requested_at = now() WHERE $1::text IS NULL OR id = $1",
    )
    .bind(replica)
    .execute(pool)
    .await?
    .rows_affected())
}
