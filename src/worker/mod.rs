//! The worker of one replica: an apalis worker fed by our own backend over `queue`.
//!
//! ```text
//! claimer ──(claim n ≤ free hold permits)──▶ feed ──▶ apalis Backend ──(run permit)──▶ runner
//!    ▲                (the prefetch buffer)                                 │ timeout, cancel,
//!    │                                                                        │ panic → Outcome
//!    └── hold permits freed once the completion is written ◀── completer ◀───┘ (batched, fenced)
//! ```
//!
//! One file per part: `handler` (what task code sees), `capacity`, `backend`,
//! `claimer`, `runner`, `completer`, and `holds` (the attempts it answers for).
//!
//! Guarantees:
//! - never more rows held than [`Capacity`] has hold permits (the grant plus `bulk.prefetch`,
//!   none while the grant is 0): a claimed row holds one from the claim until its completion
//!   is written;
//! - never more attempts running than the grant: an attempt holds a run permit from its start
//!   to the end of its handler;
//! - rows beyond the free slots are claimed only while tasks end quickly (see
//!   [`PREFETCH_HORIZON`]); a buffered row goes back to the queue after [`BUFFER_MAX_WAIT`],
//!   and every buffered row does while the grant is 0;
//! - every attempt ends in exactly one [`crate::queue::Outcome`] (success, error, panic →
//!   failed, timeout, cancel), written back in batches through
//!   [`crate::queue::Queue::complete`];
//! - a buffered row whose claim is older than `claim_max_age` is given back, not started, and
//!   so is an attempt whose claim a long enough break in the heartbeats outlived (see
//!   `lease`), checked again just before a sandboxed run's process starts;
//! - on shutdown, claimed-but-unstarted tasks and tasks still running after the grace period
//!   go back to `pending` without counting an attempt.
//!
//! The worker never talks SQL itself: claiming, completing and releasing go through `queue`.

mod backend;
mod capacity;
mod claimer;
mod completer;
mod handler;
mod holds;
mod lanes;
mod lease;
mod quarantine;
mod runner;

use crate::queue::{Queue, TaskId};
use apalis::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub use backend::{BackendError, Job};
use backend::{ClaimedRows, Feed, Finished};
pub use capacity::Capacity;
use claimer::{claim_loop, sweep_buffer};
use completer::write_completions;
use handler::{Control, Verdict};
pub use handler::{Handler, HandlerError, Registry, TaskContext, whole};
use holds::Holds;
pub use lease::Lease;
use quarantine::Quarantines;
pub use quarantine::Target;
use runner::Runner;

/// How much work the prefetch buffer holds at most: the rows that every slot, busy, ends in
/// this long at the mean duration of recent attempts, up to `bulk.prefetch`. Attempts that
/// take this long or longer get no buffer, so slow work is not kept from idle replicas.
pub const PREFETCH_HORIZON: Duration = Duration::from_millis(100);

/// The longest a row waits in the prefetch buffer: one that waited longer goes back to the
/// queue (without counting an attempt), where an idle replica can take it. Only a change of
/// pace (quick tasks, then slow ones) or a lowered grant leaves rows waiting this long.
pub const BUFFER_MAX_WAIT: Duration = Duration::from_secs(1);

/// Settings of a pool.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub replica: String,
    /// The largest capacity the governor may grant: the sum of the queues' capacities.
    pub max_concurrent: usize,
    /// The queues served, each with its capacity (`worker.queues`), in claim order.
    pub queues: Vec<(String, usize)>,
    pub retry_base: Duration,
    /// Timeout of a kind with none of its own.
    pub default_timeout: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    /// A claim answered later than this after it was sent is not started (half of
    /// `rescue_after`: by then another replica may have rescued the rows and run them).
    pub claim_max_age: Duration,
    /// After how long without a heartbeat other replicas rescue this one's tasks.
    pub rescue_after: Duration,
}

