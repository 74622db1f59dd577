//! [`Capacity`]: how many tasks one worker may run at once, as semaphore permits. The governor
//! changes the grant while the worker runs; a decrease takes effect as running tasks end.

use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many tasks the pool may run at once. The governor changes it while the pool runs;
/// the claimer never claims more rows than there are free permits.
#[derive(Debug)]
pub struct Capacity {
    pub(super) sem: Arc<Semaphore>,
    /// Permits still to be withdrawn after a decrease (taken as running tasks end).
    pub(super) debt: Mutex<usize>,
    pub(super) granted: std::sync::atomic::AtomicUsize,
}

impl Capacity {
    pub fn new(n: usize) -> Arc<Capacity> {
        Arc::new(Capacity {
            sem: Arc::new(Semaphore::new(n)),
            debt: Mutex::new(0),
            granted: n.into(),
        })
    }

    /// The number of tasks currently allowed to run at once.
    pub fn granted(&self) -> usize {
        self.granted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the grant. An increase is usable at once; a decrease takes effect as running
    /// tasks end (nothing running is interrupted).
    pub fn set(&self, n: usize) {
        let old = self.granted.swap(n, std::sync::atomic::Ordering::Relaxed);
        let mut debt = self.debt.lock().expect("capacity lock");
        if n > old {
            let mut more = n - old;
            let repaid = more.min(*debt);
            *debt -= repaid;
            more -= repaid;
            self.sem.add_permits(more);
        } else {
            *debt += old - n;
            let taken = self.sem.forget_permits(*debt);
            *debt -= taken;
        }
    }

    /// Waits for one free slot and holds it until the permit drops: the same permits the
    /// claimer takes, so a slot held here is one task fewer claimed, and a lowered grant
    /// applies here too.
    pub async fn acquire(self: &Arc<Capacity>) -> OwnedSemaphorePermit {
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

    /// Free slots right now.
    pub fn available(&self) -> usize {
        self.settle();
        self.sem.available_permits()
    }

    /// Pays debt out of permits just acquired; false when none are left to claim with.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn capacity_decrease_waits_for_running_tasks() {
        let cap = Capacity::new(4);
        let held = cap.sem.clone().try_acquire_many_owned(3).unwrap();
        cap.set(2);
        assert_eq!(cap.granted(), 2);
        // One free permit could be withdrawn at once; one more is owed.
        assert_eq!(cap.sem.available_permits(), 0);
        drop(held);
        cap.settle();
        assert_eq!(cap.sem.available_permits(), 2);
        cap.set(5);
        assert_eq!(cap.sem.available_permits(), 5);
    }

    #[test]
    pub(super) fn capacity_increase_repays_debt_first() {
        let cap = Capacity::new(3);
        let held = cap.sem.clone().try_acquire_many_owned(3).unwrap();
        cap.set(1); // owes 2
        cap.set(2); // owes 1
        drop(held);
        cap.settle();
        assert_eq!(cap.sem.available_permits(), 2);
    }
}
