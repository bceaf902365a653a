//! A fence is exact: every publish that was decided before it is below the
//! high watermarks it reports, and nothing is appended after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use fleet_api::{DeviceId, Mid, PartitionId, Region, Role};
use hub::ingest::{Ingest, Pending, Replication, Stored};
use hub::log::EventLog;
use hub::log::file::{FileLog, FileLogConfig};
use hub::state::HubState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_publish_decided_before_a_fence_lands_above_it() {
    for round in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let region = Region::new("a").unwrap();
        let state =
            Arc::new(HubState::open(&dir.path().join("state"), &region, Role::Primary).unwrap());
        let log: Arc<dyn EventLog> =
            FileLog::open(FileLogConfig::new(dir.path().join("log"), 2)).unwrap();
        let ingest = Ingest::open(
            log.clone(),
            state.clone(),
            dir.path(),
            1 << 30,
            Replication::Off,
        )
        .await
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut publishers = Vec::new();
        for t in 0..4 {
            let ingest = ingest.clone();
            let stop = stop.clone();
            publishers.push(std::thread::spawn(move || {
                let device = DeviceId::new(format!("dev-{t}")).unwrap();
                let mut accepted: Vec<Pending> = Vec::new();
                for mid in 1.. {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    match ingest.submit(&device, Some(Mid(mid)), Bytes::from_static(b"x"), None) {
                        Ok(p) => accepted.push(p),
                        Err(_) => break, // fenced
                    }
                }
                accepted
            }));
        }
        // Let them run, then fence in the middle of their publishes.
        while log.high_watermark(PartitionId(0)).0 + log.high_watermark(PartitionId(1)).0 < 200 {
            tokio::task::yield_now().await;
        }
        state.set_fenced(true);
        let mut fenced_at = Vec::new();
        for p in 0..2 {
            fenced_at.push(ingest.barrier(PartitionId(p)).await.unwrap());
        }
        stop.store(true, Ordering::Release);
        for t in publishers {
            for pending in t.join().unwrap() {
                if let Stored::New { offset, .. } = pending.await.unwrap() {
                    let fence = (0..2)
                        .map(|p| log.high_watermark(PartitionId(p)))
                        .collect::<Vec<_>>();
                    assert!(
                        fenced_at.iter().zip(&fence).all(|(a, b)| a == b),
                        "round {round}: appended after the fence: {fenced_at:?} then {fence:?} (offset {offset})"
                    );
                }
            }
        }
    }
}
