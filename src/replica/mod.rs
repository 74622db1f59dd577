//! A replica: the [`Harness`] a program builds with its handlers, and [`Harness::serve`], which
//! composes what one replica runs — the worker, and a loop per concern, each in a file of its
//! own: `heartbeat`, `wakeups` (LISTEN), `rescuer`, `reconciler` (what it holds against what it
//! runs, and missed cancels), `pruner` — plus the governor and the scheduler.
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
//! removes it on a clean exit; the heartbeat runs on its own connection, so a worker busy with
//! claims and completions cannot starve it; every replica rescues tasks of dead replicas.

mod heartbeat;
mod pruner;
mod reconciler;
mod rescuer;
mod wakeups;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agents::{AGENT_KIND, Agents, COMMAND_KIND};
use crate::config::Config;
use crate::executor::Isolation;
use crate::fleet::{Heartbeat, new_replica_id};
use crate::governor::{GovernorOptions, ResourceLimits, ResourceMonitor, Sampler};
use crate::queue::{self, Listener, Queue};
use crate::scheduler::SchedulerOptions;
use crate::worker::{
    Capacity, Handler, HandlerError, Registry, Worker, WorkerHandle, WorkerOptions,
};

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
    session: Option<sqlx::postgres::PgConnectOptions>,
    registry: Registry,
    replica_id: Option<String>,
    agents: Option<Agents>,
    sampler: Option<Box<dyn Sampler>>,
    isolation: Option<Isolation>,
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

    /// How to open connections that must be sessions of their own (the `LISTEN` connections,
    /// the heartbeat, the scheduler's leader lock) when the pool goes through a pooler in
    /// transaction mode. Without it: `database.session_url`, else the pool's connections.
    pub fn session(mut self, options: sqlx::postgres::PgConnectOptions) -> Self {
        self.session = Some(options);
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
    pub fn isolation(mut self, mode: Isolation) -> Self {
        self.isolation = Some(mode);
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
        let session = match (self.session, &cfg.database.session_url) {
            (Some(options), _) => Some(options),
            (None, Some(url)) => Some(crate::db::options(url.expose())?),
            (None, None) => None,
        };
        let replica = self.replica_id.unwrap_or_else(new_replica_id);
        let sessions = crate::db::session_pool(
            &pool,
            session.map(|o| o.application_name(&format!("harness-listener {replica}"))),
        );
        let queue = Queue::new(pool.clone(), cfg.bulk.retry_attempts);
        Ok(Harness {
            agents: self.agents,
            sampler: self.sampler,
            isolation: self.isolation,
            capacity: Capacity::with_prefetch(cfg.slots(), cfg.bulk.prefetch as usize),
            replica,
            registry: Arc::new(self.registry),
            cfg,
            pool,
            sessions,
            queue,
        })
    }
}

/// One replica's worth of Agent Harness: a queue handle and, once served, a worker pool.
pub struct Harness {
    agents: Option<Agents>,
    sampler: Option<Box<dyn Sampler>>,
    isolation: Option<Isolation>,
    cfg: Config,
    pool: PgPool,
    /// Where connections that need a session of their own come from (see
    /// [`HarnessBuilder::session`]); the pool itself when none was configured.
    sessions: PgPool,
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

    /// Its handlers, by kind (what the API checks a new task against).
    pub fn registry(&self) -> crate::worker::Registry {
        (*self.registry).clone()
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
            sessions,
            queue,
            registry,
            replica,
            capacity,
        } = self;
        // Before anything starts: a failure here must leave nothing running.
        let sampler = sampler_for(sampler, &cfg, &capacity)?;
        let mut heartbeat =
            Heartbeat::new((*sessions.connect_options()).clone(), &replica).serving(&cfg.queues());
        // Registered before the first claim, so no one rescues what we are about to take.
        heartbeat
            .beat(0, capacity.granted() as i32, Duration::from_secs(10))
            .await?;
        // Listening before the first claim, so a task enqueued in between wakes us.
        let listener = Listener::connect(&sessions).await?;
        let wake = Arc::new(Notify::new());
        let options = WorkerOptions::from_config(&cfg, &replica);
        let worker = Worker::start(
            queue.clone(),
            registry.clone(),
            capacity,
            options,
            wake.clone(),
        );
        tracing::info!(%replica, kinds = ?registry.kinds(), "replica serving");
        let ctx = Context {
            cfg: &cfg,
            pool: &pool,
            sessions: &sessions,
            queue: &queue,
            replica: &replica,
            worker: worker.handle(),
            wake,
        };
        let loops = ctx.start_loops(heartbeat, listener);
        let governor = ctx.start_governor(sampler, isolation);
        let scheduler = agents.map(|agents| ctx.start_scheduler(agents));

        shutdown.await;
        // No new scheduled runs from here on; a leader steps down so another replica takes over.
        if let Some(s) = scheduler {
            s.stop().await;
        }
        let grace_s = cfg.bulk.shutdown_grace_s;
        tracing::info!(%replica, running = ctx.worker.running(), grace_s, "shutting down: no new claims; running tasks may finish");
        // Draining is not the governor's business: its grant stays as it is.
        governor.stop().await;
        // The heartbeat keeps going while running tasks drain, or they would be rescued.
        worker.shutdown().await;
        loops.stop().await;
        deregister(&sessions, &replica).await;
        Ok(())
    }
}

/// What the loops of a serving replica are started from.
struct Context<'a> {
    cfg: &'a Config,
    pool: &'a PgPool,
    sessions: &'a PgPool,
    queue: &'a Queue,
    replica: &'a str,
    worker: WorkerHandle,
    wake: Arc<Notify>,
}

