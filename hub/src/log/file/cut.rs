//! Cutting a partition back to an offset, after archiving the cut records;
//! and skipping a partition forward past records its primary no longer has.
//!
//! The archive is written and fsynced before anything is cut, so the records
//! are never only in memory: a crash between the two steps leaves them in
//! both places, never in neither.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

use fleet_api::Offset;

use super::read::read_blocking;
use super::segment::{Active, create_segment, position_of, segment_path};
use super::{PartitionLog, io, sync_dir};
use crate::log::frame;
use crate::log::{LogError, LogResult, ReadLimits};

/// Archives records `from..` into `archive` and cuts the log back to
/// `from`; returns how many records moved. Runs on the writer thread, so no
/// append interleaves.
pub(super) fn cut_and_archive(
    part: &PartitionLog,
    active: &mut Active,
    from: Offset,
    archive: &Path,
) -> LogResult<u64> {
    let hw = active.next;
    if from >= hw {
        return Ok(0);
    }
    // 1. Copy the tail out, durably, before anything is cut.
    let records = read_blocking(
        part,
        from,
        ReadLimits {
            max_records: usize::MAX,
            max_bytes: usize::MAX,
        },
    )?;
    let mut buf = Vec::new();
    for r in &records {
        frame::encode(&mut buf, r.offset, &r.record);
    }
    if let Some(dir) = archive.parent() {
        fs::create_dir_all(dir).map_err(|e| io(dir.display(), e))?;
    }
    let mut f = File::create(archive).map_err(|e| io(archive.display(), e))?;
    f.write_all(&buf)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(archive.display(), e))?;
    if let Some(dir) = archive.parent() {
        sync_dir(dir)?;
    }
    // 2. Cut: segments starting at or after `from` go, the one holding it shrinks.
    let mut segs = part.segments.write().unwrap_or_else(|e| e.into_inner());
    let keep = segs.iter().take_while(|s| s.base <= from).count();
    if keep == 0 {
        return Err(LogError::Io(format!(
            "partition {}: offset {from} is below the retained log",
            part.id
        )));
    }
    for s in segs.drain(keep..) {
        let _ = fs::remove_file(&s.path);
        let _ = fs::remove_file(segment_path(&part.dir, s.base, "idx"));
    }
    let seg = segs[keep - 1].clone();
    let pos = position_of(&seg, from)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg.path)
        .map_err(|e| io(seg.path.display(), e))?;
    file.set_len(pos)
        .and_then(|()| file.sync_all())
        .map_err(|e| io(seg.path.display(), e))?;
    let _ = fs::remove_file(segment_path(&part.dir, seg.base, "idx"));
    sync_dir(&part.dir)?;
    let index: Vec<(u64, u64)> = {
        let mut ix = seg.index.write().unwrap_or_else(|e| e.into_inner());
        ix.retain(|(o, _)| *o < from.0);
        ix.clone()
    };
    seg.durable_len.store(pos, Ordering::Release);
    seg.next.store(from.0, Ordering::Release);
    *active = Active {
        seg: seg.clone(),
        file,
        len: pos,
        next: from,
        last_indexed: index.last().map_or(0, |(_, p)| *p),
        index,
    };
    drop(segs);
    part.hw.send_replace(from);
    tracing::warn!(partition = %part.id, %from, moved = records.len(), archive = %archive.display(), "cut the log back; the tail is archived");
    Ok(records.len() as u64)
}

/// Empties the partition and continues it at `base`, above its high
/// watermark: a secondary whose primary's retention deleted the records in
/// between (they were never pulled, and no one has them any more). What it
/// held is a prefix of the primary's history that the primary's retention
/// deleted too, so it goes the way retention would delete it. Returns how
/// many records were dropped. The old segments go first: a crash in
/// between leaves an empty partition, and the secondary skips again.
pub(super) fn skip_to(part: &PartitionLog, active: &mut Active, base: Offset) -> LogResult<u64> {
    let hw = active.next;
    if base <= hw {
        return Err(LogError::Io(format!(
            "partition {}: cannot skip to {base}, the log already reaches {hw}",
            part.id
        )));
    }
    let mut segs = part.segments.write().unwrap_or_else(|e| e.into_inner());
    let start = segs.first().map_or(hw, |s| s.base);
    for s in segs.drain(..) {
        let _ = fs::remove_file(&s.path);
        let _ = fs::remove_file(segment_path(&part.dir, s.base, "idx"));
    }
    sync_dir(&part.dir)?;
    let fresh = create_segment(&part.dir, base)?;
    segs.push(fresh.seg.clone());
    *active = fresh;
    drop(segs);
    part.hw.send_replace(base);
    let dropped = hw.0.saturating_sub(start.0);
    tracing::warn!(partition = %part.id, from = %hw, to = %base, dropped, "skipped the log forward to where the primary's retained log starts");
    Ok(dropped)
}
