//! Reliable consumers against real hubs: the shared store on SQLite and
//! PostgreSQL, a flaky handler (retries, dead letters, order), a downstream
//! database cut off behind a proxy (the shared breaker across two runner
//! processes), kill -9 of an instance (takeover from the checkpoint) and the
//! operator commands.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer::breaker::{BreakerPolicy, State};
use consumer::sink::SqlSink;
use consumer::store::{Checkpoint, ConsumerStore};
use consumer::{Consumer, ConsumerConfig, Handler, HandlerError};
use fleet_api::hub::WireRecord;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use registry_sync::testing::TempPg;
use tests::consumers::{
    batch, checkpoints_at, fast, high_watermarks, hub_with, publish, sqlite_url,
};
use tests::proxy::Proxy;
use tests::{ADMIN_TOKEN, Harness, HubNode, Node, Registry, harness, wait_for};

// ------------------------------------------------------------- helpers

fn record(p: u32, offset: u64, epoch: u64, device: &str, mid: Option<u64>) -> WireRecord {
    WireRecord {
        partition: PartitionId(p),
        offset: Offset(offset),
        device_id: DeviceId::new(device).unwrap(),
        mid: mid.map(Mid),
        enqueued_at: UnixMillis(1_700_000_000_000),
        region: Region::new("a").unwrap(),
        epoch: Epoch(epoch),
        payload: vec![0, 1, 2, 255],
    }
}

// --------------------------------------------- store conformance (both backends)

