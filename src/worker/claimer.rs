//! The claim loop of a worker: claims as many runnable tasks as there are free hold permits
//! and room for (free slots, plus the prefetch allowance while tasks end quickly), in one
//! statement, and hands them to the backend. Sleeps until a NOTIFY or the poll interval when
//! the queue is drained; stops while claiming is suspended.

use crate::queue::{Claimed, backoff};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::lanes;
use super::*;

/// The most rows one claim statement takes.
pub(super) const MAX_CLAIM: usize = 1000;

/// How soon a queue whose tasks a concurrency limit held back is asked again.
pub(super) const LIMITED_RECHECK: Duration = Duration::from_millis(250);

/// How often a claimer whose lease is lost looks again for a heartbeat that got through.
pub(super) const LEASE_RECHECK: Duration = Duration::from_millis(100);

/// How long a claimer with a backlog waits for freed capacity to gather into one claim.
pub(super) const CLAIM_GATHER: Duration = Duration::from_millis(2);

pub(super) async fn claim_loop(
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
    wake: Arc<Notify>,
    feed: Arc<Mutex<Feed>>,
    stop: CancellationToken,
) {
    let kinds = shared.registry.kinds();
    let lanes = shared.lanes.clone();
    let mut failures = 0u32;
    // Whether the last claim came back full for some queue: it has a backlog.
    let mut busy = false;
    let mut allowance = Allowance::new(&shared);
    // Queues whose last claim came back short, until when: not asked again before a NOTIFY
    // or the poll interval.
    let mut drained: Vec<Option<tokio::time::Instant>> = vec![None; lanes.len()];
    // Drained queues that an ending attempt makes claimable again (their limited tasks
    // filled every free slot).
    let mut on_end = vec![false; lanes.len()];
    loop {
        if !wait_for_claiming(&shared, &stop).await {
            return;
        }
        // No beat got through for so long that another replica may be taking this one's
        // tasks over: nothing claimed now could start (see `lease`). Wait for a beat.
        if shared.lease(std::time::Instant::now()).check().is_err() {
            tokio::select! {
                _ = tokio::time::sleep(LEASE_RECHECK) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        capacity.hold.settle();
        // Registered before the room is reckoned, so an attempt ending meanwhile wakes it.
        let ended = shared.ended.notified();
        let Some(permits) = gather_permits(&capacity, busy, &stop).await else {
            return;
        };
        let Some(mut permits) = permits else {
            continue; // every permit went to pay a capacity decrease
        };
        let now = tokio::time::Instant::now();
        for d in drained.iter_mut() {
            if d.is_some_and(|until| until <= now) {
                *d = None;
            }
        }
        // A NOTIFY that came while other queues kept this loop busy: the drained ones may
        // have work now (a new task, a resumed queue).
        if drained.iter().any(Option::is_some) {
            use futures::FutureExt;
            if wake.notified().now_or_never().is_some() {
                drained.fill(None);
            }
        }
        // Per queue: free slots, plus its share of what the buffer may hold at the pace tasks
        // end, less what runs and waits.
        let granted = capacity.granted();
        let extra = allowance.rows(&shared, granted, capacity.prefetch());
        let buffered: Vec<usize> = feed.lock().expect("backend lock").buffered().to_vec();
        // Free slots: all that tasks a limit applies to may take (never the buffer).
        let free: Vec<usize> = (0..lanes.len())
            .map(|l| lanes.free(l, granted, buffered[l]))
            .collect();
        let rooms: Vec<usize> = (0..lanes.len())
            .map(|l| match drained[l] {
                Some(_) => 0,
                // A limited queue is claimed into free slots only.
                None if shared.queue.queue_limited(lanes.name(l)) => free[l],
                None => lanes.room(l, granted, extra, buffered[l]),
            })
            .collect();
        let room: usize = rooms.iter().sum();
        if room == 0 {
            drop(permits);
            // Some queue's slots are all busy and its buffer full enough: wait for an attempt
            // to end. The drained ones wait for a NOTIFY or the poll.
            let full = drained.iter().any(Option::is_none);
            let slot_bound = on_end.iter().any(|b| *b);
            let poll = drained.iter().flatten().min().copied();
            tokio::select! {
                _ = ended, if full || slot_bound => {
                    for l in 0..lanes.len() {
                        if std::mem::take(&mut on_end[l]) {
                            drained[l] = None;
                        }
                    }
                }
                _ = tokio::time::sleep(PREFETCH_HORIZON), if full => {}
                _ = wake.notified(), if poll.is_some() => drained.fill(None),
                _ = tokio::time::sleep_until(poll.unwrap_or(now)), if poll.is_some() => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        if permits.num_permits() > room {
            drop(permits.split(permits.num_permits() - room));
        }
        let want = permits.num_permits();
        let limits = lanes::split(want, &rooms);
        let asked: Vec<(&str, u32, u32)> = limits
            .iter()
            .enumerate()
            .map(|(l, n)| (lanes.name(l), *n as u32, free[l] as u32))
            .collect();
        let seq = shared.holds.lock().expect("holds lock").claim_started();
        let t0 = tokio::time::Instant::now();
        // Not raced against `stop`: a claim dropped after its COMMIT was sent would leave rows
        // claimed that no one runs. Claimed rows go to the channel, and shutdown releases
        // whatever was not started.
        let claimed = shared
            .queue
            .claim_round(&shared.options.replica, &asked, &kinds)
            .await;
        let round = match claimed {
            Ok(round) => round,
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
        // A queue that limits held back is asked again when a token returns, or soon (a
        // slot freed anywhere in the fleet sends no NOTIFY), not at once.
        let ask_again = match (round.held_back, round.next_token_in) {
            (_, Some(t)) => t.min(shared.options.poll_interval),
            (true, None) => LIMITED_RECHECK.min(shared.options.poll_interval),
            (false, None) => shared.options.poll_interval,
        };
        let rows = round.rows;
        let got = rows.len();
        let mut got_per_lane = vec![0usize; lanes.len()];
        for row in &rows {
            got_per_lane[lanes.of(&row.queue)] += 1;
        }
        let arrived_at = tokio::time::Instant::now();
        busy = false;
        for (l, n) in limits.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            if got_per_lane[l] < *n {
                // Drained (or paused, or held back by limits): what comes next may be other
                // work.
                drained[l] = Some(arrived_at + ask_again);
                on_end[l] = round.slot_bound.iter().any(|q| q == lanes.name(l));
            } else {
                busy = true;
            }
        }
        tracing::trace!(want, got, ms = t0.elapsed().as_secs_f64() * 1000.0, "claim");
        let jobs: Vec<Job> = ours(&shared, seq, rows)
            .into_iter()
            .map(|row| Job {
                lane: lanes.of(&row.queue),
                claimed: row,
                hold: permits.split(1).expect("one permit per claimed row"),
                run: None,
                lane_slot: None,
                claimed_at: t0,
                arrived_at,
            })
            .collect();
        feed.lock().expect("backend lock").push(jobs);
        drop(permits);
        if drained.iter().all(Option::is_some) {
            // Every queue is drained: the buffer starts again from free slots only.
            allowance.reset(&shared);
        }
    }
}

/// What the prefetch buffer may hold: see [`PREFETCH_HORIZON`]. Looked at again a horizon
/// after the last look, or once as many attempts as there are slots have ended; a look that
/// saw none end (every slot on slow work) gives none, and so does a drained queue.
struct Allowance {
    since: std::time::Instant,
    seen: (u64, u64),
    rows: usize,
}

impl Allowance {
    fn new(shared: &Shared) -> Allowance {
        Allowance {
            since: std::time::Instant::now(),
            seen: shared.pace.read(),
            rows: 0,
        }
    }

    /// Starts again from no buffer, counting only attempts that end from now on.
    fn reset(&mut self, shared: &Shared) {
        *self = Allowance::new(shared);
    }

    fn rows(&mut self, shared: &Shared, granted: usize, prefetch: usize) -> usize {
        let (ended, busy_us) = shared.pace.read();
        // Looked at again after a horizon, or as soon as every slot's worth of attempts has
        // ended: quick work gets its buffer within milliseconds of starting.
        if self.since.elapsed() >= PREFETCH_HORIZON || ended - self.seen.0 >= granted.max(1) as u64
        {
            self.rows = buffer_rows(
                granted,
                prefetch,
                ended - self.seen.0,
                busy_us - self.seen.1,
            );
            self.since = std::time::Instant::now();
            self.seen = (ended, busy_us);
        }
        self.rows
    }
}

/// Rows `granted` busy slots end in one [`PREFETCH_HORIZON`], when `ended` attempts took
/// `busy_us` microseconds in all; at most `prefetch`, and none when nothing ended.
fn buffer_rows(granted: usize, prefetch: usize, ended: u64, busy_us: u64) -> usize {
    if ended == 0 {
        return 0;
    }
    let mean_us = (busy_us / ended).max(1) as u128;
    if mean_us >= PREFETCH_HORIZON.as_micros() {
        return 0;
    }
    let per_horizon = granted as u128 * PREFETCH_HORIZON.as_micros() / mean_us;
    per_horizon.min(prefetch as u128) as usize
}

/// How often the buffer is looked at for rows that waited too long.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Returns to the queue, in one statement, the buffered rows that waited over
/// [`BUFFER_MAX_WAIT`] for a slot, and every buffered row while the grant is 0 (paused).
pub(super) async fn sweep_buffer(
    shared: Arc<Shared>,
    capacity: Arc<Capacity>,
    feed: Arc<Mutex<Feed>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let paused = capacity.granted() == 0;
        let overdue = feed
            .lock()
            .expect("backend lock")
            .overdue(BUFFER_MAX_WAIT, paused);
        if overdue.is_empty() {
            continue;
        }
        let ids: Vec<(TaskId, i32)> = overdue
            .iter()
            .map(|j| (j.claimed.id, j.claimed.attempt))
            .collect();
        shared.forget(ids.iter().copied());
        match shared.queue.release(&shared.options.replica, &ids).await {
            Ok(n) => tracing::info!(
                released = n,
                paused,
                "returned prefetched tasks to the queue: they waited too long for a slot"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "could not return prefetched tasks now; the next reconciliation will"
            ),
        }
        // Their hold permits go only now that the rows are no longer ours.
        drop(overdue);
        shared.ended.notify_waiters();
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

/// The hold permits of the next claim: at least one, and every other free one. `None` when
/// stopped; `Some(None)` when what was acquired went to pay a capacity decrease.
async fn gather_permits(
    capacity: &Capacity,
    busy: bool,
    stop: &CancellationToken,
) -> Option<Option<OwnedSemaphorePermit>> {
    let mut permits = tokio::select! {
        p = capacity.hold.sem.clone().acquire_owned() => p.expect("semaphore never closed"),
        _ = stop.cancelled() => return None,
    };
    // After a decrease, permits freed by finishing tasks pay the debt before any claim.
    if !capacity.hold.repay(&mut permits) {
        return Some(None);
    }
    if busy {
        // With a backlog, permits come back a few at a time; claiming each trickle separately
        // spends a round trip per row. Wait briefly for a quarter of the capacity to gather,
        // so claims stay batched. An idle queue never waits here.
        let target = (capacity.granted() / 4).clamp(1, MAX_CLAIM);
        let deadline = tokio::time::Instant::now() + CLAIM_GATHER;
        while permits.num_permits() < target {
            match tokio::time::timeout_at(deadline, capacity.hold.sem.clone().acquire_owned()).await
            {
                Ok(p) => permits.merge(p.expect("semaphore never closed")),
                Err(_) => break,
            }
        }
    }
    // Take every other free permit too: one statement claims for all of them.
    let more = capacity.hold.sem.available_permits().min(MAX_CLAIM - 1);
    if more > 0
        && let Ok(p) = capacity
            .hold
            .sem
            .clone()
            .try_acquire_many_owned(more as u32)
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

#[cfg(test)]
mod tests {
    use super::buffer_rows;

    #[test]
    fn the_buffer_holds_one_horizon_of_work_at_most() {
        // No-op tasks (10 µs): capped by prefetch.
        assert_eq!(buffer_rows(8, 500, 1000, 10_000), 500);
        // 8 slots of 50 ms tasks end 16 in 100 ms.
        assert_eq!(buffer_rows(8, 500, 40, 40 * 50_000), 16);
        // Tasks as long as the horizon or longer get no buffer, however many slots.
        assert_eq!(buffer_rows(2, 500, 2, 2 * 300_000), 0);
        assert_eq!(buffer_rows(8, 500, 3, 3 * 1_000_000), 0);
        assert_eq!(buffer_rows(8, 500, 8, 8 * 150_000), 0);
        assert_eq!(buffer_rows(512, 500, 9, 9 * 100_000), 0);
        assert_eq!(buffer_rows(128, 500, 4, 4 * 1_000_000), 0);
        // Just under it: one horizon's worth.
        assert_eq!(buffer_rows(8, 500, 8, 8 * 99_000), 8);
        // Nothing ended since the last look (every slot on slow work): none.
        assert_eq!(buffer_rows(8, 500, 0, 0), 0);
        // Prefetch off.
        assert_eq!(buffer_rows(8, 0, 1000, 1000), 0);
        // A zero duration does not divide by zero.
        assert_eq!(buffer_rows(1, 7, 5, 0), 7);
    }
}
