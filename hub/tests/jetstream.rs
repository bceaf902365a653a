//! The JetStream log against real nats-server clusters: servers killed and
//! wiped under load, a whole cluster restarting under a starting hub, a
//! second writer, failback cuts and skips, and the fsync check.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fleet_api::local::NatsCluster;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use hub::log::jetstream::{JetStreamConfig, JetStreamLog};
use hub::log::{EventLog, LogError, NewRecord, ReadLimits};

const P0: PartitionId = PartitionId(0);
const ALL: ReadLimits = ReadLimits {
    max_records: 1_000_000,
    max_bytes: 1 << 30,
};

fn rec(device: &str, mid: u64, epoch: u64) -> NewRecord {
    NewRecord {
        device_id: DeviceId::new(device).unwrap(),
        mid: Some(Mid(mid)),
        enqueued_at: UnixMillis(1_700_000_000_000),
        region: Region::new("eu").unwrap(),
        epoch: Epoch(epoch),
        payload: Bytes::from(format!("{device}/{mid}")),
    }
}

async fn open(url: &str, partitions: u32) -> Arc<JetStreamLog> {
    JetStreamLog::open(JetStreamConfig::parse(url, partitions).unwrap())
        .await
        .unwrap()
}

/// `(offset, mid)` of each record.
fn offsets_and_mids(records: &[hub::log::Record]) -> Vec<(u64, u64)> {
    records
        .iter()
        .map(|r| (r.offset.0, r.record.mid.unwrap().0))
        .collect()
}

/// `(offset, mid)` of every frame in an archive file.
fn archived(path: &std::path::Path) -> Vec<(u64, u64)> {
    use hub::log::frame::{Decoded, decode};
    let buf = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match decode(&buf[at..]) {
            Decoded::Frame {
                offset,
                record,
                len,
                ..
            } => {
                out.push((offset.0, record.mid.unwrap().0));
                at += len;
            }
            other => panic!("archive {} at {at}: {other:?}", path.display()),
        }
    }
    out
}

