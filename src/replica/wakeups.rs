//! The wake-up loop: the replica's `LISTEN` connection. New work wakes the claimer at once
//! (the poll interval only covers delayed tasks and lost notifications); a cancel request
//! aborts the attempt here, if it runs here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::queue::{Listener, Wakeup};
use crate::worker::WorkerHandle;

pub async fn run(
    mut listener: Listener,
    worker: WorkerHandle,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            n = listener.next() => n,
            _ = stop.cancelled() => break,
        };
        match next {
            Ok(Wakeup::Tasks) | Ok(Wakeup::Reconnected) => wake.notify_one(),
            Ok(Wakeup::Cancel(id)) => {
                if worker.cancel(id) {
                    tracing::info!(task.id = id, "cancel requested; aborting");
                }
            }
            Err(e) => {
                // Reconnects for as long as the replica serves: wake-ups are an optimisation
                // over the poll, which goes on meanwhile.
                tracing::warn!(error = %e, "LISTEN connection failed; polling until it is back");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
}
