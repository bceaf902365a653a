//! The event log contract. Each test takes a backend factory, so the same
//! suite runs against every backend (the file log here; JetStream joins it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fleet_api::local::NatsCluster;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use futures::FutureExt;
use futures::future::BoxFuture;
use hub::log::file::{FileLog, FileLogConfig};
use hub::log::jetstream::{JetStreamConfig, JetStreamLog};
use hub::log::{EventLog, NewRecord, ReadLimits};

type Open = Box<dyn Fn() -> BoxFuture<'static, Arc<dyn EventLog>> + Send + Sync>;

/// A backend under test and a way to open it again on the same storage.
struct Backend {
    log: Arc<dyn EventLog>,
    reopen: Open,
    _dir: Arc<tempfile::TempDir>,
}

async fn file_backend(partitions: u32) -> Backend {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path = dir.path().to_path_buf();
    let open: Open = Box::new(move || {
        let log: Arc<dyn EventLog> =
            FileLog::open(FileLogConfig::new(path.clone(), partitions)).unwrap();
        futures::future::ready(log).boxed()
    });
    Backend {
        log: open().await,
        reopen: open,
        _dir: dir,
    }
}

async fn jetstream_backend(partitions: u32) -> Backend {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let url = NatsCluster::shared().log_url(&prefix);
    let open: Open = Box::new(move || {
        let config = JetStreamConfig::parse(&url, partitions).unwrap();
        async move {
            let log: Arc<dyn EventLog> = JetStreamLog::open(config).await.unwrap();
            log
        }
        .boxed()
    });
    Backend {
        log: open().await,
        reopen: open,
        _dir: Arc::new(tempfile::tempdir().unwrap()),
    }
}

fn rec(device: &str, mid: Option<u64>, payload: &[u8]) -> NewRecord {
    NewRecord {
        device_id: DeviceId::new(device).unwrap(),
        mid: mid.map(Mid),
        enqueued_at: UnixMillis(1_700_000_000_000),
        region: Region::new("eu").unwrap(),
        epoch: Epoch(1),
        payload: Bytes::copy_from_slice(payload),
    }
}

const P0: PartitionId = PartitionId(0);
const ALL: ReadLimits = ReadLimits {
    max_records: 100_000,
    max_bytes: 1 << 30,
};

async fn appends_get_dense_offsets_and_read_back(b: Backend) {
    let log = &b.log;
    assert_eq!(log.high_watermark(P0), Offset(0));
    for i in 0..5u64 {
        let off = log
            .append(P0, rec("d", Some(i + 1), format!("m{i}").as_bytes()))
            .await
            .unwrap();
        assert_eq!(off, Offset(i));
    }
    assert_eq!(log.high_watermark(P0), Offset(5));
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(got.len(), 5);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, Offset(i as u64));
        assert_eq!(r.partition, P0);
        assert_eq!(
            r.record,
            rec("d", Some(i as u64 + 1), format!("m{i}").as_bytes())
        );
    }
    assert_eq!(
        log.read(P0, Offset(3), ALL).await.unwrap()[0].offset,
        Offset(3)
    );
    assert!(log.read(P0, Offset(5), ALL).await.unwrap().is_empty());
    assert!(log.read(P0, Offset(99), ALL).await.unwrap().is_empty());
}

async fn reads_respect_limits(b: Backend) {
    for i in 0..50u64 {
        b.log
            .append(P0, rec("d", Some(i), &[7; 1000]))
            .await
            .unwrap();
    }
    let few = ReadLimits {
        max_records: 7,
        max_bytes: 1 << 20,
    };
    assert_eq!(b.log.read(P0, Offset(10), few).await.unwrap().len(), 7);
    let small = ReadLimits {
        max_records: 100,
        max_bytes: 2500,
    };
    let got = b.log.read(P0, Offset(0), small).await.unwrap();
    assert!((1..=3).contains(&got.len()), "{}", got.len());
    let tiny = ReadLimits {
        max_records: 100,
        max_bytes: 1,
    };
    assert_eq!(
        b.log.read(P0, Offset(0), tiny).await.unwrap().len(),
        1,
        "always at least one"
    );
}

