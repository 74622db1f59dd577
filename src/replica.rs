//! A replica: the [`Harness`] a program builds with its handlers, and what `serve` runs —
//! the worker pool, the heartbeat, the `LISTEN` connection and the maintenance loops.
//!
//! ```no_run
//! # async fn demo(cfg: harness::Config, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use harness::{Harness, queue::NewTask};
//! use serde_json::json;
//!
//! let harness = Harness::builder()
//!     .config(cfg)
//!     .pool(pool)
//!     .handler("demo", |payload: serde_json::Value| async move {
//!         Ok::<_, std::convert::Infallible>(json!({ "result": payload["value"] }))
//!     })
//!     .build()
//!     .await?;
//! let id = harness
//!     .queue()
//!     .enqueue(NewTask::new("demo", json!({ "value": 42 })).idempotency_key("k1"))
//!     .await?;
//! harness.serve(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Guarantees: the replica registers its heartbeat row before it claims anything and
//! removes it on a clean exit; the heartbeat runs on its own connection, so a pool busy with
//! claims and completions cannot starve it; every replica rescues tasks of dead replicas.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agents::{AGENT_KIND, Agents, COMMAND_KIND};
use crate::config::Config;
use crate::fleet::{Heartbeat, new_replica_id};
use crate::governor::{GovernorOptions, ResourceLimits, ResourceMonitor, Sampler};
use crate::queue::{self, Listener, Queue, Wakeup};
use crate::scheduler::SchedulerOptions;
use crate::worker::{Capacity, Handler, Registry, Worker, WorkerOptions};

/// How often completed and cancelled tasks past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_BATCH: u32 = 5000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Harness::builder() needs {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    #[error(transparent)]
    Queue(#[from] queue::Error),
    #[error("the governor cannot start: {0}")]
    Governor(String),
}

/// Builds a [`Harness`]: configuration, database pool and handlers by kind.
#[derive(Default)]
pub struct HarnessBuilder {
    config: Option<Config>,
    pool: Option<PgPool>,
    registry: Registry,
    replica_id: Option<String>,
    agents: Option<Agents>,
    sampler: Option<Box<dyn Sampler>>,
    isolation: Option<String>,
}

impl HarnessBuilder {
    pub fn config(mut self, cfg: Config) -> Self {
        self.config = Some(cfg);
        self
    }

    /// The database pool (migrated). Without one, `build` connects to `database.url`.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Registers a handler of the payload for `kind`; its `Ok` value is the task's result
    /// and its `Err` message the task's error.
    pub fn handler<F, Fut, E>(mut self, kind: impl Into<String>, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, E>> + Send + 'static,
        E: std::fmt::Display + 'static,
    {
        self.registry.insert(kind, Handler::from_payload(f));
        self
    }

    /// Registers a fully specified [`Handler`] (context-aware, own timeout).
    pub fn handler_with(mut self, kind: impl Into<String>, handler: Handler) -> Self {
        self.registry.insert(kind, handler);
        self
    }

    /// Runs agents: registers the `agent` and `command` kinds, and takes part in the
    /// election of the scheduler that fires agents' cron schedules.
    pub fn agents(mut self, agents: Agents) -> Self {
        self.registry.insert(AGENT_KIND, agents.agent_handler());
        self.registry.insert(COMMAND_KIND, agents.command_handler());
        self.agents = Some(agents);
        self
    }

    /// Replaces the governor's resource sampler (tests inject synthetic load).
    pub fn sampler(mut self, sampler: Box<dyn Sampler>) -> Self {
        self.sampler = Some(sampler);
        self
    }

    /// The executor's isolation mode, as `harness fleet` should show it.
    pub fn isolation(mut self, mode: impl Into<String>) -> Self {
        self.isolation = Some(mode.into());
        self
    }

    /// Overrides the generated replica id (host name plus a random suffix).
    pub fn replica_id(mut self, id: impl Into<String>) -> Self {
        self.replica_id = Some(id.into());
        self
    }

    pub async fn build(self) -> Result<Harness, Error> {
        let cfg = self.config.unwrap_or_default();
        let pool = match self.pool {
            Some(p) => p,
            None => {
                let url = cfg
                    .database
                    .url
                    .as_ref()
                    .ok_or(Error::Missing("a pool or database.url"))?;
                crate::db::connect(url.expose(), cfg.database.max_connections).await?
            }
        };
        let queue = Queue::new(pool.clone(), cfg.bulk.retry_attempts);
        Ok(Harness {
            agents: self.agents,
            sampler: self.sampler,
            isolation: self.isolation,
            capacity: Capacity::new(cfg.bulk.max_concurrent as usize),
            replica: self.replica_id.unwrap_or_else(new_replica_id),
            registry: Arc::new(self.registry),
            cfg,
            pool,
            queue,
        })
    }
}

/// One replica's worth of Agent Harness: a queue handle and, once served, a worker pool.
pub struct Harness {
    agents: Option<Agents>,
    sampler: Option<Box<dyn Sampler>>,
    isolation: Option<String>,
    cfg: Config,
    pool: PgPool,
    queue: Queue,
    registry: Arc<Registry>,
    replica: String,
    capacity: Arc<Capacity>,
}

impl Harness {
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder::default()
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// The kinds this replica claims.
    pub fn kinds(&self) -> Vec<String> {
        self.registry.kinds()
    }

