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
//! task, `deduplicated`; a batch the database refuses (or that waits over 200 ms for a row
//! lock on a key) is rolled back and written again call by call, so one call's problem is not
//! another's; when the database cannot be reached, or a commit's outcome is unknown, every
//! call of the batch gets the error at once (never written twice, never retried per call);
//! and a call whose caller gave up before its batch was taken is not written.
//!
//! Never used inside a caller's transaction ([`Queue::enqueue_in`] writes there directly).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::{Enqueued, Error, NewTask, Queue};

/// The most calls one batch writes.
pub const MAX_BATCH: usize = 500;

/// Batches written at once (each holds a connection while it writes).
const WRITERS: usize = 2;

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
    /// `None` outside a Tokio runtime (the call is then written on its own).
    fn sender(&self, queue: &Queue) -> Option<mpsc::Sender<Request>> {
        tokio::runtime::Handle::try_current().ok()?;
        let mut slot = self.tx.lock().expect("coalescer lock");
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return Some(tx.clone());
        }
        let (tx, rx) = mpsc::channel(WAITING);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..WRITERS {
            tokio::spawn(write_batches(queue.direct(), rx.clone()));
        }
        *slot = Some(tx.clone());
        Some(tx)
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
        let Some(sender) = self.sender(queue) else {
            return queue.direct().enqueue_alone(request.task).await;
        };
        let request = match sender.send(request).await {
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
        // A caller that gave up (a request timed out) is not written for later.
        batch.retain(|r| !r.answer.is_closed());
        if batch.len() <= 1 {
            if let Some(r) = batch.pop() {
                let answer = queue.enqueue_alone(r.task).await;
                let _ = r.answer.send(answer);
            }
            continue;
        }
        let tasks: Vec<NewTask> = batch.iter().map(|r| r.task.clone()).collect();
        match write_batch(&queue, tasks).await {
            Ok(answers) => {
                for (r, a) in batch.into_iter().zip(answers) {
                    let _ = r.answer.send(Ok(a));
                }
            }
            // The database cannot be reached, or the commit's outcome is unknown (the tasks may
            // be written): every call hears of it, as it would alone. Writing them again one
            // by one would wait out the outage once per call, or write a task twice.
            Err(Failed { committing, error }) if committing || unreachable(&error) => {
                tracing::warn!(error = %error, calls = batch.len(), committing, "a coalesced enqueue failed");
                for r in batch {
                    let _ = r.answer.send(Err(copy(&error)));
                }
            }
            // Rolled back: one call's problem (a lock on its key held too long, a row the
            // database refused) must not be the others'. Each is written on its own.
            Err(Failed { error, .. }) => {
                tracing::debug!(error = %error, calls = batch.len(), "a coalesced enqueue failed; writing its calls one by one");
                for r in batch {
                    if r.answer.is_closed() {
                        continue;
                    }
                    let answer = queue.enqueue_alone(r.task).await;
                    let _ = r.answer.send(answer);
                }
            }
        }
    }
}

/// How a batch failed: while writing (rolled back) or while committing (outcome unknown).
struct Failed {
    committing: bool,
    error: Error,
}

/// How a batch with keys opens its transaction: one round trip, and the longest it waits for
/// a row lock (another session writing the same idempotency key or cron tick); past it the
/// batch is rolled back and its calls written one by one.
const BEGIN_KEYED: &str = "BEGIN; SET LOCAL lock_timeout = '200ms'";
const UNBOUNDED: &str = "SET LOCAL lock_timeout = 0";

async fn write_batch(queue: &Queue, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>, Failed> {
    let writing = |e: Error| Failed {
        committing: false,
        error: e,
    };
    let keyed = tasks
        .iter()
        .any(|t| t.idempotency_key.is_some() || t.fire_at.is_some());
    if !keyed {
        // Nothing to conflict on or wait for: one statement, its own transaction, one round
        // trip. An error the server answered rolled the statement back; any other (the
        // connection lost after the statement was sent) leaves its outcome unknown.
        let mut conn = queue.pool.acquire().await.map_err(|e| writing(e.into()))?;
        return queue
            .enqueue_many_in(&mut conn, tasks)
            .await
            .map_err(|e| Failed {
                committing: matches!(&e, Error::Db(d) if !matches!(d, sqlx::Error::Database(_))),
                error: e,
            });
    }
    let mut tx = queue
        .pool
        .begin_with(BEGIN_KEYED)
        .await
        .map_err(|e| writing(e.into()))?;
    let out = queue
        .enqueue_many_in(&mut tx, tasks)
        .await
        .map_err(writing)?;
    // The bound is for row locks only. COMMIT takes the lock that orders NOTIFYs (when a
    // task is due), which another committing session may hold for longer under load: a
    // batch already written must wait for it, not fail.
    sqlx::query(UNBOUNDED)
        .execute(&mut *tx)
        .await
        .map_err(|e| writing(e.into()))?;
    tx.commit().await.map_err(|e| Failed {
        // An answer from the server means rolled back; only a lost one leaves it unknown.
        committing: !matches!(e, sqlx::Error::Database(_)),
        error: e.into(),
    })?;
    Ok(out)
}

/// Whether the database could not be reached at all (connection, pool, server shutting down),
/// as opposed to refusing this batch.
fn unreachable(e: &Error) -> bool {
    match e {
        Error::Db(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
            let class = &c[..2.min(c.len())];
            matches!(class, "08" | "53" | "57" | "58") && c != "57014"
        }),
        Error::Db(e) => crate::db::is_transient(e),
        _ => false,
    }
}

/// The batch's error for each of its calls (errors are not `Clone`): the same kind where the
/// caller may act on it, its text otherwise.
fn copy(e: &Error) -> Error {
    match e {
        Error::Db(sqlx::Error::PoolTimedOut) => Error::Db(sqlx::Error::PoolTimedOut),
        Error::Db(sqlx::Error::PoolClosed) => Error::Db(sqlx::Error::PoolClosed),
        Error::Db(sqlx::Error::Io(io)) => Error::Db(sqlx::Error::Io(std::io::Error::new(
            io.kind(),
            io.to_string(),
        ))),
        Error::Invalid { field, reason } => Error::Invalid {
            field,
            reason: reason.clone(),
        },
        other => Error::Db(sqlx::Error::Protocol(other.to_string())),
    }
}
