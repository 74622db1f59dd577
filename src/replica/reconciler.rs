//! The reconciler: every sample interval, what this replica runs is compared with what the
//! database says it holds ([`crate::queue::Queue::held_by`]):
//! - an attempt it runs but no longer holds (rescued while the replica was stopped or cut
//!   off) is stopped, since another replica may be running it;
//! - a row it holds without knowing it (a claim whose answer was lost, a release that failed)
//!   is handed back once unknown at two looks in a row;
//! - a cancel request whose NOTIFY was missed is honoured (the cancel sweep).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::queue::{Queue, TaskId};
use crate::ticks::Ticks;
use crate::worker::WorkerHandle;

pub async fn run(
    queue: Queue,
    worker: WorkerHandle,
    replica: String,
    interval: Duration,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut ticks = Ticks::new(interval, stop);
    while ticks.next().await {
        // Read before the database: an attempt in this list was claimed before the query, so
        // the query sees it if it is still ours.
        let before = worker.running_attempts();
        let Ok(held) = queue.held_by(&replica).await else {
            continue;
        };
        let attempts: Vec<(TaskId, i32)> = held.iter().map(|(id, a, _)| (*id, *a)).collect();
        worker.stop_lost(&before, &attempts);
        let orphans = worker.orphaned_holds(&attempts);
        if !orphans.is_empty() {
            match queue.release(&replica, &orphans).await {
                Ok(n) if n > 0 => wake.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not give back unknown tasks; trying again shortly")
                }
            }
        }
        for (id, _, cancel) in held {
            if cancel {
                worker.cancel(id);
            }
        }
    }
}
