//! The pruner: every ten minutes, completed and cancelled tasks older than
//! `persistence.gc_completed_after_days` are deleted, in bounded batches, by one replica at a
//! time ([`crate::queue::Queue::prune`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ticks::Ticks;

use crate::queue::Queue;

/// How often finished tasks past their retention are pruned.
const EVERY: Duration = Duration::from_secs(600);
/// Rows per delete statement.
const BATCH: u32 = 5000;

pub async fn run(queue: Queue, retention: Duration, stop: CancellationToken) {
    let mut ticks = Ticks::new(EVERY, stop);
    // The first tick is immediate: wait a whole period after start instead.
    if !ticks.next().await {
        return;
    }
    while ticks.next().await {
        match queue.prune(retention, BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "pruned finished tasks"),
            Err(e) => tracing::warn!(error = %e, "prune failed"),
        }
    }
}
