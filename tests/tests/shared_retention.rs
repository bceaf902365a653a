//! Retention on a log shared by two hubs of a region (one R3 JetStream of
//! three real nats-server processes). A device silent while retention
//! purges all its records, whose partition then moves to the other hub
//! (SIGKILL), still has its resends recognised as duplicates there: the
//! last mid of every purged device is kept before its records go. And
//! retention never purges what the peer region has not pulled, through a
//! takeover too.

use std::time::Duration;

use fleet_api::hub::{ReadUpto, StatusResponse};
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

fn owns(s: &StatusResponse, p: PartitionId) -> bool {
    s.owned.as_ref().is_some_and(|o| o.contains(&p))
}

async fn until<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `mids` of `device` one by one at `hub`, each acknowledged
/// before the next (reconnecting while the hub refuses the partition).
async fn publish(hub: &HubNode, reg: &Registry, device: &str, mids: impl Iterator<Item = u64>) {
    let key = reg.key(device);
    let mut client: Option<RawClient> = None;
    for mid in mids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let c = match client.as_mut() {
                Some(c) => c,
                None => {
                    let (c, code) =
                        RawClient::connect(hub.mqtt, device, Some((device, &key))).await;
                    if code != Some(ConnectReturnCode::Success) {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "{device} was never taken: {code:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    client.insert(c)
                }
            };
            let topic = format!("devices/{device}/messages/events/{mid}");
            c.publish(&topic, QoS::AtLeastOnce, 1, &payload_of(device, mid))
                .await;
            match c.recv(Duration::from_secs(30)).await {
                Ok(Packet::PubAck(_)) => break,
                other => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{device} mid {mid} was never acknowledged: {other:?}"
                    );
                    client = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Once two hubs have divided the partitions (the first holds them all at
/// first, then hands some over) and the division has held for a second:
/// the first partition the first hub writes.
async fn first_of_a_settled_division(a: &HubNode, b: &HubNode) -> PartitionId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = None;
    loop {
        let (sa, sb) = (status(a).await, status(b).await);
        let (oa, ob) = (sa.owned.unwrap_or_default(), sb.owned.unwrap_or_default());
        if oa.len() + ob.len() == PARTITIONS as usize && !oa.is_empty() && !ob.is_empty() {
            if seen.as_ref() == Some(&oa) {
                return oa[0];
            }
            seen = Some(oa);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        seen = None;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partitions were never divided: {oa:?} {ob:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `device`'s mids among the retained records of `p`, in log order.
async fn retained_mids(hub: &HubNode, p: PartitionId, device: &str) -> Vec<u64> {
    let mut from = status(hub).await.partitions[p.0 as usize].log_start;
    let mut mids = Vec::new();
    loop {
        let page = match hub
            .client()
            .records_upto(p, from, 10_000, Duration::ZERO, ReadUpto::Committed)
            .await
        {
            Ok(page) => page,
            // Retention passed the read meanwhile: again from the start.
            Err(fleet_api::client::ClientError::Api { status: 410, .. }) => {
                from = status(hub).await.partitions[p.0 as usize].log_start;
                mids.clear();
                continue;
            }
            Err(e) => panic!("read the retained records: {e}"),
        };
        let Some(last) = page.records.last() else {
            return mids;
        };
        from = last.offset.next();
        mids.extend(
            page.records
                .iter()
                .filter(|r| r.device_id.as_str() == device)
                .map(|r| r.mid.map_or(0, |m| m.0)),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_whose_records_were_purged_is_still_deduplicated_after_a_takeover() {
    let h = harness!(
        "a_silent_device_whose_records_were_purged_is_still_deduplicated_after_a_takeover"
    );
    let cluster = NatsCluster::start(&h.dir().join("nats"), "js", 3)
        .await
        .unwrap();
    let ids: Vec<String> = (0..64).map(|i| format!("ret-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&refs).await;
    let url = cluster.log_url("eu");
    let args = |id: &'static str| -> Vec<String> {
        [
            "--log",
            url.as_str(),
            "--hub-id",
            id,
            "--lease-ttl-ms",
            "1000",
            "--retention-bytes",
            "20000",
            "--retention-check-ms",
            "100",
            "--snapshot-every-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args_a = args("a");
    let args_b = args("b");
    let mut a = h.hub(
        "hub-a",
        "eu",
        &reg.url,
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = h.hub(
        "hub-b",
        "eu",
        &reg.url,
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Two devices of one partition that hub a writes.
    let p = first_of_a_settled_division(&a, &b).await;
    let mut of_p = ids
        .iter()
        .filter(|d| partition_for(&DeviceId::new(d.as_str()).unwrap(), PARTITIONS) == p);
    let silent = of_p.next().expect("a device in the partition").clone();
    let loud = of_p
        .next()
        .expect("a second device in the partition")
        .clone();

    publish(&a, &reg, &silent, 1..=20).await;
    // The loud device alone: its records push the silent one's out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut next = 1;
    while status(&a).await.partitions[p.0 as usize].log_start.0 <= 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never purged the silent device's records"
        );
        publish(&a, &reg, &loud, next..next + 50).await;
        next += 50;
    }
    assert!(retained_mids(&a, p, &silent).await.is_empty());

    a.node.kill9();
    until(30, "hub b to take the partition over", || async {
        owns(&status(&b).await, p)
    })
    .await;
    // Resends of what it sent before (its outbox had not seen them
    // acknowledged): duplicates, stored nothing; then a new mid.
    publish(&b, &reg, &silent, [19, 20, 21].into_iter()).await;
    assert!(b.metric("fleet_hub_duplicates_total").await >= 2.0);
    assert_eq!(
        retained_mids(&b, p, &silent).await,
        vec![21],
        "the resends were stored again"
    );
    // The loud device goes on where it was, on b.
    publish(&b, &reg, &loud, next..next + 5).await;
    let loud_mids = retained_mids(&b, p, &loud).await;
    assert!(
        loud_mids.windows(2).all(|w| w[1] == w[0] + 1),
        "{loud_mids:?}"
    );
    assert_eq!(loud_mids.last(), Some(&(next + 4)));
}

/// Waits for `n` more retention passes at `hub` (each after a floor was
/// set: snapshots and passes both run every 100 ms).
async fn retention_passes(hub: &HubNode, n: u32) {
    let metric = "fleet_hub_retention_passes_total";
    let from = hub.metric(metric).await;
    until(30, "retention passes", || async {
        hub.metric(metric).await >= from + f64::from(n)
    })
    .await;
}

/// The status of partition `p` at `hub`: (log start, high watermark).
async fn span(hub: &HubNode, p: PartitionId) -> (u64, u64) {
    let s = status(hub).await.partitions[p.0 as usize].clone();
    (s.log_start.0, s.high_watermark.0)
}

/// Region eu (two hubs on one R3 JetStream log, retention on) replicates
/// to region us (one hub). While us is down, eu's retention keeps every
/// record us has not pulled, also after the hub writing the partition is
/// killed and the other takes it over (it trusts no floor it did not see
/// pulled itself); us comes back and pulls everything, skipping nothing;
/// only then does retention go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_the_peer_has_not_pulled_through_a_takeover() {
    let h = harness!("retention_keeps_what_the_peer_has_not_pulled_through_a_takeover");
    let cluster = NatsCluster::start(&h.dir().join("nats"), "js", 3)
        .await
        .unwrap();
    let ids: Vec<String> = (0..64).map(|i| format!("peer-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&refs).await;
    let us_reg = Registry::sqlite(h.dir(), "us").await;
    let ports: Vec<String> = (0..3)
        .map(|_| fleet::up::reserve([127, 0, 0, 1]).unwrap().to_string())
        .collect();
    let url = cluster.log_url("eu");
    let us_peer = format!("http://{}", ports[2]);
    let eu_peers = format!("http://{},http://{}", ports[0], ports[1]);
    let eu_args = |id: &'static str, port: &str| -> Vec<String> {
        [
            "--log",
            url.as_str(),
            "--hub-id",
            id,
            "--lease-ttl-ms",
            "1000",
            "--http",
            port,
            "--peer",
            us_peer.as_str(),
            "--replication",
            "async",
            "--role",
            "primary",
            "--retention-bytes",
            "20000",
            "--retention-check-ms",
            "100",
            "--snapshot-every-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (a1, a2) = (eu_args("e1", &ports[0]), eu_args("e2", &ports[1]));
    let mut e1 = h.hub(
        "eu-1",
        "eu",
        &reg.url,
        &a1.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let e2 = h.hub(
        "eu-2",
        "eu",
        &reg.url,
        &a2.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut us = h.hub(
        "us-1",
        "us",
        &us_reg.url,
        &[
            "--http",
            &ports[2],
            "--peer",
            &eu_peers,
            "--replication",
            "async",
            "--role",
            "secondary",
        ],
    );
    let p = first_of_a_settled_division(&e1, &e2).await;
    let device = ids
        .iter()
        .find(|d| partition_for(&DeviceId::new(d.as_str()).unwrap(), PARTITIONS) == p)
        .expect("a device in the partition")
        .clone();
    publish(&e1, &reg, &device, 1..=100).await;
    until(30, "us to pull the first records", || async {
        span(&us, p).await.1 == 100
    })
    .await;
    us.node.kill9();
    // Far more than retention keeps, while us cannot pull.
    publish(&e1, &reg, &device, 101..=700).await;
    retention_passes(&e1, 5).await;
    let (start, hw) = span(&e1, p).await;
    assert_eq!(hw, 700);
    assert!(
        start <= 100,
        "e1 purged what us had not pulled: starts at {start}"
    );
    e1.node.kill9();
    until(30, "e2 to take the partition over", || async {
        owns(&status(&e2).await, p)
    })
    .await;
    publish(&e2, &reg, &device, 701..=800).await;
    retention_passes(&e2, 5).await;
    let (start, _) = span(&e2, p).await;
    assert!(
        start <= 100,
        "e2 purged what us had not pulled: starts at {start}"
    );
    us.restart(&h);
    until(60, "us to pull everything", || async {
        span(&us, p).await.1 == 800
    })
    .await;
    assert_eq!(
        us.metric("fleet_hub_replication_skipped_records_total")
            .await,
        0.0,
        "us skipped records retention deleted"
    );
    let mids = retained_mids(&us, p, &device).await;
    assert_eq!(mids, (1..=800).collect::<Vec<u64>>());
    // Pulled: retention goes on.
    until(60, "e2's retention to go on once us pulled", || async {
        span(&e2, p).await.0 > 100
    })
    .await;
}
