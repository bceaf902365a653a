//! A JetStream log whose whole cluster is gone: every append ends, refused
//! (none hangs, none is acknowledged), and the partition says why.

use std::time::Duration;

use bytes::Bytes;
use fleet_api::local::NatsCluster;
use fleet_api::{DeviceId, Epoch, Mid, PartitionId, Region, UnixMillis};
use hub::log::jetstream::{JetStreamConfig, JetStreamLog};
use hub::log::{EventLog, NewRecord};

const P0: PartitionId = PartitionId(0);

fn rec(mid: u64) -> NewRecord {
    NewRecord {
        device_id: DeviceId::new("d").unwrap(),
        mid: Some(Mid(mid)),
        enqueued_at: UnixMillis(1_700_000_000_000),
        region: Region::new("eu").unwrap(),
        epoch: Epoch(1),
        payload: Bytes::from(format!("d/{mid}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_while_every_server_is_down_are_refused_not_left_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(dir.path(), "gone", 3).await.unwrap();
    let mut config = JetStreamConfig::parse(&cluster.log_url("gone"), 1).unwrap();
    config.retry_for = Duration::from_secs(2);
    let log = JetStreamLog::open(config).await.unwrap();
    log.append(P0, rec(1)).await.unwrap();
    cluster.kill_all();
    // More than the client's command channel holds (2,048) while it
    // reconnects: a writer waiting without bound to hand one over would
    // neither time out what it has in flight nor fail.
    let appends: Vec<_> = (2..=3000).map(|mid| log.append(P0, rec(mid))).collect();
    // A guard against a hang, not a measurement.
    let results =
        tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(appends))
            .await
            .expect("appends still unanswered 300 s after every server died");
    let stored: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert!(
        stored.is_empty(),
        "acknowledged with every server down: {stored:?}"
    );
}
