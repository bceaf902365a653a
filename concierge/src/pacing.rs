//! Reconnect pacing. After a failover thousands of devices ask for their
//! endpoint at once; answering all of them at once makes them all connect at
//! once. The pacer gives every answer its own slot of a fixed rate (per
//! replica), one interval after the last (a GCRA meter with reservations),
//! and the answer tells the device when that is (`start_in_ms`): hub
//! connects arrive at the configured rate, each device at a known time,
//! without any coordination between replicas.
//!
//! The budget is shared, so no one client may spend it: each client address
//! has its own rate (checked first, so what it is refused costs the fleet
//! nothing), and a device that asks again before its slot gets the same
//! slot back instead of a new one further out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use fleet_api::DeviceId;
use fleet_api::limit::{KeyedBuckets, source_key};
use tokio::time::Instant;

/// Client addresses remembered by the per-source rate.
const MAX_SOURCES: usize = 100_000;
/// Devices waiting for their slot remembered at once.
const MAX_WAITING: usize = 100_000;
/// The furthest out a slot is given: beyond it devices are told to come
/// back then without a reservation, so no client can push the fleet's
/// slots hours away.
const MAX_WAIT: Duration = Duration::from_secs(120);

/// A device gets at most one new slot in this long.
pub const DEVICE_GAP: Duration = Duration::from_secs(1);

/// What a reservation of a future slot costs its source, in lookups.
pub const RESERVATION_COST: f64 = 5.0;

/// Why an answer is put off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paced {
    /// This client address asks faster than its own rate.
    Source(Duration),
    /// The fleet's reconnect rate: this device's slot is this far out.
    Fleet(Duration),
}

#[derive(Debug)]
struct Meter {
    next_free: Instant,
    /// When expired reservations were last dropped.
    pruned: Instant,
    /// Devices given a slot (within [`DEVICE_GAP`] of it), and the slot.
    waiting: HashMap<DeviceId, Instant>,
}

/// Admits at `rate` per second, with a one-second burst.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    burst: Duration,
    meter: Mutex<Meter>,
    sources: KeyedBuckets<IpAddr>,
}

impl Pacer {
    pub fn new(rate_per_s: f64, per_source: f64) -> Pacer {
        let interval = Duration::from_secs_f64(1.0 / rate_per_s.max(0.001));
        Pacer {
            interval,
            burst: Duration::from_secs(1),
            meter: Mutex::new(Meter {
                next_free: Instant::now(),
                pruned: Instant::now(),
                waiting: HashMap::new(),
            }),
            sources: KeyedBuckets::new(per_source, per_source, MAX_SOURCES),
        }
    }

    /// When `device` (asking from `source`) may connect, or how long it
    /// should wait before asking again: [`Pacer::source`], then
    /// [`Pacer::fleet`].
    ///
    /// # Errors
    /// When the client or the fleet is over its rate.
    pub fn admit(&self, source: IpAddr, device: &DeviceId) -> Result<Duration, Paced> {
        self.source(source)?;
        self.fleet(source, device)
    }

    /// Charges `source` one lookup.
    ///
    /// # Errors
    /// When it asks faster than its rate.
    pub fn source(&self, source: IpAddr) -> Result<(), Paced> {
        self.sources
            .try_take(&source_key(source))
            .map_err(Paced::Source)
    }

