//! Opening a partition: recovery of its segments after a restart or a crash.
//!
//! Sealed segments are taken as they are (their index is read, or rebuilt by
//! a scan); the active (last) segment is scanned. An invalid frame with
//! nothing valid after it is a torn tail and is cut off; an invalid frame
//! followed by valid ones is corruption of acknowledged data and fails the
//! partition.

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use fleet_api::{Offset, PartitionId};
use tokio::sync::{mpsc, watch};

use super::segment::{
    Active, INDEX_EVERY, Segment, create_segment, read_index, segment_path, write_index,
};
use super::{FileLogConfig, PartitionLog, cut, epochs, io, writer};
use crate::log::LogResult;
use crate::log::frame::{self, Decoded, Frames, Stop};

/// Result of scanning a segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scan {
    /// Every byte is valid frames.
    Clean,
    /// Invalid from `pos` on, with nothing valid after: an unsynced tail.
    TornTail { pos: u64 },
    /// Invalid at `pos` (offset `offset`), but valid frames follow.
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
/// finds where its valid prefix ends, and why.
pub(super) fn scan(buf: &[u8], base: Offset) -> Scanned {
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
    let valid_after = (pos + 1..buf.len()).any(|q| {
        buf[q] == frame::MAGIC
            && matches!(frame::decode(&buf[q..]), Decoded::Frame { offset, .. } if offset > expected)
    });
    let outcome = if valid_after {
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
    let dir = config.dir.join(format!("p{}", id.0));
    super::create_dir_durable(&dir)?;
    cut::finish_reset(&dir)?;
    let mut bases: Vec<Offset> = fs::read_dir(&dir)
        .map_err(|e| io(dir.display(), e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse::<u64>().ok().map(Offset)
        })
        .collect();
    bases.sort();
    let mut segments = Vec::new();
    let mut failed = None;
    let active = if let Some((&last, sealed)) = bases.split_last() {
        for (i, &base) in sealed.iter().enumerate() {
            segments.push(Arc::new(open_sealed(&dir, base, bases[i + 1])?));
        }
        let (active, failure) = open_active(&dir, id, last)?;
        failed = failure;
        active
    } else {
        create_segment(&dir, Offset(0))?
    };
    segments.push(active.seg.clone());
    let hw = active.next;
    let epochs = epochs::EpochCache::load(&dir, hw, || epochs::scan(&segments))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let part = Arc::new(PartitionLog {
        id,
        dir,
        segments: RwLock::new(segments),
        hw: watch::Sender::new(hw),
        tx,
        failed: RwLock::new(None),
        // Nothing may be deleted before the owner says what it still needs.
        retention_floor: AtomicU64::new(0),
        epochs,
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
fn open_sealed(dir: &Path, base: Offset, next: Offset) -> LogResult<Segment> {
    let path = segment_path(dir, base, "log");
    let file = File::open(&path).map_err(|e| io(path.display(), e))?;
    let len = file.metadata().map_err(|e| io(path.display(), e))?.len();
    let index = match read_index(&segment_path(dir, base, "idx"), base) {
        Some(ix) => ix,
        None => {
            let bytes = fs::read(&path).map_err(|e| io(path.display(), e))?;
            let s = scan(&bytes, base);
            let _ = write_index(&segment_path(dir, base, "idx"), &s.index);
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
fn open_active(dir: &Path, id: PartitionId, last: Offset) -> LogResult<(Active, Option<String>)> {
    let path = segment_path(dir, last, "log");
    let bytes = fs::read(&path).map_err(|e| io(path.display(), e))?;
    let scanned = scan(&bytes, last);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
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
                .and_then(|()| file.sync_all())
                .map_err(|e| io(path.display(), e))?;
        }
        Scan::Corrupt {
            pos,
            offset,
            detail,
        } => {
            failed = Some(format!(
                "corrupt record at offset {offset} ({detail}) in {} at byte {pos}; valid records follow it, so it is not a torn write: restore this partition (for example by replication) before writing again",
                path.display()
            ));
        }
    }
    let read = File::open(&path).map_err(|e| io(path.display(), e))?;
    let seg = Arc::new(Segment {
        base: last,
        path,
        file: read,
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
        for i in 0..3u8 {
            frame::encode(&mut buf, Offset(u64::from(i)), &rec(i));
            ends.push(buf.len());
        }
        assert_eq!(scan(&buf, Offset(0)).outcome, Scan::Clean);
        assert_eq!(scan(&buf, Offset(0)).next, Offset(3));
        assert_eq!(scan(&buf[..ends[1]], Offset(0)).outcome, Scan::Clean);
        for cut in ends[1] + 1..buf.len() {
            let s = scan(&buf[..cut], Offset(0));
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
        mid[ends[0] + 20] ^= 1; // inside record 1, record 2 intact after it
        match scan(&mid, Offset(0)).outcome {
            Scan::Corrupt { offset, .. } => assert_eq!(offset, Offset(1)),
            other => panic!("{other:?}"),
        }
    }
}
