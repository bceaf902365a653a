//! Streams of acknowledged publishes and the check that every one of them
//! is stored once, in order, with the bytes sent (hub durability tests).

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};

use crate::mqtt::{RawClient, RecvError};
use crate::{HubNode, Registry};

/// How long a PUBACK may take (a JetStream leader election stalls appends
/// for seconds).
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Connects `id` with its key; panics when refused.
pub async fn connect(hub: &HubNode, reg: &Registry, id: &str) -> RawClient {
    let key = reg.key(id);
    let (c, code) = RawClient::connect(hub.mqtt, id, Some((id, &key))).await;
    assert_eq!(
        code,
        Some(ConnectReturnCode::Success),
        "{id} could not connect"
    );
    c
}

/// Publishes `topic` (its own text as payload) and waits for its PUBACK.
pub async fn publish_acked(c: &mut RawClient, topic: &str, pkid: u16) {
    c.publish(topic, QoS::AtLeastOnce, pkid, topic.as_bytes())
        .await;
    loop {
        match c.recv(Duration::from_secs(10)).await {
            Ok(Packet::PubAck(a)) if a.pkid == pkid => return,
            Ok(_) => {}
            Err(e) => panic!("no PUBACK for {topic}: {e:?}"),
        }
    }
}

/// The payload `device` sends under `mid` (distinct per record, so a record
/// stored with another's bytes is caught).
pub fn payload_of(device: &str, mid: u64) -> Vec<u8> {
    let mut p = format!("{device}:{mid}:").into_bytes();
    p.resize(200, (mid % 251) as u8);
    p
}

pub fn mids(records: &[fleet_api::hub::WireRecord]) -> Vec<u64> {
    records.iter().filter_map(|r| r.mid.map(|m| m.0)).collect()
}

/// One device publishing mids 1, 2, … with 64 in flight.
#[derive(Debug)]
pub struct Pipelined {
    c: RawClient,
    device: String,
    outstanding: HashMap<u16, u64>,
    next_mid: u64,
    /// Every mid that got a PUBACK.
    pub acked: Vec<u64>,
}

impl Pipelined {
    pub async fn new(hub: &HubNode, reg: &Registry, device: &str) -> Pipelined {
        Pipelined {
            c: connect(hub, reg, device).await,
            device: device.to_string(),
            outstanding: HashMap::new(),
            next_mid: 1,
            acked: Vec::new(),
        }
    }

    /// Publishes until `n` more are acknowledged.
    pub async fn run_until(&mut self, n: usize) -> Result<(), RecvError> {
        let target = self.acked.len() + n;
        while self.acked.len() < target {
            while self.outstanding.len() < 64 {
                let mid = self.next_mid;
                let pkid = (mid % 60_000) as u16 + 1;
                let topic = format!("devices/{}/messages/events/{mid}", self.device);
                self.c
                    .publish(
                        &topic,
                        QoS::AtLeastOnce,
                        pkid,
                        &payload_of(&self.device, mid),
                    )
                    .await;
                self.outstanding.insert(pkid, mid);
                self.next_mid += 1;
            }
            self.recv_one().await?;
        }
        Ok(())
    }

    /// Collects PUBACKs without publishing until the connection breaks.
    pub async fn drain(&mut self) {
        while self.recv_one().await.is_ok() {}
    }

    async fn recv_one(&mut self) -> Result<(), RecvError> {
        if let Packet::PubAck(a) = self.c.recv(ACK_WAIT).await? {
            let mid = self
                .outstanding
                .remove(&a.pkid)
                .expect("PUBACK for an unknown packet id");
            self.acked.push(mid);
        }
        Ok(())
    }
}

/// Every acknowledged mid of `device` is stored exactly once, in publish
/// order, with the bytes sent.
pub async fn assert_stored(hub: &HubNode, device: &str, acked: &[u64]) {
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
