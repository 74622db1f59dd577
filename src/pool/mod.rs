//! The worker pool of one replica: an apalis worker fed by our own backend over `queue`.
//!
//! ```text
//! claimer ──(claim n = free permits)──▶ channel ──▶ apalis Backend ──▶ Runner (tower Service)
//!    ▲                                                                   │ timeout, cancel,
//!    └──────── permits released when an attempt ends ◀───────────────────┤ panic → Outcome
//!                                            completion writer ◀─────────┘ (batched, fenced)
//! ```
//!
//! Guarantees:
//! - never more tasks claimed than [`Capacity`] has free permits: a claimed row holds a permit
//!   from the claim until its attempt has ended;
//! - every attempt ends in exactly one [`Outcome`] (success, error, panic → failed, timeout,
//!   cancel), written back in batches through [`Queue::complete`];
//! - on shutdown, claimed-but-unstarted tasks and tasks still running after the grace period
//!   go back to `pending` without counting an attempt.
//!
//! The pool never talks SQL itself: claiming, completing and releasing go through `queue`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::*;
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::layers::Identity;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agents::handoff::HandoffWrite;
use crate::queue::{Claimed, Completion, Outcome, Queue, TaskId, backoff};

/// What a handler sees of the task it runs.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: TaskId,
    pub kind: String,
    pub payload: Value,
    /// 1 for the first attempt.
    pub attempt: i32,
    pub agent_id: Option<i64>,
    pub traceparent: Option<String>,
    /// Cancelled when the task is cancelled or the replica gives up on it; a long handler
    /// may watch it to stop early (it is also dropped at that point).
    pub cancel: CancellationToken,
    control: Arc<Mutex<Control>>,
}

/// What a handler asks of the pool beyond its `Ok`/`Err`.
#[derive(Debug, Default)]
struct Control {
    handoff: Option<HandoffWrite>,
    verdict: Option<Verdict>,
}

#[derive(Debug)]
enum Verdict {
    TimedOut(String),
    Skip(String),
    Defer(Duration),
}

impl TaskContext {
    /// State for the agent's next run, written in the transaction that completes this task
    /// (only if it completes successfully and this attempt still owns it).
    pub fn hand_off(&self, write: HandoffWrite) {
        self.control.lock().expect("control lock").handoff = Some(write);
    }
    /// Ends the attempt as `timeout` (retried while retries remain), e.g. when a sandboxed
    /// process ran out of time.
    pub fn timed_out(&self, message: impl Into<String>) {
        self.control.lock().expect("control lock").verdict =
            Some(Verdict::TimedOut(message.into()));
    }
    /// Ends the task as `cancelled` with this reason, without running it (never retried).
    pub fn skip(&self, reason: impl Into<String>) {
        self.control.lock().expect("control lock").verdict = Some(Verdict::Skip(reason.into()));
    }
    /// Puts the task back to `pending` for `delay`, its attempt not counted.
    pub fn defer(&self, delay: Duration) {
        self.control.lock().expect("control lock").verdict = Some(Verdict::Defer(delay));
    }
}

/// A handler's failure: its message is stored as the task's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError(pub String);

impl<E: std::fmt::Display> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError(e.to_string())
    }
}

type HandlerFn =
    Arc<dyn Fn(TaskContext) -> BoxFuture<'static, Result<Value, HandlerError>> + Send + Sync>;

/// A registered task kind.
#[derive(Clone)]
pub struct Handler {
    func: HandlerFn,
    /// The kind's default timeout (a task's own `timeout_ms` overrides it).
    pub timeout: Option<Duration>,
}

impl Handler {
    /// A handler of the payload alone, like the predecessor's `register_handler`.
    pub fn from_payload<F, Fut, E>(f: F) -> Handler
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, E>> + Send + 'static,
        E: std::fmt::Display + 'static,
    {
        Handler {
            func: Arc::new(move |ctx: TaskContext| {
                let fut = f(ctx.payload);
                async move { fut.await.map_err(|e| HandlerError(e.to_string())) }.boxed()
            }),
            timeout: None,
        }
    }

    /// A handler that sees the whole [`TaskContext`].
    pub fn from_context<F, Fut>(f: F) -> Handler
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        Handler {
            func: Arc::new(move |ctx| f(ctx).boxed()),
            timeout: None,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Handler {
        self.timeout = Some(timeout);
        self
    }
}

/// Handlers by kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Registry {
    pub fn insert(&mut self, kind: impl Into<String>, handler: Handler) {
        self.handlers.insert(kind.into(), handler);
    }
    pub fn get(&self, kind: &str) -> Option<&Handler> {
        self.handlers.get(kind)
    }
    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self.handlers.keys().cloned().collect();
        k.sort();
        k
    }
}

