//! Readers see the replicated prefix by default: a record stored only in the
//! primary's region is withheld until the other region has it too, and a
//! waiting read is answered as soon as it has; `upto=committed` reads it at
//! once.

use std::time::Duration;

use fleet_api::hub::ReadUpto;
use fleet_api::{DeviceId, Offset, partition_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::load::registries;
use tests::mqtt::RawClient;
use tests::{harness, wait_for};

const SECS: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_get_the_replicated_prefix_unless_they_ask_for_committed() {
    let h = harness!("readers_get_the_replicated_prefix_unless_they_ask_for_committed");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let detach = ["--peer-detach-after-s", "3600"];
    let (a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &detach);
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8);
    // One record both regions hold.
    let (mut c, code) = RawClient::connect(a.mqtt, "d1", Some(("d1", &ra.key("d1")))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    c.publish("devices/d1/messages/events/1", QoS::AtLeastOnce, 1, b"both")
        .await;
    wait_for(10, "the first record to be replicated", || async {
        a.client().status().await.unwrap().partitions[p.0 as usize].replicated == Offset(1)
    })
    .await;
    // The secondary goes away; the next records are durable in region a only.
    b.node.kill9();
    for i in 2..=4u16 {
        c.publish(
            &format!("devices/d1/messages/events/{i}"),
            QoS::AtLeastOnce,
            i,
            format!("only-a-{i}").as_bytes(),
        )
        .await;
    }
    let mut acked = 0;
    while acked < 3 {
        match c.recv(SECS).await {
            Ok(Packet::PubAck(_)) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("pubacks stopped at {acked}: {e:?}"),
        }
    }
    let client = a.client();
    let default = client
        .records(p, Offset(0), 100, Duration::ZERO)
        .await
        .unwrap();
    let payloads: Vec<&[u8]> = default
        .records
        .iter()
        .map(|r| r.payload.as_slice())
        .collect();
    assert_eq!(
        payloads,
        [&b"both"[..]],
        "only the replicated prefix by default"
    );
    assert_eq!(default.high_watermark, Offset(1));
    let committed = client
        .records_upto(p, Offset(0), 100, Duration::ZERO, ReadUpto::Committed)
        .await
        .unwrap();
    assert_eq!(committed.records.len(), 4);
    assert_eq!(committed.high_watermark, Offset(4));
    // A reader waiting at the end of the prefix gets nothing while region b
    // is down, however long it waits...
    let idle = client
        .records(p, Offset(1), 100, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(idle.records.is_empty(), "{:?}", idle.records);
    assert_eq!(idle.high_watermark, Offset(1));
    // ...and the rest once region b holds it.
    b.restart(&h);
    let got = client
        .records(p, Offset(1), 100, Duration::from_secs(25))
        .await
        .unwrap();
    let payloads: Vec<&[u8]> = got.records.iter().map(|r| r.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        [&b"only-a-2"[..], b"only-a-3", b"only-a-4"],
        "{:?}",
        got.high_watermark
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_down_primary_serves_readers_nothing_unchecked() {
    let h = harness!("a_stepped_down_primary_serves_readers_nothing_unchecked");
    let mut reg = tests::Registry::sqlite(h.dir(), "a").await;
    reg.add(&["d1"]).await;
    // A primary whose peer is gone for good: detached, it writes alone.
    let dead_peer = format!("http://{}", tests::reserve_port());
    let a = h.hub(
        "hub-a",
        "a",
        &reg.url,
        &[
            "--peer",
            &dead_peer,
            "--role",
            "primary",
            "--peer-detach-after-s",
            "1",
        ],
    );
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8);
    wait_for(20, "the primary to run alone", || async {
        a.client().status().await.is_ok_and(|s| !s.fenced)
    })
    .await;
    let (mut c, code) = RawClient::connect(a.mqtt, "d1", Some(("d1", &reg.key("d1")))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    for i in 1..=3u16 {
        c.publish(
            &format!("devices/d1/messages/events/{i}"),
            QoS::AtLeastOnce,
            i,
            b"alone",
        )
        .await;
    }
    let mut acked = 0;
    while acked < 3 {
        if let Ok(Packet::PubAck(_)) = c.recv(SECS).await {
            acked += 1;
        }
    }
    let before = a
        .client()
        .records(p, Offset(0), 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        before.records.len(),
        3,
        "a primary alone serves what it holds"
    );
    // Stepped down, it holds records no primary has confirmed: until its
    // follower reconciles with one, readers get none of them.
    let demoted =
        tests::load::admin_post(format!("{}/v1/demote", a.url()), serde_json::json!({})).await;
    assert_eq!(demoted.status(), 200);
    let after = a
        .client()
        .records(p, Offset(0), 100, Duration::ZERO)
        .await
        .unwrap();
    assert!(after.records.is_empty(), "{:?}", after.records);
    assert_eq!(after.high_watermark, Offset(0));
    let committed = a
        .client()
        .records_upto(p, Offset(0), 100, Duration::ZERO, ReadUpto::Committed)
        .await
        .unwrap();
    assert_eq!(committed.records.len(), 3);
}