async fn store_conformance(url: &str) {
    let ttl = Duration::from_secs(30);
    let s = ConsumerStore::open(url, "g").await.expect("open store");
    // Opening again (a second instance) is harmless.
    let other = ConsumerStore::open(url, "g").await.expect("open again");
    let foreign = ConsumerStore::open(url, "other-group").await.unwrap();

    // Instances.
    assert_eq!(s.heartbeat("i1", ttl).await.unwrap(), 1);
    assert_eq!(other.heartbeat("i2", ttl).await.unwrap(), 2);
    assert_eq!(
        foreign.heartbeat("x", ttl).await.unwrap(),
        1,
        "groups are separate"
    );
    s.heartbeat("gone", Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        s.heartbeat("i1", ttl).await.unwrap(),
        2,
        "expired instances do not count"
    );

    // Partitions and leases.
    s.ensure_partitions(&[Offset(0), Offset(5), Offset(0)])
        .await
        .unwrap();
    other
        .ensure_partitions(&[Offset(9), Offset(9), Offset(9)])
        .await
        .unwrap();
    assert_eq!(
        s.checkpoint(PartitionId(1)).await.unwrap(),
        Some(Checkpoint {
            next: Offset(5),
            last_epoch: Epoch(0)
        }),
        "the first ensure decides where a partition starts"
    );
    assert_eq!(s.claimable().await.unwrap().len(), 3);
    assert!(s.try_claim(PartitionId(0), "i1", ttl).await.unwrap());
    assert!(
        !other.try_claim(PartitionId(0), "i2", ttl).await.unwrap(),
        "held by i1"
    );
    assert!(
        s.try_claim(PartitionId(0), "i1", ttl).await.unwrap(),
        "re-claiming one's own"
    );
    assert!(
        other
            .try_claim(PartitionId(1), "i2", Duration::ZERO)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        s.try_claim(PartitionId(1), "i1", ttl).await.unwrap(),
        "an expired lease is free"
    );
    assert_eq!(
        other.renew("i2", ttl).await.unwrap(),
        vec![],
        "i2 lost partition 1"
    );
    assert_eq!(
        s.renew("i1", ttl).await.unwrap(),
        vec![PartitionId(0), PartitionId(1)]
    );
    assert_eq!(s.claimable().await.unwrap(), vec![PartitionId(2)]);
    let owners = s.owners().await.unwrap();
    assert_eq!(owners[0], (PartitionId(0), Some("i1".to_string())));
    assert_eq!(owners[2], (PartitionId(2), None));

    // Checkpoints: forward only, only by the holder.
    let cp = |n, e| Checkpoint {
        next: Offset(n),
        last_epoch: Epoch(e),
    };
    assert!(s.commit(PartitionId(0), cp(10, 1), "i1").await.unwrap());
    assert!(
        s.commit(PartitionId(0), cp(4, 1), "i1").await.unwrap(),
        "still the holder"
    );
    assert_eq!(
        s.checkpoint(PartitionId(0)).await.unwrap(),
        Some(cp(10, 1)),
        "never backwards"
    );
    assert!(
        !other.commit(PartitionId(0), cp(20, 1), "i2").await.unwrap(),
        "not the holder"
    );
    assert_eq!(s.checkpoint(PartitionId(0)).await.unwrap(), Some(cp(10, 1)));
    assert!(s.rewind(PartitionId(0), cp(7, 1), "i1").await.unwrap());
    assert_eq!(s.checkpoint(PartitionId(0)).await.unwrap(), Some(cp(7, 1)));
    assert!(!other.rewind(PartitionId(0), cp(0, 0), "i2").await.unwrap());
    s.release(PartitionId(0), "i1").await.unwrap();
    assert!(
        !s.commit(PartitionId(0), cp(11, 1), "i1").await.unwrap(),
        "released"
    );
    s.reset_checkpoint(PartitionId(0), cp(3, 2)).await.unwrap();
    assert_eq!(
        s.checkpoints().await.unwrap()[0],
        (PartitionId(0), cp(3, 2))
    );
    assert!(foreign.checkpoints().await.unwrap().is_empty());
    s.leave("i1").await.unwrap();
    assert_eq!(
        s.claimable().await.unwrap().len(),
        3,
        "leaving frees every lease"
    );

    // Breaker: compare-and-set on a generation.
    let b = s.breaker().await.unwrap();
    assert_eq!((b.state.clone(), b.generation), (State::Closed, 0));
    let open = State::Open {
        since_ms: 1234,
        manual: false,
    };
    assert!(s.transition(0, &open).await.unwrap());
    assert!(
        !other.transition(0, &State::Closed).await.unwrap(),
        "a stale writer loses"
    );
    let b = other.breaker().await.unwrap();
    assert_eq!((b.state.clone(), b.generation), (open, 1));
    let half = State::HalfOpen {
        prober: "i2/3".into(),
        since_ms: 99,
    };
    assert!(other.transition(1, &half).await.unwrap());
    assert!(!s.transition(1, &State::Closed).await.unwrap());
    assert_eq!(s.breaker().await.unwrap().state, half);
    let manual = State::Open {
        since_ms: 5,
        manual: true,
    };
    assert!(s.transition(2, &manual).await.unwrap());
    assert_eq!(s.breaker().await.unwrap().state, manual);
    assert_eq!(foreign.breaker().await.unwrap().state, State::Closed);

    // Failures within a window, across instances.
    let w = Duration::from_secs(30);
    assert_eq!(s.record_failure("i1", w).await.unwrap(), 1);
    assert_eq!(other.record_failure("i2", w).await.unwrap(), 2);
    assert_eq!(foreign.record_failure("x", w).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.record_failure("i1", Duration::from_millis(10))
            .await
            .unwrap(),
        1,
        "older ones fall out"
    );

    // Dead letters: once per record, in order, with everything kept.
    let r1 = record(2, 40, 3, "dev-1", Some(7));
    let r2 = record(0, 41, 3, "dev-2", None);
    s.dead_letter(&r1, "bad json at byte 3", 3).await.unwrap();
    other.dead_letter(&r1, "again", 3).await.unwrap();
    s.dead_letter(&r2, "no mid", 5).await.unwrap();
    let all = s.dead_letters(true, 100).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].record, r1);
    assert_eq!(
        (all[0].reason.as_str(), all[0].attempts),
        ("bad json at byte 3", 3)
    );
    assert_eq!(all[1].record, r2);
    assert!(all[0].id < all[1].id);
    s.mark_replayed(all[0].id).await.unwrap();
    let pending = s.dead_letters(true, 100).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].record, r2);
    let every = s.dead_letters(false, 100).await.unwrap();
    assert!(every[0].replayed_at.is_some());
    assert!(foreign.dead_letters(false, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn consumer_store_conformance_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    store_conformance(&format!("sqlite://{}", dir.path().join("c.db").display())).await;
}

#[tokio::test]
async fn consumer_store_conformance_postgres() {
    let pg = TempPg::new().await;
    store_conformance(pg.url()).await;
}

#[tokio::test]
async fn sink_ignores_redeliveries_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TempPg::new().await;
    for url in [
        format!("sqlite://{}", dir.path().join("s.db").display()),
        pg.url().to_string(),
    ] {
        let sink = SqlSink::open(&url, "telemetry").await.expect("open sink");
        let batch = vec![
            record(0, 0, 1, "d1", Some(1)),
            record(0, 1, 1, "d1", Some(2)),
            record(0, 2, 1, "d2", None),
        ];
        sink.handle(&batch).await.unwrap();
        sink.handle(&batch).await.unwrap();
        // The same message re-sent by its device and stored at another offset.
        sink.handle(&[record(0, 9, 2, "d1", Some(2))])
            .await
            .unwrap();
        assert_eq!(sink.count().await.unwrap(), 3, "{url}");
        sink.check().await.unwrap();
        assert!(SqlSink::open(&url, "bad;table").await.is_err());
    }
}

