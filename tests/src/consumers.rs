//! Helpers of the consumer tests: a hub with devices, QoS 1 publishes that
//! wait for their PUBACKs, consumer settings with short timers.

use std::sync::Arc;
use std::time::Duration;

use consumer::store::ConsumerStore;
use consumer::{ConsumerConfig, RetryPolicy};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};

use crate::mqtt::RawClient;
use crate::{ADMIN_TOKEN, Harness, HubNode, Registry};

/// Publishes `payloads` from `device` as QoS 1 with mids `first..`, and waits
/// for every PUBACK (the records are durable in the hub's log).
pub async fn publish(
    hub: &HubNode,
    reg: &Registry,
    device: &str,
    first_mid: u64,
    payloads: &[String],
) {
    let key = reg.key(device);
    let (mut c, code) = RawClient::connect(hub.mqtt, device, Some((device, &key))).await;
    assert_eq!(
        code,
        Some(ConnectReturnCode::Success),
        "{device} could not connect"
    );
    for (i, body) in payloads.iter().enumerate() {
        let mid = first_mid + i as u64;
        c.publish(
            &format!("devices/{device}/messages/events/{mid}"),
            QoS::AtLeastOnce,
            (i % 60_000) as u16 + 1,
            body.as_bytes(),
        )
        .await;
    }
    let mut acked = 0;
    while acked < payloads.len() {
        match c.recv(Duration::from_secs(10)).await {
            Ok(Packet::PubAck(_)) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("{device}: PUBACKs stopped at {acked}: {e:?}"),
        }
    }
}

pub async fn hub_with(h: &Harness, devices: &[&str]) -> (HubNode, Registry) {
    let mut reg = Registry::sqlite(h.dir(), "a").await;
    reg.add(devices).await;
    let hub = h.hub("hub-a", "a", &reg.url, &[]);
    (hub, reg)
}

pub async fn high_watermarks(hub: &HubNode) -> Vec<u64> {
    let s = hub.client().status().await.expect("status");
    s.partitions.iter().map(|p| p.high_watermark.0).collect()
}

pub fn sqlite_url(h: &Harness, name: &str) -> String {
    format!("sqlite://{}", h.dir().join(name).display())
}

pub fn fast(mut c: ConsumerConfig) -> ConsumerConfig {
    c.hub_token = Some(fleet_api::Secret::new(ADMIN_TOKEN));
    c.retry = RetryPolicy {
        attempts: 3,
        initial: Duration::from_millis(10),
        max: Duration::from_millis(200),
    };
    c.jitter = Arc::new(|d| d);
    c.lease_ttl = Duration::from_millis(900);
    c.breaker_poll = Duration::from_millis(50);
    c
}

/// Whether every checkpoint of `store` stands at its partition's high watermark.
pub async fn checkpoints_at(store: &ConsumerStore, hw: &[u64]) -> bool {
    store
        .checkpoints()
        .await
        .expect("checkpoints")
        .iter()
        .all(|(p, c)| c.next.0 == hw[p.0 as usize])
}

pub fn batch(device: &str, from: u64, n: u64) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("{{\"device\":\"{device}\",\"n\":{i}}}"))
        .collect()
}
