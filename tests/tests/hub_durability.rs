//! Nothing acknowledged is lost: duplicates across reconnects and restarts,
//! kill -9 in the middle of a stream, and a disk that refuses writes.

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Packet;
use tests::durability::{Pipelined, assert_stored, connect, mids, publish_acked};
use tests::{HubNode, Registry, harness};

const SECS: Duration = Duration::from_secs(10);

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

/// Publishes pipelined until `kill_after` are acknowledged, kills the hub,
/// and returns every mid that got a PUBACK.
async fn stream_until_killed(
    hub: &mut HubNode,
    reg: &Registry,
    device: &str,
    kill_after: usize,
) -> Vec<u64> {
    let mut p = Pipelined::new(hub, reg, device).await;
    p.run_until(kill_after)
        .await
        .expect("the stream broke before the kill");
    hub.node.kill9();
    p.drain().await;
    p.acked
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
            assert_stored(&hub, device, acked).await;
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