    /// The pool's capacity (what the governor adjusts).
    pub fn capacity(&self) -> Arc<Capacity> {
        self.capacity.clone()
    }

    /// Runs the replica until `shutdown` resolves, then drains: no new claims, running tasks
    /// get `bulk.shutdown_grace_s` to finish, unfinished ones go back to the queue.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Harness {
            agents,
            sampler,
            isolation,
            cfg,
            pool,
            queue,
            registry,
            replica,
            capacity,
        } = self;
        let sample = Duration::from_secs(cfg.telemetry.sample_interval_s);
        // Before anything starts: a failure here must leave nothing running.
        let sampler: Box<dyn Sampler> = match sampler {
            Some(s) => s,
            None => Box::new(
                ResourceMonitor::new(ResourceLimits {
                    max_concurrent_agents: cfg.bulk.max_concurrent as usize,
                    max_memory_mb: cfg.executor.max_memory_mb,
                    max_cpu_percent: cfg.executor.max_cpu_percent as f64,
                    ..ResourceLimits::default()
                })
                .map_err(Error::Governor)?,
            ),
        };
        let mut heartbeat = Heartbeat::new((*pool.connect_options()).clone(), &replica);
        // Registered before the first claim, so no one rescues what we are about to take.
        heartbeat
            .beat(0, capacity.granted() as i32, Duration::from_secs(10))
            .await?;
        // Listening before the first claim, so a task enqueued in between wakes us.
        let mut listener = Listener::connect(&pool).await?;
        let wake = Arc::new(Notify::new());
        let worker = Worker::start(
            queue.clone(),
            registry.clone(),
            capacity.clone(),
            WorkerOptions {
                replica: replica.clone(),
                max_concurrent: cfg.bulk.max_concurrent as usize,
                retry_base: Duration::from_secs(cfg.bulk.retry_delay_seconds),
                default_timeout: Duration::from_secs(cfg.executor.default_timeout_s),
                poll_interval: Duration::from_millis(cfg.bulk.poll_interval_ms),
                shutdown_grace: Duration::from_secs(cfg.bulk.shutdown_grace_s),
                claim_max_age: Duration::from_secs(cfg.persistence.rescue_after_s) / 2,
            },
            wake.clone(),
        );
        let handle = worker.handle();
        tracing::info!(
            replica = %replica,
            kinds = ?registry.kinds(),
            capacity = capacity.granted(),
            "replica serving"
        );