    /// A slot of the fleet's reconnect rate for `device`: `Ok(d)` says
    /// "connect in `d`" (zero when the schedule is free). Every answer takes
    /// the next slot, `1/rate` after the previous one, so a storm of lookups
    /// becomes a steady stream of CONNECTs at the rate hubs admit, each
    /// device told its own start instead of a coarse `Retry-After`. A device
    /// that asks again before its slot gets the same slot back; a
    /// reservation more than the burst ahead costs its source
    /// [`RESERVATION_COST`] lookups, so a few addresses asking for made-up
    /// devices cannot fill the schedule.
    ///
    /// # Errors
    /// When the schedule is full [`MAX_WAIT`] ahead: come back then.
    pub fn fleet(&self, source: IpAddr, device: &DeviceId) -> Result<Duration, Paced> {
        let now = Instant::now();
        let mut meter = self.meter.lock().unwrap_or_else(|e| e.into_inner());
        // One slot per device per `DEVICE_GAP`: asking again (whatever the
        // address) gives the same slot back, so a device id cannot eat the
        // schedule either.
        if let Some(&slot) = meter.waiting.get(device)
            && slot + DEVICE_GAP > now
        {
            return Ok(slot.saturating_duration_since(now));
        }
        let slot = meter.next_free.max(now);
        let wait = slot.duration_since(now);
        if wait > MAX_WAIT {
            return Err(Paced::Fleet(MAX_WAIT));
        }
        meter.next_free = slot + self.interval;
        if meter.waiting.len() >= MAX_WAITING
            && now.duration_since(meter.pruned) >= Duration::from_secs(1)
        {
            meter.waiting.retain(|_, s| *s + DEVICE_GAP > now);
            meter.pruned = now;
        }
        if meter.waiting.len() < MAX_WAITING {
            meter.waiting.insert(device.clone(), slot);
        }
        drop(meter);
        if wait > self.burst {
            self.sources
                .charge(&source_key(source), RESERVATION_COST - 1.0);
        }
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: usize) -> DeviceId {
        DeviceId::new(format!("d{i}")).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_spread_at_the_rate() {
        let p = Pacer::new(100.0, 1e9);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let starts: Vec<Duration> = (0..1000)
            .map(|i| p.admit(ip, &id(i)).expect("a slot"))
            .collect();
        assert_eq!(starts[0], Duration::ZERO, "the first connects at once");
        assert!(
            starts
                .windows(2)
                .all(|w| w[1] - w[0] == Duration::from_millis(10)),
            "every device gets its own slot, one interval after the last"
        );
        assert_eq!(starts[999], Duration::from_millis(9990));
        // However many ask, no slot is further out than MAX_WAIT.
        let refused = (0..100_000)
            .filter_map(|i| p.admit(ip, &id(10_000 + i)).err())
            .collect::<Vec<_>>();
        assert!(!refused.is_empty());
        assert!(refused.iter().all(|r| *r == Paced::Fleet(MAX_WAIT)));
        // After the storm drains, answers are immediate again.
        tokio::time::advance(MAX_WAIT + Duration::from_secs(2)).await;
        assert_eq!(p.admit(ip, &id(500_000)), Ok(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_cannot_spend_the_fleets_budget() {
        let p = Pacer::new(10.0, 5.0);
        let noisy: IpAddr = [10, 0, 0, 9].into();
        let device: IpAddr = [10, 0, 0, 1].into();
        let refused = (0..1000)
            .filter(|i| matches!(p.admit(noisy, &id(*i)), Err(Paced::Source(_))))
            .count();
        assert_eq!(refused, 995, "five a second for the noisy address");
        // Its five took the first five slots; the device is next.
        assert_eq!(p.admit(device, &id(7777)), Ok(Duration::from_millis(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn far_reservations_cost_their_source() {
        let p = Pacer::new(1.0, 10.0);
        let ip: IpAddr = [10, 0, 0, 1].into();
        // Two slots within the burst cost a lookup each; the third, two
        // seconds out, costs RESERVATION_COST.
        let starts: Vec<_> = (0..4).map(|i| p.admit(ip, &id(i))).collect();
        assert_eq!(
            starts,
            [
                Ok(Duration::ZERO),
                Ok(Duration::from_secs(1)),
                Ok(Duration::from_secs(2)),
                Ok(Duration::from_secs(3)),
            ]
        );
        assert!(matches!(p.admit(ip, &id(9)), Err(Paced::Source(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_asking_again_keeps_its_slot() {
        let p = Pacer::new(1.0, 1e9);
        let ip: IpAddr = [10, 0, 0, 1].into();
        for i in 0..5 {
            let _ = p.admit(ip, &id(i));
        }
        let first = p.admit(ip, &id(99)).expect("a slot");
        assert_eq!(first, Duration::from_secs(5));
        for _ in 0..100 {
            assert_eq!(p.admit(ip, &id(99)), Ok(first));
        }
        // Its asking did not push the next device further out.
        assert_eq!(p.admit(ip, &id(100)), Ok(first + Duration::from_secs(1)));
        tokio::time::advance(first).await;
        assert_eq!(p.admit(ip, &id(99)), Ok(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_takes_one_slot_a_second_whoever_asks() {
        let p = Pacer::new(1000.0, 1e9);
        for i in 0..50u8 {
            // From ever other addresses, the same id: one slot.
            let ip: IpAddr = [10, 0, 0, i].into();
            assert_eq!(p.admit(ip, &id(1)), Ok(Duration::ZERO));
        }
        assert_eq!(
            p.admit([10, 0, 1, 1].into(), &id(2)),
            Ok(Duration::from_millis(1))
        );
        tokio::time::advance(DEVICE_GAP).await;
        assert_eq!(p.admit([10, 0, 1, 1].into(), &id(1)), Ok(Duration::ZERO));
    }
}
