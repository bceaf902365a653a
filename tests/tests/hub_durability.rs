//! Nothing acknowledged is lost: duplicates across reconnects and restarts,
//! kill -9 in the middle of a stream, and a disk that refuses writes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::mqtt::RawClient;
use tests::{HubNode, Registry, harness};

const SECS: Duration = Duration::from_secs(10);

async fn connect(hub: &HubNode, reg: &Registry, id: &str) -> RawClient {
    let key = reg.key(id);
    let (c, code) = RawClient::connect(hub.mqtt, id, Some((id, &key))).await;
    assert_eq!(
        code,
        Some(ConnectReturnCode::Success),
        "{id} could not connect"
    );
    c
}

async fn publish_acked(c: &mut RawClient, topic: &str, pkid: u16) {
    c.publish(topic, QoS::AtLeastOnce, pkid, topic.as_bytes())
        .await;
    loop {
        match c.recv(SECS).await {
            Ok(Packet::PubAck(a)) if a.pkid == pkid => return,
            Ok(_) => {}
            Err(e) => panic!("no PUBACK for {topic}: {e:?}"),
        }
    }
}

/// The payload `device` sends under `mid` (distinct per record, so a record
/// stored with another's bytes is caught).
fn payload_of(device: &str, mid: u64) -> Vec<u8> {
    let mut p = format!("{device}:{mid}:").into_bytes();
    p.resize(200, (mid % 251) as u8);
    p
}

