//! Crash recovery and maintenance of the embedded file log, on real files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use hub::log::file::{FileLog, FileLogConfig};
use hub::log::{EventLog, LogError, NewRecord, ReadLimits};

const P0: PartitionId = PartitionId(0);
const ALL: ReadLimits = ReadLimits {
    max_records: 100_000,
    max_bytes: 1 << 30,
};

fn rec(i: u64, size: usize) -> NewRecord {
    NewRecord {
        device_id: DeviceId::new(format!("dev-{}", i % 7)).unwrap(),
        mid: Some(Mid(i)),
        enqueued_at: UnixMillis(1_700_000_000_000 + i),
        region: Region::new("eu").unwrap(),
        epoch: Epoch(1),
        payload: Bytes::from(vec![(i % 251) as u8; size]),
    }
}

fn open(dir: &Path) -> Arc<FileLog> {
    FileLog::open(FileLogConfig::new(dir, 1)).unwrap()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("p0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

async fn fill(log: &FileLog, n: u64, size: usize) {
    for i in 0..n {
        assert_eq!(log.append(P0, rec(i, size)).await.unwrap(), Offset(i));
    }
}

#[tokio::test]
async fn a_torn_last_record_is_truncated_at_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    fill(&log, 3, 40).await;
    drop(log);
    let seg = segments(dir.path()).remove(0);
    let full = std::fs::read(&seg).unwrap();
    let two = {
        // Size of the first two records: re-encode them.
        let mut b = Vec::new();
        hub::log::frame::encode(&mut b, Offset(0), &rec(0, 40));
        hub::log::frame::encode(&mut b, Offset(1), &rec(1, 40));
        b.len()
    };
    let mark = dir.path().join("p0/durable");
    for cut in two..full.len() {
        std::fs::write(&seg, &full[..cut]).unwrap();
        // A torn write was never acknowledged, so the durable mark never
        // covered it (here: there is none, and the old rule decides).
        std::fs::remove_file(&mark).unwrap();
        let log = open(dir.path());
        assert_eq!(log.high_watermark(P0), Offset(2), "cut at byte {cut}");
        assert!(log.health().is_ok());
        let got = log.read(P0, Offset(0), ALL).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len() as usize,
            two,
            "tail truncated on disk"
        );
        // The next write takes the torn record's offset.
        assert_eq!(log.append(P0, rec(9, 10)).await.unwrap(), Offset(2));
        drop(log);
        std::fs::write(&seg, &full).unwrap();
    }
}

#[tokio::test]
async fn a_cut_below_the_durable_mark_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    // One write each, the disk idle after each: the mark moves every 8th,
    // so it covers records 0..16 after 20.
    fill(&open(dir.path()), 20, 100).await;
    let seg = segments(dir.path()).remove(0);
    let full = std::fs::read(&seg).unwrap();
    let frame = full.len() / 20;
    // Records 12.. gone, 12 cut short: damage to synced, acknowledged data.
    let cut = 12 * frame + frame / 2;
    std::fs::write(&seg, &full[..cut]).unwrap();
    let log = open(dir.path());
    let problems = log.health().unwrap_err();
    assert!(
        problems[0].contains("corrupt record at offset 12"),
        "{problems:?}"
    );
    drop(log);
    assert_eq!(std::fs::read(&seg).unwrap().len(), cut, "nothing cut");
}

#[tokio::test]
async fn garbage_after_the_last_record_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    fill(&open(dir.path()), 5, 100).await;
    let seg = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    let good = bytes.len();
    bytes.extend_from_slice(&[0u8; 4096]); // preallocated zeros after a crash
    bytes.extend_from_slice(b"\xF1\xFF\xFF random junk");
    std::fs::write(&seg, &bytes).unwrap();
    let log = open(dir.path());
    assert_eq!(log.high_watermark(P0), Offset(5));
    assert_eq!(std::fs::metadata(&seg).unwrap().len() as usize, good);
}

