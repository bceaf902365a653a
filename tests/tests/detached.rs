//! A region lost for good: the survivor detaches its peer and runs alone
//! (acknowledging what is durable there), and a returning peer catches up
//! and counts again without a full resync. Real hub processes, kill -9,
//! simulated devices with small outboxes.

use std::collections::HashMap;

use std::time::Duration;

use fleet_api::Role;
use fleet_api::hub::{PeerState, StatusResponse};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::load::{admin_post as post, registries, status};
use tests::mqtt::RawClient;
use tests::{HubNode, harness, wait_for};

/// Small outboxes (the agent's minimum) and a rate that fills one within
/// about two seconds of no `replicated` acknowledgement.
const OUTBOX: &str = "65536";
const RATE: &str = "40";
const PAYLOAD: &str = "1000";

/// `device-agent simulate` of `keys` for `secs`, with outboxes of
/// `outbox` bytes.
fn simulate(
    h: &tests::Harness,
    c: &tests::ConciergeNode,
    keys: &std::path::Path,
    report: &std::path::Path,
    secs: &str,
    outbox: &str,
) -> std::process::Child {
    h.spawn_simulate(
        c,
        keys,
        report,
        RATE,
        secs,
        &[
            "--drain-timeout-s",
            "60",
            "--ack-timeout-s",
            "3",
            "--max-outbox-bytes",
            outbox,
            "--payload-bytes",
            PAYLOAD,
        ],
    )
}

/// Waits for `sim`; its summary must show nothing dropped or left behind.
async fn finished(sim: std::process::Child) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || sim.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "simulate failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["dropped"], 0, "outboxes overflowed: {summary}");
    assert_eq!(
        summary["in_outbox"], 0,
        "messages left unacknowledged: {summary}"
    );
    summary
}

/// Every generated mid is in `hub` exactly once, with the payload size sent;
/// returns how many.
async fn all_stored_once(hub: &HubNode, report: &std::path::Path) -> u64 {
    let mut total = 0;
    for line in std::fs::read_to_string(report).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = r["device_id"].as_str().unwrap();
        let last = r["last_mid"].as_u64().unwrap();
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for rec in hub.records_of(id, 8).await {
            assert_eq!(rec.payload.len(), PAYLOAD.parse::<usize>().unwrap());
            if let Some(m) = rec.mid {
                *counts.entry(m.0).or_default() += 1;
            }
        }
        let missing: Vec<u64> = (1..=last).filter(|m| !counts.contains_key(m)).collect();
        assert!(missing.is_empty(), "{id}: lost {missing:?}");
        assert!(counts.values().all(|n| *n == 1), "{id}: stored twice");
        total += last;
    }
    total
}

fn peer_state(s: &StatusResponse) -> Option<PeerState> {
    s.peer.as_ref().map(|p| p.state)
}

/// A replicating pair with a concierge, and the keys of 8 devices.
struct Loaded {
    a: HubNode,
    b: HubNode,
    c: tests::ConciergeNode,
    keys: std::path::PathBuf,
    report: std::path::PathBuf,
}

/// Starts [`Loaded`] with `replication` (async hubs throttle beyond 2 s of
/// lag, as deploy/ configures them) and `extra` hub flags.
async fn loaded_pair(h: &tests::Harness, replication: &str, extra: &[&str]) -> Loaded {
    let ids: Vec<String> = (0..8).map(|i| format!("dev-{i}")).collect();
    let (ra, rb) = registries(h, &ids).await;
    let mut flags = vec!["--replication", replication];
    if replication == "async" {
        flags.extend_from_slice(&["--max-lag-ms", "2000"]);
    }
    flags.extend_from_slice(extra);
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &flags);
    let c = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("a", &a), ("b", &b)],
        &["--ttl-s", "2"],
    );
    Loaded {
        keys: h.keys_file(&ra, &ids),
        report: h.dir().join("report.ndjson"),
        a,
        b,
        c,
    }
}

