//! The apalis backend of a worker: claimed rows arrive on a channel from the claimer, each
//! holding its hold permit ([`Job`]). A row leaves the backend for the runner only with a run
//! permit too, so the channel is the prefetch buffer: rows wait there while every slot is busy.
//! A finished attempt gives its run permit back at once and keeps its hold permit until its
//! completion is written ([`Finished`]).

use crate::queue::{Claimed, Completion};
use apalis::prelude::*;
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::layers::Identity;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::PollSemaphore;

use super::Capacity;

/// A claimed task on its way to the runner, holding its hold permit, and its run permit once
/// the backend hands it to the runner.
pub struct Job {
    pub(super) claimed: Claimed,
    pub(super) hold: OwnedSemaphorePermit,
    pub(super) run: Option<OwnedSemaphorePermit>,
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

/// The apalis backend: claimed rows arrive on a channel from the claimer.
#[derive(Clone)]
pub(super) struct ClaimedRows {
    pub(super) feed: Arc<Mutex<Feed>>,
}

/// The claimed rows not started yet: the channel, and the one row (at most) taken from it
/// that waits for a run permit.
pub(super) struct Feed {
    rx: mpsc::Receiver<Job>,
    next: Option<Job>,
    run: PollSemaphore,
    capacity: Arc<Capacity>,
}

impl Feed {
    pub(super) fn new(rx: mpsc::Receiver<Job>, capacity: Arc<Capacity>) -> Feed {
        Feed {
            rx,
            next: None,
            run: PollSemaphore::new(capacity.run.sem.clone()),
            capacity,
        }
    }

    /// Takes every row not started (shutdown): they go back to the queue.
    pub(super) fn drain(&mut self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.next.take().into_iter().collect();
        while let Ok(job) = self.rx.try_recv() {
            jobs.push(job);
        }
        jobs
    }

    /// The next row, with a run permit.
    fn poll_job(&mut self, cx: &mut Context<'_>) -> Poll<Job> {
        loop {
            if self.next.is_none() {
                match self.rx.poll_recv(cx) {
                    Poll::Ready(Some(job)) => self.next = Some(job),
                    // None: the claimer has stopped (shutdown); idle until the monitor stops
                    // the worker.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            }
            match self.run.poll_acquire(cx) {
                Poll::Ready(Some(mut permit)) => {
                    // After a decrease, a returned slot pays the debt before anything starts.
                    if !self.capacity.run.repay(&mut permit) {
                        continue;
                    }
                    let mut job = self.next.take().expect("a row waits");
                    job.run = Some(permit);
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