impl WorkerOptions {
    pub fn from_config(cfg: &crate::config::Config, replica: &str) -> WorkerOptions {
        WorkerOptions {
            replica: replica.to_string(),
            max_concurrent: cfg.slots(),
            queues: cfg.queues(),
            retry_base: Duration::from_secs(cfg.bulk.retry_delay_seconds),
            default_timeout: Duration::from_secs(cfg.executor.default_timeout_s),
            poll_interval: Duration::from_millis(cfg.bulk.poll_interval_ms),
            shutdown_grace: Duration::from_secs(cfg.bulk.shutdown_grace_s),
            // Half of rescue_after: by then another replica may have rescued the rows.
            claim_max_age: Duration::from_secs(cfg.persistence.rescue_after_s) / 2,
            rescue_after: Duration::from_secs(cfg.persistence.rescue_after_s),
        }
    }
}

/// What the runner, claimer and shutdown share.
struct Shared {
    queue: Queue,
    registry: Arc<Registry>,
    options: WorkerOptions,
    completions: mpsc::Sender<Finished>,
    /// Running attempts: id → (attempt, cancel token).
    running: Mutex<HashMap<TaskId, (i32, CancellationToken)>>,
    /// Every attempt this pool answers for, from its claim to its written completion.
    holds: Mutex<Holds>,
    /// Signalled whenever a running attempt ends.
    ended: Notify,
    /// Attempts that succeeded, and that failed or timed out (what the governor watches).
    completed: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    /// Attempts that ended, and the sum of their waits to be picked up (started_at −
    /// scheduled_at) in microseconds: the console's pick-up latency chart.
    timed: std::sync::atomic::AtomicU64,
    pickup_us_total: std::sync::atomic::AtomicU64,
    /// False while the replica cannot prove it is alive (heartbeats failing): what it
    /// would claim might be rescued and run twice.
    claiming: std::sync::atomic::AtomicBool,
    claiming_changed: Notify,
    /// Agents and kinds not to start now, and failures per target.
    quarantines: Quarantines,
    /// How long attempts take: what the prefetch buffer may hold.
    pace: Pace,
    /// The queues served and what runs in each.
    lanes: Arc<lanes::Lanes>,
    /// What the heartbeats say about this replica's claims (see `lease`).
    beats: Arc<Mutex<lease::Beats>>,
}

/// Handlers that returned and the time they took: what the prefetch buffer is sized by.
#[derive(Default)]
struct Pace {
    ended: std::sync::atomic::AtomicU64,
    busy_us: std::sync::atomic::AtomicU64,
}

impl Pace {
    fn ended(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.busy_us.fetch_add(took.as_micros() as u64, Relaxed);
        self.ended.fetch_add(1, Relaxed);
    }

    fn read(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.ended.load(Relaxed), self.busy_us.load(Relaxed))
    }
}

impl Shared {
    fn forget(&self, attempts: impl IntoIterator<Item = (TaskId, i32)>) {
        let mut holds = self.holds.lock().expect("holds lock");
        for (id, attempt) in attempts {
            holds.forget(id, attempt);
        }
    }

    /// The right to start of what was claimed at `claimed_at`.
    fn lease(&self, claimed_at: std::time::Instant) -> Lease {
        Lease::new(claimed_at, self.beats.clone())
    }

    fn running_count(&self) -> usize {
        self.running.lock().expect("running lock").len()
    }
}

/// A running pool. Dropping it does not stop it: call [`Worker::shutdown`].
pub struct Worker {
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
    stop_claiming: CancellationToken,
    claimer: tokio::task::JoinHandle<()>,
    sweeper: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    stop_writer: CancellationToken,
    monitor: tokio::task::JoinHandle<()>,
    stop_monitor: Option<tokio::sync::oneshot::Sender<()>>,
    unstarted: Arc<Mutex<Feed>>,
}