#[tokio::test]
async fn corruption_inside_acknowledged_data_stops_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    fill(&open(dir.path()), 10, 100).await;
    let seg = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    let frame = bytes.len() / 10;
    bytes[4 * frame + frame / 2] ^= 0xFF; // inside record 4; records 5..9 are intact
    std::fs::write(&seg, &bytes).unwrap();

    let log = open(dir.path());
    let problems = log.health().unwrap_err();
    assert!(
        problems[0].contains("corrupt record at offset 4"),
        "{problems:?}"
    );
    // Records before the corruption are served; the corrupt one never is.
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(
        got.iter().map(|r| r.offset.0).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(log.read(P0, Offset(4), ALL).await.unwrap().is_empty());
    // Writes are refused rather than stacked after a hole.
    assert!(matches!(
        log.append(P0, rec(10, 1)).await,
        Err(LogError::Failed { .. })
    ));
    // Nothing was deleted: the evidence stays on disk.
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

fn small_segments(dir: &Path) -> FileLogConfig {
    let mut c = FileLogConfig::new(dir, 1);
    c.segment_bytes = 4096;
    c
}

#[tokio::test]
async fn segments_roll_and_reads_cross_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = FileLog::open(small_segments(dir.path())).unwrap();
    fill(&log, 200, 300).await;
    let segs = segments(dir.path());
    assert!(segs.len() > 10, "{} segments", segs.len());
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(got.len(), 200);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, r)| r.offset.0 == i as u64 && r.record == rec(i as u64, 300))
    );
    drop(log);
    // Reopen from the sealed segments' index files.
    let log = FileLog::open(small_segments(dir.path())).unwrap();
    assert_eq!(log.high_watermark(P0), Offset(200));
    for from in [0u64, 13, 77, 150, 199] {
        let got = log
            .read(
                P0,
                Offset(from),
                ReadLimits {
                    max_records: 5,
                    max_bytes: 1 << 20,
                },
            )
            .await
            .unwrap();
        assert_eq!(got[0].offset, Offset(from));
        assert_eq!(got[0].record, rec(from, 300));
    }
    // A lost index is rebuilt.
    let idx = segs[3].with_extension("idx");
    std::fs::remove_file(&idx).unwrap();
    drop(log);
    let log = FileLog::open(small_segments(dir.path())).unwrap();
    assert_eq!(log.read(P0, Offset(0), ALL).await.unwrap().len(), 200);
    assert!(idx.exists());
}

#[tokio::test]
async fn corruption_in_a_sealed_segment_is_reported_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = FileLog::open(small_segments(dir.path())).unwrap();
    fill(&log, 100, 300).await;
    drop(log);
    let second = segments(dir.path())[1].clone();
    let base: u64 = second
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = std::fs::read(&second).unwrap();
    bytes[40] ^= 0x01; // inside the first record of the second segment
    std::fs::write(&second, &bytes).unwrap();
    let log = FileLog::open(small_segments(dir.path())).unwrap();
    let got = log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(got.len() as u64, base, "served up to the corrupt record");
    match log.read(P0, Offset(base), ALL).await {
        Err(LogError::Corrupt { offset, .. }) => assert_eq!(offset, Offset(base)),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

#[tokio::test]
async fn retention_deletes_old_segments_but_not_past_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_segments(dir.path());
    config.retention_bytes = Some(20_000);
    let log = FileLog::open(config.clone()).unwrap();
    fill(&log, 300, 300).await;
    let before = segments(dir.path()).len();
    log.set_retention_floor(P0, Offset(0));
    log.enforce_retention(&config);
    assert_eq!(
        segments(dir.path()).len(),
        before,
        "nothing below the floor"
    );
    log.set_retention_floor(P0, Offset(300));
    log.enforce_retention(&config);
    let after = segments(dir.path());
    assert!(
        after.len() < before && after.len() >= 4,
        "{} -> {}",
        before,
        after.len()
    );
    let start = log.log_start(P0);
    assert!(start > Offset(0));
    assert!(matches!(
        log.read(P0, Offset(0), ALL).await,
        Err(LogError::OffsetGone { .. })
    ));
    assert_eq!(log.read(P0, start, ALL).await.unwrap()[0].offset, start);
    assert_eq!(log.append(P0, rec(300, 1)).await.unwrap(), Offset(300));
}

