//! Rate limits that make an offender pay for its own traffic (feature
//! `limits`): a token bucket, and token buckets per client address with
//! bounded memory.
//!
//! Written here rather than taken from `governor`: `governor` keeps its own
//! clock, which tokio's paused-time tests cannot drive, and it has no notion
//! of charging a key more than one token after the fact (a failed login).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket on tokio time: `rate` tokens per second, at most `burst`
/// saved up. A charge may drive it into debt (down to `-burst`), which the
/// client then pays off at `rate` before it is admitted again.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: f64, burst: f64) -> TokenBucket {
        let rate = rate_per_s.max(0.001);
        let burst = burst.max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
    }

    /// Takes one token, or says how long until one is there.
    ///
    /// # Errors
    /// The wait when the bucket is empty (or in debt).
    pub fn try_take(&mut self) -> Result<(), Duration> {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Charges `cost` tokens whether or not they are there (down to `-burst`).
    pub fn charge(&mut self, cost: f64) {
        self.refill();
        self.tokens = (self.tokens - cost).max(-self.burst);
    }

    /// True when the bucket is full again (nothing to remember about its key).
    fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }
}

/// Token buckets per key, remembering at most `max_keys` keys; keys beyond
/// that share one overflow bucket, so a flood of fresh keys (addresses)
/// costs bounded memory and gains nothing over one key.
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    inner: Mutex<Keyed<K>>,
}

#[derive(Debug)]
struct Keyed<K> {
    buckets: HashMap<K, TokenBucket>,
    overflow: TokenBucket,
    /// When full buckets were last forgotten (a scan of every key: at most
    /// once a second).
    pruned: Instant,
}

impl<K: Eq + Hash + Clone> KeyedBuckets<K> {
    pub fn new(rate_per_s: f64, burst: f64, max_keys: usize) -> KeyedBuckets<K> {
        KeyedBuckets {
            rate: rate_per_s,
            burst,
            max_keys: max_keys.max(1),
            inner: Mutex::new(Keyed {
                buckets: HashMap::new(),
                overflow: TokenBucket::new(rate_per_s, burst),
                pruned: Instant::now(),
            }),
        }
    }

    /// Runs `f` on `key`'s bucket; a key not remembered while the map is
    /// full gets the overflow bucket, or `None` without `overflow`.
    fn with<T>(
        &self,
        key: &K,
        overflow_too: bool,
        f: impl FnOnce(&mut TokenBucket) -> T,
    ) -> Option<T> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Keyed {
            buckets,
            overflow,
            pruned,
        } = &mut *inner;
        if !buckets.contains_key(key)
            && buckets.len() >= self.max_keys
            && pruned.elapsed() >= Duration::from_secs(1)
        {
            // Forget keys whose buckets are full again: they owe nothing.
            buckets.retain(|_, b| !b.is_full());
            *pruned = Instant::now();
        }
        if let Some(b) = buckets.get_mut(key) {
            return Some(f(b));
        }
        if buckets.len() >= self.max_keys {
            return overflow_too.then(|| f(overflow));
        }
        Some(f(buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst))))
    }

    /// Takes one token of `key`'s bucket.
    ///
    /// # Errors
    /// How long `key` should wait.
    pub fn try_take(&self, key: &K) -> Result<(), Duration> {
        self.with(key, true, TokenBucket::try_take)
            .unwrap_or(Ok(()))
    }

    /// Charges `key` `cost` more tokens (say, for a failed login); a key
    /// that shares the overflow bucket is not charged (that would make
    /// every newcomer pay for it).
    pub fn charge(&self, key: &K, cost: f64) {
        self.with(key, false, |b| b.charge(cost));
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buckets
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key a client address is limited under: IPv4 as is (an IPv4-mapped
/// IPv6 address as its IPv4 address), IPv6 by its /64 (one host usually
/// holds a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

/// Counts things in progress per key (connections not yet authenticated,
/// say), with a cap per key and a cap in all. A [`Slot`] gives its place
/// back when dropped.
#[derive(Debug)]
pub struct Slots<K: Eq + Hash> {
    per_key: usize,
    total: usize,
    inner: std::sync::Arc<Mutex<SlotsInner<K>>>,
}

#[derive(Debug)]
struct SlotsInner<K> {
    counts: HashMap<K, usize>,
    total: usize,
}

/// Why a [`Slots::take`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotsFull {
    /// This key holds its share already.
    Key,
    /// Every slot is taken.
    Total,
}

impl SlotsFull {
    /// The `reason` label of a refusal.
    pub fn reason(self) -> &'static str {
        match self {
            SlotsFull::Key => "pending_per_source",
            SlotsFull::Total => "pending_total",
        }
    }
}