fn mids(records: &[fleet_api::hub::WireRecord]) -> Vec<u64> {
    records.iter().filter_map(|r| r.mid.map(|m| m.0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_acknowledged_but_stored_once_across_restarts() {
    let h = harness!("duplicates_are_acknowledged_but_stored_once_across_restarts");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d"]).await;
    let mut hub = h.hub("hub-eu", "eu", &reg.url, &[]);
    let t = |m: u64| format!("devices/d/messages/events/{m}");

    let mut c = connect(&hub, &reg, "d").await;
    for (pkid, m) in [(1, 1), (2, 2), (3, 3), (4, 2), (5, 3), (6, 4)] {
        publish_acked(&mut c, &t(m), pkid).await;
    }
    assert_eq!(mids(&hub.records_of("d", 8).await), [1, 2, 3, 4]);
    assert!(hub.metric("fleet_hub_duplicates_total").await >= 2.0);

    // Crash: the de-duplication state is rebuilt from the log.
    hub.restart(&h);
    let mut c = connect(&hub, &reg, "d").await;
    for (pkid, m) in [(1, 3), (2, 4), (3, 5)] {
        publish_acked(&mut c, &t(m), pkid).await;
    }
    assert_eq!(mids(&hub.records_of("d", 8).await), [1, 2, 3, 4, 5]);

    // Clean stop: the state comes from the snapshot written at shutdown.
    drop(c);
    hub.restart_clean(&h);
    assert!(h.dir().join("hub-eu/dedup/p0.snap").exists());
    let mut c = connect(&hub, &reg, "d").await;
    for (pkid, m) in [(1, 1), (2, 5), (3, 6)] {
        publish_acked(&mut c, &t(m), pkid).await;
    }
    // Publishes without a mid are never de-duplicated.
    publish_acked(&mut c, "devices/d/messages/events", 4).await;
    publish_acked(&mut c, "devices/d/messages/events", 5).await;
    let recs = hub.records_of("d", 8).await;
    assert_eq!(mids(&recs), [1, 2, 3, 4, 5, 6]);
    assert_eq!(recs.iter().filter(|r| r.mid.is_none()).count(), 2);
}

/// Publishes mids `first..` pipelined (64 in flight) until `kill_after` are
/// acknowledged, kills the hub, and returns every mid that got a PUBACK.
async fn stream_until_killed(
    hub: &mut HubNode,
    reg: &Registry,
    device: &str,
    kill_after: usize,
) -> Vec<u64> {
    let mut c = connect(hub, reg, device).await;
    let mut outstanding: HashMap<u16, u64> = HashMap::new();
    let mut acked = Vec::new();
    let mut next_mid = 1u64;
    let mut killed = false;
    loop {
        while !killed && outstanding.len() < 64 {
            let pkid = (next_mid % 60_000) as u16 + 1;
            let topic = format!("devices/{device}/messages/events/{next_mid}");
            c.publish(
                &topic,
                QoS::AtLeastOnce,
                pkid,
                &payload_of(device, next_mid),
            )
            .await;
            outstanding.insert(pkid, next_mid);
            next_mid += 1;
        }
        match c.recv(SECS).await {
            Ok(Packet::PubAck(a)) => {
                let mid = outstanding
                    .remove(&a.pkid)
                    .expect("PUBACK for an unknown packet id");
                acked.push(mid);
                if !killed && acked.len() >= kill_after {
                    hub.node.kill9();
                    killed = true;
                }
            }
            Ok(_) => {}
            Err(_) => {
                assert!(killed, "the stream broke before the kill");
                return acked;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_that_was_acknowledged() {
    let h = harness!("kill_9_mid_stream_loses_nothing_that_was_acknowledged");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["k0", "k1", "k2"]).await;
    let mut hub = h.hub("hub-eu", "eu", &reg.url, &[]);
    let mut all_acked = BTreeMap::new();
    for (round, kill_after) in [(0, 300), (1, 2500), (2, 6000)] {
        let device = format!("k{round}");
        let acked = stream_until_killed(&mut hub, &reg, &device, kill_after).await;
        hub.restart(&h);
        all_acked.insert(device, acked);
        // Every round checks every device so far: later crashes lose nothing either.
        for (device, acked) in &all_acked {
            let records = hub.records_of(device, 8).await;
            for r in &records {
                let mid = r.mid.map_or(0, |m| m.0);
                assert_eq!(
                    r.payload,
                    payload_of(device, mid),
                    "{device} mid {mid}: stored bytes differ from the ones sent"
                );
            }
            let stored = mids(&records);
            let mut counts: HashMap<u64, usize> = HashMap::new();
            for m in &stored {
                *counts.entry(*m).or_default() += 1;
            }
            let lost: Vec<u64> = acked
                .iter()
                .filter(|m| !counts.contains_key(m))
                .copied()
                .collect();
            assert!(lost.is_empty(), "{device}: acknowledged but lost: {lost:?}");
            assert!(
                counts.values().all(|n| *n == 1),
                "{device}: a record was stored twice"
            );
            assert!(
                stored.windows(2).all(|w| w[0] < w[1]),
                "{device}: log order differs from publish order"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acknowledgements_and_loses_nothing() {
    let h = harness!("a_full_disk_stops_acknowledgements_and_loses_nothing");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d"]).await;
    // Segment files may not grow past 256 KiB: the log's writes fail there.
    let mut hub = h.hub_limited("hub-eu", "eu", &reg.url, &[], Some(256));
    let mut c = connect(&hub, &reg, "d").await;
    let mut acked = Vec::new();
    let mut mid = 0u64;
    let refused = loop {
        mid += 1;
        let pkid = (mid % 60_000) as u16 + 1;
        c.publish(
            &format!("devices/d/messages/events/{mid}"),
            QoS::AtLeastOnce,
            pkid,
            &[1u8; 1000],
        )
        .await;
        match c.recv(SECS).await {
            Ok(Packet::PubAck(a)) if a.pkid == pkid => acked.push(mid),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break mid,
        }
        assert!(mid < 10_000, "the file size cap never bit");
    };
    assert!(
        acked.len() > 100,
        "only {} acknowledged before the disk filled",
        acked.len()
    );
    // The hub says it is unhealthy, and why.
    let health = tests::http_get(&format!("{}/healthz", hub.url()));
    assert!(
        health.contains("unhealthy") && health.contains("File too large"),
        "{health}"
    );
    // Writes stay refused: a new connection gets no PUBACK either.
    let mut again = connect(&hub, &reg, "d").await;
    again
        .publish(
            &format!("devices/d/messages/events/{}", refused + 1),
            QoS::AtLeastOnce,
            1,
            b"x",
        )
        .await;
    assert!(again.closed_within(SECS).await);
    // With room again, everything acknowledged is there, the refused one is not.
    hub.restart(&h);
    let stored = mids(&hub.records_of("d", 8).await);
    assert_eq!(
        stored, acked,
        "stored records differ from acknowledged ones"
    );
}