// ------------------------------------------------- flaky handler, in process

/// Fails records whose payload starts with `poison` every time, and records
/// starting with `flaky` on their first two attempts; remembers the order of
/// what it accepted.
#[derive(Default)]
struct Flaky {
    attempts: Mutex<HashMap<(u32, u64), u32>>,
    accepted: Mutex<Vec<WireRecord>>,
}

#[async_trait::async_trait]
impl Handler for Flaky {
    async fn handle(&self, batch: &[WireRecord]) -> Result<(), HandlerError> {
        let mut attempts = self.attempts.lock().unwrap();
        for r in batch {
            let n = attempts.entry((r.partition.0, r.offset.0)).or_default();
            *n += 1;
            if r.payload.starts_with(b"poison") {
                return Err(HandlerError::Record(format!(
                    "poison at offset {}",
                    r.offset
                )));
            }
            if r.payload.starts_with(b"flaky") && *n <= 2 {
                return Err(HandlerError::Record("flaky".into()));
            }
        }
        self.accepted.lock().unwrap().extend(batch.iter().cloned());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flaky_handler_retries_then_dead_letters_without_skipping_or_reordering() {
    let h = harness!("flaky_handler_retries_then_dead_letters_without_skipping_or_reordering");
    let devices = ["d1", "d2", "d3", "d4"];
    let (hub, reg) = hub_with(&h, &devices).await;
    let mut expected_poison = 0;
    for d in devices {
        let payloads: Vec<String> = (1..=60)
            .map(|i| match i % 20 {
                7 => {
                    expected_poison += 1;
                    format!("poison-{d}-{i}")
                }
                3 | 11 => format!("flaky-{d}-{i}"),
                _ => format!("ok-{d}-{i}"),
            })
            .collect();
        publish(&hub, &reg, d, 1, &payloads).await;
    }
    let store = sqlite_url(&h, "consumer.db");
    let mut config = fast(ConsumerConfig::new("flaky", vec![hub.url()], &store));
    config.batch = 25;
    config.breaker = BreakerPolicy {
        failures: 10_000,
        ..BreakerPolicy::default()
    };
    let handler = Arc::new(Flaky::default());
    let consumer = Consumer::start(config, handler.clone())
        .await
        .expect("start");
    let hw = high_watermarks(&hub).await;
    let total: u64 = hw.iter().sum();
    assert_eq!(total, 240);
    let s = ConsumerStore::open(&store, "flaky").await.unwrap();
    wait_for(60, "checkpoints at the high watermarks", || async {
        let cps = s.checkpoints().await.unwrap();
        cps.len() == hw.len() && cps.iter().all(|(p, cp)| cp.next.0 == hw[p.0 as usize])
    })
    .await;
    let accepted = handler.accepted.lock().unwrap().clone();
    let letters = s.dead_letters(true, 1000).await.unwrap();
    assert_eq!(letters.len(), expected_poison, "every poison record, once");
    for d in &letters {
        assert!(d.record.payload.starts_with(b"poison"), "{d:?}");
        assert_eq!(d.attempts, 3);
        assert!(d.reason.contains("poison at offset"), "{}", d.reason);
    }
    // Per partition: every other record accepted, in log order; the first
    // acceptance of each offset counts (a batch retried after a flaky record
    // re-delivers records before it).
    let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in &accepted {
        let seen = by_partition.entry(r.partition.0).or_default();
        if !seen.contains(&r.offset.0) {
            assert!(
                seen.last().is_none_or(|last| *last < r.offset.0),
                "partition {} went back from {:?} to {}",
                r.partition,
                seen.last(),
                r.offset
            );
            seen.push(r.offset.0);
        }
    }
    let dead: BTreeMap<(u32, u64), ()> = letters
        .iter()
        .map(|d| ((d.record.partition.0, d.record.offset.0), ()))
        .collect();
    for (p, &end) in hw.iter().enumerate() {
        let got = by_partition.remove(&(p as u32)).unwrap_or_default();
        let want: Vec<u64> = (0..end)
            .filter(|o| !dead.contains_key(&(p as u32, *o)))
            .collect();
        assert_eq!(got, want, "partition {p}: nothing skipped");
    }
    let flaky_tries = handler.attempts.lock().unwrap().clone();
    assert!(
        flaky_tries.values().any(|n| *n >= 3),
        "flaky records were retried"
    );
    let status = consumer.status();
    assert_eq!(status.dead_lettered as usize, expected_poison);
    consumer.shutdown().await;
    assert!(
        s.owners().await.unwrap().iter().all(|(_, o)| o.is_none()),
        "a clean shutdown gives the leases back"
    );
}

// ---------------------------------------- runner processes (fleet consume run)

struct Runner {
    node: Node,
    http: String,
}

fn runner(
    h: &Harness,
    label: &str,
    hub: &HubNode,
    store: &str,
    sink: &str,
    extra: &[&str],
) -> Runner {
    let mut args: Vec<String> = [
        "consume",
        "--json",
        "run",
        "--group",
        "sink",
        "--hub",
        &hub.url(),
        "--hub-token",
        ADMIN_TOKEN,
        "--store",
        store,
        "--sink",
        sink,
        "--http",
        "127.0.0.1:0",
        "--admin-token",
        ADMIN_TOKEN,
        "--instance",
        label,
        "--lease-ttl-ms",
        "1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if extra.contains(&"--lease-ttl-ms") {
        args.truncate(args.len() - 2);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let node = h.spawn(label, &args);
    let http = format!("http://{}", node.addr("http"));
    Runner { node, http }
}

async fn get_json(url: String) -> serde_json::Value {
    reqwest::get(url)
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn sink_count(sink: &SqlSink) -> u64 {
    sink.count().await.unwrap_or(0)
}

/// Every `(device, mid, payload)` in the sink's table.
async fn sink_messages(url: &str) -> std::collections::BTreeSet<(String, i64, Vec<u8>)> {
    use sqlx::Row;
    let (pool, _) = consumer::store::connect(url, 1).await.unwrap();
    sqlx::query("SELECT device_id, mid, payload FROM telemetry")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// What `devices` published with [`batch`], mids `1..=n` each.
fn published(devices: &[&str], n: u64) -> std::collections::BTreeSet<(String, i64, Vec<u8>)> {
    devices
        .iter()
        .flat_map(|d| {
            batch(d, 1, n)
                .into_iter()
                .enumerate()
                .map(move |(i, p)| (d.to_string(), i as i64 + 1, p.into_bytes()))
        })
        .collect()
}

async fn distinct_messages(url: &str) -> (i64, i64) {
    use sqlx::Row;
    let (pool, _) = consumer::store::connect(url, 1).await.unwrap();
    let row = sqlx::query(
        "SELECT COUNT(*), COUNT(DISTINCT device_id || '/' || CAST(mid AS TEXT)) FROM telemetry",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    (row.try_get(0).unwrap(), row.try_get(1).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downstream_outage_opens_the_shared_breaker_then_the_probe_resumes_all_without_loss() {
    let h = harness!(
        "downstream_outage_opens_the_shared_breaker_then_the_probe_resumes_all_without_loss"
    );
    let devices = ["d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8"];
    let (hub, reg) = hub_with(&h, &devices).await;
    let store_db = TempPg::new().await;
    let sink_db = TempPg::new().await;
    // The sink is reached through a proxy that the test cuts (the database
    // "stops" for the consumers while the store stays reachable).
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let sink_url = sink_db
        .url()
        .replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(sink_url, sink_db.url());
    let breaker_flags = [
        "--breaker-failures",
        "5",
        "--breaker-window-s",
        "30",
        "--breaker-cooldown-s",
        "2",
        "--batch",
        "50",
    ];
    let a = runner(
        &h,
        "consumer-a",
        &hub,
        store_db.url(),
        &sink_url,
        &breaker_flags,
    );
    let b = runner(
        &h,
        "consumer-b",
        &hub,
        store_db.url(),
        &sink_url,
        &breaker_flags,
    );
    let sink = SqlSink::open(sink_db.url(), "telemetry").await.unwrap();
    let store = ConsumerStore::open(store_db.url(), "sink").await.unwrap();
    for d in devices {
        publish(&hub, &reg, d, 1, &batch(d, 1, 40)).await;
    }
    wait_for(30, "the first 320 records in the sink", || async {
        sink_count(&sink).await == 320
    })
    .await;
    wait_for(10, "both instances to share the partitions", || async {
        let owners = store.owners().await.unwrap();
        ["consumer-a", "consumer-b"]
            .iter()
            .all(|i| owners.iter().any(|(_, o)| o.as_deref() == Some(*i)))
    })
    .await;

    proxy.cut();
    for d in devices {
        publish(&hub, &reg, d, 41, &batch(d, 41, 40)).await;
    }
    wait_for(30, "the breaker to open", || async {
        matches!(
            store.breaker().await.unwrap().state,
            State::Open { .. } | State::HalfOpen { .. }
        )
    })
    .await;
    for r in [&a, &b] {
        let http = r.http.clone();
        wait_for(10, "every instance to see the breaker open", || {
            let url = format!("{http}/v1/consumer");
            async move { get_json(url).await["instance"]["breaker"] != "closed" }
        })
        .await;
        let metrics = reqwest::get(format!("{}/metrics", r.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics
                .contains("fleet_consumer_breaker_transitions_total{group=\"sink\",to=\"open\"}"),
            "{}: transitions on /metrics:\n{metrics}",
            r.node.label
        );
    }
    // While it is open nothing advances: the checkpoints stay at the 320
    // records the sink holds.
    let sum = |cps: Vec<(PartitionId, Checkpoint)>| cps.iter().map(|(_, c)| c.next.0).sum::<u64>();
    assert_eq!(sum(store.checkpoints().await.unwrap()), 320);
    // Wait for probes to have run against the dead sink (each one moves the
    // breaker to half-open and back), not for a while.
    let opened = store.breaker().await.unwrap().generation;
    wait_for(30, "two failed probes", || async {
        store.breaker().await.unwrap().generation >= opened + 4
    })
    .await;
    assert_eq!(
        sum(store.checkpoints().await.unwrap()),
        320,
        "no checkpoint moved while the sink was down"
    );
    assert_eq!(sink_count(&sink).await, 320);
    assert!(
        store.dead_letters(false, 10).await.unwrap().is_empty(),
        "an outage dead-letters nothing"
    );

    proxy.heal();
    wait_for(40, "the probe to close the breaker", || async {
        store.breaker().await.unwrap().state == State::Closed
    })
    .await;
    wait_for(30, "all 640 records in the sink", || async {
        sink_count(&sink).await == 640
    })
    .await;
    wait_for(10, "checkpoints at the high watermarks", || async {
        sum(store.checkpoints().await.unwrap()) == 640
    })
    .await;
    assert_eq!(
        distinct_messages(sink_db.url()).await,
        (640, 640),
        "complete, no duplicates"
    );
    assert!(
        sink_messages(sink_db.url()).await == published(&devices, 80),
        "the sink holds exactly what was published, byte for byte"
    );
    for r in [&a, &b] {
        let v = get_json(format!("{}/v1/consumer", r.http)).await;
        assert_eq!(v["instance"]["breaker"], "closed", "{v}");
        assert_eq!(v["group"]["dead_letters_pending"], 0);
    }
    // Manual open/close over HTTP needs the admin token.
    let client = reqwest::Client::new();
    let anon = client
        .post(format!("{}/v1/breaker/open", a.http))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let opened = client
        .post(format!("{}/v1/breaker/open", a.http))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), 200);
    assert!(matches!(
        store.breaker().await.unwrap().state,
        State::Open { manual: true, .. }
    ));
    for r in [&a, &b] {
        let http = r.http.clone();
        wait_for(10, "every instance to see the manual open", || {
            let url = format!("{http}/v1/consumer");
            async move { get_json(url).await["instance"]["breaker"] == "open" }
        })
        .await;
    }
    publish(&hub, &reg, "d1", 81, &batch("d1", 81, 5)).await;
    // Past its cool-down (and more), a manual open has not moved: not one
    // transition since (no probe), nothing delivered.
    let held = store.breaker().await.unwrap();
    let State::Open { since_ms, .. } = held.state else {
        panic!("{held:?}")
    };
    wait_for(30, "the cool-down to pass twice over", || async {
        registry_sync::hlc::wall_ms() > since_ms + 2 * 2_000 + 500
    })
    .await;
    assert_eq!(
        store.breaker().await.unwrap().generation,
        held.generation,
        "a manually opened breaker was probed"
    );
    assert_eq!(
        sink_count(&sink).await,
        640,
        "a manually opened breaker holds past its cool-down"
    );
    let closed = client
        .post(format!("{}/v1/breaker/close", b.http))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 200);
    wait_for(20, "processing to resume after a manual close", || async {
        sink_count(&sink).await == 645
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_runner_gives_its_partitions_back_at_once() {
    let h = harness!("a_stopped_runner_gives_its_partitions_back_at_once");
    let (hub, _reg) = hub_with(&h, &["d1"]).await;
    let store_url = sqlite_url(&h, "consumer.db");
    let sink_url = sqlite_url(&h, "sink.db");
    // Leases that would outlive the test: only an explicit release frees them.
    let mut a = runner(
        &h,
        "consumer-a",
        &hub,
        &store_url,
        &sink_url,
        &["--lease-ttl-ms", "600000"],
    );
    let store = ConsumerStore::open(&store_url, "sink").await.unwrap();
    wait_for(10, "instance a to hold every partition", || async {
        store
            .owners()
            .await
            .unwrap()
            .iter()
            .all(|(_, o)| o.is_some())
    })
    .await;
    // A client keeps a connection to the runner's HTTP API open meanwhile.
    let http = reqwest::Client::new();
    let status = http
        .get(format!("{}/v1/consumer", a.http))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    let exit = a.node.terminate();
    assert!(exit.success(), "runner exited with {exit}");
    let owners = store.owners().await.unwrap();
    assert!(
        owners.iter().all(|(_, o)| o.is_none()),
        "leases still held after a clean stop: {owners:?}"
    );
    drop(http);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_is_replaced_from_its_checkpoints() {
    let h = harness!("a_killed_instance_is_replaced_from_its_checkpoints");
    let devices = ["d1", "d2", "d3", "d4", "d5", "d6"];
    let (hub, reg) = hub_with(&h, &devices).await;
    let store_url = sqlite_url(&h, "consumer.db");
    let sink_url = sqlite_url(&h, "sink.db");
    let mut a = runner(&h, "consumer-a", &hub, &store_url, &sink_url, &[]);
    let store = ConsumerStore::open(&store_url, "sink").await.unwrap();
    wait_for(10, "instance a to hold every partition", || async {
        store
            .owners()
            .await
            .unwrap()
            .iter()
            .filter(|(_, o)| o.is_some())
            .count()
            == 8
    })
    .await;
    let b = runner(&h, "consumer-b", &hub, &store_url, &sink_url, &[]);
    wait_for(15, "a fair share for each instance", || async {
        let owners = store.owners().await.unwrap();
        let of = |i: &str| {
            owners
                .iter()
                .filter(|(_, o)| o.as_deref() == Some(i))
                .count()
        };
        of("consumer-a") == 4 && of("consumer-b") == 4
    })
    .await;
    for d in devices {
        publish(&hub, &reg, d, 1, &batch(d, 1, 50)).await;
    }
    let sink = SqlSink::open(&sink_url, "telemetry").await.unwrap();
    wait_for(30, "300 records in the sink", || async {
        sink_count(&sink).await == 300
    })
    .await;
    let owners = store.owners().await.unwrap();
    let of_a: Vec<PartitionId> = owners
        .iter()
        .filter(|(_, o)| o.as_deref() == Some("consumer-a"))
        .map(|(p, _)| *p)
        .collect();
    a.node.kill9();
    for d in devices {
        publish(&hub, &reg, d, 51, &batch(d, 51, 50)).await;
    }
    wait_for(30, "instance b to take every partition", || async {
        store
            .owners()
            .await
            .unwrap()
            .iter()
            .all(|(_, o)| o.as_deref() == Some("consumer-b"))
    })
    .await;
    wait_for(30, "600 records in the sink", || async {
        sink_count(&sink).await == 600
    })
    .await;
    let hw = high_watermarks(&hub).await;
    wait_for(10, "checkpoints at the high watermarks", || async {
        checkpoints_at(&store, &hw).await
    })
    .await;
    assert!(!of_a.is_empty());
    assert_eq!(distinct_messages(&sink_url).await, (600, 600));
    assert!(
        sink_messages(&sink_url).await == published(&devices, 100),
        "the sink holds exactly what was published, byte for byte"
    );
    let v = get_json(format!("{}/v1/consumer", b.http)).await;
    assert_eq!(
        v["instance"]["partitions"].as_array().unwrap().len(),
        8,
        "{v}"
    );
}

// ------------------------------------------------------ operator commands

/// Rejects records whose payload starts with `bad`, like a strict sink would.
struct Strict(SqlSink);

#[async_trait::async_trait]
impl Handler for Strict {
    async fn handle(&self, batch: &[WireRecord]) -> Result<(), HandlerError> {
        if let Some(r) = batch.iter().find(|r| r.payload.starts_with(b"bad")) {
            return Err(HandlerError::Record(format!(
                "unparsable payload at offset {}",
                r.offset
            )));
        }
        self.0.handle(batch).await
    }
}

fn cli(h: &Harness, label: &str, args: &[&str]) -> (bool, String, String) {
    let out = h
        .command(
            label,
            &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run fleet-node");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_and_replayed_and_the_breaker_is_operated_from_the_cli() {
    let h =
        harness!("dead_letters_are_listed_and_replayed_and_the_breaker_is_operated_from_the_cli");
    let (hub, reg) = hub_with(&h, &["d1"]).await;
    let payloads: Vec<String> = (1..=20)
        .map(|i| {
            if i % 5 == 0 {
                format!("bad-{i}")
            } else {
                format!("good-{i}")
            }
        })
        .collect();
    publish(&hub, &reg, "d1", 1, &payloads).await;
    let store_url = sqlite_url(&h, "consumer.db");
    let sink_url = sqlite_url(&h, "sink.db");
    let sink = SqlSink::open(&sink_url, "telemetry").await.unwrap();
    let consumer = Consumer::start(
        fast(ConsumerConfig::new("strict", vec![hub.url()], &store_url)),
        Arc::new(Strict(sink.clone())),
    )
    .await
    .unwrap();
    let store = ConsumerStore::open(&store_url, "strict").await.unwrap();
    wait_for(30, "four dead letters and 16 rows", || async {
        store.dead_letters(true, 100).await.unwrap().len() == 4 && sink_count(&sink).await == 16
    })
    .await;
    consumer.shutdown().await;

    let group = ["--group", "strict", "--store", &store_url];
    let mut list = vec!["consume", "--json", "dead-letters", "list"];
    list.extend_from_slice(&group);
    let (ok, out, err) = cli(&h, "list", &list);
    assert!(ok, "{err}");
    let letters: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 4, "{out}");
    assert_eq!(letters[0]["attempts"], 3);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unparsable payload")
    );
    assert_eq!(letters[0]["record"]["mid"], 5);

    // Replaying into the plain sink (which accepts them) completes the table.
    let mut replay = vec![
        "consume",
        "--json",
        "dead-letters",
        "replay",
        "--sink",
        &sink_url,
    ];
    replay.extend_from_slice(&group);
    let (ok, out, err) = cli(&h, "replay", &replay);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!({"replayed": 4, "failed": 0})
    );
    assert_eq!(sink_count(&sink).await, 20);
    let (_, out, _) = cli(&h, "list-again", &list);
    assert!(out.trim().is_empty(), "nothing pending: {out}");
    list.push("--all");
    let (_, out, _) = cli(&h, "list-all", &list);
    assert_eq!(out.lines().count(), 4);

    // Breaker by hand, and status.
    let mut open = vec!["consume", "--json", "breaker"];
    open.extend_from_slice(&group);
    open.push("open");
    let (ok, out, err) = cli(&h, "open", &open);
    assert!(ok, "{err}");
    assert!(out.contains("\"open\""), "{out}");
    assert!(matches!(
        store.breaker().await.unwrap().state,
        State::Open { manual: true, .. }
    ));
    let mut status = vec!["consume", "--json", "status"];
    status.extend_from_slice(&group);
    let (ok, out, _) = cli(&h, "status", &status);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["breaker"], "open");
    assert_eq!(v["dead_letters_pending"], 0);
    assert_eq!(
        v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["checkpoint"].as_u64().unwrap())
            .sum::<u64>(),
        20
    );
    *open.last_mut().unwrap() = "close";
    let (ok, _, _) = cli(&h, "close", &open);
    assert!(ok);
    assert_eq!(store.breaker().await.unwrap().state, State::Closed);

    // Bad input: one clear line, non-zero exit.
    let (ok, _, err) = cli(
        &h,
        "bad-store",
        &["consume", "status", "--group", "g", "--store", "mysql://x"],
    );
    assert!(!ok);
    assert!(err.contains("unsupported store URL"), "{err}");
    let (ok, _, err) = cli(
        &h,
        "no-hub",
        &[
            "consume", "run", "--group", "g", "--store", &store_url, "--sink", &sink_url,
        ],
    );
    assert!(!ok);
    assert!(err.contains("--hub is required"), "{err}");
}

// ------------------------------------------------------------ failover

/// Remembers what the sink accepted (to prove which records were re-read).
struct Recording {
    sink: SqlSink,
    seen: Mutex<Vec<WireRecord>>,
}

#[async_trait::async_trait]
impl Handler for Recording {
    async fn handle(&self, batch: &[WireRecord]) -> Result<(), HandlerError> {
        self.sink.handle(batch).await?;
        self.seen.lock().unwrap().extend(batch.iter().cloned());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_forced_failover_the_consumer_rewinds_to_where_the_regions_agree() {
    let h = harness!("after_a_forced_failover_the_consumer_rewinds_to_where_the_regions_agree");
    let devices = ["d1", "d2", "d3", "d4"];
    let mut ra = Registry::sqlite(h.dir(), "a").await;
    ra.add(&devices).await;
    let mut rb = Registry::sqlite(h.dir(), "b").await;
    ra.mirror_into(&mut rb).await;
    // The secondary pulls through a proxy: cutting it stops replication.
    let http_a = tests::reserve_port();
    let to_a = Proxy::start(http_a.parse().unwrap()).await;
    let b = h.hub(
        "hub-b",
        "b",
        &rb.url,
        &["--peer", &to_a.url(), "--role", "secondary"],
    );
    let a = h.hub(
        "hub-a",
        "a",
        &ra.url,
        &["--http", &http_a, "--peer", &b.url(), "--role", "primary"],
    );
    let sink_url = sqlite_url(&h, "sink.db");
    let store_url = sqlite_url(&h, "consumer.db");
    let handler = Arc::new(Recording {
        sink: SqlSink::open(&sink_url, "telemetry").await.unwrap(),
        seen: Mutex::new(Vec::new()),
    });
    // A consumer that reads the committed log (not only the replicated
    // prefix, the default) can handle records a forced failover takes back.
    let mut config = fast(ConsumerConfig::new(
        "failover",
        vec![a.url(), b.url()],
        &store_url,
    ));
    config.upto = fleet_api::hub::ReadUpto::Committed;
    let consumer = Consumer::start(config, handler.clone()).await.unwrap();
    let store = ConsumerStore::open(&store_url, "failover").await.unwrap();
    let done = |n: u64| {
        let store = store.clone();
        async move {
            store
                .checkpoints()
                .await
                .unwrap()
                .iter()
                .map(|(_, c)| c.next.0)
                .sum::<u64>()
                == n
        }
    };
    for d in devices {
        publish(&a, &ra, d, 1, &batch(d, 1, 20)).await;
    }
    wait_for(20, "the secondary to hold the first 80", || async {
        high_watermarks(&b).await.iter().sum::<u64>() == 80
    })
    .await;
    wait_for(20, "the consumer to process 80", || done(80)).await;

    // Replication stops; the primary acknowledges 40 more, the consumer
    // processes them; then the secondary is promoted without them.
    to_a.cut();
    for d in devices {
        publish(&a, &ra, d, 21, &batch(d, 21, 10)).await;
    }
    wait_for(20, "the consumer to process 120", || done(120)).await;
    let promoted = reqwest::Client::new()
        .post(format!("{}/v1/promote", b.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"expected_epoch": 1, "mode": "forced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(promoted.status(), 200, "{}", promoted.text().await.unwrap());
    // Devices continue on the new primary (mids 21..30 were acknowledged by
    // the old one): b writes other records at the offsets a used.
    for d in devices {
        publish(&b, &rb, d, 31, &batch(d, 31, 15)).await;
    }
    let hw_b = high_watermarks(&b).await;
    assert_eq!(hw_b.iter().sum::<u64>(), 140);
    wait_for(30, "the consumer to follow the new primary", || async {
        checkpoints_at(&store, &hw_b).await
    })
    .await;
    // Everything any region acknowledged is in the sink: the first 80, the
    // 40 only the old primary had, and all 60 of the new primary, including
    // those written at offsets the consumer had already passed on a.
    assert_eq!(distinct_messages(&sink_url).await, (180, 180));
    let seen = handler.seen.lock().unwrap().clone();
    let new_epoch = seen.iter().filter(|r| r.epoch.0 == 2).count();
    assert_eq!(new_epoch, 60, "every record of the new epoch was delivered");
    assert!(consumer.status().rewinds > 0, "{:?}", consumer.status());
    consumer.shutdown().await;
}
