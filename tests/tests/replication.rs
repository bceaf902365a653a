//! Replication between two hub processes, promotion, fencing and failback,
//! with real clients, kill -9 and a real network partition (proxies).

use std::collections::HashMap;
use std::time::Duration;

use fleet_api::hub::StatusResponse;
use fleet_api::{DeviceId, Role, partition_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::load::{admin_post as post, failback_report, registries, rows as records, status};
use tests::mqtt::RawClient;
use tests::{ADMIN_TOKEN, HubNode, Registry, harness, wait_for};

const SECS: Duration = Duration::from_secs(10);

/// Records stored in all partitions of `hub`.
async fn stored(hub: &HubNode) -> u64 {
    status(hub)
        .await
        .partitions
        .iter()
        .map(|p| p.high_watermark.0)
        .sum()
}

use tests::durability::connect;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_replication_copies_records_at_the_same_offsets_and_acks_replicated() {
    let h = harness!("async_replication_copies_records_at_the_same_offsets_and_acks_replicated");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    // The secondary refuses devices.
    let (_, code) = RawClient::connect(b.mqtt, "d1", Some(("d1", &rb.key("d1")))).await;
    assert_eq!(code, Some(ConnectReturnCode::ServiceUnavailable));
    let mut c = connect(&a, &ra, "d1").await;
    c.subscribe(1, "devices/d1/acks").await;
    for i in 1..=100u16 {
        c.publish(
            &format!("devices/d1/messages/events/{i}"),
            QoS::AtLeastOnce,
            i,
            format!("r{i}").as_bytes(),
        )
        .await;
    }
    // Acks: `replicated` reaches 100 once the secondary has everything.
    let mut replicated = 0;
    while replicated < 100 {
        match c.recv(SECS).await {
            Ok(Packet::Publish(p)) => {
                let ack: fleet_api::AckMessage = serde_json::from_slice(&p.payload).unwrap();
                assert!(ack.replicated <= ack.committed);
                replicated = ack.replicated.0;
            }
            Ok(_) => {}
            Err(e) => panic!("acks stopped at replicated={replicated}: {e:?}"),
        }
    }
    let on_a = records(&a, "d1").await;
    assert_eq!(on_a.len(), 100);
    wait_for(10, "the secondary to hold everything", || async {
        records(&b, "d1").await.len() == 100
    })
    .await;
    assert_eq!(
        records(&b, "d1").await,
        on_a,
        "same records at the same offsets"
    );
    let sa = status(&a).await;
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8).0 as usize;
    assert_eq!(sa.partitions[p].replicated, sa.partitions[p].high_watermark);
    assert_eq!(sa.replication.as_ref().unwrap().mode, "async");
    let sb = status(&b).await;
    assert_eq!((sb.role, sb.epoch.0), (Role::Secondary, 1));
    assert!(sb.peer_reachable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replication_acknowledges_only_what_both_regions_hold() {
    let h = harness!("sync_replication_acknowledges_only_what_both_regions_hold");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &["--replication", "sync"]);
    let mut c = connect(&a, &ra, "d1").await;
    c.publish("devices/d1/messages/events/1", QoS::AtLeastOnce, 1, b"one")
        .await;
    assert!(matches!(c.recv(SECS).await, Ok(Packet::PubAck(_))));
    assert_eq!(
        records(&b, "d1").await.len(),
        1,
        "PUBACK came before the secondary had it"
    );

    b.node.kill9();
    c.publish("devices/d1/messages/events/2", QoS::AtLeastOnce, 2, b"two")
        .await;
    // Whenever the PUBACK comes, the secondary must hold the record then.
    let b_client = b.client();
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8);
    let puback = tokio::spawn(async move {
        loop {
            match c.recv(Duration::from_secs(60)).await {
                Ok(Packet::PubAck(a)) if a.pkid == 2 => {
                    let held = b_client
                        .records_upto(
                            p,
                            fleet_api::Offset(0),
                            100,
                            Duration::ZERO,
                            fleet_api::hub::ReadUpto::Committed,
                        )
                        .await
                        .map(|r| r.records.iter().any(|r| r.payload == b"two"));
                    return held;
                }
                Ok(_) => {}
                Err(e) => panic!("no PUBACK for the second record: {e:?}"),
            }
        }
    });
    wait_for(10, "the primary to report the stall", || async {
        status(&a)
            .await
            .replication
            .is_some_and(|r| r.state == "stalled")
    })
    .await;
    b.restart(&h);
    assert!(
        matches!(puback.await.unwrap(), Ok(true)),
        "acknowledged before the secondary held the record"
    );
    assert_eq!(records(&b, "d1").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_needs_the_exact_epoch_and_the_epoch_cannot_wrap() {
    let h = harness!("a_promotion_needs_the_exact_epoch_and_the_epoch_cannot_wrap");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    // u64::MAX used to answer 200 with epoch 0 (the `+ 1` wrapped): two
    // primaries. Ahead or behind, a wrong expectation changes nothing.
    for expected in [u64::MAX, 0, 2, 7] {
        let r = post(
            format!("{}/v1/promote", b.url()),
            serde_json::json!({"expected_epoch": expected, "mode": "forced"}),
        )
        .await;
        assert_eq!(r.status(), 409, "expected_epoch {expected}");
    }
    let (sa, sb) = (status(&a).await, status(&b).await);
    assert_eq!((sa.role, sa.epoch.0), (Role::Primary, 1));
    assert_eq!((sb.role, sb.epoch.0), (Role::Secondary, 1));
    let r = post(
        format!("{}/v1/promote", b.url()),
        serde_json::json!({"expected_epoch": 1, "mode": "forced"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&b).await.epoch.0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_promotion_tells_connected_devices_the_new_epoch_before_closing() {
    let h = harness!("a_planned_promotion_tells_connected_devices_the_new_epoch_before_closing");
    let (ra, rb) = registries(&h, &["d1", "d2"]).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    // d1 listens to its acks and has published (its committed mid is
    // known); d2 has not subscribed: it only sees the connection close.
    let mut c = connect(&a, &ra, "d1").await;
    c.subscribe(1, "devices/d1/acks").await;
    c.publish("devices/d1/messages/events/1", QoS::AtLeastOnce, 1, b"one")
        .await;
    let mut acks = Vec::new();
    while !acks
        .iter()
        .any(|a: &fleet_api::AckMessage| a.replicated.0 == 1)
    {
        match c.recv(SECS).await {
            Ok(Packet::Publish(p)) => acks.push(serde_json::from_slice(&p.payload).unwrap()),
            Ok(_) => {}
            Err(e) => panic!("no replicated ack: {e:?}"),
        }
    }
    let mut quiet = connect(&a, &ra, "d2").await;
    let r = post(
        format!("{}/v1/promote", b.url()),
        serde_json::json!({"expected_epoch": 1, "mode": "planned"}),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // Before the connection closes, d1 is told the epoch of the hub taking
    // over, repeating what it was already told and claiming nothing more.
    let mut hint = None;
    loop {
        match c.recv(SECS).await {
            Ok(Packet::Publish(p)) => {
                let ack: fleet_api::AckMessage = serde_json::from_slice(&p.payload).unwrap();
                if ack.epoch.0 == 2 {
                    hint = Some(ack);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let hint = hint.expect("no ack with the new epoch before the connection closed");
    assert_eq!((hint.committed.0, hint.replicated.0), (1, 1));
    assert!(quiet.closed_within(SECS).await);
    assert_eq!(status(&b).await.epoch.0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_promotions_racing_have_one_winner() {
    let h = harness!("two_promotions_racing_have_one_winner");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    let c1 = h.concierge("concierge-1", "127.0.0.1:0", &[("a", &a), ("b", &b)], &[]);
    let c2 = h.concierge("concierge-2", "127.0.0.1:0", &[("a", &a), ("b", &b)], &[]);
    for c in [&c1, &c2] {
        wait_for(10, "the concierge to see both hubs", || async {
            let r: fleet_api::concierge::RegionsResponse =
                reqwest::get(format!("{}/v1/regions", c.url()))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
            r.regions.iter().all(|v| v.healthy)
        })
        .await;
    }
    let body = serde_json::json!({"to": "b", "mode": "forced"});
    let (r1, r2) = tokio::join!(
        post(format!("{}/v1/failover", c1.url()), body.clone()),
        post(format!("{}/v1/failover", c2.url()), body)
    );
    let mut codes = vec![r1.status().as_u16(), r2.status().as_u16()];
    codes.sort_unstable();
    assert_eq!(codes, [200, 409], "exactly one failover wins");
    wait_for(10, "both hubs to agree", || async {
        let (sa, sb) = (status(&a).await, status(&b).await);
        sb.role == Role::Primary && sb.epoch.0 == 2 && sa.role == Role::Secondary && sa.epoch.0 == 2
    })
    .await;
    // A stale expectation is refused outright.
    let stale = post(
        format!("{}/v1/promote", a.url()),
        serde_json::json!({"expected_epoch": 1, "mode": "forced"}),
    )
    .await;
    assert_eq!(stale.status(), 409);
    let body: serde_json::Value = stale.json().await.unwrap();
    assert_eq!(body["error"]["code"], "epoch_mismatch");
}

/// A replicating pair behind a concierge, with 20 simulated devices
/// publishing to the primary (`a`) for 8 s.
struct UnderLoad {
    ids: Vec<String>,
    a: HubNode,
    b: HubNode,
    c: tests::ConciergeNode,
    sim: std::process::Child,
    report: std::path::PathBuf,
}

async fn pair_under_load(h: &tests::Harness) -> UnderLoad {
    let ids: Vec<String> = (0..20).map(|i| format!("dev-{i:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (ra, rb) = registries(h, &refs).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    let c = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("a", &a), ("b", &b)],
        &["--ttl-s", "2"],
    );
    let keys = h.keys_file(&ra, &ids);
    let report = h.dir().join("report.ndjson");
    let sim = simulate(h, &c, &keys, &report, "20", "8");
    wait_for(20, "traffic on the primary", || async {
        stored(&a).await > 200
    })
    .await;
    UnderLoad {
        ids,
        a,
        b,
        c,
        sim,
        report,
    }
}

/// Runs `device-agent simulate` against concierge `c`.
fn simulate(
    h: &tests::Harness,
    c: &tests::ConciergeNode,
    keys: &std::path::Path,
    report: &std::path::Path,
    rate: &str,
    secs: &str,
) -> std::process::Child {
    h.spawn_simulate(
        c,
        keys,
        report,
        rate,
        secs,
        &["--drain-timeout-s", "90", "--ack-timeout-s", "3"],
    )
}

/// Every mid each simulated device generated is in `hub` exactly once.
async fn all_delivered_once(hub: &HubNode, report: &std::path::Path) -> u64 {
    let mut total = 0;
    for line in std::fs::read_to_string(report).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = r["device_id"].as_str().unwrap();
        let last = r["last_mid"].as_u64().unwrap();
        assert_eq!(r["acked"], r["last_mid"], "{id} still holds messages: {r}");
        let mids: Vec<u64> = hub
            .records_of(id, 8)
            .await
            .iter()
            .filter_map(|x| x.mid.map(|m| m.0))
            .collect();
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for m in &mids {
            *counts.entry(*m).or_default() += 1;
        }
        let missing: Vec<u64> = (1..=last).filter(|m| !counts.contains_key(m)).collect();
        assert!(missing.is_empty(), "{id}: lost {missing:?}");
        assert!(counts.values().all(|n| *n == 1), "{id}: a duplicate record");
        total += last;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_failover_under_load_and_failback_lose_nothing() {
    let h = harness!("forced_failover_under_load_and_failback_lose_nothing");
    let UnderLoad {
        ids,
        mut a,
        b,
        c,
        sim,
        report,
    } = pair_under_load(&h).await;
    // The secondary freezes: the primary acknowledges records it never
    // pulls, so the old primary surely has a divergent tail to archive (a
    // little less than it counts as unreplicated: the frozen secondary may
    // hold a last pull it never confirmed).
    signal(&b, "STOP");
    wait_for(
        20,
        "the primary to run ahead of the frozen secondary",
        || async {
            status(&a)
                .await
                .partitions
                .iter()
                .map(|p| p.high_watermark.0 - p.replicated.0)
                .sum::<u64>()
                >= 20
        },
    )
    .await;
    a.node.kill9();
    signal(&b, "CONT");
    let failover = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "forced"}),
    )
    .await;
    assert_eq!(
        failover.status(),
        200,
        "{}",
        failover.text().await.unwrap_or_default()
    );
    // Devices move to the new primary; what it stores is committed there but
    // not yet `replicated` (the other region is down), so they keep it.
    wait_for(20, "devices on the new primary", || async {
        status(&b).await.connected_devices >= 10
    })
    .await;
    // New-epoch records at the offsets the old primary's tail used.
    let at_failover = stored(&b).await;
    wait_for(20, "writes on the new primary", || async {
        stored(&b).await >= at_failover + 50
    })
    .await;
    // Failback: the old primary comes back, learns epoch 2, archives its
    // divergent tail and replicates from the new primary; acks flow again.
    a.restart(&h);
    let out = tokio::task::spawn_blocking(move || sim.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["in_outbox"], 0, "{summary}");
    assert_eq!(summary["dropped"], 0);
    let total = all_delivered_once(&b, &report).await;
    assert_eq!(summary["generated"], total);
    wait_for(20, "the old primary to follow", || async {
        let s = status(&a).await;
        s.role == Role::Secondary
            && s.epoch.0 == 2
            && s.replication
                .is_some_and(|r| r.lag_records == 0 && r.state == "streaming")
    })
    .await;
    // b ran alone since the forced promotion; it counts on a again once a
    // holds everything.
    wait_for(30, "b to attach a again", || async {
        status(&b)
            .await
            .peer
            .is_some_and(|p| p.state == fleet_api::hub::PeerState::Attached)
    })
    .await;
    let fb = failback_report(&a).await;
    assert!(
        fb.archived_records > 0,
        "the old primary's divergent tail was not archived: {fb:?}"
    );
    assert_eq!(
        fb.missing_count, 0,
        "archived records the new history lacks: {:?}",
        fb.missing
    );
    for id in &ids {
        assert_eq!(
            records(&a, id).await,
            records(&b, id).await,
            "{id}: the regions differ after failback"
        );
    }
    // A planned promotion back restores the original layout.
    let back = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "a", "mode": "planned"}),
    )
    .await;
    assert_eq!(
        back.status(),
        200,
        "{}",
        back.text().await.unwrap_or_default()
    );
    wait_for(10, "the original layout", || async {
        let (sa, sb) = (status(&a).await, status(&b).await);
        sa.role == Role::Primary && sa.epoch.0 == 3 && sb.role == Role::Secondary && sb.epoch.0 == 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_promotion_under_load_loses_nothing() {
    let h = harness!("planned_promotion_under_load_loses_nothing");
    let UnderLoad {
        a,
        b,
        c,
        sim,
        report,
        ..
    } = pair_under_load(&h).await;
    let resp = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "planned"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let done: fleet_api::concierge::FailoverResponse = resp.json().await.unwrap();
    assert_eq!(done.epoch.0, 2);
    assert!(done.unreplicated.is_empty());
    assert!(done.took_ms < 60_000, "write pause {} ms", done.took_ms);
    let out = tokio::task::spawn_blocking(move || sim.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    all_delivered_once(&b, &report).await;
    let sa = status(&a).await;
    assert_eq!((sa.role, sa.epoch.0), (Role::Secondary, 2));
    let fb = failback_report(&a).await;
    assert!(
        fb.archived.is_empty(),
        "a planned promotion leaves nothing to archive: {fb:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_old_primary_loses_no_acknowledged_telemetry() {
    let h = harness!("an_isolated_old_primary_loses_no_acknowledged_telemetry");
    let ids: Vec<String> = (0..10).map(|i| format!("dev-{i:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (ra, rb) = registries(&h, &refs).await;
    // Every path to the old primary's API goes through proxies we can cut;
    // devices keep reaching its MQTT port directly.
    let (http_a, http_b) = (tests::reserve_port(), tests::reserve_port());
    let to_a = tests::proxy::Proxy::start(http_a.parse().unwrap()).await;
    let to_b = tests::proxy::Proxy::start(http_b.parse().unwrap()).await;
    let b = h.hub(
        "hub-b",
        "b",
        &rb.url,
        &[
            "--http",
            &http_b,
            "--peer",
            &to_a.url(),
            "--role",
            "secondary",
        ],
    );
    let a = h.hub(
        "hub-a",
        "a",
        &ra.url,
        &[
            "--http",
            &http_a,
            "--peer",
            &to_b.url(),
            "--role",
            "primary",
        ],
    );
    let concierge_to_a = tests::proxy::Proxy::start(http_a.parse().unwrap()).await;
    let a_seen = tests::HubNode::alias(&a, concierge_to_a.addr);
    let b_seen = tests::HubNode::alias(&b, b.http);
    let c = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("a", &a_seen), ("b", &b_seen)],
        &["--ttl-s", "2"],
    );
    let keys = h.keys_file(&ra, &ids);
    let report = h.dir().join("report.ndjson");
    let sim = simulate(&h, &c, &keys, &report, "20", "10");
    wait_for(20, "traffic on the primary", || async {
        stored(&a).await > 100
    })
    .await;
    // The partition: the old primary hears from no one, devices still reach it.
    to_a.cut();
    to_b.cut();
    concierge_to_a.cut();
    let failover = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "forced"}),
    )
    .await;
    assert_eq!(failover.status(), 200);
    // The isolated primary keeps accepting writes it can never replicate.
    let at_cut = stored(&a).await;
    wait_for(20, "the isolated primary to take writes", || async {
        stored(&a).await >= at_cut + 10
    })
    .await;
    let isolated = status(&a).await;
    assert_eq!(
        isolated.role,
        Role::Primary,
        "the isolated hub cannot know it was replaced"
    );
    // Heal: it learns the higher epoch, steps down and archives its tail.
    to_a.heal();
    to_b.heal();
    concierge_to_a.heal();
    let out = tokio::task::spawn_blocking(move || sim.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["in_outbox"], 0, "{summary}");
    all_delivered_once(&b, &report).await;
    wait_for(20, "the old primary to follow", || async {
        let s = status(&a).await;
        s.role == Role::Secondary && s.epoch.0 == 2
    })
    .await;
    wait_for(20, "the failback report to reconcile", || async {
        let fb = failback_report(&a).await;
        fb.missing_count == 0
    })
    .await;
    // It did have a tail: the writes it took while isolated, archived.
    let fb = failback_report(&a).await;
    assert!(
        fb.archived_records >= 10,
        "the isolated primary's tail was not archived: {fb:?}"
    );
}

/// Sends a signal (`STOP`, `CONT`) to a hub process.
fn signal(hub: &HubNode, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &hub.node.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} failed");
}

/// A hub reached over HTTPS, for the concierge.
struct HttpsHub {
    url: String,
    mqtt: std::net::SocketAddr,
}

impl tests::HubAddrs for HttpsHub {
    fn http_url(&self) -> String {
        self.url.clone()
    }
    fn mqtt_addr(&self) -> std::net::SocketAddr {
        self.mqtt
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_replicate_and_are_watched_over_https_with_a_private_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h = harness!("hubs_replicate_and_are_watched_over_https_with_a_private_ca");
    let cert = h.self_signed();
    let (cert_s, key_s) = (cert.cert.as_str(), cert.key.as_str());
    let (ra, rb) = registries(&h, &["d1"]).await;
    let tls = [
        "--replication",
        "sync",
        "--http-tls-cert",
        cert_s,
        "--http-tls-key",
        key_s,
        "--peer-ca",
        cert_s,
    ];
    let (a, b) = h.pair_with(("a", &ra), ("b", &rb), "https", None, &tls);
    let url = |hub: &HubNode| format!("https://{}", hub.http);
    // Sync replication over HTTPS: the PUBACK needs the secondary's copy.
    let mut c = connect(&a, &ra, "d1").await;
    c.publish("devices/d1/messages/events/1", QoS::AtLeastOnce, 1, b"one")
        .await;
    assert!(matches!(c.recv(SECS).await, Ok(Packet::PubAck(_))));
    let https = cert.https_client();
    let status_b: StatusResponse = https
        .get(format!("{}/v1/status", url(&b)))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8).0 as usize;
    assert_eq!(status_b.partitions[p].high_watermark.0, 1);
    assert!(status_b.peer_reachable);
    // A concierge that trusts the CA sees both regions and hands out a.
    let hubs = [
        HttpsHub {
            url: url(&a),
            mqtt: a.mqtt,
        },
        HttpsHub {
            url: url(&b),
            mqtt: b.mqtt,
        },
    ];
    let conc = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("a", &hubs[0]), ("b", &hubs[1])],
        &["--hub-ca", cert_s],
    );
    wait_for(10, "the concierge to see both hubs over HTTPS", || async {
        let r: serde_json::Value = reqwest::get(format!("{}/v1/regions", conc.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["regions"]
            .as_array()
            .is_some_and(|v| v.len() == 2 && v.iter().all(|x| x["healthy"] == true))
    })
    .await;
    let endpoint: serde_json::Value =
        reqwest::get(format!("{}/v1/devices/d1/endpoint", conc.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(endpoint["region"], "a");
    // Without the CA the concierge refuses the hubs' certificate: no hub is healthy.
    let blind = h.concierge(
        "concierge-blind",
        "127.0.0.1:0",
        &[("a", &hubs[0]), ("b", &hubs[1])],
        &[],
    );
    wait_for(
        10,
        "the blind concierge to have checked both hubs",
        || async {
            let r: serde_json::Value = reqwest::get(format!("{}/v1/regions", blind.url()))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["regions"].as_array().is_some_and(|v| {
                v.iter().all(|x| {
                    x["problem"]
                        .as_str()
                        .is_some_and(|p| p.contains("unreachable"))
                })
            })
        },
    )
    .await;
    let r = reqwest::get(format!("{}/v1/devices/d1/endpoint", blind.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "an untrusted certificate was accepted");
}

const READ_TOKEN: &str = "test-read-token-0123456789";

/// `GET url` with `token`; the status code.
async fn get_with(url: String, token: &str) -> u16 {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("get")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_peer_token_drives_replication() {
    let h = harness!("only_the_peer_token_drives_replication");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &["--read-token", READ_TOKEN]);
    // Without its puller, nothing else may move a's `replicated`.
    b.node.kill9();
    let mut c = connect(&a, &ra, "d1").await;
    c.publish("devices/d1/messages/events/1", QoS::AtLeastOnce, 1, b"one")
        .await;
    assert!(matches!(c.recv(SECS).await, Ok(Packet::PubAck(_))));
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8).0 as usize;
    let hw = status(&a).await.partitions[p].high_watermark.0;
    assert_eq!(hw, 1);
    let records = format!("{}/v1/partitions/{p}/records", a.url());
    for token in [READ_TOKEN, ADMIN_TOKEN] {
        // Marking records replicated that the peer never received, or
        // demoting the primary with a forged epoch: refused.
        assert_eq!(
            get_with(format!("{records}?from={hw}&replica=b&epoch=1"), token).await,
            403
        );
        assert_eq!(
            get_with(format!("{records}?from=0&epoch=99"), token).await,
            403
        );
        // Reading stays allowed.
        assert_eq!(get_with(format!("{records}?from=0"), token).await, 200);
    }
    let s = status(&a).await;
    assert_eq!((s.role, s.epoch.0), (Role::Primary, 1));
    assert_eq!(s.partitions[p].replicated.0, 0, "nothing was replicated");
    let demote = reqwest::Client::new()
        .post(format!("{}/v1/demote", a.url()))
        .bearer_auth(READ_TOKEN)
        .json(&serde_json::json!({"epoch": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(demote.status(), 401);
    // Even the peer cannot push the epoch out of reach of promotions: the
    // pull is refused, neither learned nor counted.
    assert_eq!(
        get_with(
            format!("{records}?from=0&replica=b&epoch={}", u64::MAX),
            tests::PEER_TOKEN
        )
        .await,
        409
    );
    let s = status(&a).await;
    assert_eq!((s.role, s.epoch.0), (Role::Primary, 1));
    assert_eq!(
        get_with(
            format!("{records}?from=0&replica=b&epoch=1002"),
            tests::PEER_TOKEN
        )
        .await,
        409,
        "an epoch 1001 ahead is refused"
    );
    // The peer token cannot do what operators do, nor step a primary down
    // without a higher epoch, nor fence or unfence without one.
    for (path, body, code) in [
        (
            "/v1/promote",
            serde_json::json!({"expected_epoch": 1, "mode": "forced"}),
            401,
        ),
        ("/v1/peer/detach", serde_json::json!({}), 401),
        ("/v1/peer/attach", serde_json::json!({}), 401),
        ("/v1/demote", serde_json::json!({}), 409),
        ("/v1/demote", serde_json::json!({"epoch": 1}), 409),
        ("/v1/fence", serde_json::json!({}), 409),
        ("/v1/unfence", serde_json::json!({}), 400),
        ("/v1/unfence", serde_json::json!({"epoch": 2}), 409),
    ] {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", a.url()))
            .bearer_auth(tests::PEER_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), code, "{path} {body}");
    }
    let put = reqwest::Client::new()
        .put(format!("{}/v1/devices/intruder", a.url()))
        .bearer_auth(tests::PEER_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 401);
    let s = status(&a).await;
    assert_eq!((s.role, s.epoch.0, s.fenced), (Role::Primary, 1, false));
    // The peer token does what the peer does.
    assert_eq!(
        get_with(
            format!("{records}?from={hw}&replica=b&epoch=1"),
            tests::PEER_TOKEN
        )
        .await,
        200
    );
    assert_eq!(status(&a).await.partitions[p].replicated.0, hw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_with_a_peer_needs_its_own_peer_token() {
    let h = harness!("a_hub_with_a_peer_needs_its_own_peer_token");
    let reg = Registry::sqlite(h.dir(), "a").await;
    let base = |extra: &[&str], with_peer: bool| -> Vec<String> {
        let mut args: Vec<String> = [
            "hub",
            "run",
            "--region",
            "a",
            "--registry",
            &reg.url,
            "--mqtt",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--admin-token",
            ADMIN_TOKEN,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if with_peer {
            args.extend(["--peer".into(), "http://127.0.0.1:9".into()]);
        }
        args.push("--data".into());
        args.push(h.dir().join("data").display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    for (extra, with_peer, says) in [
        (&[][..], true, "--peer needs --peer-token"),
        (
            &["--peer-token", "short"][..],
            true,
            "at least 16 characters",
        ),
        (
            &["--peer-token", ADMIN_TOKEN][..],
            true,
            "must differ from the admin",
        ),
        (
            &["--peer-token", READ_TOKEN, "--read-token", READ_TOKEN][..],
            true,
            "must differ from the admin and read",
        ),
        (
            &["--peer-token", tests::PEER_TOKEN][..],
            false,
            "--peer-token needs --peer",
        ),
        (
            &["--read-token", ADMIN_TOKEN][..],
            false,
            "--read-token must differ",
        ),
        // A payload the log's frames cannot hold would be acknowledged,
        // then never read back.
        (
            &["--payload-limit", "67108864"][..],
            false,
            "a log record holds at most that much payload",
        ),
    ] {
        let mut child = h
            .command("bad-peer-token", &base(extra, with_peer))
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A hub that accepted the flags would run on: give it 20 s.
        let mut exited = false;
        for _ in 0..200 {
            if child.try_wait().unwrap().is_some() {
                exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !exited {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        assert!(exited, "{extra:?} was accepted: the hub started");
        assert!(!out.status.success(), "{extra:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(
            !err.contains(ADMIN_TOKEN) && !err.contains(READ_TOKEN),
            "a secret in an error: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_different_partition_counts_refuse_to_pair() {
    let h = harness!("peers_with_different_partition_counts_refuse_to_pair");
    let (ra, rb) = registries(&h, &["d1", "d2", "d3"]).await;
    let (http_a, http_b) = (tests::reserve_port(), tests::reserve_port());
    let (peer_of_a, peer_of_b) = (format!("http://{http_b}"), format!("http://{http_a}"));
    let b = h.hub(
        "hub-b",
        "b",
        &rb.url,
        &[
            "--http",
            &http_b,
            "--peer",
            &peer_of_b,
            "--role",
            "secondary",
            "--partitions",
            "4",
        ],
    );
    let a = h.hub(
        "hub-a",
        "a",
        &ra.url,
        &[
            "--http",
            &http_a,
            "--peer",
            &peer_of_a,
            "--role",
            "primary",
            "--partitions",
            "8",
        ],
    );
    for hub in [&a, &b] {
        wait_for(20, "the mismatch to be reported", || async {
            status(hub)
                .await
                .replication
                .is_some_and(|r| r.state == "partition_mismatch")
        })
        .await;
    }
    for id in ["d1", "d2", "d3"] {
        let mut c = connect(&a, &ra, id).await;
        c.publish(
            &format!("devices/{id}/messages/events/1"),
            QoS::AtLeastOnce,
            1,
            b"x",
        )
        .await;
        assert!(matches!(c.recv(SECS).await, Ok(Packet::PubAck(_))));
    }
    assert_eq!(stored(&a).await, 3);
    // A pull is refused outright, and b holds nothing.
    let r = reqwest::Client::new()
        .get(format!(
            "{}/v1/partitions/0/records?from=0&replica=b&epoch=1",
            a.url()
        ))
        .bearer_auth(tests::PEER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(stored(&b).await, 0);
    assert!(a.node.log_tail().contains("different partition count"));
}