/// How many tasks the pool may run at once. The governor changes it while the pool runs;
/// the claimer never claims more rows than there are free permits.
#[derive(Debug)]
pub struct Capacity {
    sem: Arc<Semaphore>,
    /// Permits still to be withdrawn after a decrease (taken as running tasks end).
    debt: Mutex<usize>,
    granted: std::sync::atomic::AtomicUsize,
}

impl Capacity {
    pub fn new(n: usize) -> Arc<Capacity> {
        Arc::new(Capacity {
            sem: Arc::new(Semaphore::new(n)),
            debt: Mutex::new(0),
            granted: n.into(),
        })
    }

    /// The number of tasks currently allowed to run at once.
    pub fn granted(&self) -> usize {
        self.granted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the grant. An increase is usable at once; a decrease takes effect as running
    /// tasks end (nothing running is interrupted).
    pub fn set(&self, n: usize) {
        let old = self.granted.swap(n, std::sync::atomic::Ordering::Relaxed);
        let mut debt = self.debt.lock().expect("capacity lock");
        if n > old {
            let mut more = n - old;
            let repaid = more.min(*debt);
            *debt -= repaid;
            more -= repaid;
            self.sem.add_permits(more);
        } else {
            *debt += old - n;
            let taken = self.sem.forget_permits(*debt);
            *debt -= taken;
        }
    }

    /// Pays debt out of permits just acquired; false when none are left to claim with.
    fn repay(&self, permits: &mut OwnedSemaphorePermit) -> bool {
        let mut debt = self.debt.lock().expect("capacity lock");
        let n = (*debt).min(permits.num_permits());
        if n > 0 {
            if let Some(p) = permits.split(n) {
                p.forget();
            }
            *debt -= n;
        }
        permits.num_permits() > 0
    }

    /// Withdraws free permits still owed after a decrease.
    fn settle(&self) {
        let mut debt = self.debt.lock().expect("capacity lock");
        if *debt > 0 {
            let taken = self.sem.forget_permits(*debt);
            *debt -= taken;
        }
    }
}

/// A claimed task on its way to the runner, holding its capacity permit.
pub struct Job {
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
    /// When the claim statement was sent: a claim answered too late is not started.
    claimed_at: tokio::time::Instant,
}

/// A finished attempt on its way to the database. It keeps its capacity permit until its
/// completion is written: until then the row still counts as running.
struct Finished {
    completion: Completion,
    _permit: OwnedSemaphorePermit,
}

/// The apalis backend: claimed rows arrive on a channel from the claimer.
#[derive(Clone)]
struct ClaimedRows {
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("claimed-rows backend: {0}")]
pub struct BackendError(String);

impl Backend for ClaimedRows {
    type Task = Task<Job>;
    type Error = BackendError;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    // apalis polls this only when its concurrency layer has a free slot.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Task<Job>, Self::Error>>> {
        let mut rx = self.rx.lock().expect("backend lock");
        match rx.poll_recv(cx) {
            Poll::Ready(Some(job)) => {
                let id = apalis::prelude::TaskId::Int(job.claimed.id as u64);
                Poll::Ready(Some(Ok(TaskBuilder::new(job).task_id(id).build())))
            }
            // The claimer has stopped (shutdown): idle until the monitor stops the worker.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn poll_close(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for ClaimedRows {
    type Args = Job;
    type Id = i64;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = Identity;
    fn config(&self) -> &() {
        &()
    }
    fn middleware(&mut self, _: &mut WorkerContext) -> Identity {
        Identity::new()
    }
}

/// Settings of a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub replica: String,
    /// The largest capacity the governor may grant (`bulk.max_concurrent`).
    pub max_concurrent: usize,
    pub retry_base: Duration,
    /// Timeout of a kind with none of its own.
    pub default_timeout: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    /// A claim answered later than this after it was sent is not started (half of
    /// `rescue_after`: by then another replica may have rescued the rows and run them).
    pub claim_max_age: Duration,
}

/// The most rows one claim statement takes.
const MAX_CLAIM: usize = 1000;
/// How long a claimer with a backlog waits for freed capacity to gather into one claim.
const CLAIM_GATHER: Duration = Duration::from_millis(2);
/// The most completions one statement writes.
const MAX_COMPLETE: usize = 2000;

/// What the runner, claimer and shutdown share.
struct Shared {
    queue: Queue,
    registry: Arc<Registry>,
    options: PoolOptions,
    completions: mpsc::Sender<Finished>,
    /// Running attempts: id → (attempt, cancel token).
    running: Mutex<HashMap<TaskId, (i32, CancellationToken)>>,
    /// Every attempt this pool answers for, from its claim to its written completion.
    holds: Mutex<Holds>,
    /// Signalled whenever a running attempt ends.
    ended: Notify,
    /// Attempts ended, by outcome (what the governor watches).
    completed: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    /// False while the replica cannot prove it is alive (heartbeats failing): what it
    /// would claim might be rescued and run twice.
    claiming: std::sync::atomic::AtomicBool,
    claiming_changed: Notify,
}

/// The attempts a pool answers for, checked against what the database says it holds.
///
/// A row can be held in the database by a live replica that does not know it: a claim whose
/// COMMIT went through while its answer was lost (the connection broke), a release that failed
/// during an outage. Nobody would ever rescue it (the replica heartbeats), so the replica gives
/// such rows back itself — but only once they have been unknown at two reconciliations in a
/// row (a claim in flight is answered within milliseconds), and a claim that still brings one
/// of them back afterwards is dropped, not started (`revoked`).
#[derive(Debug, Default)]
struct Holds {
    /// Claimed and not yet written back or released: task → attempt.
    known: HashMap<TaskId, i32>,
    /// Held in the database but unknown here at the last reconciliation.
    suspects: std::collections::HashSet<(TaskId, i32)>,
    /// Given back by a reconciliation: when, and the last claim started by then. Only a
    /// claim started no later than that can bring the row back unknowingly (a later claim of
    /// the same row, which gets the same attempt number again, is a fair claim).
    revoked: HashMap<(TaskId, i32), (std::time::Instant, u64)>,
    /// Claims started so far (each claim statement's sequence number).
    claims: u64,
}

impl Holds {
    /// Given `held` (read from the database just before), the attempts to give back: unknown
    /// now and at the previous call. They are revoked from `now`; revocations older than
    /// `keep` are dropped.
    fn orphans(
        &mut self,
        held: &[(TaskId, i32)],
        now: std::time::Instant,
        keep: Duration,
    ) -> Vec<(TaskId, i32)> {
        let unknown: std::collections::HashSet<(TaskId, i32)> = held
            .iter()
            .filter(|(id, attempt)| self.known.get(id) != Some(attempt))
            .copied()
            .collect();
        self.revoked
            .retain(|_, (at, _)| now.duration_since(*at) < keep);
        // Suspected at the last look, or given back already and still listed (the release
        // failed): give back now.
        let mut orphans: Vec<(TaskId, i32)> = unknown
            .iter()
            .filter(|u| self.suspects.contains(u) || self.revoked.contains_key(u))
            .copied()
            .collect();
        orphans.sort_unstable();
        for o in &orphans {
            self.revoked.insert(*o, (now, self.claims));
        }
        self.suspects = unknown
            .into_iter()
            .filter(|u| !self.revoked.contains_key(u))
            .collect();
        orphans
    }

