//! Reconnect pacing. After a failover thousands of devices ask for their
//! endpoint at once; answering all of them at once makes them all connect at
//! once. The pacer admits answers at a fixed rate (split across replicas) and
//! gives every device beyond that its own `Retry-After`, spread one slot
//! apart (a GCRA meter with reservations), so hub connects stay under the
//! configured rate without any coordination between replicas.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Admits at `rate` per second, with a one-second burst.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    burst: Duration,
    next_free: Mutex<Instant>,
}

impl Pacer {
    pub fn new(rate_per_s: f64) -> Pacer {
        let interval = Duration::from_secs_f64(1.0 / rate_per_s.max(0.001));
        Pacer {
            interval,
            burst: Duration::from_secs(1),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// `Ok` to answer now, or how long this device should wait first.
    pub fn admit(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (*next).max(now);
        *next = slot + self.interval;
        let wait = slot.duration_since(now);
        if wait <= self.burst {
            Ok(())
        } else {
            Err(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_spread_at_the_rate() {
        let p = Pacer::new(100.0);
        let results: Vec<Result<(), Duration>> = (0..1000).map(|_| p.admit()).collect();
        let admitted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(admitted, 101, "one second of burst");
        let waits: Vec<Duration> = results.iter().filter_map(|r| r.err()).collect();
        assert!(
            waits.windows(2).all(|w| w[0] < w[1]),
            "every device gets its own slot"
        );
        assert!(waits.last().unwrap() <= &Duration::from_secs(10));
        // After the storm drains, answers are immediate again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(p.admit().is_ok());
    }
}
