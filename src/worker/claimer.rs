//! The claim loop of a worker: claims as many runnable tasks as there are free permits, in one
//! statement, and hands them to the backend. Sleeps until a NOTIFY or the poll interval when
//! the queue is drained; stops while claiming is suspended.

use crate::queue::{Claimed, backoff};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
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
    let queue = &shared.queue;
    let options = &shared.options;
    let kinds = shared.registry.kinds();
    let mut failures = 0u32;
    // Whether the last claim came back full: the queue has a backlog.
    let mut busy = false;
    loop {
        while !shared.claiming.load(std::sync::atomic::Ordering::SeqCst) {
            let changed = shared.claiming_changed.notified();
            if shared.claiming.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = stop.cancelled() => return,
            }
        }
        capacity.settle();
        let mut permits = tokio::select! {
            p = capacity.sem.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.cancelled() => return,
        };
        // After a decrease, permits freed by finishing tasks pay the debt before any claim.
        if !capacity.repay(&mut permits) {
            continue;
        }
        if busy {
            // With a backlog, permits come back a few at a time; claiming each trickle
            // separately spends a round trip per row. Wait briefly for a quarter of the
            // capacity to gather, so claims stay batched. An idle queue never waits here.
            let target = (capacity.granted() / 4).clamp(1, MAX_CLAIM);
            let deadline = tokio::time::Instant::now() + CLAIM_GATHER;
            while permits.num_permits() < target {
                match tokio::time::timeout_at(deadline, capacity.sem.clone().acquire_owned()).await
                {
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
        let want = permits.num_permits();
        let seq = shared.holds.lock().expect("holds lock").claim_started();
        let t0 = tokio::time::Instant::now();
        // Not raced against `stop`: a claim dropped after its COMMIT was sent would leave rows
        // claimed that no one runs. Claimed rows go to the channel, and shutdown releases
        // whatever was not started.
        let claimed = queue.claim(&options.replica, want as u32, &kinds).await;
        tracing::trace!(
            want,
            got = claimed.as_ref().map_or(0, Vec::len),
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            "claim"
        );
        match claimed {
            Ok(rows) => {
                failures = 0;
                let got = rows.len();
                busy = got == want;
                // Known before anything can finish with them; a row a reconciliation gave
                // back while this claim was in flight is not ours to start.
                let rows: Vec<Claimed> = {
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
                };
                for row in rows {
                    let permit = permits.split(1).expect("one permit per claimed row");
                    if jobs
                        .send(Job {
                            claimed: row,
                            permit,
                            claimed_at: t0,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                drop(permits);
                if got < want {
                    // The queue is drained: sleep until a NOTIFY or the next poll.
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(options.poll_interval) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
            Err(e) => {
                // Claiming is what a replica is for: it goes on trying, at most every 5 s,
                // for as long as it serves. A claim whose COMMIT went through although this
                // error says otherwise leaves rows we hold without knowing; the maintenance
                // tick hands those back (see `Holds`).
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
            }
        }
    }
}
