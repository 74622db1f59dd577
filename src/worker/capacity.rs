//! [`Capacity`]: how many tasks one worker may run at once, as semaphore permits. The governor
//! changes the grant while the worker runs; a decrease takes effect as running tasks end.

use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits of one semaphore whose size the governor changes while they are held: a decrease
/// takes back free permits at once and the rest as they are returned.
#[derive(Debug)]
pub(super) struct Gate {
    pub(super) sem: Arc<Semaphore>,
    /// Permits still to be withdrawn after a decrease (taken as they come back).
    debt: Mutex<usize>,
}

impl Gate {
    fn new(n: usize) -> Gate {
        Gate {
            sem: Arc::new(Semaphore::new(n)),
            debt: Mutex::new(0),
        }
    }

    fn resize(&self, old: usize, new: usize) {
        let mut debt = self.debt.lock().expect("capacity lock");
        if new > old {
            let mut more = new - old;
            let repaid = more.min(*debt);
            *debt -= repaid;
            more -= repaid;
            self.sem.add_permits(more);
        } else {
            *debt += old - new;
            let taken = self.sem.forget_permits(*debt);
            *debt -= taken;
        }
    }

    /// Pays debt out of permits just acquired; false when none are left.
    pub(super) fn repay(&self, permits: &mut OwnedSemaphorePermit) -> bool {
        let mut debt = self.debt.lock().expect("capacity lock");
        let n = (*debt).min(permits.num_permits());
        if n > 0 {
            if let Some(p) = permits.split(n) {
                p.forget();
            }
            *debt -= n;
        }
        permits.num_permits() > 0
    }

    /// Withdraws free permits still owed after a decrease.
    pub(super) fn settle(&self) {
        let mut debt = self.debt.lock().expect("capacity lock");
        if *debt > 0 {
            let taken = self.sem.forget_permits(*debt);
            *debt -= taken;
        }
    }

    /// Waits for one permit, debt paid.
    async fn acquire(&self) -> OwnedSemaphorePermit {
        loop {
            let mut permit = self
                .sem
                .clone()
                .acquire_owned()
                .await
                .expect("capacity is never closed");
            if self.repay(&mut permit) {
                return permit;
            }
        }
    }
}

/// How many tasks the pool may run at once, and how many rows it may hold: running, waiting
/// in its prefetch buffer, or ended with their completion not yet written. The governor
/// changes the grant while the pool runs; a decrease takes effect as running tasks end.
#[derive(Debug)]
pub struct Capacity {
    /// One permit per running attempt, from its start to the end of its handler.
    pub(super) run: Gate,
    /// One permit per held row, from its claim until its completion is written: the claimer
    /// never claims more rows than there are free ones.
    pub(super) hold: Gate,
    /// Rows a replica may hold beyond its grant (`bulk.prefetch`); none while the grant is 0.
    prefetch: usize,
    pub(super) granted: std::sync::atomic::AtomicUsize,
}

/// How many rows a pool granted `granted` slots may hold.
fn holdable(granted: usize, prefetch: usize) -> usize {
    if granted == 0 { 0 } else { granted + prefetch }
}

impl Capacity {
    /// `n` slots and no prefetch buffer.
    pub fn new(n: usize) -> Arc<Capacity> {
        Capacity::with_prefetch(n, 0)
    }

    /// `n` slots, and room for up to `prefetch` claimed rows waiting for one.
    pub fn with_prefetch(n: usize, prefetch: usize) -> Arc<Capacity> {
        Arc::new(Capacity {
            run: Gate::new(n),
            hold: Gate::new(holdable(n, prefetch)),
            prefetch,
            granted: n.into(),
        })
    }

    /// The number of tasks currently allowed to run at once.
    pub fn granted(&self) -> usize {
        self.granted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most rows the pool may hold beyond those it runs.
    pub fn prefetch(&self) -> usize {
        self.prefetch
    }

    /// The most rows the pool may hold at its current grant.
    pub fn max_holdable(&self) -> usize {
        holdable(self.granted(), self.prefetch)
    }

    /// Changes the grant. An increase is usable at once; a decrease takes effect as running
    /// tasks end (nothing running is interrupted).
    pub fn set(&self, n: usize) {
        let old = self.granted.swap(n, std::sync::atomic::Ordering::Relaxed);
        self.run.resize(old, n);
        self.hold
            .resize(holdable(old, self.prefetch), holdable(n, self.prefetch));
    }

    /// Waits for one free slot and holds it until the permit drops: the same permits the
    /// runner takes, so a slot held here is one task fewer started, and a lowered grant
    /// applies here too.
    pub async fn acquire(self: &Arc<Capacity>) -> OwnedSemaphorePermit {
        self.run.acquire().await
    }

    /// Free slots right now.
    pub fn available(&self) -> usize {
        self.run.settle();
        self.run.sem.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn capacity_decrease_waits_for_running_tasks() {
        let cap = Capacity::new(4);
        let held = cap.run.sem.clone().try_acquire_many_owned(3).unwrap();
        cap.set(2);
        assert_eq!(cap.granted(), 2);
        // One free permit could be withdrawn at once; one more is owed.
        assert_eq!(cap.run.sem.available_permits(), 0);
        drop(held);
        cap.run.settle();
        assert_eq!(cap.run.sem.available_permits(), 2);
        cap.set(5);
        assert_eq!(cap.run.sem.available_permits(), 5);
    }

    #[test]
    pub(super) fn capacity_increase_repays_debt_first() {
        let cap = Capacity::new(3);
        let held = cap.run.sem.clone().try_acquire_many_owned(3).unwrap();
        cap.set(1); // owes 2
        cap.set(2); // owes 1
        drop(held);
        cap.run.settle();
        assert_eq!(cap.run.sem.available_permits(), 2);
    }

    #[test]
    fn a_pool_holds_its_grant_and_prefetch_and_nothing_while_paused() {
        let cap = Capacity::with_prefetch(4, 10);
        assert_eq!(cap.hold.sem.available_permits(), 14);
        assert_eq!(cap.run.sem.available_permits(), 4);
        let held = cap.hold.sem.clone().try_acquire_many_owned(12).unwrap();
        cap.set(0); // paused: no row may be held, so 12 are owed as they come back
        cap.hold.settle();
        assert_eq!(cap.hold.sem.available_permits(), 0);
        assert_eq!(cap.run.sem.available_permits(), 0);
        drop(held);
        cap.hold.settle();
        assert_eq!(cap.hold.sem.available_permits(), 0);
        cap.set(2);
        assert_eq!(cap.hold.sem.available_permits(), 12);
        assert_eq!(cap.run.sem.available_permits(), 2);
    }
}
