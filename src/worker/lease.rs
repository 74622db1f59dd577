//! Whether an attempt may still start. Another replica rescues the rows of one whose heartbeat
//! is older than `rescue_after`; a claim that such a gap between heartbeats outlived (the
//! process stopped, the database out of reach) may already be running elsewhere. The runner
//! asks before an attempt begins, and the executor asks again just before it starts the run's
//! process (see [`crate::executor::StartGate`]), so that a replica stopped in between does not
//! start, once resumed, a task that was rescued and finished meanwhile.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What this replica's heartbeats say about its claims.
#[derive(Debug)]
pub(super) struct Beats {
    /// A gap this long between heartbeats (from one beat's sending to the next one's answer)
    /// may have let another replica rescue: three quarters of `rescue_after`, the rest a margin
    /// for what happens between a check and the start it allows.
    threshold: Duration,
    /// When the last beat that got through was sent; none yet: not watched (a pool run
    /// without a replica's heartbeat loop), every start allowed.
    last_sent: Option<Instant>,
    /// When a beat got through after such a gap: claims made before may have been rescued.
    broken_at: Option<Instant>,
}

impl Beats {
    pub(super) fn new(rescue_after: Duration) -> Beats {
        Beats {
            threshold: rescue_after * 3 / 4,
            last_sent: None,
            broken_at: None,
        }
    }

    /// A beat sent at `sent` got through at `answered`.
    pub(super) fn beat(&mut self, sent: Instant, answered: Instant) {
        if let Some(last) = self.last_sent {
            if answered.saturating_duration_since(last) >= self.threshold {
                self.broken_at = Some(answered);
            }
            self.last_sent = Some(sent.max(last));
        } else {
            self.last_sent = Some(sent);
        }
    }

    /// Whether what was claimed at `claimed_at` may start at `now`; else why not.
    pub(super) fn check(&self, claimed_at: Instant, now: Instant) -> Result<(), String> {
        let Some(last) = self.last_sent else {
            return Ok(());
        };
        let quiet = now.saturating_duration_since(last);
        if quiet >= self.threshold {
            return Err(format!(
                "no heartbeat got through for {:.1} s: another replica may have taken the task over",
                quiet.as_secs_f64()
            ));
        }
        if self.broken_at.is_some_and(|at| at > claimed_at) {
            return Err(
                "heartbeats stopped for a while after the claim: another replica may have taken \
                 the task over"
                    .to_string(),
            );
        }
        Ok(())
    }
}

/// An attempt's right to start: when its claim was sent, checked against the heartbeats.
#[derive(Clone)]
pub struct Lease {
    claimed_at: Instant,
    beats: Arc<Mutex<Beats>>,
}

impl Lease {
    pub(super) fn new(claimed_at: Instant, beats: Arc<Mutex<Beats>>) -> Lease {
        Lease { claimed_at, beats }
    }

    /// `Ok` while no other replica can have taken the attempt's task over; else why it may
    /// have. Cheap and synchronous: ask it right before anything the task does outside.
    pub fn check(&self) -> Result<(), String> {
        self.beats
            .lock()
            .expect("beats lock")
            .check(self.claimed_at, Instant::now())
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("claimed_at", &self.claimed_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_between_heartbeats_revokes_the_claims_made_before_it() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        // rescue_after 4 s: a gap of 3 s may have let another replica rescue.
        let mut b = Beats::new(s(4));
        // Not watched yet: every start allowed.
        assert!(b.check(t0, t0 + s(100)).is_ok());
        b.beat(t0, t0 + Duration::from_millis(10));
        b.beat(t0 + s(1), t0 + s(1));
        let claim = t0 + Duration::from_millis(1500);
        assert!(b.check(claim, t0 + s(2)).is_ok());
        // Nothing got through for 3 s: refused, whatever the claim's age.
        let quiet = b.check(claim, t0 + s(4)).unwrap_err();
        assert!(
            quiet.contains("no heartbeat got through for 3.0 s"),
            "{quiet}"
        );
        // The next beat gets through after the gap: claims made before it stay refused...
        b.beat(t0 + s(5), t0 + s(5));
        let broke = b
            .check(claim, t0 + Duration::from_millis(5100))
            .unwrap_err();
        assert!(
            broke.contains("stopped for a while after the claim"),
            "{broke}"
        );
        // ...claims made after it start.
        assert!(b.check(t0 + s(5), t0 + Duration::from_millis(5100)).is_ok());
        // A slow answer counts as a gap from the beat before: sent at 6, answered at 8.
        b.beat(t0 + s(6), t0 + s(6));
        b.beat(t0 + s(7), t0 + s(9));
        assert!(
            b.check(t0 + s(8), t0 + Duration::from_millis(9100))
                .is_err()
        );
        assert!(b.check(t0 + s(9), t0 + Duration::from_millis(9100)).is_ok());
    }
}
