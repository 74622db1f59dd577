//! The apalis backend of a worker: claimed rows arrive on a channel from the claimer, each
//! holding its capacity permit ([`Job`]); a finished attempt keeps its permit until its
//! completion is written ([`Finished`]).

use crate::queue::{Claimed, Completion};
use apalis::prelude::*;
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::layers::Identity;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// A claimed task on its way to the runner, holding its capacity permit.
pub struct Job {
    pub(super) claimed: Claimed,
    pub(super) permit: OwnedSemaphorePermit,
    /// When the claim statement was sent: a claim answered too late is not started.
    pub(super) claimed_at: tokio::time::Instant,
}

/// A finished attempt on its way to the database. It keeps its capacity permit until its
/// completion is written: until then the row still counts as running.
pub(super) struct Finished {
    pub(super) completion: Completion,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// The apalis backend: claimed rows arrive on a channel from the claimer.
#[derive(Clone)]
pub(super) struct ClaimedRows {
    pub(super) rx: Arc<Mutex<mpsc::Receiver<Job>>>,
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
