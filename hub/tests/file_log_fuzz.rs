//! The file log's recovery on damaged segment files, fuzzed: whatever the
//! damage, a reopened log serves only records exactly as written, at their
//! own offsets, or says that a partition failed. `PROPTEST_CASES` sets the
//! number of cases (default 48).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use hub::log::file::{FileLog, FileLogConfig};
use hub::log::{EventLog, NewRecord, ReadLimits};
use proptest::prelude::*;

const P0: PartitionId = PartitionId(0);
const ALL: ReadLimits = ReadLimits {
    max_records: 100_000,
    max_bytes: 1 << 30,
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(48)
}

fn rec(i: u64, payload: &[u8]) -> NewRecord {
    NewRecord {
        device_id: DeviceId::new(format!("dev-{}", i % 5)).unwrap(),
        mid: Some(Mid(i + 1)),
        enqueued_at: UnixMillis(1_700_000_000_000 + i),
        region: Region::new("eu").unwrap(),
        epoch: Epoch(1),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn config(dir: &Path) -> FileLogConfig {
    let mut c = FileLogConfig::new(dir, 1);
    c.segment_bytes = 4096;
    c
}

#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Append(Vec<u8>),
    Zero(usize, usize),
}

fn damage() -> impl Strategy<Value = (usize, Damage)> {
    let d = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(p, x)| Damage::Flip(p, x)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(p, b)| Damage::Insert(p, b)),
        prop::collection::vec(any::<u8>(), 1..60).prop_map(Damage::Append),
        (any::<usize>(), 1..64usize).prop_map(|(p, n)| Damage::Zero(p, n)),
    ];
    (any::<usize>(), d)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("p0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn hurt(path: &Path, d: &Damage) {
    let mut b = std::fs::read(path).unwrap();
    let len = b.len().max(1);
    match d {
        Damage::Flip(p, x) if !b.is_empty() => b[p % len] ^= x,
        Damage::Truncate(p) => b.truncate(p % len),
        Damage::Insert(p, bytes) => {
            let at = p % (b.len() + 1);
            b.splice(at..at, bytes.iter().copied());
        }
        Damage::Append(bytes) => b.extend_from_slice(bytes),
        Damage::Zero(p, n) if !b.is_empty() => {
            let start = p % len;
            let end = (start + n).min(b.len());
            b[start..end].fill(0);
        }
        _ => {}
    }
    std::fs::write(path, b).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_log_never_serves_a_record_that_was_not_written(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..400), 1..50),
        damages in prop::collection::vec(damage(), 1..5),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let log = FileLog::open(config(dir.path())).unwrap();
            for (i, p) in payloads.iter().enumerate() {
                log.append(P0, rec(i as u64, p)).await.unwrap();
            }
            drop(log);
            let files = segment_files(dir.path());
            for (which, d) in &damages {
                hurt(&files[which % files.len()], d);
            }
            let Ok(log) = FileLog::open(config(dir.path())) else {
                return Ok(());
            };
            let hw = log.high_watermark(P0);
            prop_assert!(hw.0 <= payloads.len() as u64, "high watermark {} beyond what was written", hw);
            // Read from every offset: only exact records, at their offsets.
            for from in 0..payloads.len() as u64 {
                let Ok(got) = log.read(P0, Offset(from), ALL).await else {
                    continue;
                };
                for (expect, r) in (from..).zip(got) {
                    prop_assert_eq!(r.offset, Offset(expect), "reading from {}", from);
                    let i = usize::try_from(r.offset.0).unwrap();
                    let want = rec(r.offset.0, &payloads[i]);
                    prop_assert_eq!(&r.record.payload, &want.payload, "offset {}", r.offset);
                    prop_assert_eq!(r.record.mid, want.mid);
                    prop_assert_eq!(&r.record.device_id, &want.device_id);
                }
            }
            // Appending either continues the log or is refused (failed partition).
            if log.health().is_ok() {
                let at = log.append(P0, rec(999, b"after")).await.unwrap();
                prop_assert_eq!(at, hw);
            }
            Ok(())
        })?;
    }
}
