//! Cutting a partition back to an offset, after archiving the cut records;
//! and skipping a partition forward past records its primary no longer has.
//!
//! The archive is written and fsynced before anything is cut, so the records
//! are never only in memory: a crash between the two steps leaves them in
//! both places, never in neither.

use std::path::Path;
use std::sync::atomic::Ordering;

use fleet_api::Offset;
use fleet_api::storage::{self, Open, Storage};

use super::mark::Mark;
use super::read::read_blocking;
use super::segment::{Active, create_segment, position_of, segment_path};
use super::{PartitionLog, helper, io, sync_dir};
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
    let start = part
        .segments
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .first()
        .map_or(hw, |s| s.base);
    // 1. Copy the tail out, durably, before anything is cut (what retention
    //    deleted below the retained log is gone already; if retention
    //    deletes more meanwhile, the archive holds more than is cut).
    let records = read_blocking(
        part,
        from.max(start),
        ReadLimits {
            max_records: usize::MAX,
            max_bytes: usize::MAX,
        },
    )?;
    let mut buf = Vec::new();
    for r in &records {
        frame::encode(&mut buf, r.offset, &r.record);
    }
    let fs = &*part.fs;
    if let Some(dir) = archive.parent() {
        super::create_dir_durable_on(fs, dir)?;
    }
    storage::write_new_durable(fs, archive, &buf).map_err(helper)?;
    // 2. Cut, under the segment lock (retention may have moved the start
    //    since the archive was read: decide again here). Any failure from
    //    now on fails the partition: the log on disk is half cut, and
    //    recovery, not this process, puts it right.
    let mut segs = part.segments.write().unwrap_or_else(|e| e.into_inner());
    let keep = segs.iter().take_while(|s| s.base <= from).count();
    if keep == 0 {
        // The common point is below the retained log: nothing retained is
        // shared, the partition continues empty at `from`.
        drop(segs);
        reset_to(part, active, from)?;
        part.epochs.truncate(from);
        persist_history(part)?;
        tracing::warn!(partition = %part.id, %from, moved = records.len(), archive = %archive.display(), "cut the whole retained log; the partition continues empty");
        return Ok(records.len() as u64);
    }
    let seg = segs[keep - 1].clone();
    let result = (|| {
        let pos = position_of(fs, &seg, from)?;
        // Newer segments and the kept one's index go first, made durable,
        // and only then is the kept segment shortened: a power cut in
        // between leaves a log that ends later, never one with a hole.
        for s in segs[keep..].iter().rev() {
            remove_segment(part, s.base)?;
        }
        let idx = segment_path(&part.dir, seg.base, "idx");
        storage::remove_if_present(fs, &idx).map_err(helper)?;
        sync_dir(fs, &part.dir)?;
        // The mark must not claim what is about to be cut: a later torn
        // write there would pass for damage.
        part.mark
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lower(Mark {
                base: seg.base,
                len: pos,
            })?;
        let file = fs
            .open(&seg.path, Open::ReadWrite)
            .map_err(|e| io(seg.path.display(), e))?;
        file.set_len(pos)
            .and_then(|()| file.sync_data())
            .map_err(|e| io(seg.path.display(), e))?;
        Ok((pos, file))
    })();
    let (pos, file) = match result {
        Ok(done) => done,
        Err(e) => {
            drop(segs);
            part.fail(format!("cutting the log back to {from} failed: {e}"));
            return Err(e);
        }
    };
    segs.truncate(keep);
    let index: Vec<(u64, u64)> = {
        let mut ix = seg.index.write().unwrap_or_else(|e| e.into_inner());
        ix.retain(|(o, _)| *o < from.0);
        if ix.is_empty() {
            // Cut at the segment's base: the first entry is always (base, 0).
            ix.push((seg.base.0, 0));
        }
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
    // Only now: until the cut is durable the old entries describe the log.
    part.epochs.truncate(from);
    persist_history(part)?;
    tracing::warn!(partition = %part.id, %from, moved = records.len(), archive = %archive.display(), "cut the log back; the tail is archived");
    Ok(records.len() as u64)
}