    /// Numbers a claim about to be sent.
    fn claim_started(&mut self) -> u64 {
        self.claims += 1;
        self.claims
    }

    /// Records a row that claim `seq` returned as ours; returns whether it may be started
    /// (false: a reconciliation gave it back while that claim was in flight).
    fn claimed(&mut self, seq: u64, id: TaskId, attempt: i32) -> bool {
        if self
            .revoked
            .get(&(id, attempt))
            .is_some_and(|(_, last)| seq <= *last)
        {
            return false;
        }
        self.known.insert(id, attempt);
        true
    }

    /// Forgets `attempt` of `id` (written back or released); a newer attempt stays.
    fn forget(&mut self, id: TaskId, attempt: i32) {
        if self.known.get(&id) == Some(&attempt) {
            self.known.remove(&id);
        }
    }
}

impl Shared {
    fn forget(&self, attempts: impl IntoIterator<Item = (TaskId, i32)>) {
        let mut holds = self.holds.lock().expect("holds lock");
        for (id, attempt) in attempts {
            holds.forget(id, attempt);
        }
    }

    fn running_count(&self) -> usize {
        self.running.lock().expect("running lock").len()
    }
}

/// The tower service at the bottom of the apalis stack: runs one attempt end to end.
#[derive(Clone)]
struct Runner {
    shared: Arc<Shared>,
}

impl tower::Service<Task<Job>> for Runner {
    type Response = ();
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<Job>) -> Self::Future {
        let shared = self.shared.clone();
        async move {
            run_attempt(shared, task.args).await;
            Ok(())
        }
        .boxed()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_string())
}

