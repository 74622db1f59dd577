//! The completer of a worker: writes finished attempts in batches (whatever arrived while the
//! previous statement ran) and frees their hold permits once written.

use crate::queue::{Completion, Queue, backoff};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::*;

/// The most completions one statement writes.
pub(super) const MAX_COMPLETE: usize = 2000;

/// Writes finished attempts in batches: whatever has arrived while the previous statement
/// ran goes into the next one. Each attempt's hold permit is freed once its completion is
/// written.
pub(super) async fn write_completions(
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
pub(super) const STOPPING_TRIES: u32 = 10;

pub(super) async fn write_with_retry(
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