#[tokio::test]
async fn the_partition_count_is_fixed_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    drop(FileLog::open(FileLogConfig::new(dir.path(), 4)).unwrap());
    let err = FileLog::open(FileLogConfig::new(dir.path(), 8)).unwrap_err();
    assert!(
        err.to_string().contains("created with 4 partitions, not 8"),
        "{err}"
    );
}

fn rec_at(i: u64, epoch: u64) -> NewRecord {
    NewRecord {
        epoch: Epoch(epoch),
        ..rec(i, 300)
    }
}

#[tokio::test]
async fn the_epoch_history_outlives_retention_cuts_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_segments(dir.path());
    config.retention_bytes = Some(8_000);
    let log = FileLog::open(config.clone()).unwrap();
    for i in 0..100 {
        log.append(P0, rec_at(i, 1)).await.unwrap();
    }
    for i in 100..200 {
        log.append(P0, rec_at(i, 4)).await.unwrap();
    }
    let history = vec![(Epoch(1), Offset(0)), (Epoch(4), Offset(100))];
    assert_eq!(log.epoch_history(P0), history);
    // Retention deletes every record of epoch 1: the history keeps it.
    log.set_retention_floor(P0, Offset(200));
    log.enforce_retention(&config);
    assert!(log.log_start(P0) > Offset(100));
    assert_eq!(log.epoch_history(P0), history);
    drop(log);
    let log = FileLog::open(config.clone()).unwrap();
    assert_eq!(log.epoch_history(P0), history, "kept across a restart");
    // A cut below the retained log: everything retained is archived and
    // the partition continues empty at the cut; the history follows.
    let archive = dir.path().join("archive.log");
    let moved = log
        .cut_and_archive(P0, Offset(60), archive.clone())
        .await
        .unwrap();
    assert_eq!(moved, 200 - log_start_before(&archive));
    assert_eq!(log.high_watermark(P0), Offset(60));
    assert_eq!(log.log_start(P0), Offset(60));
    assert_eq!(log.epoch_history(P0), vec![(Epoch(1), Offset(0))]);
    assert_eq!(log.append(P0, rec_at(60, 5)).await.unwrap(), Offset(60));
    drop(log);
    let log = FileLog::open(config).unwrap();
    assert_eq!(
        log.epoch_history(P0),
        vec![(Epoch(1), Offset(0)), (Epoch(5), Offset(60))]
    );
    assert_eq!(log.read(P0, Offset(60), ALL).await.unwrap().len(), 1);
}

/// The first offset in an archive file.
fn log_start_before(archive: &Path) -> u64 {
    let bytes = std::fs::read(archive).unwrap();
    hub::log::frame::Frames::new(&bytes)
        .next()
        .map_or(0, |f| f.offset.0)
}

#[tokio::test]
async fn skipping_forward_survives_a_crash_half_way() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_segments(dir.path());
    let log = FileLog::open(config.clone()).unwrap();
    for i in 0..50 {
        log.append(P0, rec_at(i, 2)).await.unwrap();
    }
    let dropped = log
        .skip_to(P0, Offset(500), vec![(Epoch(2), Offset(0))])
        .await
        .unwrap();
    assert_eq!(dropped, 50);
    assert_eq!(
        (log.log_start(P0), log.high_watermark(P0)),
        (Offset(500), Offset(500))
    );
    assert_eq!(log.append(P0, rec_at(500, 3)).await.unwrap(), Offset(500));
    drop(log);
    // A crash after the marker was written and before anything was
    // deleted: recovery finishes the reset.
    let p0 = dir.path().join("p0");
    let mut body = 900u64.to_le_bytes().to_vec();
    body.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    std::fs::write(p0.join("reset-to"), &body).unwrap();
    let log = FileLog::open(config.clone()).unwrap();
    assert_eq!(
        (log.log_start(P0), log.high_watermark(P0)),
        (Offset(900), Offset(900))
    );
    assert!(!p0.join("reset-to").exists());
    assert_eq!(log.append(P0, rec_at(900, 3)).await.unwrap(), Offset(900));
    drop(log);
    // A torn marker is refused, not guessed at.
    std::fs::write(p0.join("reset-to"), b"torn").unwrap();
    let err = FileLog::open(config).unwrap_err().to_string();
    assert!(err.contains("reset-to is corrupt"), "{err}");
}