async fn run_attempt(shared: Arc<Shared>, job: Job) {
    let Job {
        claimed: c,
        permit,
        claimed_at,
    } = job;
    // A claim that came back late (the process was stopped, or the database stalled) may
    // already have been rescued and run elsewhere; one made while claiming is suspended may be
    // rescued at any moment. Give it back (fenced by the attempt) rather than run it twice.
    let age = claimed_at.elapsed();
    let suspended = !shared.claiming.load(std::sync::atomic::Ordering::SeqCst);
    if age > shared.options.claim_max_age || suspended {
        tracing::warn!(
            task.id = c.id,
            task.attempt = c.attempt,
            claim_age_ms = age.as_millis() as u64,
            suspended,
            "not starting a claimed task: the claim is too old or claiming is suspended; \
             returning it to the queue"
        );
        if let Err(e) = shared
            .queue
            .release(&shared.options.replica, &[(c.id, c.attempt)])
            .await
        {
            tracing::warn!(task.id = c.id, error = %e, "could not return the task now; the next reconciliation will");
        }
        shared.forget([(c.id, c.attempt)]);
        return;
    }
    let token = CancellationToken::new();
    shared
        .running
        .lock()
        .expect("running lock")
        .insert(c.id, (c.attempt, token.clone()));
    let control = Arc::new(Mutex::new(Control::default()));
    let span = tracing::info_span!(
        "task.execute",
        task.id = c.id,
        task.kind = %c.kind,
        task.attempt = c.attempt,
        replica = %shared.options.replica,
    );
    if let Some(parent) = c
        .traceparent
        .as_deref()
        .and_then(crate::telemetry::parent_from)
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let _ = span.set_parent(parent);
    }
    let outcome = async {
        let Some(handler) = shared.registry.get(&c.kind) else {
            return Outcome::Failed(format!(
                "no handler for kind {:?} on replica {}",
                c.kind, shared.options.replica
            ));
        };
        let timeout = c
            .timeout_ms
            .map(|ms| Duration::from_millis(ms as u64))
            .or(handler.timeout)
            .unwrap_or(shared.options.default_timeout);
        let ctx = TaskContext {
            id: c.id,
            kind: c.kind.clone(),
            payload: c.payload.clone(),
            attempt: c.attempt,
            agent_id: c.agent_id,
            traceparent: c.traceparent.clone(),
            cancel: token.clone(),
            control: control.clone(),
        };
        // Inside the guard, so a handler that panics while building its future is caught too.
        let func = handler.func.clone();
        let run = AssertUnwindSafe(async move { func(ctx).await }).catch_unwind();
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, run) => match r {
                Ok(Ok(Ok(v))) => match control.lock().expect("control lock").verdict.take() {
                    None => Outcome::Success(v),
                    Some(Verdict::TimedOut(e)) => Outcome::TimedOut(e),
                    Some(Verdict::Skip(reason)) => Outcome::Skipped(reason),
                    Some(Verdict::Defer(d)) => Outcome::Deferred(d),
                },
                Ok(Ok(Err(HandlerError(e)))) => Outcome::Failed(e),
                Ok(Err(panic)) => Outcome::Failed(format!("handler panicked: {}", panic_message(&*panic))),
                Err(_) => Outcome::TimedOut(format!("timed out after {:.3}s", timeout.as_secs_f64())),
            },
            _ = token.cancelled() => Outcome::Cancelled,
        };
        match &outcome {
            Outcome::Success(_) => tracing::debug!("task completed"),
            Outcome::Cancelled => tracing::info!("task cancelled"),
            Outcome::Skipped(reason) => tracing::info!(%reason, "task skipped"),
            Outcome::Deferred(d) => tracing::debug!(delay_ms = d.as_millis() as u64, "task deferred"),
            Outcome::Failed(e) | Outcome::TimedOut(e) => tracing::warn!(error = %e, "task attempt failed"),
        }
        outcome
    }
    .instrument(span)
    .await;

    // One count for the governor (failures drive its pauses), one for the metrics.
    let m = crate::telemetry::metrics();
    let attrs = crate::telemetry::task_attrs(&c.kind, c.agent_id);
    let counter = match &outcome {
        Outcome::Failed(_) | Outcome::TimedOut(_) => {
            m.failed.add(1, &attrs);
            if c.retry_count < c.max_retries {
                m.retried.add(1, &attrs);
            }
            &shared.failed
        }
        Outcome::Success(_) => {
            m.completed.add(1, &attrs);
            &shared.completed
        }
        _ => &shared.completed,
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = chrono::Utc::now();
    let seconds = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
    m.duration.record(seconds(now - c.started_at), &attrs);
    m.pickup_latency
        .record(seconds(c.started_at - c.scheduled_at), &attrs);
    let retry_at = now
        + backoff::delay(
            shared.options.retry_base,
            (c.retry_count + 1) as u32,
            &mut rand::thread_rng(),
        );
    // Still ours? A shutdown past its grace period may have released it already, and the
    // entry may belong to a newer attempt of the same task (rescued, then claimed again here).
    let ours = |m: &HashMap<TaskId, (i32, CancellationToken)>| {
        m.get(&c.id)
            .is_some_and(|(attempt, _)| *attempt == c.attempt)
    };
    let still_ours = ours(&shared.running.lock().expect("running lock"));
    if !still_ours {
        // Released by a shutdown past its grace: nothing to write.
        shared.forget([(c.id, c.attempt)]);
    } else {
        let handoff = match outcome {
            Outcome::Success(_) => control.lock().expect("control lock").handoff.take(),
            _ => None,
        };
        // Sent before the entry goes, so a draining shutdown still counts this attempt
        // while its completion waits for room in the writer's channel.
        let _ = shared
            .completions
            .send(Finished {
                completion: Completion {
                    id: c.id,
                    attempt: c.attempt,
                    outcome,
                    retry_at,
                    handoff,
                },
                // Freed by the writer once the completion is durable.
                _permit: permit,
            })
            .await;
    }
    {
        let mut running = shared.running.lock().expect("running lock");
        if ours(&running) {
            running.remove(&c.id);
        }
    }
    shared.ended.notify_waiters();
}

