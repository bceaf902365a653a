//! Several hubs in one region on one R3 JetStream log (three real
//! nats-server processes): the region's partitions are divided among the
//! hubs by lease, the concierge sends each device to its partition's hub,
//! and a hub killed with SIGKILL moves its devices to the other hub with
//! nothing lost, nothing stored twice, and no regional failover.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fleet_api::hub::StatusResponse;
use fleet_api::local::NatsCluster;
use fleet_api::{DeviceId, PartitionId, partition_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::durability::payload_of;
use tests::mqtt::RawClient;
use tests::{HubNode, Registry, harness};

const PARTITIONS: u32 = 8;

async fn status(hub: &HubNode) -> StatusResponse {
    let url = format!("{}/v1/status", hub.url());
    reqwest::get(&url).await.unwrap().json().await.unwrap()
}

fn owned(s: &StatusResponse) -> Vec<u32> {
    let mut o: Vec<u32> = s
        .owned
        .as_ref()
        .expect("a hub of several reports what it owns")
        .iter()
        .map(|p| p.0)
        .collect();
    o.sort_unstable();
    o
}

/// Waits until the hubs' owned partitions are disjoint and cover all.
async fn until_divided(hubs: &[&HubNode]) -> Vec<Vec<u32>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = Vec::new();
        for h in hubs {
            all.push(owned(&status(h).await));
        }
        let mut union: Vec<u32> = all.iter().flatten().copied().collect();
        union.sort_unstable();
        if union == (0..PARTITIONS).collect::<Vec<_>>() && all.iter().all(|o| !o.is_empty()) {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partitions were never divided: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn hub_args<'a>(url: &'a str, id: &'a str) -> Vec<&'a str> {
    vec!["--log", url, "--hub-id", id, "--lease-ttl-ms", "1000"]
}

/// What a record's payload is, to check it is the one sent under its mid.
#[derive(Clone, Copy)]
enum Bytes {
    /// [`payload_of`].
    Raw,
    /// `device-agent simulate`'s JSON, whose `seq` is the mid.
    Simulated,
}

/// Every record of the log, per device: the mids in log order.
async fn stored_mids(hub: &HubNode, bytes: Bytes) -> HashMap<String, Vec<u64>> {
    let client = hub.client();
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for p in 0..PARTITIONS {
        let records = client
            .committed_records(PartitionId(p))
            .await
            .expect("read records");
        for r in records {
            let mid = r.mid.map_or(0, |m| m.0);
            let own_bytes = match bytes {
                Bytes::Raw => r.payload == payload_of(r.device_id.as_str(), mid),
                Bytes::Simulated => {
                    String::from_utf8_lossy(&r.payload).contains(&format!("\"seq\":{mid},"))
                }
            };
            assert!(
                own_bytes,
                "{} mid {mid}: stored bytes are not the ones sent",
                r.device_id
            );
            out.entry(r.device_id.to_string())
                .or_default()
                .push(r.mid.map_or(0, |m| m.0));
        }
    }
    out
}

/// `device-agent simulate` ended with every message acknowledged and
/// nothing left or dropped; its summary.
fn all_acknowledged(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["in_outbox"], 0, "{summary}");
    assert_eq!(summary["dropped"], 0, "{summary}");
    assert_eq!(summary["acknowledged"], summary["generated"], "{summary}");
    summary
}

/// `hub`'s log holds every message the simulation generated, once, in
/// order: mids are dense from 1 per device, so the count is the highest
/// mid and there is no hole.
async fn all_stored(hub: &HubNode, summary: &serde_json::Value) -> HashMap<String, Vec<u64>> {
    let stored = stored_mids(hub, Bytes::Simulated).await;
    assert_once_in_order(&stored);
    let total: usize = stored.values().map(Vec::len).sum();
    assert_eq!(
        total as u64,
        summary["generated"].as_u64().unwrap(),
        "stored records"
    );
    for (device, mids) in &stored {
        assert_eq!(
            mids.last().copied(),
            Some(mids.len() as u64),
            "{device}: a hole"
        );
    }
    stored
}

/// Each device's mids are stored once each, in order.
fn assert_once_in_order(stored: &HashMap<String, Vec<u64>>) {
    for (device, mids) in stored {
        for w in mids.windows(2) {
            assert!(
                w[0] < w[1],
                "{device}: mid {} stored after {} (twice or out of order)",
                w[1],
                w[0]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_in_a_region_one_killed_loses_nothing_and_fails_nothing_over() {
    let h = harness!("two_hubs_in_a_region_one_killed_loses_nothing_and_fails_nothing_over");
    let cluster = NatsCluster::start(&h.dir().join("nats"), "js", 3)
        .await
        .unwrap();
    let ids: Vec<String> = (0..32).map(|i| format!("dev-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&refs).await;
    let url = cluster.log_url("eu");
    let mut a = h.hub("hub-a", "eu", &reg.url, &hub_args(&url, "a"));
    let b = h.hub("hub-b", "eu", &reg.url, &hub_args(&url, "b"));
    let divided = until_divided(&[&a, &b]).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &a), ("eu", &b)], &[]);
    let keys = h.keys_file(&reg, &ids);
    let report = h.dir().join("report.ndjson");
    let args = h.simulate_args(&c, &keys, &report, "20", "10", &[]);
    let sim = tokio::task::spawn_blocking({
        let mut cmd = h.command("simulate", &args);
        move || cmd.output()
    });
    // Both hubs serve devices (the concierge spreads them), then one dies.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (sa, sb) = (status(&a).await, status(&b).await);
        if sa.connected_devices > 0 && sb.connected_devices > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "devices never reached both hubs ({divided:?}): {} and {}",
            sa.connected_devices,
            sb.connected_devices
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.node.kill9();
    let summary = all_acknowledged(sim.await.unwrap().unwrap());

    // The surviving hub took every partition, in the same region and epoch.
    let sb = status(&b).await;
    assert_eq!(owned(&sb), (0..PARTITIONS).collect::<Vec<_>>());
    assert_eq!(sb.epoch.0, 1, "no regional failover");
    assert_eq!(sb.role, fleet_api::Role::Primary);
    let stored = all_stored(&b, &summary).await;
    assert_eq!(stored.len(), ids.len());
}

/// Two hubs of region eu sharing a fresh R3 log, with the partitions
/// divided, and a registered device whose partition hub a writes.
struct Pair {
    _cluster: NatsCluster,
    reg: Registry,
    a: HubNode,
    b: HubNode,
    device: String,
}

impl Pair {
    async fn start(h: &tests::Harness, prefix: &str) -> Pair {
        let cluster = NatsCluster::start(&h.dir().join("nats"), "js", 3)
            .await
            .unwrap();
        let ids: Vec<String> = (0..16).map(|i| format!("{prefix}-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut reg = Registry::sqlite(h.dir(), "eu").await;
        reg.add(&refs).await;
        let url = cluster.log_url("eu");
        let a = h.hub("hub-a", "eu", &reg.url, &hub_args(&url, "a"));
        let b = h.hub("hub-b", "eu", &reg.url, &hub_args(&url, "b"));
        let divided = until_divided(&[&a, &b]).await;
        let device = ids
            .into_iter()
            .find(|d| {
                let p = partition_for(&DeviceId::new(d.as_str()).unwrap(), PARTITIONS);
                divided[0].contains(&p.0)
            })
            .expect("a device of hub a");
        Pair {
            _cluster: cluster,
            reg,
            a,
            b,
            device,
        }
    }
}

/// A connection of the [`Flapper`]: to which hub, and what is in flight.
struct Conn {
    hub: std::net::SocketAddr,
    c: RawClient,
    by_pkid: HashMap<u16, u64>,
    pkid: u16,
}

/// One device publishing with 64 in flight, resending what was not
/// acknowledged whenever it (re)connects, as the agent does.
struct Flapper {
    device: String,
    key: String,
    next_mid: u64,
    unacked: BTreeMap<u64, ()>,
    acked: Vec<u64>,
    conn: Option<Conn>,
}

impl Flapper {
    fn new(reg: &Registry, device: &str) -> Flapper {
        Flapper {
            key: reg.key(device),
            device: device.to_string(),
            next_mid: 1,
            unacked: BTreeMap::new(),
            acked: Vec::new(),
            conn: None,
        }
    }

    /// Publishes on its connection to `hub` (connecting first, retrying
    /// while the hub refuses: the partition is not there yet) until
    /// `target` are acknowledged in all, then sends `send_only` more
    /// without waiting. `false`: the connection broke first.
    async fn run(&mut self, hub: &HubNode, target: usize, send_only: usize) -> bool {
        if self.conn.as_ref().is_none_or(|c| c.hub != hub.mqtt) {
            self.conn = Some(self.connect(hub).await);
        }
        let mut conn = self.conn.take().expect("connected");
        loop {
            if self.acked.len() >= target {
                for _ in 0..send_only {
                    let mid = self.next_mid;
                    self.next_mid += 1;
                    self.unacked.insert(mid, ());
                    self.publish(&mut conn, mid).await;
                }
                self.conn = Some(conn);
                return true;
            }
            while conn.by_pkid.len() < 64 {
                let mid = self.next_mid;
                self.next_mid += 1;
                self.unacked.insert(mid, ());
                self.publish(&mut conn, mid).await;
            }
            match conn.c.recv(Duration::from_secs(30)).await {
                Ok(Packet::PubAck(ack)) => {
                    if let Some(mid) = conn.by_pkid.remove(&ack.pkid) {
                        self.unacked.remove(&mid);
                        self.acked.push(mid);
                    }
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// [`Flapper::run`] until `target`, connecting again (after a pause,
    /// as a device backs off) whenever the connection breaks: right after
    /// a partition moved, a hub may still take the device before it learns
    /// that its view is stale; its append then fails unacknowledged.
    async fn settle(&mut self, hub: &HubNode, target: usize) {
        let mut tries = 0;
        while !self.run(hub, target, 0).await {
            tries += 1;
            assert!(
                tries < 50,
                "{} never got through to {}",
                self.device,
                hub.mqtt
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn connect(&self, hub: &HubNode) -> Conn {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let c = loop {
            let (c, code) =
                RawClient::connect(hub.mqtt, &self.device, Some((&self.device, &self.key))).await;
            if code == Some(ConnectReturnCode::Success) {
                break c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never taken at {}: {code:?}",
                self.device,
                hub.mqtt
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut conn = Conn {
            hub: hub.mqtt,
            c,
            by_pkid: HashMap::new(),
            pkid: 0,
        };
        // What was not acknowledged goes again first, in mid order.
        let resend: Vec<u64> = self.unacked.keys().copied().collect();
        for mid in resend {
            self.publish(&mut conn, mid).await;
        }
        conn
    }

    async fn publish(&self, conn: &mut Conn, mid: u64) {
        conn.pkid = conn.pkid % 60_000 + 1;
        conn.by_pkid.insert(conn.pkid, mid);
        let topic = format!("devices/{}/messages/events/{mid}", self.device);
        conn.c
            .publish(
                &topic,
                QoS::AtLeastOnce,
                conn.pkid,
                &payload_of(&self.device, mid),
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moved_between_two_hubs_both_ways_keeps_order_and_dedup() {
    let h = harness!("a_device_moved_between_two_hubs_both_ways_keeps_order_and_dedup");
    let Pair {
        _cluster,
        reg,
        mut a,
        b,
        device,
    } = Pair::start(&h, "flap").await;
    let mut f = Flapper::new(&reg, &device);
    // On a, with 64 more in flight when a is killed.
    assert!(f.run(&a, 300, 64).await);
    a.node.kill9();
    // b takes the partition over; the device resends what is in flight.
    f.settle(&b, 600).await;
    // a comes back (same id): the partition returns to it, which closes
    // the device's connection to b while publishes are in flight.
    a.restart(&h);
    let moved_back = !f.run(&b, usize::MAX, 0).await;
    assert!(moved_back, "the connection to b was never closed");
    f.settle(&a, 900).await;
    // And once more to b, a killed again mid-stream.
    assert!(f.run(&a, 1000, 64).await);
    a.node.kill9();
    f.settle(&b, 1200).await;

    // Resends of what a had stored were recognised, not stored again.
    assert!(b.metric("fleet_hub_duplicates_total").await > 0.0);
    let stored = stored_mids(&b, Bytes::Raw).await;
    assert_once_in_order(&stored);
    let mids = &stored[&device];
    for m in &f.acked {
        assert!(
            mids.binary_search(m).is_ok(),
            "{device}: mid {m} acknowledged, not stored"
        );
    }
    assert!(
        mids.last().copied() < Some(f.next_mid),
        "a mid never sent was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_hub_that_resumes_after_a_takeover_stores_nothing_twice() {
    let h = harness!("a_paused_hub_that_resumes_after_a_takeover_stores_nothing_twice");
    let Pair {
        _cluster,
        reg,
        a,
        b,
        device,
    } = Pair::start(&h, "pause").await;
    let mut f = Flapper::new(&reg, &device);
    assert!(f.run(&a, 300, 64).await);
    // a stops (a long GC pause, a stopped VM) with publishes in flight,
    // and is taken for dead: b takes its partitions over.
    let pid = a.node.pid().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(stop.success());
    f.settle(&b, 700).await;
    // a resumes believing it still writes its partitions: whatever it
    // still tries to store must not land beside b's records.
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert!(cont.success());
    // a is live again and gets its partitions back (the device is moved
    // off b with publishes in flight), then the device goes on at a.
    let moved_back = !f.run(&b, usize::MAX, 0).await;
    assert!(moved_back, "the connection to b was never closed");
    // The resumed a may still take the device before it learns that its
    // view is stale: its first append then fails (the stream moved), the
    // device is not acknowledged and connects again, as a device does.
    f.settle(&a, 1100).await;

    // A hub's view of a partition it just got back may lag the log for a
    // moment (it is reloaded from the servers); what was acknowledged must
    // become readable, so the read is repeated until it covers the acked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let stored = stored_mids(&a, Bytes::Raw).await;
        let covered = stored
            .get(&device)
            .is_some_and(|m| f.acked.iter().all(|x| m.binary_search(x).is_ok()));
        if covered || tokio::time::Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_once_in_order(&stored);
    let mids = &stored[&device];
    for m in &f.acked {
        assert!(
            mids.binary_search(m).is_ok(),
            "{device}: mid {m} acknowledged, not stored; stored around it: {:?}; acked around it: {:?}",
            &mids[mids.partition_point(|x| x < m).saturating_sub(5)
                ..(mids.partition_point(|x| x < m) + 5).min(mids.len())],
            f.acked
                .iter()
                .position(|x| x == m)
                .map(|at| &f.acked[at.saturating_sub(5)..(at + 5).min(f.acked.len())])
        );
    }
    let sa = status(&a).await;
    assert_eq!(sa.epoch.0, 1);
    let p = partition_for(&DeviceId::new(device.as_str()).unwrap(), PARTITIONS);
    assert!(
        owned(&sa).contains(&p.0),
        "a writes the device's partition again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_id_settings_that_cannot_work_are_refused_with_one_clear_line() {
    let h = harness!("hub_id_settings_that_cannot_work_are_refused_with_one_clear_line");
    let reg = Registry::sqlite(h.dir(), "eu").await;
    let data = h.dir().join("data").display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "hub",
            "run",
            "--region",
            "eu",
            "--data",
            &data,
            "--registry",
            &reg.url,
            "--mqtt",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--admin-token",
            tests::ADMIN_TOKEN,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let nats = "nats://127.0.0.1:4222/eu";
    for (i, (extra, says)) in [
        (
            vec!["--hub-id", "a"],
            "--hub-id applies only with --log nats://",
        ),
        (vec!["--log", nats, "--hub-id", "a.b"], "invalid --hub-id"),
        (
            vec![
                "--log",
                nats,
                "--hub-id",
                "a",
                "--peer",
                "http://127.0.0.1:1,http://127.0.0.1:1/",
                "--peer-token",
                "peer-token-0123456789",
            ],
            "--peer http://127.0.0.1:1 is given twice",
        ),
        (
            vec!["--log", nats, "--hub-id", "a", "--lease-ttl-ms", "5"],
            "--lease-ttl-ms must be between",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let label = format!("hub-{i}");
        let out = h.command(&label, &base(&extra)).output().unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        let err =
            std::fs::read_to_string(h.logs().join(format!("{label}.log"))).unwrap_or_default();
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_learns_the_highest_mid_behind_a_plain_publish() {
    let h = harness!("a_takeover_learns_the_highest_mid_behind_a_plain_publish");
    let Pair {
        _cluster,
        reg,
        mut a,
        b,
        device,
    } = Pair::start(&h, "mixed").await;
    let key = reg.key(&device);
    // Numbered 1..=20, then one plain publish (no mid) last.
    let (mut c, code) = RawClient::connect(a.mqtt, &device, Some((&device, &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    for mid in 1..=20u64 {
        let topic = format!("devices/{device}/messages/events/{mid}");
        c.publish(
            &topic,
            QoS::AtLeastOnce,
            mid as u16,
            &payload_of(&device, mid),
        )
        .await;
        assert!(matches!(
            c.recv(Duration::from_secs(30)).await,
            Ok(Packet::PubAck(_))
        ));
    }
    let plain = format!("devices/{device}/messages/events");
    c.publish(&plain, QoS::AtLeastOnce, 100, &payload_of(&device, 0))
        .await;
    assert!(matches!(
        c.recv(Duration::from_secs(30)).await,
        Ok(Packet::PubAck(_))
    ));
    a.node.kill9();
    // At b, after the takeover: resends of 19 and 20 are duplicates, 21 new.
    let mut f = Flapper::new(&reg, &device);
    f.next_mid = 21;
    f.unacked = [(19, ()), (20, ())].into_iter().collect();
    assert!(f.run(&b, 3, 0).await);
    assert!(b.metric("fleet_hub_duplicates_total").await >= 2.0);
    let stored = stored_mids(&b, Bytes::Raw).await;
    let mids = &stored[&device];
    let rest = mids.len() - 21;
    assert_eq!(
        mids[..],
        (1..=20)
            .chain([0])
            .chain(21..21 + rest as u64)
            .collect::<Vec<u64>>()[..],
        "each mid once, in order (0: the plain publish)"
    );
}

/// Region eu (two hubs, primary) replicates synchronously to region us (two
/// hubs, each on its own R3 log): every partition is pulled by the us hub
/// that writes it, from the eu hub that writes it. One us hub is killed with
/// SIGKILL under load: the other takes its partitions, and with them their
/// pulls, so every publish is still acknowledged (sync: only once both
/// regions hold it), nothing is lost, and us holds every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_hub_killed_under_sync_load_hands_its_pulls_over() {
    let h = harness!("a_secondary_hub_killed_under_sync_load_hands_its_pulls_over");
    let eu_log = NatsCluster::start(&h.dir().join("nats-eu"), "eu", 3)
        .await
        .unwrap();
    let us_log = NatsCluster::start(&h.dir().join("nats-us"), "us", 3)
        .await
        .unwrap();
    let ids: Vec<String> = (0..16).map(|i| format!("dev-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&refs).await;
    let us_reg = Registry::sqlite(h.dir(), "us").await;
    let ports: Vec<String> = (0..4)
        .map(|_| fleet::up::reserve([127, 0, 0, 1]).unwrap().to_string())
        .collect();
    let peers = |i: usize| format!("http://{},http://{}", ports[i], ports[i + 1]);
    let (eu_peers, us_peers) = (peers(2), peers(0));
    let (eu_url, us_url) = (eu_log.log_url("eu"), us_log.log_url("us"));
    let hub = |label: &str,
               region: &str,
               reg: &str,
               url: &str,
               id: &str,
               port: &str,
               peers: &str,
               role: &str| {
        let mut args = hub_args(url, id);
        args.extend([
            "--http",
            port,
            "--peer",
            peers,
            "--replication",
            "sync",
            "--role",
            role,
        ]);
        h.hub(label, region, reg, &args)
    };
    let e1 = hub(
        "eu-1", "eu", &reg.url, &eu_url, "e1", &ports[0], &eu_peers, "primary",
    );
    let e2 = hub(
        "eu-2", "eu", &reg.url, &eu_url, "e2", &ports[1], &eu_peers, "primary",
    );
    let u1 = hub(
        "us-1",
        "us",
        &us_reg.url,
        &us_url,
        "u1",
        &ports[2],
        &us_peers,
        "secondary",
    );
    let mut u2 = hub(
        "us-2",
        "us",
        &us_reg.url,
        &us_url,
        "u2",
        &ports[3],
        &us_peers,
        "secondary",
    );
    until_divided(&[&e1, &e2]).await;
    let us_divided = until_divided(&[&u1, &u2]).await;
    assert!(!us_divided[1].is_empty(), "us-2 pulls some partitions");
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &e1), ("eu", &e2)], &[]);
    let keys = h.keys_file(&reg, &ids);
    let report = h.dir().join("report.ndjson");
    let args = h.simulate_args(&c, &keys, &report, "20", "10", &[]);
    let sim = tokio::task::spawn_blocking({
        let mut cmd = h.command("simulate", &args);
        move || cmd.output()
    });
    // us-2 has pulled records of its partitions when it dies.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while status(&u2)
        .await
        .partitions
        .iter()
        .all(|p| p.high_watermark.0 == 0)
    {
        assert!(tokio::time::Instant::now() < deadline, "us-2 never pulled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    u2.node.kill9();
    let summary = all_acknowledged(sim.await.unwrap().unwrap());
    // us-1 writes (and pulls) every partition now, and holds every record
    // once, in order, with no hole.
    let s1 = status(&u1).await;
    assert_eq!(owned(&s1), (0..PARTITIONS).collect::<Vec<_>>());
    assert_eq!(s1.role, fleet_api::Role::Secondary);
    all_stored(&u1, &summary).await;
}
