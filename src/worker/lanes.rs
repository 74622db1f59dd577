//! [`Lanes`]: the queues a worker serves, each with its share of the slots. A claim asks each
//! queue for at most the rows its lane has room for, and a buffered row starts only while its
//! lane runs fewer attempts than its capacity, so a queue's burst never takes another
//! queue's slots.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::Waker;

/// The queues of one worker with their capacities, and the attempts running in each.
#[derive(Debug)]
pub(super) struct Lanes {
    names: Vec<String>,
    caps: Vec<usize>,
    total: usize,
    running: Vec<AtomicUsize>,
    /// A moving mean of how long each lane's attempts take, in microseconds (0: none yet):
    /// only a lane whose tasks end quickly gets a share of the prefetch buffer.
    mean_us: Vec<std::sync::atomic::AtomicU64>,
    /// The backend's task, waiting for a lane to have room.
    waker: Mutex<Option<Waker>>,
}

impl Lanes {
    /// `queues` with their capacities, in the order given (at least one, none of capacity 0).
    pub(super) fn new(queues: &[(String, usize)]) -> Lanes {
        assert!(!queues.is_empty(), "a worker serves at least one queue");
        Lanes {
            names: queues.iter().map(|(q, _)| q.clone()).collect(),
            caps: queues.iter().map(|(_, n)| *n).collect(),
            total: queues.iter().map(|(_, n)| *n).sum(),
            running: queues.iter().map(|_| AtomicUsize::new(0)).collect(),
            mean_us: queues.iter().map(|_| Default::default()).collect(),
            waker: Mutex::new(None),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.names.len()
    }

    pub(super) fn name(&self, lane: usize) -> &str {
        &self.names[lane]
    }

    /// The lane of a claimed row's queue (only served queues are claimed from).
    pub(super) fn of(&self, queue: &str) -> usize {
        self.names.iter().position(|n| n == queue).unwrap_or(0)
    }

    /// What lane `l` may run at once while the governor grants `granted` of all the slots:
    /// its capacity, scaled down with the grant (at least one while anything is granted).
    pub(super) fn cap(&self, l: usize, granted: usize) -> usize {
        let cap = self.caps[l];
        if granted >= self.total {
            cap
        } else if granted == 0 {
            0
        } else {
            (cap * granted).div_ceil(self.total).max(1)
        }
    }

    pub(super) fn running(&self, l: usize) -> usize {
        self.running[l].load(Relaxed)
    }

    /// Whether lane `l` may start another attempt now.
    pub(super) fn has_room(&self, l: usize, granted: usize) -> bool {
        self.running(l) < self.cap(l, granted)
    }

    /// Rows lane `l` may claim: its slots plus its share of the prefetch `extra` (none while
    /// its own attempts take a prefetch horizon or longer), less what runs and what waits in
    /// the buffer.
    pub(super) fn room(&self, l: usize, granted: usize, extra: usize, buffered: usize) -> usize {
        let mean = self.mean_us[l].load(Relaxed);
        let quick = mean > 0 && (mean as u128) < super::PREFETCH_HORIZON.as_micros();
        let share = if quick {
            (extra * self.caps[l]).div_ceil(self.total.max(1))
        } else {
            0
        };
        (self.cap(l, granted) + share).saturating_sub(self.running(l) + buffered)
    }

    /// Free slots of lane `l`: what it may start now, without the buffer.
    pub(super) fn free(&self, l: usize, granted: usize, buffered: usize) -> usize {
        self.cap(l, granted)
            .saturating_sub(self.running(l) + buffered)
    }

    /// An attempt of lane `l` took `took`.
    pub(super) fn ended(&self, l: usize, took: std::time::Duration) {
        let took = (took.as_micros() as u64).max(1);
        let old = self.mean_us[l].load(Relaxed);
        let new = if old == 0 { took } else { (old * 7 + took) / 8 };
        self.mean_us[l].store(new, Relaxed);
    }

    /// Wakes `waker` when an attempt of any lane ends.
    pub(super) fn watch(&self, waker: &Waker) {
        *self.waker.lock().expect("lanes lock") = Some(waker.clone());
    }

    /// An attempt of lane `l` starts; it ends when the slot drops.
    pub(super) fn start(self: &std::sync::Arc<Self>, l: usize) -> LaneSlot {
        self.running[l].fetch_add(1, Relaxed);
        LaneSlot {
            lanes: self.clone(),
            lane: l,
        }
    }
}

/// One running attempt of a lane.
#[derive(Debug)]
pub(super) struct LaneSlot {
    lanes: std::sync::Arc<Lanes>,
    lane: usize,
}

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.lanes.running[self.lane].fetch_sub(1, Relaxed);
        if let Some(w) = self.lanes.waker.lock().expect("lanes lock").take() {
            w.wake();
        }
    }
}