async fn concurrent_appends_are_dense_and_complete(b: Backend) {
    let mut tasks = Vec::new();
    for t in 0..8 {
        let log = b.log.clone();
        tasks.push(tokio::spawn(async move {
            let mut offs = Vec::new();
            for i in 0..200u64 {
                offs.push(
                    log.append(P0, rec(&format!("t{t}"), Some(i), b"x"))
                        .await
                        .unwrap(),
                );
            }
            offs
        }));
    }
    let mut all: Vec<u64> = Vec::new();
    for t in tasks {
        let offs = t.await.unwrap();
        assert!(
            offs.windows(2).all(|w| w[0] < w[1]),
            "per-caller order kept"
        );
        all.extend(offs.iter().map(|o| o.0));
    }
    all.sort_unstable();
    assert_eq!(all, (0..1600).collect::<Vec<_>>());
    assert_eq!(b.log.read(P0, Offset(0), ALL).await.unwrap().len(), 1600);
}

async fn appends_pipeline_and_resolve_in_order(b: Backend) {
    // Many appends in flight at once: group commit, same results.
    let futs: Vec<_> = (0..500u64)
        .map(|i| b.log.append(P0, rec("d", Some(i), b"p")))
        .collect();
    let offs = futures::future::try_join_all(futs).await.unwrap();
    assert_eq!(offs, (0..500).map(Offset).collect::<Vec<_>>());
    b.log.flush(P0).await.unwrap();
}

async fn partitions_are_independent(b: Backend) {
    let p1 = PartitionId(1);
    b.log.append(P0, rec("a", None, b"0")).await.unwrap();
    assert_eq!(
        b.log.append(p1, rec("b", None, b"1")).await.unwrap(),
        Offset(0)
    );
    assert_eq!(b.log.high_watermark(p1), Offset(1));
    assert_eq!(
        b.log.read(p1, Offset(0), ALL).await.unwrap()[0]
            .record
            .device_id
            .as_str(),
        "b"
    );
    assert!(
        b.log
            .append(PartitionId(99), rec("c", None, b""))
            .await
            .is_err()
    );
}

async fn watch_follows_the_high_watermark(b: Backend) {
    let mut w = b.log.watch(P0);
    assert_eq!(*w.borrow_and_update(), Offset(0));
    let log = b.log.clone();
    let writer = tokio::spawn(async move { log.append(P0, rec("d", None, b"x")).await });
    tokio::time::timeout(Duration::from_secs(10), w.wait_for(|hw| *hw >= Offset(1)))
        .await
        .expect("watch woke")
        .unwrap();
    writer.await.unwrap().unwrap();
}

async fn records_survive_a_reopen(b: Backend) {
    for i in 0..20u64 {
        b.log
            .append(P0, rec("d", Some(i), &vec![i as u8; 300]))
            .await
            .unwrap();
    }
    let Backend { log, reopen, _dir } = b;
    drop(log);
    let log = reopen().await;
    assert_eq!(log.high_watermark(P0), Offset(20));
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(got.len(), 20);
    assert_eq!(got[19].record.payload.as_ref(), &vec![19u8; 300][..]);
    assert_eq!(
        log.append(P0, rec("d", Some(20), b"z")).await.unwrap(),
        Offset(20)
    );
}

async fn payload_edge_cases(b: Backend) {
    let big = vec![0xAB; 300 * 1024];
    b.log.append(P0, rec("d", None, b"")).await.unwrap();
    b.log
        .append(P0, rec("d", Some(u64::MAX), &big))
        .await
        .unwrap();
    let got = b.log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(got[0].record.payload.len(), 0);
    assert_eq!(got[0].record.mid, None);
    assert_eq!(got[1].record.payload.as_ref(), &big[..]);
    assert_eq!(got[1].record.mid, Some(Mid(u64::MAX)));
}

macro_rules! conformance {
    ($backend:ident, $factory:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::$factory(2).await).await;
            })*
        }
    };
}

macro_rules! suite {
    ($($backend:ident, $factory:ident);*) => {
        $(conformance!($backend, $factory:
            appends_get_dense_offsets_and_read_back,
            reads_respect_limits,
            concurrent_appends_are_dense_and_complete,
            appends_pipeline_and_resolve_in_order,
            partitions_are_independent,
            watch_follows_the_high_watermark,
            records_survive_a_reopen,
            payload_edge_cases,
        );)*
    };
}

suite!(file, file_backend; jetstream, jetstream_backend);