/// A running pool. Dropping it does not stop it: call [`Pool::shutdown`].
pub struct Pool {
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
    stop_claiming: CancellationToken,
    claimer: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    stop_writer: CancellationToken,
    monitor: tokio::task::JoinHandle<()>,
    stop_monitor: Option<tokio::sync::oneshot::Sender<()>>,
    unstarted: Arc<Mutex<mpsc::Receiver<Job>>>,
}

impl Pool {
    /// Starts claiming and running tasks. `wake` is notified on `LISTEN` wake-ups.
    pub fn start(
        queue: Queue,
        registry: Arc<Registry>,
        capacity: Arc<Capacity>,
        options: PoolOptions,
        wake: Arc<Notify>,
    ) -> Pool {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(options.max_concurrent.max(1));
        let (done_tx, done_rx) = mpsc::channel::<Finished>(options.max_concurrent.max(1) * 2);
        let shared = Arc::new(Shared {
            queue: queue.clone(),
            registry: registry.clone(),
            options: options.clone(),
            completions: done_tx,
            running: Mutex::new(HashMap::new()),
            holds: Mutex::new(Holds::default()),
            ended: Notify::new(),
            completed: 0.into(),
            failed: 0.into(),
            claiming: true.into(),
            claiming_changed: Notify::new(),
        });

        let stop_writer = CancellationToken::new();
        let writer = tokio::spawn(write_completions(
            shared.clone(),
            done_rx,
            stop_writer.clone(),
        ));

        let stop_claiming = CancellationToken::new();
        let claimer = tokio::spawn(claim_loop(
            shared.clone(),
            capacity.clone(),
            wake,
            jobs_tx,
            stop_claiming.clone(),
        ));

        let unstarted = Arc::new(Mutex::new(jobs_rx));
        let backend = ClaimedRows {
            rx: unstarted.clone(),
        };
        let runner = Runner {
            shared: shared.clone(),
        };
        let max = options.max_concurrent.max(1);
        let name = format!("pool-{}", options.replica);
        let monitor = Monitor::new().register(move |_restarts| {
            WorkerBuilder::new(name.clone())
                .backend(backend.clone())
                .concurrency(max)
                // Each attempt on its own tokio task, so handlers use every core.
                .parallelize(tokio::spawn)
                .build(runner.clone())
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let monitor = tokio::spawn(async move {
            let signal = async move {
                let _ = stop_rx.await;
                Ok(())
            };
            if let Err(e) = monitor.run_with_signal(signal).await {
                tracing::error!(error = %e, "worker pool stopped with an error");
            }
        });

        Pool {
            shared,
            capacity,
            stop_claiming,
            claimer,
            writer,
            stop_writer,
            monitor,
            stop_monitor: Some(stop_tx),
            unstarted,
        }
    }

    /// A cheap handle for the replica's background loops (heartbeat, cancel listener).
    pub fn handle(&self) -> PoolHandle {
        PoolHandle {
            shared: self.shared.clone(),
            capacity: self.capacity.clone(),
        }
    }

    /// Stops claiming, gives running attempts `shutdown_grace` to finish, then puts every
    /// unfinished task back to `pending` without counting the attempt.
    pub async fn shutdown(mut self) {
        self.stop_claiming.cancel();
        let _ = (&mut self.claimer).await;

        // Claimed but never started: straight back to the queue.
        let unstarted: Vec<(TaskId, i32)> = {
            let mut rx = self.unstarted.lock().expect("backend lock");
            let mut ids = Vec::new();
            while let Ok(job) = rx.try_recv() {
                ids.push((job.claimed.id, job.claimed.attempt));
            }
            ids
        };
        self.release(&unstarted, "claimed but not started").await;

        let deadline = tokio::time::Instant::now() + self.shared.options.shutdown_grace;
        loop {
            let ended = self.shared.ended.notified();
            if self.shared.running_count() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        let leftover: Vec<(TaskId, i32, CancellationToken)> = self
            .shared
            .running
            .lock()
            .expect("running lock")
            .drain()
            .map(|(id, (attempt, token))| (id, attempt, token))
            .collect();
        if !leftover.is_empty() {
            // Stop them first, so no second replica runs them while this one still does.
            for (_, _, token) in &leftover {
                token.cancel();
            }
            let ids: Vec<(TaskId, i32)> = leftover.iter().map(|(id, a, _)| (*id, *a)).collect();
            self.release(&ids, "still running after the shutdown grace period")
                .await;
        }

        if let Some(stop) = self.stop_monitor.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.monitor).await;
        self.stop_writer.cancel();
        let _ = (&mut self.writer).await;
    }

    async fn release(&self, ids: &[(TaskId, i32)], why: &str) {
        if ids.is_empty() {
            return;
        }
        self.shared.forget(ids.iter().copied());
        match self
            .shared
            .queue
            .release(&self.shared.options.replica, ids)
            .await
        {
            Ok(n) => tracing::info!(released = n, reason = why, "returned tasks to the queue"),
            Err(e) => tracing::error!(
                error = %e,
                tasks = ?ids,
                "could not return tasks to the queue; other replicas will rescue them"
            ),
        }
    }
}

/// What the rest of a replica may see and do while the pool runs.
#[derive(Clone)]
pub struct PoolHandle {
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
}

impl PoolHandle {
    /// Attempts running right now.
    pub fn running(&self) -> usize {
        self.shared.running_count()
    }

    /// Attempts ended since the pool started: (succeeded or otherwise done, failed or timed out).
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.completed.load(Relaxed),
            self.shared.failed.load(Relaxed),
        )
    }

