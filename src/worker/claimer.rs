//! The claim loop of a worker: claims as many runnable tasks as there are free permits, in one
//! statement, and hands them to the backend. Sleeps until a NOTIFY or the poll interval when
//! the queue is drained; stops while claiming is suspended.

use crate::queue::{Claimed, backoff};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::*;

/// The most rows one claim statement takes.
pub(super) const MAX_CLAIM: usize = 1000;

/// How long a claimer with a backlog waits for freed capacity to gather into one claim.
pub(super) const CLAIM_GATHER: Duration = Duration::from_millis(2);

pub(super) async fn claim_loop(
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
    wake: Arc<Notify>,
    jobs: mpsc::Sender<Job>,
    stop: CancellationToken,
) {
    let kinds = shared.registry.kinds();
    let mut failures = 0u32;
    // Whether the last claim came back full: the queue has a backlog.
    let mut busy = false;
    loop {
        if !wait_for_claiming(&shared, &stop).await {
            return;
        }
        capacity.settle();
        let Some(permits) = gather_permits(&capacity, busy, &stop).await else {
            return;
        };
        let Some(mut permits) = permits else {
            continue; // every permit went to pay a capacity decrease
        };
        let want = permits.num_permits();
        let seq = shared.holds.lock().expect("holds lock").claim_started();
        let t0 = tokio::time::Instant::now();
        // Not raced against `stop`: a claim dropped after its COMMIT was sent would leave rows
        // claimed that no one runs. Claimed rows go to the channel, and shutdown releases
        // whatever was not started.
        let claimed = shared
            .queue
            .claim(&shared.options.replica, want as u32, &kinds)
            .await;
        let rows = match claimed {
            Ok(rows) => rows,
            Err(e) => {
                // Claiming is what a replica is for: it goes on trying, at most every 5 s,
                // for as long as it serves. A claim whose COMMIT went through although this
                // error says otherwise leaves rows we hold without knowing; the reconciler
                // hands those back (see `holds`).
                drop(permits);
                busy = false;
                failures += 1;
                let wait = backoff::nominal(Duration::from_millis(100), failures)
                    .min(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "claim failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        };
        failures = 0;
        let got = rows.len();
        busy = got == want;
        tracing::trace!(want, got, ms = t0.elapsed().as_secs_f64() * 1000.0, "claim");
        for row in ours(&shared, seq, rows) {
            let permit = permits.split(1).expect("one permit per claimed row");
            let job = Job {
                claimed: row,
                permit,
                claimed_at: t0,
            };
            if jobs.send(job).await.is_err() {
                return;
            }
        }
        drop(permits);
        if got < want {
            // The queue is drained: sleep until a NOTIFY or the next poll.
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(shared.options.poll_interval) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Waits while claiming is suspended (heartbeats failing). False when stopped meanwhile.
async fn wait_for_claiming(shared: &Shared, stop: &CancellationToken) -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    while !shared.claiming.load(SeqCst) {
        let changed = shared.claiming_changed.notified();
        if shared.claiming.load(SeqCst) {
            break;
        }
        tokio::select! {
            _ = changed => {}
            _ = stop.cancelled() => return false,
        }
    }
    true
}

/// The permits of the next claim: at least one, and every other free one. `None` when stopped;
/// `Some(None)` when what was acquired went to pay a capacity decrease.
async fn gather_permits(
    capacity: &Capacity,
    busy: bool,
    stop: &CancellationToken,
) -> Option<Option<OwnedSemaphorePermit>> {
    let mut permits = tokio::select! {
        p = capacity.sem.clone().acquire_owned() => p.expect("semaphore never closed"),
        _ = stop.cancelled() => return None,
    };
    // After a decrease, permits freed by finishing tasks pay the debt before any claim.
    if !capacity.repay(&mut permits) {
        return Some(None);
    }
    if busy {
        // With a backlog, permits come back a few at a time; claiming each trickle separately
        // spends a round trip per row. Wait briefly for a quarter of the capacity to gather,
        // so claims stay batched. An idle queue never waits here.
        let target = (capacity.granted() / 4).clamp(1, MAX_CLAIM);
        let deadline = tokio::time::Instant::now() + CLAIM_GATHER;
        while permits.num_permits() < target {
            match tokio::time::timeout_at(deadline, capacity.sem.clone().acquire_owned()).await {
                Ok(p) => permits.merge(p.expect("semaphore never closed")),
                Err(_) => break,
            }
        }
    }
    // Take every other free permit too: one statement claims for all of them.
    let more = capacity.sem.available_permits().min(MAX_CLAIM - 1);
    if more > 0
        && let Ok(p) = capacity.sem.clone().try_acquire_many_owned(more as u32)
    {
        permits.merge(p);
    }
    Some(Some(permits))
}

/// The claimed rows this worker may start, recorded as its own before anything can finish with
/// them; a row a reconciliation gave back while claim `seq` was in flight is dropped.
fn ours(shared: &Shared, seq: u64, rows: Vec<Claimed>) -> Vec<Claimed> {
    let mut holds = shared.holds.lock().expect("holds lock");
    rows.into_iter()
        .filter(|r| {
            let ok = holds.claimed(seq, r.id, r.attempt);
            if !ok {
                tracing::warn!(
                    task.id = r.id,
                    "a claim returned a row already given back; dropping it"
                );
            }
            ok
        })
        .collect()
}
