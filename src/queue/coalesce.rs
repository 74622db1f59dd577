//! Group commit of single enqueues: concurrent [`Queue::enqueue`] calls are written together,
//! in one statement and one commit, instead of paying a commit (an fsync) each.
//!
//! A call hands its task to a small pool of writers and waits for its answer; a writer takes
//! every request waiting (up to [`MAX_BATCH`]) and writes them with the batch statement.
//! Nothing waits on purpose: a lone call is written at once, and calls that arrive while a
//! batch is being written form the next one, so batches grow exactly as fast as commits are
//! the bottleneck. A call is answered only after its batch committed (its task is durable).
//!
//! Guarantees: the answer of each call is the one a lone [`Queue::enqueue`] would give. Its
//! task is validated on its own first (a bad task fails only its own call); an idempotency
//! key already in the table, or taken by an earlier call of the same batch, answers with that
//! task, `deduplicated`; and a batch that fails as a whole is written again call by call, so
//! one call's database error is not another's.
//!
//! Never used inside a caller's transaction ([`Queue::enqueue_in`] writes there directly).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::{Enqueued, Error, NewTask, Queue};

/// The most calls one batch writes.
pub const MAX_BATCH: usize = 500;

/// Batches written at once (each holds a connection while it writes).
const WRITERS: usize = 4;

/// Calls waiting for a writer; a caller past this waits for room (back-pressure).
const WAITING: usize = 8 * MAX_BATCH;

struct Request {
    task: NewTask,
    answer: oneshot::Sender<Result<Enqueued, Error>>,
}

/// The writers of one queue; made on first use, inside the runtime that uses it.
#[derive(Clone, Default)]
pub(super) struct Coalescer {
    tx: Arc<Mutex<Option<mpsc::Sender<Request>>>>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Coalescer")
    }
}

impl Coalescer {
    /// The channel to the writers, starting them if none runs (or the runtime that ran
    /// them is gone).
    fn sender(&self, queue: &Queue) -> mpsc::Sender<Request> {
        let mut slot = self.tx.lock().expect("coalescer lock");
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(WAITING);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..WRITERS {
            tokio::spawn(write_batches(queue.direct(), rx.clone()));
        }
        *slot = Some(tx.clone());
        tx
    }

    /// Writes `task` with whatever other calls are waiting; answers once it is committed.
    pub(super) async fn enqueue(
        &self,
        queue: &Queue,
        mut task: NewTask,
    ) -> Result<Enqueued, Error> {
        task.validate()?;
        // The task's run becomes a child of the caller's span, not of a writer's.
        if task.traceparent.is_none() {
            task.traceparent = crate::telemetry::current_traceparent();
        }
        let (answer, answered) = oneshot::channel();
        let request = Request { task, answer };
        let request = match self.sender(queue).send(request).await {
            // No answer: the writer was stopped with its runtime, after or before its commit.
            // Not written again (that could write it twice): the caller hears of a failure.
            Ok(()) => {
                return answered
                    .await
                    .unwrap_or(Err(Error::Db(sqlx::Error::WorkerCrashed)));
            }
            Err(mpsc::error::SendError(r)) => r,
        };
        // The writers are gone (their runtime shut down): write it alone.
        queue.direct().enqueue_alone(request.task).await
    }
}

/// One writer: takes the waiting calls, writes them, answers them; ends when the channel does.
async fn write_batches(queue: Queue, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>) {
    loop {
        let mut batch = Vec::new();
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        }
        if batch.len() == 1 {
            let r = batch.pop().expect("one request");
            let answer = queue.enqueue_alone(r.task).await;
            let _ = r.answer.send(answer);
            continue;
        }
        let tasks: Vec<NewTask> = batch.iter().map(|r| r.task.clone()).collect();
        match queue.enqueue_many(tasks).await {
            Ok(answers) => {
                for (r, a) in batch.into_iter().zip(answers) {
                    let _ = r.answer.send(Ok(a));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, calls = batch.len(), "a coalesced enqueue failed; writing its calls one by one");
                for r in batch {
                    let answer = queue.enqueue_alone(r.task).await;
                    let _ = r.answer.send(answer);
                }
            }
        }
    }
}