/// Every acknowledged `(offset, mid)` reads back as that record.
async fn assert_all_there(log: &JetStreamLog, acked: &BTreeMap<u64, u64>) {
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    let stored: BTreeMap<u64, u64> = offsets_and_mids(&got).into_iter().collect();
    for (off, mid) in acked {
        assert_eq!(
            stored.get(off),
            Some(mid),
            "acknowledged offset {off} (mid {mid}) is not stored as acknowledged"
        );
    }
    let mids: Vec<u64> = got.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert!(mids.windows(2).all(|w| w[0] < w[1]), "stored in call order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_killed_and_wiped_under_load_lose_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(dir.path(), "load", 3).await.unwrap();
    let log = open(&cluster.log_url("load"), 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let mut failed = 0u64;
            let mut mid = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Eight in flight at a time, like a hub's pipelined ingest.
                let batch: Vec<_> = (0..8)
                    .map(|_| {
                        mid += 1;
                        (mid, log.append(P0, rec("d", mid, 1)))
                    })
                    .collect();
                for (m, fut) in batch {
                    match fut.await {
                        Ok(off) => {
                            acked.insert(off.0, m);
                        }
                        Err(_) => failed += 1,
                    }
                }
            }
            (acked, failed)
        })
    };
    let progress = |n: usize| {
        let log = log.clone();
        async move {
            let target = log.high_watermark(P0).0 + n as u64;
            tokio::time::timeout(Duration::from_secs(60), async {
                while log.high_watermark(P0).0 < target {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("appends go on");
        }
    };
    progress(200).await;
    cluster.kill(0); // SIGKILL: a crashed server (its store stays)
    progress(200).await;
    cluster.restart_wiped(0).await.unwrap(); // back with an empty disk
    progress(200).await;
    // Let the wiped server catch up, then lose another: the data must now
    // be on the wiped one too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.kill(1);
    progress(200).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.await.unwrap();
    assert!(acked.len() >= 800, "{} acknowledged", acked.len());
    assert_eq!(failed, 0, "a lost server only delays appends");
    assert_all_there(&log, &acked).await;
    // A fresh reader (another hub) sees the same.
    drop(log);
    let again = open(&cluster.log_url("load"), 1).await;
    assert_all_there(&again, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_opens_while_its_whole_cluster_is_still_starting() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(dir.path(), "cold", 3).await.unwrap();
    let url = cluster.log_url("cold");
    let mut acked = BTreeMap::new();
    {
        let log = open(&url, 2).await;
        for mid in 1..=50 {
            let off = log.append(P0, rec("d", mid, 1)).await.unwrap();
            acked.insert(off.0, mid);
        }
    }
    // The region is lost and comes back: its servers and its hub start
    // together, so the hub finds servers not yet listening, then streams
    // without leaders. It waits for them instead of giving up.
    cluster.kill_all();
    cluster.spawn_stopped().unwrap();
    let log = open(&url, 2).await;
    assert_all_there(&log, &acked).await;
    assert_eq!(log.append(P0, rec("d", 51, 1)).await.unwrap(), Offset(50));
    assert_eq!(
        log.append(PartitionId(1), rec("e", 1, 1)).await.unwrap(),
        Offset(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_fences_the_first() {
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("fence");
    let first = open(&url, 1).await;
    first.append(P0, rec("a", 1, 1)).await.unwrap();
    let second = open(&url, 1).await;
    assert_eq!(second.append(P0, rec("b", 1, 1)).await.unwrap(), Offset(1));
    // The first writer still believes offset 1 is next: refused, never
    // stored out of order or twice.
    let err = first.append(P0, rec("a", 2, 1)).await.unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
    assert!(first.partition_failure(P0).unwrap().contains("fenced"));
    assert!(first.append(P0, rec("a", 3, 1)).await.is_err());
    let got = second.read(P0, Offset(0), ALL).await.unwrap();
    let devices: Vec<&str> = got.iter().map(|r| r.record.device_id.as_str()).collect();
    assert_eq!(devices, ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_cut_and_skip_keep_offsets_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("cut");
    let log = open(&url, 1).await;
    for i in 0..10 {
        log.append(P0, rec("d", i, 1)).await.unwrap();
    }
    for i in 10..15 {
        log.append(P0, rec("d", i, 2)).await.unwrap();
    }
    assert_eq!(
        log.epoch_history(P0),
        vec![(Epoch(1), Offset(0)), (Epoch(2), Offset(10))]
    );
    // Failback: the tail from 10 diverged; it is archived, then the
    // partition continues at 10 with the new primary's epoch.
    let archive = dir.path().join("archive/p0-10");
    assert_eq!(
        log.cut_and_archive(P0, Offset(10), archive.clone())
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        archived(&archive),
        (10..15).map(|m| (m, m)).collect::<Vec<_>>()
    );
    assert_eq!(log.high_watermark(P0), Offset(10));
    assert_eq!(log.epoch_history(P0), vec![(Epoch(1), Offset(0))]);
    assert_eq!(log.append(P0, rec("d", 100, 3)).await.unwrap(), Offset(10));
    drop(log);
    let log = open(&url, 1).await;
    assert_eq!(log.high_watermark(P0), Offset(11));
    assert_eq!(
        log.epoch_history(P0),
        vec![(Epoch(1), Offset(0)), (Epoch(3), Offset(10))]
    );
    let got = log.read(P0, Offset(8), ALL).await.unwrap();
    let mids: Vec<u64> = got.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert_eq!(mids, [8, 9, 100], "reads cross generations");
    // A secondary whose primary no longer holds what it misses: skip.
    let history = vec![(Epoch(1), Offset(0)), (Epoch(4), Offset(50))];
    assert_eq!(
        log.skip_to(P0, Offset(100), history.clone()).await.unwrap(),
        11
    );
    assert_eq!(log.log_start(P0), Offset(100));
    // The skipped generations' streams are deleted.
    let client = async_nats::connect(cluster.servers[0].client.to_string())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(js.get_stream("cut_p0_g0").await.is_err());
    assert!(js.get_stream("cut_p0_g1").await.is_err());
    assert!(matches!(
        log.read(P0, Offset(5), ALL).await,
        Err(LogError::OffsetGone { .. })
    ));
    drop(log);
    let log = open(&url, 1).await;
    assert_eq!(log.high_watermark(P0), Offset(100), "an empty generation");
    assert_eq!(log.append(P0, rec("d", 200, 4)).await.unwrap(), Offset(100));
    // A second cut below the current generation's first offset: the
    // generations it covered are gone from reads.
    for i in 201..205 {
        log.append(P0, rec("d", i, 4)).await.unwrap();
    }
    log.cut_and_archive(P0, Offset(102), dir.path().join("archive/p0-102"))
        .await
        .unwrap();
    log.append(P0, rec("d", 300, 5)).await.unwrap();
    log.cut_and_archive(P0, Offset(101), dir.path().join("archive/p0-101"))
        .await
        .unwrap();
    assert_eq!(log.append(P0, rec("d", 400, 5)).await.unwrap(), Offset(101));
    let got = log.read(P0, Offset(100), ALL).await.unwrap();
    let mids: Vec<u64> = got.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert_eq!(mids, [200, 400]);
    drop(log);
    let log = open(&url, 1).await;
    assert_eq!(
        log.epoch_history(P0),
        vec![
            (Epoch(1), Offset(0)),
            (Epoch(4), Offset(50)),
            (Epoch(5), Offset(101))
        ]
    );
    assert_eq!(log.high_watermark(P0), Offset(102));
    assert_eq!(
        log.read(P0, Offset(100), ALL).await.unwrap()[0].record.mid,
        Some(Mid(200))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_servers_that_acknowledge_before_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let lazy = NatsCluster::start_with(dir.path(), "lazy", 1, false)
        .await
        .unwrap();
    let url = lazy.log_url("lazy");
    let err = JetStreamLog::open(JetStreamConfig::parse(&url, 1).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("acknowledges before fsync"), "{err}");
    // Without monitoring URLs nothing can be verified: refused too.
    let bare = format!("nats://{}/lazy?replicas=1", lazy.servers[0].client);
    let err = JetStreamLog::open(JetStreamConfig::parse(&bare, 1).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot verify"), "{err}");
    // The operator's explicit opt-out.
    let mut config = JetStreamConfig::parse(&bare, 1).unwrap();
    config.allow_unsynced = true;
    let log = JetStreamLog::open(config).await.unwrap();
    assert_eq!(log.append(P0, rec("d", 1, 1)).await.unwrap(), Offset(0));
    // A monitoring URL list that leaves out a cluster member is refused.
    let three = NatsCluster::shared();
    let partial = format!(
        "nats://{}/p?replicas=3&monitor=http://{},http://{}",
        three.servers[0].client, three.servers[0].monitor, three.servers[1].monitor
    );
    let err = JetStreamLog::open(JetStreamConfig::parse(&partial, 1).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("reach only 2 of them"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_servers_cannot_take_fails_the_partition() {
    let cluster = NatsCluster::shared();
    let log = open(&cluster.log_url("big"), 1).await;
    log.append(P0, rec("d", 1, 1)).await.unwrap();
    let mut big = rec("d", 2, 1);
    big.payload = Bytes::from(vec![7u8; 2 << 20]);
    // The caller counted on offset 1: skipping it would shift every later
    // record, so the partition refuses writes, like a file log that cannot write.
    let err = log.append(P0, big).await.unwrap_err();
    assert!(err.to_string().contains("message limit"), "{err}");
    assert!(log.append(P0, rec("d", 3, 1)).await.is_err());
    assert!(log.flush(P0).await.is_err());
    assert!(log.health().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_cannot_cut_or_write_into_a_newer_generation() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("stale");
    let quick = |url: &str| {
        let mut c = JetStreamConfig::parse(url, 1).unwrap();
        c.retry_for = Duration::from_secs(2);
        c
    };
    let old = JetStreamLog::open(quick(&url)).await.unwrap();
    for i in 0..5 {
        old.append(P0, rec("d", i, 1)).await.unwrap();
    }
    let new = JetStreamLog::open(quick(&url)).await.unwrap();
    new.cut_and_archive(P0, Offset(3), dir.path().join("a3"))
        .await
        .unwrap();
    assert_eq!(archived(&dir.path().join("a3")), [(3, 3), (4, 4)]);
    new.append(P0, rec("d", 10, 2)).await.unwrap();
    // The old writer's stream is sealed: its append is refused, not
    // acknowledged into a generation nobody reads.
    let err = old.append(P0, rec("d", 5, 1)).await.unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
    assert!(old.partition_failure(P0).is_some());
    // Its cut claims nothing and deletes nothing.
    assert!(matches!(
        old.cut_and_archive(P0, Offset(1), dir.path().join("a1"))
            .await
            .unwrap_err(),
        LogError::Failed { .. }
    ));
    assert!(!dir.path().join("a1").exists());
    let got = new.read(P0, Offset(0), ALL).await.unwrap();
    let mids: Vec<u64> = got.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert_eq!(mids, [0, 1, 2, 10]);
    drop(new);
    let again = open(&url, 1).await;
    let got = again.read(P0, Offset(0), ALL).await.unwrap();
    let mids: Vec<u64> = got.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert_eq!(mids, [0, 1, 2, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_raced_by_a_stale_writer_fails_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("race");
    let old = open(&url, 1).await;
    for i in 0..5 {
        old.append(P0, rec("d", i, 1)).await.unwrap();
    }
    let new = open(&url, 1).await;
    // The stale writer appends after the new one opened: acknowledged.
    assert_eq!(old.append(P0, rec("d", 5, 1)).await.unwrap(), Offset(5));
    // The new writer's cut sees the stream moved behind its back.
    let err = new
        .cut_and_archive(P0, Offset(3), dir.path().join("a3"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another writer"), "{err}");
    drop((old, new));
    // Reopened: the sealed stream rolls into a new generation; the
    // acknowledged record 5 is there, and appends go on after it.
    let log = open(&url, 1).await;
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    let mids: Vec<u64> = got.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert_eq!(mids, [0, 1, 2, 3, 4, 5]);
    assert_eq!(log.append(P0, rec("d", 6, 1)).await.unwrap(), Offset(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_interrupted_after_the_seal_recovers_at_open() {
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("seal");
    let log = open(&url, 1).await;
    for i in 0..3 {
        log.append(P0, rec("d", i, 1)).await.unwrap();
    }
    drop(log);
    // What a crash between sealing and switching leaves: a sealed current
    // stream (and possibly an orphan claimed generation).
    let client = async_nats::connect(cluster.servers[0].client.to_string())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream("seal_p0_g0").await.unwrap();
    let mut config = s.info().await.unwrap().config.clone();
    config.sealed = true;
    js.update_stream(config).await.unwrap();
    let log = open(&url, 1).await;
    assert_eq!(log.append(P0, rec("d", 3, 1)).await.unwrap(), Offset(3));
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    let mids: Vec<u64> = got.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert_eq!(mids, [0, 1, 2, 3]);
    drop(log);
    let log = open(&url, 1).await;
    assert_eq!(log.high_watermark(P0), Offset(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_by_size_and_age_never_past_the_floor() {
    use hub::log::jetstream::RetentionPolicy;
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("retain");
    let config = JetStreamConfig::parse(&url, 1).unwrap();
    let by_size = RetentionPolicy {
        bytes: Some(8 * 1024),
        age: None,
    };
    let log = JetStreamLog::open(config.clone()).await.unwrap();
    for mid in 1..=200 {
        log.append(P0, rec("d", mid, 1)).await.unwrap();
    }
    // Over the size, but the floor (nothing pulled yet) keeps everything.
    assert_eq!(log.retain_now(by_size).await.unwrap(), 0);
    assert_eq!(log.log_start(P0), Offset(0));
    // With the floor at 150 the oldest records go, down to the size limit
    // if the floor allows, never past it.
    log.set_retention_floor(P0, Offset(150));
    let purged = log.retain_now(by_size).await.unwrap();
    let start = log.log_start(P0).0;
    assert!(
        purged > 0 && start == purged && start <= 150,
        "start {start}"
    );
    let gone = log.read(P0, Offset(start - 1), ALL).await.unwrap_err();
    assert!(matches!(gone, LogError::OffsetGone { .. }), "{gone}");
    let kept = log.read(P0, Offset(start), ALL).await.unwrap();
    let mids: Vec<u64> = kept.iter().map(|r| r.record.mid.unwrap().0).collect();
    assert_eq!(mids, (start + 1..=200).collect::<Vec<_>>());
    // A cut after retention: generation 1 starts at 195.
    let dir = tempfile::tempdir().unwrap();
    log.cut_and_archive(P0, Offset(195), dir.path().join("cut"))
        .await
        .unwrap();
    for mid in 196..=200 {
        log.append(P0, rec("d", mid, 1)).await.unwrap();
    }
    drop(log);
    // Reopened (the start is kept): by age, everything received before now
    // may go, but only below the floor, here inside generation 1, so
    // generation 0's stream goes whole.
    let log = JetStreamLog::open(config.clone()).await.unwrap();
    assert_eq!(log.log_start(P0).0, start);
    let keep_all = RetentionPolicy {
        bytes: None,
        age: Some(Duration::from_secs(3600)),
    };
    log.set_retention_floor(P0, Offset(198));
    assert_eq!(log.retain_now(keep_all).await.unwrap(), 0);
    let by_age = RetentionPolicy {
        bytes: None,
        age: Some(Duration::ZERO),
    };
    assert_eq!(log.retain_now(by_age).await.unwrap(), 198 - start);
    assert_eq!(log.log_start(P0), Offset(198));
    let kept = log.read(P0, Offset(198), ALL).await.unwrap();
    let got = offsets_and_mids(&kept);
    assert_eq!(got, [(198, 199), (199, 200)]);
    let client = async_nats::connect(format!("nats://{}", cluster.servers[0].client))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(
        js.get_stream("retain_p0_g0").await.is_err(),
        "generation 0 deleted"
    );
    let mut g1 = js.get_stream("retain_p0_g1").await.unwrap();
    assert_eq!(
        g1.info().await.unwrap().state.messages,
        2,
        "purged in generation 1"
    );
    drop(log);
    // The hub's settings: passes in the background.
    let mut config = config;
    config.retention = by_age;
    config.retention_check = Duration::from_millis(50);
    let log = JetStreamLog::open(config).await.unwrap();
    assert_eq!(log.log_start(P0), Offset(198));
    assert_eq!(log.append(P0, rec("d", 201, 1)).await.unwrap(), Offset(200));
    log.set_retention_floor(P0, Offset(200));
    for _ in 0..200 {
        if log.log_start(P0) == Offset(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log.log_start(P0), Offset(200), "the background pass purged");
    let kept = log.read(P0, Offset(200), ALL).await.unwrap();
    assert_eq!(kept[0].record.mid, Some(Mid(201)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_counts_only_live_records_after_a_cut() {
    use hub::log::jetstream::RetentionPolicy;
    let cluster = NatsCluster::shared();
    let log = open(&cluster.log_url("retaincut"), 1).await;
    for mid in 1..=100 {
        log.append(P0, rec("d", 100 + mid, 1)).await.unwrap();
    }
    // Generation 1 from offset 50: generation 0's stream still holds the
    // cut tail 50..100, which nobody reads and which is not the log's.
    let dir = tempfile::tempdir().unwrap();
    log.cut_and_archive(P0, Offset(50), dir.path().join("cut"))
        .await
        .unwrap();
    for mid in 51..=100 {
        log.append(P0, rec("d", 100 + mid, 1)).await.unwrap();
    }
    let client = async_nats::connect(format!("nats://{}", cluster.servers[0].client))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut g1 = js.get_stream("retaincut_p0_g1").await.unwrap();
    let state = g1.info().await.unwrap().state.clone();
    let per_record = state.bytes / state.messages;
    // 100 live records; keep about 60 of them.
    log.set_retention_floor(P0, Offset(100));
    let policy = RetentionPolicy {
        bytes: Some(per_record * 60),
        age: None,
    };
    log.retain_now(policy).await.unwrap();
    let start = log.log_start(P0).0;
    assert!(
        (35..=45).contains(&start),
        "about 40 records go, not the cut tail's worth more: start {start}"
    );
    let kept = log.read(P0, Offset(start), ALL).await.unwrap();
    assert_eq!(kept.len() as u64, 100 - start);
    assert!(
        kept.iter()
            .zip(start..)
            .all(|(r, o)| r.offset.0 == o && r.record.mid == Some(Mid(101 + o)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_without_fsync_makes_the_log_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(dir.path(), "recheck", 3).await.unwrap();
    let url = cluster.log_url("recheck");
    let mut config = JetStreamConfig::parse(&url, 1).unwrap();
    config.fsync_recheck = Duration::from_millis(100);
    let log = JetStreamLog::open(config).await.unwrap();
    assert_eq!(log.append(P0, rec("d", 1, 1)).await.unwrap(), Offset(0));
    // Servers restarting as they are (a rolling restart; the checks catch
    // them down, half up, answering half) are no reason to refuse writes.
    for i in 0..3 {
        cluster.restart_with_sync(i, true).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            log.partition_failure(P0),
            None,
            "after restarting server {i}"
        );
    }
    assert_eq!(log.append(P0, rec("d", 2, 1)).await.unwrap(), Offset(1));
    // An operator restarts one server without `sync_interval: always`: its
    // acknowledgements could be lost in a power cut, so the hub stops
    // trusting the cluster's.
    cluster.restart_with_sync(1, false).await.unwrap();
    for _ in 0..400 {
        if log.partition_failure(P0).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let why = log
        .partition_failure(P0)
        .expect("the partition refuses writes");
    assert!(why.contains("acknowledges before fsync"), "{why}");
    let err = log.append(P0, rec("d", 3, 1)).await.unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
    // Fixed, and the hub restarted: trusted again, nothing lost.
    cluster.restart_with_sync(1, true).await.unwrap();
    drop(log);
    let log = open(&url, 1).await;
    assert_eq!(log.append(P0, rec("d", 3, 1)).await.unwrap(), Offset(2));
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(got.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_last_record_is_found_without_reading_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("last");
    let log = open(&url, 1).await;
    let last = |device: &str| {
        let log = log.clone();
        let device = DeviceId::new(device).unwrap();
        async move {
            log.last_of(P0, &device)
                .await
                .unwrap()
                .map(|r| (r.offset.0, r.record.mid.map(|m| m.0)))
        }
    };
    // a.1 … a.5 at 0..5, then "b.x" (a dot in the id) interleaved with a.
    for m in 1..=5 {
        log.append(P0, rec("a", m, 1)).await.unwrap();
    }
    for m in 1..=3 {
        log.append(P0, rec("b.x", m, 1)).await.unwrap();
        log.append(P0, rec("a", 5 + m, 1)).await.unwrap();
    }
    assert_eq!(last("a").await, Some((10, Some(8))));
    assert_eq!(last("b.x").await, Some((9, Some(3))));
    assert_eq!(last("b").await, None, "a prefix of another id");
    assert_eq!(last("nobody").await, None);
    // A failback cuts 8.. away (a.7 at 8, a.8 at 10, b.x 3 at 9): the last
    // records are those before the cut, in the old generation, and then
    // the new generation's.
    log.cut_and_archive(P0, Offset(8), dir.path().join("cut"))
        .await
        .unwrap();
    assert_eq!(last("a").await, Some((6, Some(6))));
    assert_eq!(last("b.x").await, Some((7, Some(2))));
    log.append(P0, rec("b.x", 3, 2)).await.unwrap();
    assert_eq!(last("b.x").await, Some((8, Some(3))));
    assert_eq!(last("a").await, Some((6, Some(6))));
    // a.7 at 9, then a failback cuts it (9..): a's last message in that
    // generation is in its cut tail, and its live part (8..9) has none of
    // a's records: a's last is still the one in the oldest generation.
    log.append(P0, rec("a", 7, 2)).await.unwrap();
    log.cut_and_archive(P0, Offset(9), dir.path().join("cut2"))
        .await
        .unwrap();
    assert_eq!(last("a").await, Some((6, Some(6))));
    // c.1 at 9 and c.2 at 10, cut at 10: c's last is the one at 9.
    log.append(P0, rec("c", 1, 2)).await.unwrap();
    log.append(P0, rec("c", 2, 2)).await.unwrap();
    log.cut_and_archive(P0, Offset(10), dir.path().join("cut3"))
        .await
        .unwrap();
    assert_eq!(last("c").await, Some((9, Some(1))));
    assert_eq!(last("a").await, Some((6, Some(6))));
}

/// Retention keeps each purged device's last mid (what a hub taking the
/// partition over learns when the device has no record left), and a
/// failback cut that takes the record it came from voids it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_devices_last_mid_is_kept_until_a_cut_takes_its_record() {
    use hub::log::jetstream::RetentionPolicy;
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::shared();
    let log = open(&cluster.log_url("purged"), 1).await;
    let purged = |device: &str| {
        let log = log.clone();
        let device = DeviceId::new(device).unwrap();
        async move {
            log.purged_last(P0, &device)
                .await
                .unwrap()
                .map(|(m, o)| (m.0, o.0))
        }
    };
    let all_of_it = RetentionPolicy {
        bytes: Some(1),
        age: None,
    };
    // a.1 … a.5 at 0..5, b:x.1 … b:x.3 at 5..8, a.6 at 8.
    for m in 1..=5 {
        log.append(P0, rec("a", m, 1)).await.unwrap();
    }
    for m in 1..=3 {
        log.append(P0, rec("b:x", m, 1)).await.unwrap();
    }
    log.append(P0, rec("a", 6, 1)).await.unwrap();
    assert_eq!(purged("a").await, None, "nothing purged yet");
    log.set_retention_floor(P0, Offset(8));
    assert_eq!(log.retain_now(all_of_it).await.unwrap(), 8);
    assert_eq!(purged("a").await, Some((5, 4)));
    assert_eq!(purged("b:x").await, Some((3, 7)));
    assert_eq!(purged("c").await, None);
    let b = DeviceId::new("b:x").unwrap();
    assert!(log.last_of(P0, &b).await.unwrap().is_none());
    // A failback cut at 6, below the retained start: b:x's last purged
    // record (at 7) is no longer in the history, a's (at 4) still is.
    // (b:x.1 at 5 is still in it, but a device keeps one entry: it is
    // known only as a record with no kept mid. A resend of it needs its
    // acknowledgement lost, and it was stored in both regions: see the
    // README's limits.)
    log.cut_and_archive(P0, Offset(6), dir.path().join("cut"))
        .await
        .unwrap();
    assert_eq!(purged("b:x").await, None);
    assert_eq!(purged("a").await, Some((5, 4)));
    // The new primary's history from 6 on: b:x.2 at 6 (epoch 2), then a
    // purge of it replaces the void entry, though that one's offset is
    // higher.
    log.append(P0, rec("b:x", 2, 2)).await.unwrap();
    log.append(P0, rec("c", 1, 2)).await.unwrap();
    assert_eq!(purged("b:x").await, None, "its record is still there");
    log.set_retention_floor(P0, Offset(7));
    assert_eq!(log.retain_now(all_of_it).await.unwrap(), 1);
    assert_eq!(purged("b:x").await, Some((2, 6)));
    assert!(log.last_of(P0, &b).await.unwrap().is_none());
}

/// A hub that wrote a partition and lost it without knowing (a paused
/// process) purges nothing once another hub has taken the partition over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_lost_its_partition_purges_nothing() {
    use hub::log::jetstream::RetentionPolicy;
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("stale_purge");
    let shared = |id: &str| {
        let mut c = JetStreamConfig::parse(&url, 1).unwrap();
        c.hub_id = Some(id.to_string());
        c
    };
    let a = JetStreamLog::open(shared("a")).await.unwrap();
    a.reload(P0, true).await.unwrap();
    for m in 1..=10 {
        a.append(P0, rec("d", m, 1)).await.unwrap();
    }
    let b = JetStreamLog::open(shared("b")).await.unwrap();
    b.reload(P0, true).await.unwrap();
    a.set_retention_floor(P0, Offset(10));
    let all_of_it = RetentionPolicy {
        bytes: Some(1),
        age: None,
    };
    let purged = a.retain_now(all_of_it).await;
    assert!(matches!(purged, Err(_) | Ok(0)), "{purged:?}");
    b.reload(P0, true).await.unwrap();
    assert_eq!(b.log_start(P0), Offset(0), "the stale writer purged");
    assert_eq!(b.read(P0, Offset(0), ALL).await.unwrap().len(), 10);
}

/// Records stored by a hub from before the writer's id moved from a header
/// into the message body (the frame alone, `Fleet-Write-Id` header) read
/// as before, are found as a device's last record, and appends go on after
/// them; a hub's own confirmation after an error still tells its records
/// from another writer's (`a_second_writer_fences_the_first`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stored_with_the_older_header_layout_still_read() {
    let cluster = NatsCluster::shared();
    let url = cluster.log_url("legacy");
    let log = open(&url, 1).await;
    assert_eq!(log.append(P0, rec("d", 1, 1)).await.unwrap(), Offset(0));
    drop(log);
    // What an older hub stored at offset 1.
    let (config, subject) = hub::log::jetstream::stream_layout("legacy", P0, 3, "d");
    let client = async_nats::connect(format!("nats://{}", cluster.servers[0].client))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut frame = Vec::new();
    hub::log::frame::encode(&mut frame, Offset(1), &rec("d", 2, 1));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Fleet-Write-Id", "0123456789abcdef.1");
    headers.insert("Nats-Expected-Last-Sequence", "1");
    let ack = js
        .publish_with_headers(subject, headers, Bytes::from(frame))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        (ack.stream.as_str(), ack.sequence),
        (config.name.as_str(), 2)
    );

    let log = open(&url, 1).await;
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    let mids = offsets_and_mids(&got);
    assert_eq!(mids, [(0, 1), (1, 2)]);
    assert_eq!(got[1].record.payload, Bytes::from("d/2"));
    let last = log
        .last_of(P0, &DeviceId::new("d").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((last.offset, last.record.mid), (Offset(1), Some(Mid(2))));
    assert_eq!(log.append(P0, rec("d", 3, 1)).await.unwrap(), Offset(2));
    let got = log.read(P0, Offset(2), ALL).await.unwrap();
    assert_eq!(got[0].record.mid, Some(Mid(3)));
}