async fn primary_lost_for_good(name: &str, replication: &str) {
    let h = harness!(name);
    let Loaded {
        mut a,
        b,
        c,
        keys,
        report,
    } = loaded_pair(&h, replication, &[]).await;
    let sim = simulate(&h, &c, &keys, &report, "25", OUTBOX);
    wait_for(20, "traffic replicated to b", || async {
        status(&b)
            .await
            .partitions
            .iter()
            .map(|p| p.high_watermark.0)
            .sum::<u64>()
            > 200
    })
    .await;
    // Region a is lost and never returns.
    a.node.kill9();
    let failover = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "forced"}),
    )
    .await;
    assert_eq!(failover.status(), 200, "{}", failover.text().await.unwrap());
    let s = status(&b).await;
    assert_eq!(s.role, Role::Primary);
    assert_eq!(peer_state(&s), Some(PeerState::Detached), "{s:?}");
    // The outboxes hold about 1.6 s of messages; the rest of the run (well
    // over 10 s) is delivered only because b acknowledges alone.
    let summary = finished(sim).await;
    let total = all_stored_once(&b, &report).await;
    assert_eq!(summary["generated"], total);
    let s = status(&b).await;
    let link = s.peer.expect("peer link");
    assert_eq!(link.state, PeerState::Detached);
    assert!(link.written_since.unwrap_or(0) > 0, "{link:?}");
    assert!(link.since_ms.is_some());
    assert_eq!(s.replication.map(|r| r.state).as_deref(), Some("detached"));
    let m = b.metric("fleet_hub_peer_detached").await;
    assert_eq!(m, 1.0);
    let regions: serde_json::Value = reqwest::get(format!("{}/v1/regions", c.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rb_view = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["region"] == "b")
        .unwrap()
        .clone();
    assert!(rb_view["detached_since_ms"].is_u64(), "{rb_view}");
    assert!(rb_view["written_while_detached"].as_u64().unwrap() > 0);
    let page = tests::http_get(&format!("{}/", c.url()));
    assert!(page.contains("running alone since"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_survivor_of_a_lost_primary_runs_alone_and_loses_nothing() {
    primary_lost_for_good(
        "async_survivor_of_a_lost_primary_runs_alone_and_loses_nothing",
        "async",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_survivor_of_a_lost_primary_runs_alone_and_loses_nothing() {
    primary_lost_for_good(
        "sync_survivor_of_a_lost_primary_runs_alone_and_loses_nothing",
        "sync",
    )
    .await;
}

async fn secondary_lost_then_back(name: &str, replication: &str) {
    let h = harness!(name);
    let Loaded {
        a,
        mut b,
        c,
        keys,
        report,
    } = loaded_pair(&h, replication, &["--peer-detach-after-s", "1"]).await;
    // Sync acknowledgements wait until the lost peer is detached (about
    // 1.5 s): outboxes of 1 MiB bridge that.
    let sim = simulate(&h, &c, &keys, &report, "30", "1048576");
    wait_for(20, "traffic on the primary", || async {
        status(&a)
            .await
            .partitions
            .iter()
            .map(|p| p.replicated.0)
            .sum::<u64>()
            > 100
    })
    .await;
    assert_eq!(peer_state(&status(&a).await), Some(PeerState::Attached));
    // The secondary region is lost; the primary detaches it and goes on.
    b.node.kill9();
    wait_for(20, "the primary to detach its lost peer", || async {
        peer_state(&status(&a).await) == Some(PeerState::Detached)
    })
    .await;
    let written = |s: StatusResponse| s.peer.and_then(|p| p.written_since).unwrap_or(0);
    wait_for(20, "writes acknowledged while detached", || async {
        written(status(&a).await) > 500
    })
    .await;
    // It returns, catches up from where it was (no full resync) and counts
    // again.
    b.restart(&h);
    wait_for(60, "the returning peer to attach again", || async {
        peer_state(&status(&a).await) == Some(PeerState::Attached)
    })
    .await;
    let summary = finished(sim).await;
    let total = all_stored_once(&a, &report).await;
    assert_eq!(summary["generated"], total);
    wait_for(20, "lag 0", || async {
        status(&a)
            .await
            .replication
            .is_some_and(|r| r.lag_records == 0)
    })
    .await;
    let back = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "planned"}),
    )
    .await;
    assert_eq!(back.status(), 200, "{}", back.text().await.unwrap());
    assert_eq!(all_stored_once(&b, &report).await, total);
    let sb = status(&b).await;
    assert_eq!(sb.role, Role::Primary);
    assert_eq!(peer_state(&sb), Some(PeerState::Attached));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_primary_detaches_a_lost_secondary_which_catches_up_and_takes_over() {
    secondary_lost_then_back(
        "async_primary_detaches_a_lost_secondary_which_catches_up_and_takes_over",
        "async",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_primary_detaches_a_lost_secondary_which_catches_up_and_takes_over() {
    secondary_lost_then_back(
        "sync_primary_detaches_a_lost_secondary_which_catches_up_and_takes_over",
        "sync",
    )
    .await;
}

/// The next ack on `devices/dev-0/acks` whose `committed` reaches `mid`.
async fn ack_for(c: &mut RawClient, mid: u64) -> fleet_api::AckMessage {
    loop {
        match c.recv(Duration::from_secs(10)).await {
            Ok(Packet::Publish(p)) => {
                let ack: fleet_api::AckMessage = serde_json::from_slice(&p.payload).unwrap();
                if ack.committed.0 >= mid {
                    return ack;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("no ack for mid {mid}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_detach_and_attach_with_the_admin_token_only() {
    let h = harness!("operators_detach_and_attach_with_the_admin_token_only");
    let ids: Vec<String> = vec!["dev-0".into()];
    let (ra, rb) = registries(&h, &ids).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &["--replication", "sync"]);
    let key = ra.key("dev-0");
    let (mut dev, code) = RawClient::connect(a.mqtt, "dev-0", Some(("dev-0", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    dev.subscribe(1, "devices/dev-0/acks").await;
    dev.publish(
        "devices/dev-0/messages/events/1",
        QoS::AtLeastOnce,
        1,
        b"one",
    )
    .await;
    let ack = ack_for(&mut dev, 1).await;
    assert!(!ack.detached, "{ack:?}");

    let detach = format!("{}/v1/peer/detach", a.url());
    let no_token = reqwest::Client::new().post(&detach).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    let on_secondary = post(format!("{}/v1/peer/detach", b.url()), serde_json::json!({})).await;
    assert_eq!(
        on_secondary.status(),
        409,
        "a secondary has nothing to detach"
    );
    let r = post(detach.clone(), serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    let link: fleet_api::hub::PeerLink = r.json().await.unwrap();
    assert_eq!(link.state, PeerState::Detached);
    assert!(link.manual);
    // Acks say the region runs alone.
    dev.publish(
        "devices/dev-0/messages/events/2",
        QoS::AtLeastOnce,
        2,
        b"two",
    )
    .await;
    let ack = ack_for(&mut dev, 2).await;
    assert!(ack.detached, "{ack:?}");
    assert_eq!(ack.replicated, ack.committed);
    // A planned promotion to the detached peer is refused by the primary,
    // which keeps its role; the peer is alive and pulling meanwhile.
    let planned = post(
        format!("{}/v1/promote", b.url()),
        serde_json::json!({"expected_epoch": 1, "mode": "planned"}),
    )
    .await;
    assert_ne!(planned.status(), 200);
    let body = planned.text().await.unwrap();
    assert!(body.contains("detached"), "{body}");
    assert_eq!(status(&a).await.role, Role::Primary);
    assert!(!status(&a).await.fenced);
    // An operator's detach holds until an operator attaches.
    assert_eq!(peer_state(&status(&a).await), Some(PeerState::Detached));
    let r = post(format!("{}/v1/peer/attach", a.url()), serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    wait_for(20, "the caught-up peer to attach", || async {
        peer_state(&status(&a).await) == Some(PeerState::Attached)
    })
    .await;
    dev.publish(
        "devices/dev-0/messages/events/3",
        QoS::AtLeastOnce,
        3,
        b"three",
    )
    .await;
    let ack = ack_for(&mut dev, 3).await;
    assert!(!ack.detached, "{ack:?}");
    wait_for(10, "b to hold all three", || async {
        b.records_of("dev-0", 8).await.len() == 3
    })
    .await;
}

/// A primary that restarts while its peer does not answer stays fenced: an
/// unanswered look proves nothing (the other region may have taken over
/// during a partition). An operator's detach lets it run alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_that_cannot_see_its_peer_stays_fenced_until_detached() {
    let h = harness!("a_restarted_primary_that_cannot_see_its_peer_stays_fenced_until_detached");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (mut a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    b.node.kill9();
    a.restart(&h);
    // Looks at the peer have failed (it is reported unreachable) ...
    wait_for(20, "a to find its peer unreachable", || async {
        peer_state(&status(&a).await) == Some(PeerState::Unreachable)
    })
    .await;
    // ... and still nothing is accepted.
    let s = status(&a).await;
    assert_eq!(s.role, Role::Primary);
    assert!(
        s.fenced,
        "a restarted primary unfenced without seeing its peer"
    );
    let (_, code) = RawClient::connect(a.mqtt, "d1", Some(("d1", &ra.key("d1")))).await;
    assert_eq!(code, Some(ConnectReturnCode::ServiceUnavailable));
    // The operator decides the peer is lost: a runs alone.
    let r = post(format!("{}/v1/peer/detach", a.url()), serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    wait_for(20, "a to accept writes", || async {
        !status(&a).await.fenced
    })
    .await;
    let (mut c, code) = RawClient::connect(a.mqtt, "d1", Some(("d1", &ra.key("d1")))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    c.publish(
        "devices/d1/messages/events/1",
        QoS::AtLeastOnce,
        1,
        b"alone",
    )
    .await;
    loop {
        match c.recv(Duration::from_secs(10)).await {
            Ok(Packet::PubAck(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("no PUBACK after the detach: {e:?}"),
        }
    }
    // The peer returns: it is looked at, and a keeps its role.
    b.restart(&h);
    wait_for(20, "a to see b again", || async {
        status(&a).await.peer_reachable
    })
    .await;
}
