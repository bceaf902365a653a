//! Exponential backoff with full jitter (a uniform draw in `[0, base·2ⁿ]`,
//! capped): after a failover thousands of devices retry, and full jitter
//! spreads them instead of letting them retry in lockstep. The jitter source
//! is injectable so that tests under paused tokio time are deterministic.

use std::time::Duration;

/// Draws a delay in `[0, max]`.
pub type Jitter = Box<dyn FnMut(Duration) -> Duration + Send>;

/// Full jitter from the thread's RNG.
pub fn random_jitter() -> Jitter {
    Box::new(|max: Duration| {
        let nanos = max.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 {
            0
        } else {
            rand::random_range(0..=nanos)
        })
    })
}

/// The backoff state of one device.
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    jitter: Jitter,
}

impl std::fmt::Debug for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff")
            .field("base", &self.base)
            .field("cap", &self.cap)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, jitter: Jitter) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            jitter,
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay; grows the ceiling for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        (self.jitter)(ceiling).min(ceiling)
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(30),
            Box::new(|d| d),
        );
        let got: Vec<u64> = (0..12).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            got,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_stays_in_range_and_spreads() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(30),
            random_jitter(),
        );
        for _ in 0..6 {
            b.next_delay();
        }
        let ceiling = b.ceiling();
        let draws: Vec<Duration> = (0..200)
            .map(|_| {
                let mut c = Backoff::new(
                    Duration::from_millis(100),
                    Duration::from_secs(30),
                    random_jitter(),
                );
                for _ in 0..6 {
                    c.next_delay();
                }
                c.next_delay()
            })
            .collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        let below_half = draws.iter().filter(|d| **d < ceiling / 2).count();
        assert!(
            (50..150).contains(&below_half),
            "not uniform: {below_half}/200 below half"
        );
    }
}