/// Empties the partition and continues it at `base`, above its high
/// watermark: a secondary whose primary's retention deleted the records in
/// between (they were never pulled, and no one has them any more). What it
/// held is a prefix of the primary's history that the primary's retention
/// deleted too, so it goes the way retention would delete it. Returns how
/// many records were dropped.
pub(super) fn skip_to(
    part: &PartitionLog,
    active: &mut Active,
    base: Offset,
    history: Vec<(fleet_api::Epoch, Offset)>,
) -> LogResult<u64> {
    let hw = active.next;
    if base <= hw {
        return Err(LogError::Io(format!(
            "partition {}: cannot skip to {base}, the log already reaches {hw}",
            part.id
        )));
    }
    // The primary's history first: whichever way a crash falls, recovery
    // keeps only the entries below the log's end, and both are right.
    part.epochs
        .replace(history.into_iter().filter(|(_, at)| *at < base).collect());
    persist_history(part)?;
    let dropped = reset_to(part, active, base)?;
    tracing::warn!(partition = %part.id, from = %hw, to = %base, dropped, "skipped the log forward to where the primary's retained log starts");
    Ok(dropped)
}

/// Writes the epoch history; a failure fails the partition (a stale file
/// could later name epochs at offsets that hold other records).
fn persist_history(part: &PartitionLog) -> LogResult<()> {
    part.epochs.persist().inspect_err(|e| {
        part.fail(format!("cannot write the epoch history: {e}"));
    })
}

const RESET_MARKER: &str = "reset-to";

/// Empties the partition and continues it at `base`. Crash-safe: a marker
/// naming `base` is made durable before anything is deleted, and recovery
/// finishes an interrupted reset ([`finish_reset`]). A failure half-way
/// fails the partition (recovery finishes the job at the next start).
/// Returns how many retained records were dropped.
fn reset_to(part: &PartitionLog, active: &mut Active, base: Offset) -> LogResult<u64> {
    let fs = &*part.fs;
    let marker = part.dir.join(RESET_MARKER);
    let mut body = base.0.to_le_bytes().to_vec();
    body.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    // Once the marker may be on disk, the reset is decided (recovery
    // finishes it): any failure from here on must stop further appends to
    // the old log, which the next start would wipe.
    let prepared = storage::replace_durable(fs, &marker, &body)
        .map_err(helper)
        .and_then(|()| {
            part.mark
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lower(Mark { base, len: 0 })
        });
    if let Err(e) = prepared {
        part.fail(format!(
            "preparing to empty the partition to continue at {base} failed: {e}"
        ));
        return Err(e);
    }
    let mut segs = part.segments.write().unwrap_or_else(|e| e.into_inner());
    let start = segs.first().map_or(active.next, |s| s.base);
    let dropped = active.next.0.saturating_sub(start.0);
    let result = (|| {
        let gone: Vec<_> = segs.drain(..).collect();
        for s in gone.iter().rev() {
            remove_segment(part, s.base)?;
        }
        sync_dir(fs, &part.dir)?;
        let fresh = create_segment(fs, &part.dir, base)?;
        segs.push(fresh.seg.clone());
        *active = fresh;
        fs.remove_file(&marker)
            .map_err(|e| io(marker.display(), e))?;
        sync_dir(fs, &part.dir)
    })();
    drop(segs);
    if let Err(e) = &result {
        part.fail(format!(
            "emptying the partition to continue at {base} failed: {e}"
        ));
        return Err(e.clone());
    }
    part.hw.send_replace(base);
    Ok(dropped)
}

fn remove_segment(part: &PartitionLog, base: Offset) -> LogResult<()> {
    for ext in ["log", "idx"] {
        storage::remove_if_present(&*part.fs, &segment_path(&part.dir, base, ext))
            .map_err(helper)?;
    }
    Ok(())
}

/// Finishes a reset a crash interrupted: every segment goes, an empty one
/// starts at the marker's offset.
pub(super) fn finish_reset(fs: &dyn Storage, dir: &Path) -> LogResult<()> {
    let marker = dir.join(RESET_MARKER);
    let body = match fs.read(&marker) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(marker.display(), e)),
    };
    let valid = body.len() == 12 && crc32fast::hash(&body[..8]).to_le_bytes()[..] == body[8..];
    if !valid {
        return Err(LogError::Io(format!(
            "{} is corrupt: an interrupted reset cannot be finished",
            marker.display()
        )));
    }
    let base = Offset(u64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8])));
    tracing::warn!(dir = %dir.display(), %base, "finishing an interrupted reset of the partition");
    for name in fs.list(dir).map_err(|e| io(dir.display(), e))? {
        if name.ends_with(".log") || name.ends_with(".idx") {
            let path = dir.join(name);
            fs.remove_file(&path).map_err(|e| io(path.display(), e))?;
        }
    }
    sync_dir(fs, dir)?;
    create_segment(fs, dir, base)?;
    fs.remove_file(&marker)
        .map_err(|e| io(marker.display(), e))?;
    sync_dir(fs, dir)
}
