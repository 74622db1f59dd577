//! The rescuer: every sample interval, tasks held by replicas whose heartbeat is older than
//! `rescue_after` go back to the queue ([`crate::queue::Queue::rescue`]).
//!
//! Only a replica whose own heartbeats have gone through for `rescue_after` judges others:
//! after an outage it saw, the others need as long to show they are alive, and a replica cut
//! off itself must not judge at all.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::heartbeat::Health;
use crate::queue::Queue;
use crate::ticks::Ticks;

pub async fn run(
    queue: Queue,
    health: Health,
    interval: Duration,
    rescue_after: Duration,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut ticks = Ticks::new(interval, stop);
    while ticks.next().await {
        if health.healthy_for() < rescue_after {
            continue;
        }
        match queue.rescue(rescue_after).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(tasks = ?ids, "rescued tasks of replicas that stopped heartbeating");
                wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "rescue failed"),
        }
    }
}