    pub fn capacity(&self) -> &Arc<Capacity> {
        &self.capacity
    }

    /// Stops or resumes claiming (running attempts are not touched).
    pub fn set_claiming(&self, on: bool) {
        let was = self
            .shared
            .claiming
            .swap(on, std::sync::atomic::Ordering::SeqCst);
        if was != on {
            self.shared.claiming_changed.notify_waiters();
        }
    }

    pub fn claiming(&self) -> bool {
        self.shared
            .claiming
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The attempts running right now, as (task, attempt).
    pub fn running_attempts(&self) -> Vec<(TaskId, i32)> {
        self.shared
            .running
            .lock()
            .expect("running lock")
            .iter()
            .map(|(id, (attempt, _))| (*id, *attempt))
            .collect()
    }

    /// Stops every attempt in `before` (a [`PoolHandle::running_attempts`] taken before the
    /// database was read) that `held` (what the database says this replica holds, read
    /// afterwards) no longer lists: it was rescued while this replica could not heartbeat
    /// (stopped, cut off), and another replica may be running it. Returns how many stopped.
    pub fn stop_lost(&self, before: &[(TaskId, i32)], held: &[(TaskId, i32)]) -> usize {
        let held: std::collections::HashSet<&(TaskId, i32)> = held.iter().collect();
        let running = self.shared.running.lock().expect("running lock");
        let mut stopped = 0;
        for attempt in before {
            if held.contains(attempt) {
                continue;
            }
            if let Some((a, token)) = running.get(&attempt.0)
                && *a == attempt.1
                && !token.is_cancelled()
            {
                tracing::warn!(
                    task.id = attempt.0,
                    task.attempt = attempt.1,
                    "this replica no longer holds a task it is running (rescued while it could \
                     not heartbeat); stopping it"
                );
                token.cancel();
                stopped += 1;
            }
        }
        stopped
    }

    /// Compares `held` (what the database says this replica holds, read just before) with
    /// the attempts this pool answers for. Returns the attempts to give back: held, but
    /// unknown here now and at the previous call. From now on a claim that brings one of them
    /// back is dropped. See [`Holds`].
    pub fn orphaned_holds(&self, held: &[(TaskId, i32)]) -> Vec<(TaskId, i32)> {
        // Long enough for any claim still in flight to have come back (or to be too old to
        // start anyway).
        let keep = self.shared.options.claim_max_age * 4;
        let orphans = self.shared.holds.lock().expect("holds lock").orphans(
            held,
            std::time::Instant::now(),
            keep,
        );
        if !orphans.is_empty() {
            tracing::warn!(
                tasks = ?orphans,
                "the database says this replica holds tasks it is not running (a claim whose \
                 answer was lost, a release that failed); giving them back"
            );
        }
        orphans
    }

    /// Aborts a running attempt of this pool (a cancel request). Returns whether it was here.
    pub fn cancel(&self, id: TaskId) -> bool {
        match self.shared.running.lock().expect("running lock").get(&id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

async fn claim_loop(
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
    wake: Arc<Notify>,
    jobs: mpsc::Sender<Job>,
    stop: CancellationToken,
) {
    let queue = &shared.queue;
    let options = &shared.options;
    let kinds = shared.registry.kinds();
    let mut failures = 0u32;
    // Whether the last claim came back full: the queue has a backlog.
    let mut busy = false;
    loop {
        while !shared.claiming.load(std::sync::atomic::Ordering::SeqCst) {
            let changed = shared.claiming_changed.notified();
            if shared.claiming.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = stop.cancelled() => return,
            }
        }
        capacity.settle();
        let mut permits = tokio::select! {
            p = capacity.sem.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.cancelled() => return,
        };
        // After a decrease, permits freed by finishing tasks pay the debt before any claim.
        if !capacity.repay(&mut permits) {
            continue;
        }
        if busy {
            // With a backlog, permits come back a few at a time; claiming each trickle
            // separately spends a round trip per row. Wait briefly for a quarter of the
            // capacity to gather, so claims stay batched. An idle queue never waits here.
            let target = (capacity.granted() / 4).clamp(1, MAX_CLAIM);
            let deadline = tokio::time::Instant::now() + CLAIM_GATHER;
            while permits.num_permits() < target {
                match tokio::time::timeout_at(deadline, capacity.sem.clone().acquire_owned()).await
                {
                    Ok(p) => permits.merge(p.expect("semaphore never closed")),
                    Err(_) => break,
                }
            }
        }
        // Take every other free permit too: one statement claims for all of them.
        let more = capacity.sem.available_permits().min(MAX_CLAIM - 1);
        if more > 0
            && let Ok(p) = capacity.sem.clone().try_acquire_many_owned(more as u32)
        {
            permits.merge(p);
        }
        let want = permits.num_permits();
        let seq = shared.holds.lock().expect("holds lock").claim_started();
        let t0 = tokio::time::Instant::now();
        // Not raced against `stop`: a claim dropped after its COMMIT was sent would leave rows
        // claimed that no one runs. Claimed rows go to the channel, and shutdown releases
        // whatever was not started.
        let claimed = queue.claim(&options.replica, want as u32, &kinds).await;
        tracing::trace!(
            want,
            got = claimed.as_ref().map_or(0, Vec::len),
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            "claim"
        );
        match claimed {
            Ok(rows) => {
                failures = 0;
                let got = rows.len();
                busy = got == want;
                // Known before anything can finish with them; a row a reconciliation gave
                // back while this claim was in flight is not ours to start.
                let rows: Vec<Claimed> = {
                    let mut holds = shared.holds.lock().expect("holds lock");
                    rows.into_iter()
                        .filter(|r| {
                            let ok = holds.claimed(seq, r.id, r.attempt);
                            if !ok {
                                tracing::warn!(
                                    task.id = r.id,
                                    "a claim returned a row already given back; dropping it"
                                );
                            }
                            ok
                        })
                        .collect()
                };
                for row in rows {
                    let permit = permits.split(1).expect("one permit per claimed row");
                    if jobs
                        .send(Job {
                            claimed: row,
                            permit,
                            claimed_at: t0,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                drop(permits);
                if got < want {
                    // The queue is drained: sleep until a NOTIFY or the next poll.
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(options.poll_interval) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
            Err(e) => {
                // Claiming is what a replica is for: it goes on trying, at most every 5 s,
                // for as long as it serves. A claim whose COMMIT went through although this
                // error says otherwise leaves rows we hold without knowing; the maintenance
                // tick hands those back (see `Holds`).
                drop(permits);
                busy = false;
                failures += 1;
                let wait = backoff::nominal(Duration::from_millis(100), failures)
                    .min(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "claim failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Writes finished attempts in batches: whatever has arrived while the previous statement
/// ran goes into the next one. Each attempt's capacity permit is freed once its completion is
/// written.
async fn write_completions(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Finished>,
    stop: CancellationToken,
) {
    let (queue, replica) = (&shared.queue, &shared.options.replica);
    let mut arrived = Vec::with_capacity(MAX_COMPLETE);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut arrived, MAX_COMPLETE) => n,
            _ = stop.cancelled() => {
                while let Ok(f) = rx.try_recv() {
                    arrived.push(f);
                }
                if !arrived.is_empty() {
                    let batch: Vec<Completion> = arrived.drain(..).map(|f| f.completion).collect();
                    write_with_retry(queue, replica, &batch, &stop).await;
                    shared.forget(batch.iter().map(|c| (c.id, c.attempt)));
                }
                return;
            }
        };
        if n == 0 {
            return;
        }
        let (batch, permits): (Vec<Completion>, Vec<OwnedSemaphorePermit>) =
            arrived.drain(..).map(|f| (f.completion, f._permit)).unzip();
        write_with_retry(queue, replica, &batch, &stop).await;
        shared.forget(batch.iter().map(|c| (c.id, c.attempt)));
        drop(permits);
    }
}

/// Tries after a stop is requested: what is not written by then is rescued by other replicas.
const STOPPING_TRIES: u32 = 10;

async fn write_with_retry(
    queue: &Queue,
    replica: &str,
    batch: &[Completion],
    stop: &CancellationToken,
) {
    let mut failures = 0u32;
    // Unbounded while serving, on purpose: `complete` fails only when the database cannot be
    // reached (a row it refuses is failed row by row inside), so this waits out an outage.
    // Meanwhile the rows stay ours and fenced, the permits stay held (nothing new is claimed),
    // and if the outage outlasts `rescue_after` other replicas rescue the tasks and this write,
    // when it lands, is fenced out. Once stopping, it is bounded by STOPPING_TRIES.
    loop {
        let t0 = std::time::Instant::now();
        let result = {
            use tracing::Instrument;
            let span = tracing::info_span!("queue.complete", tasks = batch.len());
            queue.complete(replica, batch).instrument(span).await
        };
        tracing::trace!(
            n = batch.len(),
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            "complete"
        );
        match result {
            Ok(n) => {
                if (n as usize) < batch.len() {
                    tracing::info!(
                        stale = batch.len() - n as usize,
                        "completions fenced out: those tasks were rescued and belong to a newer attempt"
                    );
                }
                return;
            }
            Err(e) => {
                failures += 1;
                if stop.is_cancelled() && failures >= STOPPING_TRIES {
                    tracing::error!(error = %e, tasks = batch.len(), "giving up writing completions; the tasks will be rescued");
                    return;
                }
                let wait = backoff::nominal(Duration::from_millis(100), failures)
                    .min(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "writing completions failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_decrease_waits_for_running_tasks() {
        let cap = Capacity::new(4);
        let held = cap.sem.clone().try_acquire_many_owned(3).unwrap();
        cap.set(2);
        assert_eq!(cap.granted(), 2);
        // One free permit could be withdrawn at once; one more is owed.
        assert_eq!(cap.sem.available_permits(), 0);
        drop(held);
        cap.settle();
        assert_eq!(cap.sem.available_permits(), 2);
        cap.set(5);
        assert_eq!(cap.sem.available_permits(), 5);
    }

    #[test]
    fn capacity_increase_repays_debt_first() {
        let cap = Capacity::new(3);
        let held = cap.sem.clone().try_acquire_many_owned(3).unwrap();
        cap.set(1); // owes 2
        cap.set(2); // owes 1
        drop(held);
        cap.settle();
        assert_eq!(cap.sem.available_permits(), 2);
    }

    #[test]
    fn holds_unknown_at_two_reconciliations_are_given_back_once() {
        let mut h = Holds::default();
        let t0 = std::time::Instant::now();
        let keep = Duration::from_secs(10);
        let first = h.claim_started();
        assert!(h.claimed(first, 1, 1));
        // A claim is in flight while the reconciliations below give its row back.
        let in_flight = h.claim_started();
        // 2 is held but unknown (its claim's answer was lost); 1 is ours.
        assert!(h.orphans(&[(1, 1), (2, 1)], t0, keep).is_empty());
        // A claim in flight at the first look is known by the second: never given back.
        let quick = h.claim_started();
        assert!(h.claimed(quick, 3, 1));
        assert_eq!(h.orphans(&[(1, 1), (2, 1), (3, 1)], t0, keep), vec![(2, 1)]);
        // Still listed (the release failed): given back again at once.
        assert_eq!(h.orphans(&[(2, 1)], t0, keep), vec![(2, 1)]);
        // The claim in flight brings 2 back: dropped. A claim started since may have it.
        assert!(!h.claimed(in_flight, 2, 1));
        let later = h.claim_started();
        assert!(h.claimed(later, 2, 1));
        h.forget(2, 1);
        assert!(h.orphans(&[], t0, keep).is_empty());
        // An older attempt of a task we now run is not ours: (1, 1) vs known (1, 2).
        let retried = h.claim_started();
        assert!(h.claimed(retried, 1, 2));
        assert!(h.orphans(&[(1, 1)], t0, keep).is_empty());
        assert_eq!(h.orphans(&[(1, 1)], t0, keep), vec![(1, 1)]);
        // Revocations age out.
        h.orphans(&[], t0 + keep, keep);
        assert!(h.revoked.is_empty());
        h.forget(1, 1);
        assert_eq!(
            h.known.get(&1),
            Some(&2),
            "forgetting an old attempt keeps the new one"
        );
        h.forget(1, 2);
        assert!(!h.known.contains_key(&1));
    }

    #[test]
    fn panic_messages_are_kept() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*p), "boom 7");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(&*p), "static");
    }
}