/// Background work that stops on its token, and is awaited.
struct Running {
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    fn new() -> Running {
        Running {
            stop: CancellationToken::new(),
            tasks: tokio::task::JoinSet::new(),
        }
    }
    async fn stop(self) {
        self.stop.cancel();
        self.tasks.join_all().await;
    }
}

impl Context<'_> {
    /// The heartbeat, wake-ups, rescuer, reconciler and pruner.
    fn start_loops(&self, heartbeat: Heartbeat, listener: Listener) -> Running {
        let cfg = self.cfg;
        let sample = Duration::from_secs(cfg.telemetry.sample_interval_s);
        let rescue_after = Duration::from_secs(cfg.persistence.rescue_after_s);
        let retention =
            Duration::from_secs(cfg.persistence.gc_completed_after_days as u64 * 86_400);
        let mut r = Running::new();
        let (worker, wake, stop) = (&self.worker, &self.wake, &r.stop);
        let (health, beating) = heartbeat::start(
            heartbeat,
            worker.clone(),
            sample,
            rescue_after,
            stop.clone(),
        );
        r.tasks.spawn(beating);
        r.tasks.spawn(wakeups::run(
            listener,
            worker.clone(),
            wake.clone(),
            stop.clone(),
        ));
        r.tasks.spawn(rescuer::run(
            self.queue.clone(),
            health,
            sample,
            rescue_after,
            wake.clone(),
            stop.clone(),
        ));
        r.tasks.spawn(reconciler::run(
            self.queue.clone(),
            worker.clone(),
            self.replica.to_string(),
            sample,
            wake.clone(),
            stop.clone(),
        ));
        r.tasks
            .spawn(pruner::run(self.queue.clone(), retention, stop.clone()));
        r
    }

    /// The governor: grants the worker what the host can afford.
    fn start_governor(&self, sampler: Box<dyn Sampler>, isolation: Option<Isolation>) -> Running {
        let mut r = Running::new();
        r.tasks.spawn(crate::governor::run(
            self.pool.clone(),
            self.worker.clone(),
            sampler,
            GovernorOptions::from_config(self.cfg, self.replica, isolation),
            r.stop.clone(),
        ));
        r
    }

    /// The scheduler: every replica campaigns; the leader fires agents' schedules.
    fn start_scheduler(&self, agents: Agents) -> Running {
        let mut r = Running::new();
        r.tasks.spawn(crate::scheduler::run(
            self.pool.clone(),
            self.sessions.clone(),
            agents,
            self.queue.clone(),
            SchedulerOptions::from_config(self.cfg, self.replica),
            r.stop.clone(),
        ));
        r
    }
}

/// The governor's sampler: the one given, else one of this host within the configured limits
/// whose slots are the worker's capacity.
fn sampler_for(
    given: Option<Box<dyn Sampler>>,
    cfg: &Config,
    capacity: &Arc<Capacity>,
) -> Result<Box<dyn Sampler>, Error> {
    Ok(match given {
        Some(s) => s,
        None => Box::new(
            ResourceMonitor::with_capacity(
                ResourceLimits {
                    max_concurrent_agents: cfg.slots(),
                    max_memory_mb: cfg.executor.max_memory_mb,
                    max_cpu_percent: cfg.executor.max_cpu_percent as f64,
                    ..ResourceLimits::default()
                },
                capacity.clone(),
            )
            .map_err(Error::Governor)?,
        ),
    })
}

/// Removes the replica's row, on a fresh connection: the heartbeat's may have been failing.
async fn deregister(sessions: &PgPool, replica: &str) {
    let mut hb = Heartbeat::new((*sessions.connect_options()).clone(), replica);
    if let Err(e) = hb.deregister().await {
        tracing::warn!(error = %e, "could not remove the replica row; it will age out");
    }
    tracing::info!(%replica, "replica stopped");
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
        .handler_with(
            "sleep",
            Handler::from_context(|ctx| async move {
                let ms = sleep_ms(&ctx.payload).map_err(HandlerError::permanent)?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(serde_json::json!({ "slept_ms": ms }))
            })
            .with_validation(|p| sleep_ms(p).map(|_| ())),
        )
}

/// The longest `sleep` task, in milliseconds (an hour).
pub const SLEEP_MAX_MS: u64 = 3_600_000;

/// The `sleep` kind's payload: `{"ms": N}`, N from 0 to [`SLEEP_MAX_MS`].
fn sleep_ms(payload: &Value) -> Result<u64, String> {
    crate::worker::whole(&payload["ms"])
        .and_then(|ms| u64::try_from(ms).ok())
        .filter(|ms| *ms <= SLEEP_MAX_MS)
        .ok_or_else(|| {
            format!(
                "payload.ms must be a whole number of milliseconds from 0 to {SLEEP_MAX_MS}, \
                 not {}",
                payload
                    .get("ms")
                    .map_or("missing".to_string(), Value::to_string)
            )
        })
}

/// Checks a payload of a built-in kind (`noop`, `echo`, `sleep`, `agent`, `command`) as a
/// replica would at enqueue; `None` for another kind.
pub fn validate_builtin(kind: &str, payload: &Value) -> Option<Result<(), String>> {
    match kind {
        "noop" | "echo" => Some(Ok(())),
        "sleep" => Some(sleep_ms(payload).map(|_| ())),
        AGENT_KIND => Some(crate::agents::validate_agent_payload(payload)),
        COMMAND_KIND => Some(crate::agents::validate_command_payload(payload)),
        _ => None,
    }
}

/// The kinds [`builtin_handlers`] registers.
pub const BUILTIN_KINDS: [&str; 3] = ["noop", "echo", "sleep"];
