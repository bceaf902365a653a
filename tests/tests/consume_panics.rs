//! Consumer handlers that panic: a panic is a failed attempt (retried, then
//! dead-lettered), and a panic on the breaker's probe keeps the breaker open
//! (the batch waits; nothing is dead-lettered or skipped).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use consumer::breaker::{BreakerPolicy, State};
use consumer::store::ConsumerStore;
use consumer::{Consumer, ConsumerConfig, Handler, HandlerError};
use fleet_api::hub::WireRecord;
use fleet_api::{DeviceId, partition_for};
use tests::consumers::{
    batch, checkpoints_at, fast, high_watermarks, hub_with, publish, sqlite_url,
};
use tests::{harness, wait_for};

/// Panics on records whose payload starts with `panic`.
#[derive(Default)]
struct Panicky {
    accepted: Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl Handler for Panicky {
    async fn handle(&self, batch: &[WireRecord]) -> Result<(), HandlerError> {
        if let Some(r) = batch.iter().find(|r| r.payload.starts_with(b"panic")) {
            panic!("cannot handle offset {}", r.offset);
        }
        self.accepted
            .lock()
            .unwrap()
            .extend(batch.iter().map(|r| r.offset.0));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_handler_is_a_failed_attempt_then_a_dead_letter() {
    let h = harness!("a_panicking_handler_is_a_failed_attempt_then_a_dead_letter");
    let (hub, reg) = hub_with(&h, &["d1"]).await;
    let payloads: Vec<String> = (1..=10)
        .map(|i| {
            if i == 4 {
                format!("panic-{i}")
            } else {
                format!("ok-{i}")
            }
        })
        .collect();
    publish(&hub, &reg, "d1", 1, &payloads).await;
    let store = sqlite_url(&h, "consumer.db");
    let config = fast(ConsumerConfig::new("panicky", vec![hub.url()], &store));
    let handler = Arc::new(Panicky::default());
    let consumer = Consumer::start(config, handler.clone())
        .await
        .expect("start");
    let hw = high_watermarks(&hub).await;
    let s = ConsumerStore::open(&store, "panicky").await.unwrap();
    wait_for(60, "checkpoints at the high watermarks", || async {
        let cps = s.checkpoints().await.unwrap();
        cps.iter().map(|(_, cp)| cp.next.0).sum::<u64>() == hw.iter().sum::<u64>()
    })
    .await;
    let letters = s.dead_letters(true, 100).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].record.payload, b"panic-4");
    assert_eq!(letters[0].attempts, 3);
    assert!(
        letters[0].reason.contains("panicked"),
        "{}",
        letters[0].reason
    );
    let mut accepted = handler.accepted.lock().unwrap().clone();
    accepted.sort_unstable();
    accepted.dedup();
    assert_eq!(
        accepted.len(),
        9,
        "every other record handled: {accepted:?}"
    );
    consumer.shutdown().await;
}

/// Panics on every batch while armed; records what it accepted otherwise.
#[derive(Default)]
struct PanicsWhileArmed {
    armed: AtomicBool,
    calls: AtomicU32,
    accepted: Mutex<Vec<(String, u64, Vec<u8>)>>,
}

#[async_trait::async_trait]
impl Handler for PanicsWhileArmed {
    async fn handle(&self, batch: &[WireRecord]) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.armed.load(Ordering::SeqCst) {
            panic!("the probe panics");
        }
        self.accepted.lock().unwrap().extend(batch.iter().map(|r| {
            (
                r.device_id.to_string(),
                r.mid.map_or(0, |m| m.0),
                r.payload.clone(),
            )
        }));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_panicking_on_the_probe_keeps_the_breaker_open() {
    let h = harness!("a_handler_panicking_on_the_probe_keeps_the_breaker_open");
    // Records in every partition: a probe of an empty partition would
    // close the breaker for a good reason.
    let mut devices: Vec<String> = Vec::new();
    let mut covered = [false; 8];
    for i in 0.. {
        let d = format!("probe-{i}");
        let p = partition_for(&DeviceId::new(&d).unwrap(), 8).0 as usize;
        if !covered[p] {
            covered[p] = true;
            devices.push(d);
        }
        if covered.iter().all(|c| *c) {
            break;
        }
    }
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    let (hub, reg) = hub_with(&h, &refs).await;
    for d in &refs {
        publish(&hub, &reg, d, 1, &batch(d, 1, 5)).await;
    }
    let store = sqlite_url(&h, "consumer.db");
    let s = ConsumerStore::open(&store, "probe").await.unwrap();
    // Open (long ago): the first instance probes at once.
    assert!(
        s.transition(
            0,
            &State::Open {
                since_ms: 0,
                manual: false
            }
        )
        .await
        .unwrap()
    );
    let mut config = fast(ConsumerConfig::new("probe", vec![hub.url()], &store));
    config.breaker = BreakerPolicy {
        failures: 10_000,
        window: std::time::Duration::from_secs(30),
        cooldown: std::time::Duration::from_millis(300),
    };
    let handler = Arc::new(PanicsWhileArmed::default());
    handler.armed.store(true, Ordering::SeqCst);
    let consumer = Consumer::start(config, handler.clone()).await.unwrap();
    wait_for(30, "three panicking probes", || async {
        assert_ne!(
            s.breaker().await.unwrap().state,
            State::Closed,
            "a panicking probe closed the breaker"
        );
        handler.calls.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(
        s.dead_letters(true, 100).await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    assert!(
        s.checkpoints()
            .await
            .unwrap()
            .iter()
            .all(|(_, c)| c.next.0 == 0),
        "no checkpoint moved"
    );
    // The sink is back: the next probe closes it and everything arrives.
    handler.armed.store(false, Ordering::SeqCst);
    let hw = high_watermarks(&hub).await;
    wait_for(30, "closed and caught up", || async {
        s.breaker().await.unwrap().state == State::Closed && checkpoints_at(&s, &hw).await
    })
    .await;
    let mut got = handler.accepted.lock().unwrap().clone();
    got.sort();
    got.dedup();
    let mut want: Vec<(String, u64, Vec<u8>)> = refs
        .iter()
        .flat_map(|d| {
            batch(d, 1, 5)
                .into_iter()
                .enumerate()
                .map(move |(i, p)| (d.to_string(), i as u64 + 1, p.into_bytes()))
        })
        .collect();
    want.sort();
    assert_eq!(got, want, "every record handled, byte for byte");
    assert!(s.dead_letters(true, 100).await.unwrap().is_empty());
    consumer.shutdown().await;
}