/// One taken place of [`Slots`].
#[derive(Debug)]
pub struct Slot<K: Eq + Hash> {
    key: K,
    inner: std::sync::Arc<Mutex<SlotsInner<K>>>,
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.total = inner.total.saturating_sub(1);
        if let Some(n) = inner.counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.counts.remove(&self.key);
            }
        }
    }
}

impl<K: Eq + Hash + Clone> Slots<K> {
    pub fn new(per_key: usize, total: usize) -> Slots<K> {
        Slots {
            per_key: per_key.max(1),
            total: total.max(1),
            inner: std::sync::Arc::new(Mutex::new(SlotsInner {
                counts: HashMap::new(),
                total: 0,
            })),
        }
    }

    /// Takes a place for `key`.
    ///
    /// # Errors
    /// When `key` holds its share, or all places are taken.
    pub fn take(&self, key: &K) -> Result<Slot<K>, SlotsFull> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.total >= self.total {
            return Err(SlotsFull::Total);
        }
        let n = inner.counts.entry(key.clone()).or_insert(0);
        if *n >= self.per_key {
            return Err(SlotsFull::Key);
        }
        *n += 1;
        inner.total += 1;
        Ok(Slot {
            key: key.clone(),
            inner: self.inner.clone(),
        })
    }

    /// Places taken now.
    pub fn in_use(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_limits_the_rate_and_debt_is_paid_off() {
        let mut b = TokenBucket::new(10.0, 10.0);
        assert_eq!((0..100).filter(|_| b.try_take().is_ok()).count(), 10);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..100).filter(|_| b.try_take().is_ok()).count(), 5);
        b.charge(1000.0);
        let wait = b.try_take().unwrap_err();
        assert_eq!(
            wait,
            Duration::from_millis(1100),
            "10 tokens of debt, then one"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            (0..100).filter(|_| b.try_take().is_ok()).count(),
            10,
            "burst stays capped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_cannot_spend_anothers_tokens() {
        let k: KeyedBuckets<u32> = KeyedBuckets::new(5.0, 5.0, 100);
        assert_eq!((0..50).filter(|_| k.try_take(&1).is_ok()).count(), 5);
        assert_eq!((0..5).filter(|_| k.try_take(&2).is_ok()).count(), 5);
        k.charge(&1, 5.0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(k.try_take(&1).is_err(), "key 1 paid its debt only");
        assert!(k.try_take(&2).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_keys_beyond_the_cap_share_one_bucket() {
        let k: KeyedBuckets<u32> = KeyedBuckets::new(1.0, 2.0, 10);
        for key in 0..10 {
            k.try_take(&key).unwrap();
        }
        assert_eq!(k.len(), 10);
        // Keys 10.. share the overflow bucket of 2.
        let admitted = (10..1000).filter(|key| k.try_take(key).is_ok()).count();
        assert_eq!(admitted, 2);
        assert_eq!(k.len(), 10, "memory stays bounded");
        // A failed login of an overflowing key costs the newcomers nothing.
        k.charge(&77_777, 1000.0);
        // Once the remembered buckets are full again they are forgotten.
        tokio::time::advance(Duration::from_secs(10)).await;
        k.try_take(&5000).unwrap();
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn slots_cap_per_key_and_in_all() {
        let s: Slots<u8> = Slots::new(2, 3);
        let a1 = s.take(&1).unwrap();
        let _a2 = s.take(&1).unwrap();
        assert_eq!(s.take(&1).unwrap_err(), SlotsFull::Key);
        let _b1 = s.take(&2).unwrap();
        assert_eq!(s.take(&3).unwrap_err(), SlotsFull::Total);
        drop(a1);
        assert_eq!(s.in_use(), 2);
        let _c = s.take(&3).unwrap();
    }

    #[test]
    fn ipv6_sources_are_limited_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
