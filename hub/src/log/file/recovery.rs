//! Opening a partition: recovery of its segments after a restart or a crash.
//!
//! Sealed segments are taken as they are (their index is read, or rebuilt by
//! a scan); the active (last) segment is scanned. An invalid frame below the
//! durable mark, or followed by the valid first frame of a later write, is
//! corruption of acknowledged data and fails the partition; otherwise it
//! starts a torn tail (the last write, never acknowledged) and is cut off.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use fleet_api::storage::{Open, Storage};
use fleet_api::{Offset, PartitionId};
use tokio::sync::{mpsc, watch};

use super::segment::{
    Active, INDEX_EVERY, Segment, create_segment, read_index, segment_path, write_index,
};
use super::{FileLogConfig, PartitionLog, cut, epochs, io, mark, sync_dir, writer};
use crate::log::LogResult;
use crate::log::frame::{self, Decoded, Frames, Stop};

/// Result of scanning a segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scan {
    /// Every byte is valid frames.
    Clean,
    /// Invalid from `pos` on, above the durable mark and with no later
    /// write after it: an unsynced tail.
    TornTail { pos: u64 },
    /// Invalid at `pos` (offset `offset`), which was synced: it lies below
    /// the durable mark, or a later write follows it.
    Corrupt {
        pos: u64,
        offset: Offset,
        detail: String,
    },
}

pub(super) struct Scanned {
    pub(super) index: Vec<(u64, u64)>,
    pub(super) len: u64,
    pub(super) next: Offset,
    pub(super) outcome: Scan,
}

/// Walks the frames of a segment starting at `base`: builds its index and
/// finds where its valid prefix ends, and why. `synced` bytes from the
/// start are known durable (the durable mark); `None`: a segment of a
/// version before marks and write flags, judged by the old rule (any valid
/// later frame means corruption).
pub(super) fn scan(buf: &[u8], base: Offset, synced: Option<u64>) -> Scanned {
    // A segment whose first frame is not flagged was written before the
    // flags (every write of a newer hub starts flagged, and a segment starts
    // with a write): the flags prove nothing in it, the old rule holds.
    let synced = match frame::decode(buf) {
        Decoded::Frame {
            starts_write: false,
            ..
        } => None,
        _ => synced,
    };
    let mut index = vec![(base.0, 0)];
    let mut expected = base;
    let mut last_indexed = 0u64;
    let mut frames = Frames::new(buf);
    let mut out_of_order = None;
    for f in frames.by_ref() {
        if f.offset != expected {
            out_of_order = Some((
                f.pos,
                format!("offset {} where {expected} was due", f.offset),
            ));
            break;
        }
        let pos = f.pos as u64;
        if pos - last_indexed >= INDEX_EVERY {
            index.push((f.offset.0, pos));
            last_indexed = pos;
        }
        expected = expected.next();
    }
    let (pos, bad) = match (out_of_order, frames.stop()) {
        (Some((pos, why)), _) => (pos, why),
        (None, None) => {
            return Scanned {
                index,
                len: frames.pos() as u64,
                next: expected,
                outcome: Scan::Clean,
            };
        }
        (None, Some(Stop::Short { .. })) => (frames.pos(), "record cut short".to_string()),
        (None, Some(Stop::Bad(why))) => (frames.pos(), why.to_string()),
    };
    // A write starts only after the one before it was synced: a later
    // write's first frame proves this frame was synced too. Valid frames of
    // the same write prove nothing (its sectors may land in any order).
    // Only frames whose offset could follow from here count (a payload
    // that embeds a frame-shaped blob with a far offset proves nothing).
    let later_write = (pos + 1..buf.len()).any(|q| {
        let reachable = expected.0 + ((q - pos) / frame::MIN_FRAME) as u64 + 1;
        buf[q] == frame::MAGIC
            && matches!(frame::decode(&buf[q..]), Decoded::Frame { offset, starts_write, .. }
                if offset > expected && offset.0 <= reachable && (starts_write || synced.is_none()))
    });
    let outcome = if later_write || (pos as u64) < synced.unwrap_or(0) {
        Scan::Corrupt {
            pos: pos as u64,
            offset: expected,
            detail: bad,
        }
    } else {
        Scan::TornTail { pos: pos as u64 }
    };
    Scanned {
        index,
        len: pos as u64,
        next: expected,
        outcome,
    }
}