#[tokio::test]
async fn a_cut_at_a_segments_base_keeps_it_readable_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    fill(&log, 40, 300).await;
    let archive = dir.path().join("archive.log");
    assert_eq!(
        log.cut_and_archive(P0, Offset(0), archive).await.unwrap(),
        40
    );
    assert_eq!(log.high_watermark(P0), Offset(0));
    // Enough records to add sparse index entries after the cut.
    for i in 0..60 {
        assert_eq!(log.append(P0, rec_at(i, 2)).await.unwrap(), Offset(i));
    }
    let all = log.read(P0, Offset(0), ALL).await.unwrap();
    assert_eq!(all.len(), 60);
    assert_eq!(all[0].record.epoch, Epoch(2));
    assert_eq!(
        log.read(P0, Offset(31), ALL).await.unwrap()[0].offset,
        Offset(31)
    );
}

/// A log as a hub before write flags and durable marks wrote it (format 1,
/// unflagged frames, no mark file): five records in `dir`. Returns the
/// segment, its bytes and where each record ends.
fn format_1_log(dir: &Path) -> (PathBuf, Vec<u8>, Vec<usize>) {
    let p0 = dir.join("p0");
    std::fs::create_dir_all(&p0).unwrap();
    std::fs::write(dir.join("meta.json"), br#"{"format":1,"partitions":1}"#).unwrap();
    let mut bytes = Vec::new();
    let mut ends = Vec::new();
    for i in 0..5 {
        hub::log::frame::encode(&mut bytes, Offset(i), &rec(i, 200));
        ends.push(bytes.len());
    }
    let seg = p0.join(format!("{:020}.log", 0));
    std::fs::write(&seg, &bytes).unwrap();
    (seg, bytes, ends)
}

#[tokio::test]
async fn a_damaged_format_1_log_stays_stopped_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, mut bytes, ends) = format_1_log(dir.path());
    bytes[ends[1] + 30] ^= 0xFF; // inside record 2; 3 and 4 intact after it
    std::fs::write(&seg, &bytes).unwrap();
    for attempt in 0..3 {
        let log = open(dir.path());
        let problems = log.health().unwrap_err();
        assert!(
            problems[0].contains("corrupt record at offset 2"),
            "start {attempt}: {problems:?}"
        );
        drop(log);
        assert_eq!(
            std::fs::read(&seg).unwrap(),
            bytes,
            "start {attempt}: acknowledged records were cut"
        );
    }
}

#[tokio::test]
async fn a_format_1_log_is_upgraded_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    format_1_log(dir.path());
    let log = open(dir.path());
    assert!(log.health().is_ok());
    assert_eq!(log.append(P0, rec(5, 10)).await.unwrap(), Offset(5));
    drop(log);
    let log = open(dir.path());
    assert_eq!(log.read(P0, Offset(0), ALL).await.unwrap().len(), 6);
    let meta = std::fs::read_to_string(dir.path().join("meta.json")).unwrap();
    assert!(meta.contains("\"format\":2"), "{meta}");
    drop(log);
    std::fs::write(
        dir.path().join("meta.json"),
        br#"{"format":3,"partitions":1}"#,
    )
    .unwrap();
    let err = FileLog::open(FileLogConfig::new(dir.path(), 1)).unwrap_err();
    assert!(err.to_string().contains("newer than this hub"), "{err}");
}
