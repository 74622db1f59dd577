//! Retry backoff: `base × 2^(retry-1)`, ±20% jitter, capped at one hour. Pure, no I/O.

use std::time::Duration;

use rand::Rng;

/// The longest any retry waits.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Relative jitter either side of the nominal delay.
pub const JITTER: f64 = 0.2;

/// The nominal delay before retry number `retry` (1 for the first retry).
pub fn nominal(base: Duration, retry: u32) -> Duration {
    let exp = retry.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << exp).min(MAX_DELAY)
}

/// The delay before retry number `retry`, with jitter drawn from `rng`.
pub fn delay(base: Duration, retry: u32, rng: &mut impl Rng) -> Duration {
    let nominal = nominal(base, retry).as_secs_f64();
    let factor = 1.0 + rng.gen_range(-JITTER..=JITTER);
    Duration::from_secs_f64(nominal * factor).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn doubles_from_the_base() {
        let base = Duration::from_secs(15);
        let got: Vec<u64> = (1..=5).map(|r| nominal(base, r).as_secs()).collect();
        assert_eq!(got, [15, 30, 60, 120, 240]);
    }

    #[test]
    fn is_capped_at_one_hour() {
        let base = Duration::from_secs(15);
        assert_eq!(nominal(base, 9), MAX_DELAY);
        assert_eq!(nominal(base, 1000), MAX_DELAY);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            assert!(delay(base, 12, &mut rng) <= MAX_DELAY);
        }
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_varies() {
        let base = Duration::from_secs(10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples: Vec<f64> = (0..2000)
            .map(|_| delay(base, 2, &mut rng).as_secs_f64())
            .collect();
        assert!(samples.iter().all(|s| (16.0..=24.0).contains(s)));
        let min = samples.iter().cloned().fold(f64::MAX, f64::min);
        let max = samples.iter().cloned().fold(f64::MIN, f64::max);
        assert!(min < 17.0 && max > 23.0, "jitter spreads: {min}..{max}");
    }

    #[test]
    fn zero_base_means_immediate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        assert_eq!(delay(Duration::ZERO, 4, &mut rng), Duration::ZERO);
    }
}
