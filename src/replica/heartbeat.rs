//! The heartbeat loop: the replica's row in `replicas`, beaten every sample interval on a
//! connection of its own (a worker busy with claims and completions cannot starve it).
//!
//! It also keeps the replica honest about itself: past half of `rescue_after` without a
//! heartbeat, other replicas may soon take its tasks, so claiming stops until a beat gets
//! through; every beat that gets through is told to the worker, whose claims may start only
//! while no break in the beats could have let another replica take them (`worker::Lease`);
//! and it publishes since when beats have succeeded without a break ([`Health`]), which
//! the rescuer requires before judging anyone else.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::Heartbeat;
use crate::ticks::Ticks;
use crate::worker::WorkerHandle;

/// Since when the replica's heartbeats have been succeeding without a break (`None` while
/// they fail).
#[derive(Clone)]
pub struct Health(watch::Receiver<Option<Instant>>);

impl Health {
    /// How long heartbeats have been succeeding (zero while they fail).
    pub fn healthy_for(&self) -> Duration {
        self.0
            .borrow()
            .map(|since| since.elapsed())
            .unwrap_or_default()
    }
}

/// Beats until `stop`, every `interval`. `Health` starts healthy: the replica registered
/// itself (a first beat) before this loop starts.
pub fn start(
    mut heartbeat: Heartbeat,
    worker: WorkerHandle,
    interval: Duration,
    rescue_after: Duration,
    stop: CancellationToken,
) -> (Health, impl std::future::Future<Output = ()>) {
    let (healthy_tx, healthy_rx) = watch::channel(Some(Instant::now()));
    let fence = rescue_after / 2;
    let run = async move {
        let mut ticks = Ticks::new(interval, stop);
        let mut last_ok = Instant::now();
        while ticks.next().await {
            let running = worker.running() as i32;
            let granted = worker.capacity().granted() as i32;
            let sent = Instant::now();
            match heartbeat.beat(running, granted, interval).await {
                Ok(()) => {
                    last_ok = Instant::now();
                    worker.beat_through(sent.into_std(), last_ok.into_std());
                    healthy_tx.send_if_modified(|since| {
                        since.get_or_insert(last_ok);
                        false
                    });
                    if !worker.claiming() {
                        tracing::info!("heartbeat is back; claiming again");
                        worker.set_claiming(true);
                    }
                }
                Err(e) => {
                    healthy_tx.send_replace(None);
                    tracing::warn!(error = %e, "heartbeat failed; retrying next interval");
                    if last_ok.elapsed() >= fence && worker.claiming() {
                        tracing::error!(
                            since_s = last_ok.elapsed().as_secs(),
                            "no heartbeat for half the rescue threshold: claiming stops \
                             until one gets through (running tasks go on)"
                        );
                        worker.set_claiming(false);
                    }
                }
            }
        }
    };
    (Health(healthy_rx), run)
}
