//! How every long-running loop waits: a tick each period until its stop token is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Periodic ticks that end when `stop` is cancelled.
pub struct Ticks {
    interval: tokio::time::Interval,
    stop: CancellationToken,
}

impl Ticks {
    /// A tick every `period`, the first at once; a late tick is delayed, never bunched up.
    pub fn new(period: Duration, stop: CancellationToken) -> Ticks {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks { interval, stop }
    }

    /// Waits for the next tick: true when it came, false once stopped.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => !self.stop.is_cancelled(),
            _ = self.stop.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_until_stopped() {
        let stop = CancellationToken::new();
        let mut ticks = Ticks::new(Duration::from_secs(1), stop.clone());
        let start = tokio::time::Instant::now();
        assert!(ticks.next().await, "the first tick is at once");
        assert!(start.elapsed() < Duration::from_millis(500));
        assert!(ticks.next().await);
        assert!(start.elapsed() >= Duration::from_secs(1));
        stop.cancel();
        // Stopped: no further tick is waited for.
        let stopped = tokio::time::Instant::now();
        assert!(!ticks.next().await);
        assert!(stopped.elapsed() < Duration::from_millis(500));
    }
}
