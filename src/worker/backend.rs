//! The apalis backend of a worker: claimed rows wait in the [`Feed`], the prefetch buffer,
//! each holding its hold permit ([`Job`]). A row leaves it for the runner only with a run
//! permit too, so rows wait there while every slot is busy. A finished attempt gives its run
//! permit back at once and keeps its hold permit until its completion is written
//! ([`Finished`]).

use crate::queue::{Claimed, Completion};
use apalis::prelude::*;
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::layers::Identity;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::PollSemaphore;

use super::Capacity;
use super::lanes::{LaneSlot, Lanes};

/// A claimed task on its way to the runner, holding its hold permit, and its run permit once
/// the backend hands it to the runner.
pub struct Job {
    pub(super) claimed: Claimed,
    pub(super) hold: OwnedSemaphorePermit,
    pub(super) run: Option<OwnedSemaphorePermit>,
    /// Its queue's lane, and the lane's slot once it runs.
    pub(super) lane: usize,
    pub(super) lane_slot: Option<LaneSlot>,
    /// When the claim statement was sent: a claim answered too late is not started.
    pub(super) claimed_at: tokio::time::Instant,
    /// When the claim's answer arrived: how long the row has waited in the buffer since.
    pub(super) arrived_at: tokio::time::Instant,
}

/// A finished attempt on its way to the database. It keeps its hold permit until its
/// completion is written: until then the row is still this replica's.
pub(super) struct Finished {
    pub(super) completion: Completion,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// The apalis backend: claimed rows come from the [`Feed`].
#[derive(Clone)]
pub(super) struct ClaimedRows {
    pub(super) feed: Arc<Mutex<Feed>>,
}

/// The claimed rows not started yet, oldest first: the prefetch buffer.
pub(super) struct Feed {
    rows: VecDeque<Job>,
    /// The backend's task, waiting for a row.
    waker: Option<Waker>,
    run: PollSemaphore,
    capacity: Arc<Capacity>,
    lanes: Arc<Lanes>,
    /// Rows waiting, per lane.
    buffered: Vec<usize>,
}

impl Feed {
    pub(super) fn new(capacity: Arc<Capacity>, lanes: Arc<Lanes>) -> Feed {
        Feed {
            rows: VecDeque::new(),
            waker: None,
            run: PollSemaphore::new(capacity.run.sem.clone()),
            capacity,
            buffered: vec![0; lanes.len()],
            lanes,
        }
    }

    /// Adds claimed rows, in the claim's order.
    pub(super) fn push(&mut self, jobs: Vec<Job>) {
        for j in &jobs {
            self.buffered[j.lane] += 1;
        }
        self.rows.extend(jobs);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Rows waiting for a slot, per lane.
    pub(super) fn buffered(&self) -> &[usize] {
        &self.buffered
    }

    /// Takes the rows that waited longer than `max_wait` (every row with `all`): they go
    /// back to the queue.
    pub(super) fn overdue(&mut self, max_wait: Duration, all: bool) -> Vec<Job> {
        let mut jobs = Vec::new();
        while let Some(job) = self.rows.front() {
            if !all && job.arrived_at.elapsed() <= max_wait {
                break;
            }
            if let Some(job) = self.rows.pop_front() {
                self.buffered[job.lane] -= 1;
                jobs.push(job);
            }
        }
        jobs
    }

    /// The next row, with a run permit.
    fn poll_job(&mut self, cx: &mut Context<'_>) -> Poll<Job> {
        loop {
            if self.rows.is_empty() {
                self.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            match self.run.poll_acquire(cx) {
                Poll::Ready(Some(mut permit)) => {
                    // After a decrease, a returned slot pays the debt before anything starts.
                    if !self.capacity.run.repay(&mut permit) {
                        continue;
                    }
                    // The first row whose lane has room. Watched before the look, so that an
                    // attempt ending just after it wakes this task.
                    let granted = self.capacity.granted();
                    let at = if self.lanes.len() == 1 {
                        Some(0)
                    } else {
                        self.lanes.watch(cx.waker());
                        self.rows
                            .iter()
                            .position(|j| self.lanes.has_room(j.lane, granted))
                    };
                    let Some(at) = at else {
                        // Every waiting row's lane is full: the slot goes back until one ends.
                        drop(permit);
                        self.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    };
                    let mut job = self.rows.remove(at).expect("a row waits");
                    self.buffered[job.lane] -= 1;
                    job.run = Some(permit);
                    job.lane_slot = Some(self.lanes.start(job.lane));
                    return Poll::Ready(job);
                }
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
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
        let mut feed = self.feed.lock().expect("backend lock");
        feed.poll_job(cx).map(|job| {
            let id = apalis::prelude::TaskId::Int(job.claimed.id as u64);
            Some(Ok(TaskBuilder::new(job).task_id(id).build()))
        })
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