impl Worker {
    /// Starts claiming and running tasks. `wake` is notified on `LISTEN` wake-ups.
    pub fn start(
        queue: Queue,
        registry: Arc<Registry>,
        capacity: Arc<Capacity>,
        options: WorkerOptions,
        wake: Arc<Notify>,
    ) -> Worker {
        // Room for every row the pool may hold, so a runner never waits on the completer.
        let holdable = capacity.max_holdable().max(options.max_concurrent.max(1));
        let (done_tx, done_rx) = mpsc::channel::<Finished>(holdable);
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
            timed: 0.into(),
            pickup_us_total: 0.into(),
            claiming: true.into(),
            claiming_changed: Notify::new(),
            quarantines: Quarantines::default(),
            pace: Pace::default(),
            lanes: Arc::new(lanes::Lanes::new(&options.queues)),
            beats: Arc::new(Mutex::new(lease::Beats::new(options.rescue_after))),
        });

        let stop_writer = CancellationToken::new();
        let writer = tokio::spawn(write_completions(
            shared.clone(),
            done_rx,
            stop_writer.clone(),
        ));

        let unstarted = Arc::new(Mutex::new(Feed::new(
            capacity.clone(),
            shared.lanes.clone(),
        )));
        let stop_claiming = CancellationToken::new();
        let claimer = tokio::spawn(claim_loop(
            shared.clone(),
            capacity.clone(),
            wake,
            unstarted.clone(),
            stop_claiming.clone(),
        ));
        let sweeper = tokio::spawn(sweep_buffer(
            shared.clone(),
            capacity.clone(),
            unstarted.clone(),
            stop_claiming.clone(),
        ));

        let backend = ClaimedRows {
            feed: unstarted.clone(),
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

        Worker {
            shared,
            capacity,
            stop_claiming,
            claimer,
            sweeper,
            writer,
            stop_writer,
            monitor,
            stop_monitor: Some(stop_tx),
            unstarted,
        }
    }

    /// A cheap handle for the replica's background loops (heartbeat, cancel listener).
    pub fn handle(&self) -> WorkerHandle {
        WorkerHandle {
            shared: self.shared.clone(),
            capacity: self.capacity.clone(),
        }
    }

    /// Stops claiming, gives running attempts `shutdown_grace` to finish, then puts every
    /// unfinished task back to `pending` without counting the attempt.
    pub async fn shutdown(mut self) {
        self.stop_claiming.cancel();
        let _ = (&mut self.claimer).await;
        let _ = (&mut self.sweeper).await;

        // Claimed but never started: straight back to the queue.
        let unstarted: Vec<(TaskId, i32)> = {
            let mut feed = self.unstarted.lock().expect("backend lock");
            feed.overdue(Duration::ZERO, true)
                .into_iter()
                .map(|job| (job.claimed.id, job.claimed.attempt))
                .collect()
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
pub struct WorkerHandle {
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
}

impl WorkerHandle {
    /// Attempts running right now.
    pub fn running(&self) -> usize {
        self.shared.running_count()
    }

    /// Attempts ended since the pool started: (succeeded, failed or timed out). Cancelled and
    /// skipped runs count as neither; a deferred run is not an end.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.completed.load(Relaxed),
            self.shared.failed.load(Relaxed),
        )
    }

    /// Attempts that ended since the pool started and the sum of their pick-up waits, in
    /// microseconds.
    pub fn pickups(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.timed.load(Relaxed),
            self.shared.pickup_us_total.load(Relaxed),
        )
    }

    pub fn capacity(&self) -> &Arc<Capacity> {
        &self.capacity
    }

    /// A heartbeat sent at `sent` got through at `answered`: what decides whether claims may
    /// still start (see [`Lease`]). A pool never told of a heartbeat starts everything.
    pub fn beat_through(&self, sent: std::time::Instant, answered: std::time::Instant) {
        self.shared
            .beats
            .lock()
            .expect("beats lock")
            .beat(sent, answered);
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

    /// Stops every attempt in `before` (a [`WorkerHandle::running_attempts`] taken before the
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
    /// back is dropped. See the `holds` module.
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

    /// Failed attempts per agent or kind since the last call (what the governor decides
    /// quarantines on).
    pub fn take_failures(&self) -> HashMap<Target, u64> {
        self.shared.quarantines.take_failures()
    }

    /// The quarantines in force (replacing what was known): their tasks go back to the queue
    /// until then instead of running.
    pub fn set_quarantines(&self, quarantines: HashMap<Target, chrono::DateTime<chrono::Utc>>) {
        self.shared.quarantines.set(quarantines);
    }

    /// One more quarantine, in force at once on this pool.
    pub fn quarantine(&self, target: Target, until: chrono::DateTime<chrono::Utc>) {
        self.shared.quarantines.add(target, until);
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