        let stop = CancellationToken::new();
        let mut loops = tokio::task::JoinSet::new();
        // Since when this replica's heartbeats have been succeeding without a break (None
        // while they fail): the rescuer's proof that it is not itself the one cut off.
        let (healthy_tx, healthy_rx) =
            tokio::sync::watch::channel(Some(tokio::time::Instant::now()));

        // Heartbeat: its own connection and its own task.
        {
            let stop = stop.clone();
            let handle = handle.clone();
            // Past half the rescue threshold without a heartbeat, other replicas may soon
            // take this one's tasks: stop claiming more until a heartbeat gets through.
            let fence = Duration::from_secs(cfg.persistence.rescue_after_s) / 2;
            loops.spawn(async move {
                let mut tick = tokio::time::interval(sample);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last_ok = tokio::time::Instant::now();
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => break,
                    }
                    let running = handle.running() as i32;
                    let granted = handle.capacity().granted() as i32;
                    match heartbeat.beat(running, granted, sample).await {
                        Ok(()) => {
                            last_ok = tokio::time::Instant::now();
                            healthy_tx.send_if_modified(|since| {
                                since.get_or_insert(last_ok);
                                false
                            });
                            if !handle.claiming() {
                                tracing::info!("heartbeat is back; claiming again");
                                handle.set_claiming(true);
                            }
                        }
                        Err(e) => {
                            healthy_tx.send_replace(None);
                            tracing::warn!(error = %e, "heartbeat failed; retrying next interval");
                            if last_ok.elapsed() >= fence && handle.claiming() {
                                tracing::error!(
                                    since_s = last_ok.elapsed().as_secs(),
                                    "no heartbeat for half the rescue threshold: claiming stops \
                                     until one gets through (running tasks go on)"
                                );
                                handle.set_claiming(false);
                            }
                        }
                    }
                }
            });
        }

        // Wake-ups and cancel requests.
        {
            let stop = stop.clone();
            let handle = handle.clone();
            let wake = wake.clone();
            loops.spawn(async move {
                loop {
                    let next = tokio::select! {
                        n = listener.next() => n,
                        _ = stop.cancelled() => break,
                    };
                    match next {
                        Ok(Wakeup::Tasks) | Ok(Wakeup::Reconnected) => wake.notify_one(),
                        Ok(Wakeup::Cancel(id)) => {
                            if handle.cancel(id) {
                                tracing::info!(task.id = id, "cancel requested; aborting");
                            }
                        }
                        Err(e) => {
                            // Reconnects for as long as the replica serves: wake-ups are an
                            // optimisation over the poll, which goes on meanwhile.
                            tracing::warn!(error = %e, "LISTEN connection failed; polling until it is back");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = stop.cancelled() => break,
                            }
                        }
                    }
                }
            });
        }

        // Maintenance: rescue dead replicas' tasks, catch missed cancels, prune.
        {
            let stop = stop.clone();
            let queue = queue.clone();
            let handle = handle.clone();
            let replica = replica.clone();
            let rescue_after = Duration::from_secs(cfg.persistence.rescue_after_s);
            let retention =
                Duration::from_secs(cfg.persistence.gc_completed_after_days as u64 * 86_400);
            let wake = wake.clone();
            loops.spawn(async move {
                let mut tick = tokio::time::interval(sample);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last_prune = tokio::time::Instant::now();
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => break,
                    }
                    // Only a replica whose own heartbeats have gone through for `rescue_after`
                    // judges others: after an outage it saw, the others need as long to show
                    // they are alive, and a replica cut off itself must not judge at all.
                    let healthy_for = healthy_rx
                        .borrow()
                        .map(|since| since.elapsed())
                        .unwrap_or_default();
                    if healthy_for >= rescue_after {
                        match queue.rescue(rescue_after).await {
                            Ok(ids) if !ids.is_empty() => {
                                tracing::warn!(tasks = ?ids, "rescued tasks of replicas that stopped heartbeating");
                                wake.notify_one();
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "rescue failed"),
                        }
                    }
                    // What the database says this replica holds: attempts it no longer holds
                    // (rescued while it was stopped or cut off) are stopped here, and cancel
                    // requests whose NOTIFY was missed are honoured.
                    let before = handle.running_attempts();
                    if let Ok(held) = queue.held_by(&replica).await {
                        let attempts: Vec<(queue::TaskId, i32)> =
                            held.iter().map(|(id, attempt, _)| (*id, *attempt)).collect();
                        handle.stop_lost(&before, &attempts);
                        let orphans = handle.orphaned_holds(&attempts);
                        if !orphans.is_empty() {
                            match queue.release(&replica, &orphans).await {
                                Ok(n) if n > 0 => wake.notify_one(),
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "could not give back unknown tasks; trying again shortly"),
                            }
                        }
                        for (id, _, cancel) in held {
                            if cancel {
                                handle.cancel(id);
                            }
                        }
                    }
                    if last_prune.elapsed() >= PRUNE_EVERY {
                        last_prune = tokio::time::Instant::now();
                        match queue.prune(retention, PRUNE_BATCH).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(deleted = n, "pruned finished tasks"),
                            Err(e) => tracing::warn!(error = %e, "prune failed"),
                        }
                    }
                }
            });
        }

        // The governor: grants the pool what the host can afford.
        let stop_governing = CancellationToken::new();
        let governor = tokio::spawn(crate::governor::run(
            pool.clone(),
            handle.clone(),
            sampler,
            GovernorOptions::from_config(&cfg, &replica, isolation),
            stop_governing.clone(),
        ));

        // The scheduler: every replica campaigns; the leader fires agents' schedules.
        let stop_scheduling = CancellationToken::new();
        let scheduler = agents.map(|agents| {
            tokio::spawn(crate::scheduler::run(
                pool.clone(),
                agents,
                queue.clone(),
                SchedulerOptions::from_config(&cfg, &replica),
                stop_scheduling.clone(),
            ))
        });

        shutdown.await;
        // No new scheduled runs from here on; a leader steps down so another replica takes over.
        stop_scheduling.cancel();
        if let Some(s) = scheduler {
            let _ = s.await;
        }
        tracing::info!(
            replica = %replica,
            running = handle.running(),
            grace_s = cfg.bulk.shutdown_grace_s,
            "shutting down: no new claims; running tasks may finish"
        );
        // Draining is not the governor's business: its grant stays as it is.
        stop_governing.cancel();
        let _ = governor.await;
        // The heartbeat keeps going while running tasks drain, or they would be rescued.
        worker.shutdown().await;
        stop.cancel();
        loops.join_all().await;
        // Deregister with a fresh connection: the loop's may have been mid-failure.
        let mut hb = Heartbeat::new((*pool.connect_options()).clone(), &replica);
        if let Err(e) = hb.deregister().await {
            tracing::warn!(error = %e, "could not remove the replica row; it will age out");
        }
        tracing::info!(replica = %replica, "replica stopped");
        Ok(())
    }
}

/// The built-in kinds of the stock binary: `noop` returns `{}`, `echo` returns its payload,
/// `sleep` waits `{"ms": N}` milliseconds (at most an hour) and returns `{"slept_ms": N}`.
pub fn builtin_handlers(builder: HarnessBuilder) -> HarnessBuilder {
    builder
        .handler("noop", |_payload: Value| async {
            Ok::<_, std::convert::Infallible>(serde_json::json!({}))
        })
        .handler("echo", |payload: Value| async move {
            Ok::<_, std::convert::Infallible>(payload)
        })
        .handler("sleep", |payload: Value| async move {
            let ms = payload["ms"]
                .as_u64()
                .filter(|ms| *ms <= 3_600_000)
                .ok_or("payload.ms must be a whole number of milliseconds from 0 to 3600000")?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, &str>(serde_json::json!({ "slept_ms": ms }))
        })
}

/// The kinds [`builtin_handlers`] registers.
pub const BUILTIN_KINDS: [&str; 3] = ["noop", "echo", "sleep"];
