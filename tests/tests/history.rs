//! Failover histories with real hub processes: reconciling on the whole
//! epoch history (the KIP-279 history), and retention that respects what
//! the peer still needs, on both roles and across restarts.

use std::time::Duration;

use fleet_api::hub::EpochHistory;
use fleet_api::{DeviceId, Role, partition_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::load::{Row, admin_post as post, failback_report, registries, rows as records, status};
use tests::mqtt::RawClient;
use tests::{ADMIN_TOKEN, HubNode, Registry, harness, wait_for};

/// One partition, 4 KiB segments, 16 KiB retained, snapshots and retention
/// checks every few hundred milliseconds: retention acts within a test.
const SMALL: [&str; 10] = [
    "--partitions",
    "1",
    "--segment-bytes",
    "4096",
    "--retention-bytes",
    "16384",
    "--snapshot-every-ms",
    "200",
    "--retention-check-ms",
    "100",
];

/// Publishes mids `mids` of `id` to `hub` with `tag` in the payload and
/// waits for every PUBACK.
async fn publish(
    hub: &HubNode,
    reg: &Registry,
    id: &str,
    mids: std::ops::RangeInclusive<u64>,
    tag: &str,
) {
    let key = reg.key(id);
    let (mut c, code) = RawClient::connect(hub.mqtt, id, Some((id, &key))).await;
    assert_eq!(
        code,
        Some(ConnectReturnCode::Success),
        "{id} cannot connect to {}",
        hub.url()
    );
    let mut waiting = 0usize;
    for (n, mid) in mids.enumerate() {
        let pkid = (n % 60_000) as u16 + 1;
        c.publish(
            &format!("devices/{id}/messages/events/{mid}"),
            QoS::AtLeastOnce,
            pkid,
            format!("{tag}-{mid}").as_bytes(),
        )
        .await;
        waiting += 1;
    }
    while waiting > 0 {
        match c.recv(Duration::from_secs(20)).await {
            Ok(Packet::PubAck(_)) => waiting -= 1,
            Ok(_) => {}
            Err(e) => panic!("{waiting} PUBACKs missing from {}: {e:?}", hub.url()),
        }
    }
}

async fn promote(hub: &HubNode, expected: u64) {
    let r = post(
        format!("{}/v1/promote", hub.url()),
        serde_json::json!({"expected_epoch": expected, "mode": "forced"}),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

async fn epochs(hub: &HubNode, p: u32) -> EpochHistory {
    reqwest::Client::new()
        .get(format!("{}/v1/partitions/{p}/epochs", hub.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("epoch history")
        .json()
        .await
        .expect("epoch history JSON")
}

/// Issue 15's history: A at epoch 1 writes offsets 0..150 while B holds
/// 0..80; B is forced (epoch 2) and writes 80..120; B dies; A is forced
/// (epoch 3); B returns. Asking only where B's last epoch (2) ends in A's
/// history (150, past B's end) would keep B's foreign 80..120.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_region_reconciles_on_the_whole_epoch_history() {
    let h = harness!("a_returning_region_reconciles_on_the_whole_epoch_history");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (mut a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    publish(&a, &ra, "d1", 1..=80, "a").await;
    wait_for(20, "B to hold offsets 0..80", || async {
        records(&b, "d1").await.len() == 80
    })
    .await;
    b.node.kill9();
    publish(&a, &ra, "d1", 81..=150, "a").await;
    a.node.kill9();

    b.restart(&h);
    promote(&b, 1).await;
    publish(&b, &rb, "d1", 81..=120, "b").await;
    assert_eq!(records(&b, "d1").await.len(), 120);
    b.node.kill9();

    a.restart(&h);
    // A learns that epoch 2 exists (as a concierge would tell it), then is
    // forced to epoch 3 and takes writes.
    let r = post(
        format!("{}/v1/demote", a.url()),
        serde_json::json!({"epoch": 2}),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    promote(&a, 2).await;
    publish(&a, &ra, "d1", 151..=160, "a").await;

    b.restart(&h);
    wait_for(30, "B to follow epoch 3", || async {
        let s = status(&b).await;
        s.role == Role::Secondary && s.epoch.0 == 3
    })
    .await;
    let on_a = records(&a, "d1").await;
    assert_eq!(on_a.len(), 160);
    wait_for(30, "B to hold A's history", || async {
        records(&b, "d1").await.len() == 160
    })
    .await;
    let on_b = records(&b, "d1").await;
    let differ = on_a.iter().zip(&on_b).find(|(x, y)| x != y);
    assert!(
        differ.is_none(),
        "B must hold A's records at every offset (its epoch-2 records at 80..120 are foreign); first difference (A, B): {differ:?}"
    );
    // B set aside exactly its epoch-2 records.
    let fb = failback_report(&b).await;
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8);
    let ranges: Vec<(u64, u64, u64)> = fb
        .archived
        .iter()
        .filter(|r| r.partition == p)
        .map(|r| (r.from.0, r.to.0, r.epoch.0))
        .collect();
    assert_eq!(ranges, vec![(80, 120, 2)], "{fb:?}");
    // The epoch history says where each epoch starts.
    let history = epochs(&a, p.0).await;
    let starts: Vec<(u64, u64)> = history
        .epochs
        .iter()
        .map(|e| (e.epoch.0, e.start.0))
        .collect();
    assert_eq!(starts, vec![(1, 0), (3, 150)]);
    assert_eq!(history.high_watermark.0, 160);
}

fn segment_files(hub_dir: &std::path::Path) -> usize {
    let mut n = 0;
    for part in std::fs::read_dir(hub_dir.join("log"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(part.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "log") {
                n += 1;
            }
        }
    }
    n
}

/// Retention with small segments on both roles: a secondary that is down
/// while the primary writes, and a primary restarted meanwhile, never lose
/// what the secondary still needs (no 410, every record arrives); both
/// disks stay bounded once it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_the_secondary_needs_and_runs_on_both_roles() {
    let h = harness!("retention_keeps_what_the_secondary_needs_and_runs_on_both_roles");
    let (ra, rb) = registries(&h, &["d1"]).await;
    // B pulls through a proxy that can be cut; A watches B directly (a
    // restarted primary waits until it sees its peer).
    let (http_a, http_b) = (tests::reserve_port(), tests::reserve_port());
    let to_a = tests::proxy::Proxy::start(http_a.parse().unwrap()).await;
    let (peer_of_b, peer_of_a) = (to_a.url(), format!("http://{http_b}"));
    let mut args_b = vec![
        "--http",
        &http_b,
        "--peer",
        &peer_of_b,
        "--role",
        "secondary",
    ];
    args_b.extend_from_slice(&SMALL);
    let b = h.hub("hub-b", "b", &rb.url, &args_b);
    let mut args_a = vec!["--http", &http_a, "--peer", &peer_of_a, "--role", "primary"];
    args_a.extend_from_slice(&SMALL);
    let mut a = h.hub("hub-a", "a", &ra.url, &args_a);
    publish(&a, &ra, "d1", 1..=100, "a").await;
    wait_for(20, "B to hold the first records", || async {
        status(&b).await.partitions[0].high_watermark.0 == 100
    })
    .await;
    to_a.cut();
    // Far more than the retention limit while B cannot pull, and a restart
    // of A in the middle (it must remember how far B had pulled).
    publish(&a, &ra, "d1", 101..=600, "a").await;
    a.restart(&h);
    wait_for(20, "A to accept writes again", || async {
        let s = status(&a).await;
        s.role == Role::Primary && !s.fenced
    })
    .await;
    publish(&a, &ra, "d1", 601..=1200, "a").await;
    // Wait until snapshots and retention have both run twice since: each
    // had every chance to delete what B still needs.
    let passes = a.metric("fleet_hub_retention_passes_total").await;
    let snapshots = a.metric("fleet_hub_dedup_snapshots_total").await;
    wait_for(30, "retention to run after the writes", || async {
        a.metric("fleet_hub_retention_passes_total").await >= passes + 2.0
            && a.metric("fleet_hub_dedup_snapshots_total").await >= snapshots + 2.0
    })
    .await;
    let start = status(&a).await.partitions[0].log_start.0;
    assert!(
        start <= 100,
        "A deleted records up to {start}, which the attached secondary has not pulled (it holds 0..100)"
    );
    to_a.heal();
    wait_for(60, "B to catch up", || async {
        status(&b).await.partitions[0].high_watermark.0 == 1200
    })
    .await;
    // Everything arrived in order, none skipped.
    assert_eq!(
        b.metric("fleet_hub_replication_skipped_records_total")
            .await,
        0.0,
        "B skipped records"
    );
    // Now both roles apply retention: the oldest segments go.
    publish(&a, &ra, "d1", 1201..=1300, "a").await;
    wait_for(30, "retention on the primary", || async {
        status(&a).await.partitions[0].log_start.0 > 0
    })
    .await;
    wait_for(30, "retention on the secondary", || async {
        status(&b).await.partitions[0].log_start.0 > 0
    })
    .await;
    for dir in ["a", "b"] {
        let files = segment_files(&h.dir().join(format!("hub-{dir}")));
        assert!(
            files <= 12,
            "hub-{dir}: {files} segment files, retention does not bound the disk"
        );
    }
}

/// A detached secondary does not hold the primary's floor: when it returns
/// after retention deleted what it lacks, it skips to the primary's retained
/// log (counted, loudly) instead of asking for deleted records forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_secondary_returning_past_retention_skips_forward() {
    let h = harness!("a_detached_secondary_returning_past_retention_skips_forward");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &SMALL);
    publish(&a, &ra, "d1", 1..=50, "a").await;
    wait_for(20, "B to hold the first records", || async {
        status(&b).await.partitions[0].high_watermark.0 == 50
    })
    .await;
    b.node.kill9();
    let r = post(format!("{}/v1/peer/detach", a.url()), serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    publish(&a, &ra, "d1", 51..=1000, "a").await;
    wait_for(
        60,
        "retention on the primary to pass B (once B no longer pulls)",
        || async { status(&a).await.partitions[0].log_start.0 > 50 },
    )
    .await;
    let r = post(format!("{}/v1/peer/attach", a.url()), serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    b.restart(&h);
    wait_for(60, "B to catch up past the gap", || async {
        status(&b).await.partitions[0].high_watermark.0 == 1000
    })
    .await;
    assert!(
        b.metric("fleet_hub_replication_skipped_records_total")
            .await
            > 0.0
    );
    let start = status(&b).await.partitions[0].log_start.0;
    assert!(start > 50, "B's log starts at {start}");
    // What B holds is A's history at the same offsets.
    let on_a = retained(&a).await;
    let on_b = retained(&b).await;
    assert!(!on_b.is_empty());
    let tail_a: Vec<&Row> = on_a.iter().filter(|r| r.0 >= on_b[0].0).collect();
    let tail_b: Vec<&Row> = on_b.iter().filter(|r| r.0 >= on_a[0].0).collect();
    assert_eq!(tail_a, tail_b);
}

/// Every retained record of partition 0 (all the log holds: a secondary
/// serves readers only what it confirmed against the primary since, which
/// may lag its high watermark).
async fn retained(hub: &HubNode) -> Vec<Row> {
    let start = status(hub).await.partitions[0].log_start;
    let page = hub
        .client()
        .records_upto(
            fleet_api::PartitionId(0),
            start,
            10_000,
            Duration::ZERO,
            fleet_api::hub::ReadUpto::Committed,
        )
        .await
        .expect("read the retained log");
    page.records
        .into_iter()
        .map(|r| (r.offset.0, r.mid.map(|m| m.0), r.payload, r.epoch.0))
        .collect()
}

/// The same history, but the returning region's retention has deleted the
/// start of its foreign epoch: the common point is below its retained log.
/// Its epoch history outlives retention, so it still finds that point,
/// archives everything it retains, continues empty from there and pulls
/// the primary's records (no silent hole, no endless retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_region_whose_retention_passed_the_divergence_reconciles() {
    let h = harness!("a_returning_region_whose_retention_passed_the_divergence_reconciles");
    let (ra, rb) = registries(&h, &["d1"]).await;
    let (mut a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &SMALL);
    publish(&a, &ra, "d1", 1..=80, "a").await;
    wait_for(20, "B to hold offsets 0..80", || async {
        status(&b).await.partitions[0].high_watermark.0 == 80
    })
    .await;
    b.node.kill9();
    publish(&a, &ra, "d1", 81..=150, "a").await;
    a.node.kill9();

    b.restart(&h);
    promote(&b, 1).await;
    // Far more than B retains: its epoch 2 starts below its retained log.
    publish(&b, &rb, "d1", 81..=1080, "b").await;
    wait_for(30, "B's retention to pass offset 80", || async {
        status(&b).await.partitions[0].log_start.0 > 80
    })
    .await;
    b.node.kill9();

    a.restart(&h);
    let r = post(
        format!("{}/v1/demote", a.url()),
        serde_json::json!({"epoch": 2}),
    )
    .await;
    assert_eq!(r.status(), 200);
    promote(&a, 2).await;
    publish(&a, &ra, "d1", 151..=160, "a").await;

    b.restart(&h);
    wait_for(30, "B to hold A's history", || async {
        let s = status(&b).await;
        s.role == Role::Secondary && s.epoch.0 == 3 && s.partitions[0].high_watermark.0 == 160
    })
    .await;
    let on_b = retained(&b).await;
    let on_a = retained(&a).await;
    assert_eq!(
        on_b.first().map(|r| r.0),
        Some(80),
        "B continues from the common point"
    );
    let tail_a: Vec<&Row> = on_a.iter().filter(|r| r.0 >= 80).collect();
    let tail_b: Vec<&Row> = on_b.iter().collect();
    assert_eq!(
        tail_a, tail_b,
        "B holds A's records at every offset it holds"
    );
    let history = epochs(&b, 0).await;
    let starts: Vec<(u64, u64)> = history
        .epochs
        .iter()
        .map(|e| (e.epoch.0, e.start.0))
        .collect();
    assert_eq!(starts, vec![(1, 0), (3, 150)], "B's epoch history is A's");
}