/// Opens (recovering) or creates partition `id` and starts its writer.
pub(super) fn open_partition(
    config: &FileLogConfig,
    id: PartitionId,
) -> LogResult<Arc<PartitionLog>> {
    let fs = &*config.storage;
    let dir = config.dir.join(format!("p{}", id.0));
    super::create_dir_durable_on(fs, &dir)?;
    // A directory made by a process that died before syncing it: sync now,
    // before anything in it is relied on.
    sync_dir(fs, &dir)?;
    cut::finish_reset(fs, &dir)?;
    let (mut durable_mark, known) = mark::DurableMark::open(fs, &dir)?;
    let mut bases: Vec<Offset> = fs
        .list(&dir)
        .map_err(|e| io(dir.display(), e))?
        .iter()
        .filter_map(|name| name.strip_suffix(".log")?.parse::<u64>().ok().map(Offset))
        .collect();
    bases.sort();
    let mut segments = Vec::new();
    let mut failed = None;
    let active = if let Some((&last, sealed)) = bases.split_last() {
        for (i, &base) in sealed.iter().enumerate() {
            segments.push(Arc::new(open_sealed(fs, &dir, base, bases[i + 1])?));
        }
        let (active, failure) = open_active(fs, &dir, id, last, known.synced(last))?;
        failed = failure;
        durable_mark.keep_only(last);
        active
    } else {
        create_segment(fs, &dir, Offset(0))?
    };
    if known == mark::Known::Legacy && failed.is_none() {
        // From now on the mark decides. Synced first: after a kill the tail
        // may be in the page cache only, and the mark must never claim more
        // than the disk holds. (A failed partition keeps the legacy rule.)
        active
            .file
            .sync_data()
            .map_err(|e| io(active.seg.path.display(), e))?;
        durable_mark.write(mark::Mark {
            base: active.seg.base,
            len: active.len,
        })?;
    }
    segments.push(active.seg.clone());
    let hw = active.next;
    let epochs = epochs::EpochCache::load(config.storage.clone(), &dir, hw, || {
        epochs::scan(fs, &segments)
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let part = Arc::new(PartitionLog {
        id,
        dir,
        fs: config.storage.clone(),
        segments: RwLock::new(segments),
        hw: watch::Sender::new(hw),
        tx,
        failed: RwLock::new(None),
        // Nothing may be deleted before the owner says what it still needs.
        retention_floor: AtomicU64::new(0),
        epochs,
        mark: Mutex::new(durable_mark),
    });
    if let Some(reason) = failed {
        part.fail(reason);
    }
    // The writer holds only a weak reference: when the log is dropped, the
    // sender inside `PartitionLog` goes with it and the thread ends.
    let writer_part = Arc::downgrade(&part);
    let settings = config.clone();
    std::thread::Builder::new()
        .name(format!("log-p{}", id.0))
        .spawn(move || writer::writer(writer_part, active, rx, settings))
        .map_err(|e| io("spawn log writer", e))?;
    Ok(part)
}

/// A sealed segment from `base` up to `next` (the next segment's base).
fn open_sealed(fs: &dyn Storage, dir: &Path, base: Offset, next: Offset) -> LogResult<Segment> {
    let path = segment_path(dir, base, "log");
    let file = fs
        .open(&path, Open::Read)
        .map_err(|e| io(path.display(), e))?;
    let len = file.len().map_err(|e| io(path.display(), e))?;
    let index = match read_index(fs, &segment_path(dir, base, "idx"), base) {
        Some(ix) => ix,
        None => {
            let bytes = fs.read(&path).map_err(|e| io(path.display(), e))?;
            let s = scan(&bytes, base, Some(0));
            let _ = write_index(fs, &segment_path(dir, base, "idx"), &s.index);
            s.index
        }
    };
    Ok(Segment {
        base,
        path,
        file,
        index: RwLock::new(index),
        durable_len: AtomicU64::new(len),
        next: AtomicU64::new(next.0),
    })
}

/// The last segment, scanned: a torn tail is cut off; corruption is
/// returned as the reason the partition refuses writes.
fn open_active(
    fs: &dyn Storage,
    dir: &Path,
    id: PartitionId,
    last: Offset,
    synced: Option<u64>,
) -> LogResult<(Active, Option<String>)> {
    let path = segment_path(dir, last, "log");
    let bytes = fs.read(&path).map_err(|e| io(path.display(), e))?;
    let scanned = scan(&bytes, last, synced);
    let file = fs
        .open(&path, Open::ReadWrite)
        .map_err(|e| io(path.display(), e))?;
    let mut failed = None;
    match &scanned.outcome {
        Scan::Clean => {}
        Scan::TornTail { pos } => {
            tracing::warn!(
                partition = %id,
                segment = %path.display(),
                bytes = bytes.len() as u64 - pos,
                "truncating a torn tail (writes that were never acknowledged)"
            );
            file.set_len(*pos)
                .and_then(|()| file.sync_data())
                .map_err(|e| io(path.display(), e))?;
        }
        Scan::Corrupt {
            pos,
            offset,
            detail,
        } => {
            failed = Some(format!(
                "corrupt record at offset {offset} ({detail}) in {} at byte {pos}; it was synced (below the durable mark, or a later write follows), so it is not a torn write: restore this partition (for example by replication) before writing again",
                path.display()
            ));
        }
    }
    let seg = Arc::new(Segment {
        base: last,
        path,
        file: file.clone(),
        index: RwLock::new(scanned.index.clone()),
        durable_len: AtomicU64::new(scanned.len),
        next: AtomicU64::new(scanned.next.0),
    });
    let last_indexed = scanned.index.last().map_or(0, |(_, p)| *p);
    let active = Active {
        seg,
        file,
        len: scanned.len,
        next: scanned.next,
        last_indexed,
        index: scanned.index,
    };
    Ok((active, failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::NewRecord;

    #[test]
    fn scan_tells_torn_tails_from_corruption() {
        let rec = |n: u8| NewRecord {
            device_id: fleet_api::DeviceId::new("d").unwrap(),
            mid: Some(fleet_api::Mid(u64::from(n))),
            enqueued_at: fleet_api::UnixMillis(1),
            region: fleet_api::Region::new("r").unwrap(),
            epoch: fleet_api::Epoch(1),
            payload: bytes::Bytes::from(vec![n; 100]),
        };
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        // Records 0 and 1 in one write, record 2 in the next.
        for i in 0..3u8 {
            frame::encode_flagged(&mut buf, Offset(u64::from(i)), &rec(i), i != 1);
            ends.push(buf.len());
        }
        assert_eq!(scan(&buf, Offset(0), Some(0)).outcome, Scan::Clean);
        assert_eq!(scan(&buf, Offset(0), Some(0)).next, Offset(3));
        assert_eq!(
            scan(&buf[..ends[1]], Offset(0), Some(0)).outcome,
            Scan::Clean
        );
        for cut in ends[1] + 1..buf.len() {
            let s = scan(&buf[..cut], Offset(0), Some(0));
            assert_eq!(
                s.outcome,
                Scan::TornTail {
                    pos: ends[1] as u64
                },
                "cut {cut}"
            );
            assert_eq!(s.next, Offset(2));
        }
        let mut mid = buf.clone();
        mid[ends[0] + 20] ^= 1; // inside record 1, record 2 (a later write) intact after it
        match scan(&mid, Offset(0), Some(0)).outcome {
            Scan::Corrupt { offset, .. } => assert_eq!(offset, Offset(1)),
            other => panic!("{other:?}"),
        }
        // Record 0 damaged, record 1 of the same write intact: a torn write...
        let mut torn = buf[..ends[1]].to_vec();
        torn[20] ^= 1;
        assert_eq!(
            scan(&torn, Offset(0), Some(0)).outcome,
            Scan::TornTail { pos: 0 }
        );
        // ...unless the durable mark says it was synced, or the segment
        // predates marks and flags (the old, cautious rule).
        assert!(matches!(
            scan(&torn, Offset(0), None).outcome,
            Scan::Corrupt { .. }
        ));
        assert!(matches!(
            scan(&torn, Offset(0), Some(ends[0] as u64)).outcome,
            Scan::Corrupt { .. }
        ));
        // The last synced record damaged, nothing after it: the mark tells.
        let mut last = buf.clone();
        last[ends[1] + 20] ^= 1;
        assert_eq!(
            scan(&last, Offset(0), Some(0)).outcome,
            Scan::TornTail {
                pos: ends[1] as u64
            }
        );
        assert!(matches!(
            scan(&last, Offset(0), Some(buf.len() as u64)).outcome,
            Scan::Corrupt { .. }
        ));
    }
}