/// Splits `want` rows among lanes with `rooms`: one row at a time to each lane that has room
/// left, in turn, so that no lane takes every row while others have room.
pub(super) fn split(want: usize, rooms: &[usize]) -> Vec<usize> {
    let mut out = vec![0; rooms.len()];
    let total: usize = rooms.iter().sum();
    if total <= want {
        return rooms.to_vec();
    }
    let mut left = want;
    while left > 0 {
        for (l, room) in rooms.iter().enumerate() {
            if left > 0 && out[l] < *room {
                out[l] += 1;
                left -= 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes() -> std::sync::Arc<Lanes> {
        std::sync::Arc::new(Lanes::new(&[
            ("default".into(), 8),
            ("agents".into(), 4),
            ("heavy".into(), 1),
        ]))
    }

    #[test]
    fn a_lane_runs_its_capacity_scaled_with_the_grant() {
        let l = lanes();
        assert_eq!((l.cap(0, 13), l.cap(1, 13), l.cap(2, 13)), (8, 4, 1));
        assert_eq!((l.cap(0, 20), l.cap(1, 20), l.cap(2, 20)), (8, 4, 1));
        // Half the slots granted: about half each, and at least one.
        assert_eq!((l.cap(0, 6), l.cap(1, 6), l.cap(2, 6)), (4, 2, 1));
        assert_eq!((l.cap(0, 0), l.cap(1, 0), l.cap(2, 0)), (0, 0, 0));
    }

    #[test]
    fn a_running_attempt_takes_its_lanes_room_until_it_ends() {
        let l = lanes();
        let slot = l.start(2);
        assert!(!l.has_room(2, 13));
        assert!(l.has_room(1, 13));
        assert_eq!(l.room(2, 13, 0, 0), 0);
        // No share of the prefetch before a lane's attempts are known to be quick.
        assert_eq!(l.room(0, 13, 13, 2), 8 - 2);
        // Then it is shared by capacity: 13 rows, 8 / 4 / 1; a slow lane gets none.
        l.ended(0, std::time::Duration::from_millis(1));
        l.ended(1, std::time::Duration::from_secs(2));
        assert_eq!(l.room(0, 13, 13, 2), 8 + 8 - 2);
        assert_eq!(l.room(1, 13, 13, 0), 4);
        assert_eq!(l.free(0, 13, 2), 6);
        drop(slot);
        assert!(l.has_room(2, 13));
        assert_eq!(l.room(2, 13, 0, 0), 1);
    }

    #[test]
    fn rows_are_split_in_turn_among_lanes_with_room() {
        assert_eq!(split(10, &[3, 0, 2]), vec![3, 0, 2]);
        assert_eq!(split(4, &[3, 3, 3]), vec![2, 1, 1]);
        assert_eq!(split(5, &[1, 9, 2]), vec![1, 2, 2]);
        assert_eq!(split(0, &[1, 1]), vec![0, 0]);
    }
}
