//! The attempts a worker answers for, checked against what the database says it holds.

use crate::queue::TaskId;
use std::collections::HashMap;
use std::time::Duration;

/// The attempts a pool answers for, checked against what the database says it holds.
///
/// A row can be held in the database by a live replica that does not know it: a claim whose
/// COMMIT went through while its answer was lost (the connection broke), a release that failed
/// during an outage. Nobody would ever rescue it (the replica heartbeats), so the replica gives
/// such rows back itself — but only once they have been unknown at two reconciliations in a
/// row (a claim in flight is answered within milliseconds), and a claim that still brings one
/// of them back afterwards is dropped, not started (`revoked`).
#[derive(Debug, Default)]
pub(super) struct Holds {
    /// Claimed and not yet written back or released: task → attempt.
    pub(super) known: HashMap<TaskId, i32>,
    /// Held in the database but unknown here at the last reconciliation.
    pub(super) suspects: std::collections::HashSet<(TaskId, i32)>,
    /// Given back by a reconciliation: when, and the last claim started by then. Only a
    /// claim started no later than that can bring the row back unknowingly (a later claim of
    /// the same row, which gets the same attempt number again, is a fair claim).
    pub(super) revoked: HashMap<(TaskId, i32), (std::time::Instant, u64)>,
    /// Claims started so far (each claim statement's sequence number).
    pub(super) claims: u64,
}

impl Holds {
    /// Given `held` (read from the database just before), the attempts to give back: unknown
    /// now and at the previous call. They are revoked from `now`; revocations older than
    /// `keep` are dropped.
    pub(super) fn orphans(
        &mut self,
        held: &[(TaskId, i32)],
        now: std::time::Instant,
        keep: Duration,
    ) -> Vec<(TaskId, i32)> {
        let unknown: std::collections::HashSet<(TaskId, i32)> = held
            .iter()
            .filter(|(id, attempt)| self.known.get(id) != Some(attempt))
            .copied()
            .collect();
        self.revoked
            .retain(|_, (at, _)| now.duration_since(*at) < keep);
        // Suspected at the last look, or given back already and still listed (the release
        // failed): give back now.
        let mut orphans: Vec<(TaskId, i32)> = unknown
            .iter()
            .filter(|u| self.suspects.contains(u) || self.revoked.contains_key(u))
            .copied()
            .collect();
        orphans.sort_unstable();
        for o in &orphans {
            self.revoked.insert(*o, (now, self.claims));
        }
        self.suspects = unknown
            .into_iter()
            .filter(|u| !self.revoked.contains_key(u))
            .collect();
        orphans
    }

    /// Numbers a claim about to be sent.
    pub(super) fn claim_started(&mut self) -> u64 {
        self.claims += 1;
        self.claims
    }

    /// Records a row that claim `seq` returned as ours; returns whether it may be started
    /// (false: a reconciliation gave it back while that claim was in flight).
    pub(super) fn claimed(&mut self, seq: u64, id: TaskId, attempt: i32) -> bool {
        if self
            .revoked
            .get(&(id, attempt))
            .is_some_and(|(_, last)| seq <= *last)
        {
            return false;
        }
        self.known.insert(id, attempt);
        true
    }

    /// Forgets `attempt` of `id` (written back or released); a newer attempt stays.
    pub(super) fn forget(&mut self, id: TaskId, attempt: i32) {
        if self.known.get(&id) == Some(&attempt) {
            self.known.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn holds_unknown_at_two_reconciliations_are_given_back_once() {
        let mut h = Holds::default();
        let t0 = std::time::Instant::now();
        let keep = Duration::from_secs(10);
        let first = h.claim_started();
        assert!(h.claimed(first, 1, 1));
        // A claim is in flight while the reconciliations below give its row back.
        let in_flight = h.claim_started();
        // 2 is held but unknown (its claim's answer was lost); 1 is ours.
        assert!(h.orphans(&[(1, 1), (2, 1)], t0, keep).is_empty());
        // A claim in flight at the first look is known by the second: never given back.
        let quick = h.claim_started();
        assert!(h.claimed(quick, 3, 1));
        assert_eq!(h.orphans(&[(1, 1), (2, 1), (3, 1)], t0, keep), vec![(2, 1)]);
        // Still listed (the release failed): given back again at once.
        assert_eq!(h.orphans(&[(2, 1)], t0, keep), vec![(2, 1)]);
        // The claim in flight brings 2 back: dropped. A claim started since may have it.
        assert!(!h.claimed(in_flight, 2, 1));
        let later = h.claim_started();
        assert!(h.claimed(later, 2, 1));
        h.forget(2, 1);
        assert!(h.orphans(&[], t0, keep).is_empty());
        // An older attempt of a task we now run is not ours: (1, 1) vs known (1, 2).
        let retried = h.claim_started();
        assert!(h.claimed(retried, 1, 2));
        assert!(h.orphans(&[(1, 1)], t0, keep).is_empty());
        assert_eq!(h.orphans(&[(1, 1)], t0, keep), vec![(1, 1)]);
        // Revocations age out.
        h.orphans(&[], t0 + keep, keep);
        assert!(h.revoked.is_empty());
        h.forget(1, 1);
        assert_eq!(
            h.known.get(&1),
            Some(&2),
            "forgetting an old attempt keeps the new one"
        );
        h.forget(1, 2);
        assert!(!h.known.contains_key(&1));
    }
}
