//! The group-commit writer: one thread per partition.
//!
//! It takes every command that queued while the previous fsync ran, writes
//! the appends with one `write` and one `fdatasync`, and only then resolves
//! their futures and advances the high watermark readers see. A failed write
//! or fsync fails the partition for good: it is never retried, because the
//! state of the page cache is unknown after it.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use fleet_api::Offset;
use tokio::sync::{mpsc, oneshot};

use super::cut::{cut_and_archive, skip_to};
use super::mark::Mark;
use super::segment::{Active, INDEX_EVERY, roll};
use super::{FileLogConfig, PartitionLog};
use crate::log::frame;
use crate::log::{LogError, LogResult, NewRecord};

/// What the writer thread is asked to do, in queue order.
pub(super) enum Cmd {
    Append(NewRecord, oneshot::Sender<LogResult<Offset>>),
    Flush(oneshot::Sender<LogResult<()>>),
    /// Archive records `from..` into the file, then cut them from the log.
    CutAndArchive(Offset, PathBuf, oneshot::Sender<LogResult<u64>>),
    /// Wait until the sender is dropped (deterministic tests: every
    /// append queued meanwhile goes into the next write together).
    Hold(std::sync::mpsc::Receiver<()>),
    /// Empty the partition and continue it at the offset.
    SkipTo(
        Offset,
        Vec<(fleet_api::Epoch, Offset)>,
        oneshot::Sender<LogResult<u64>>,
    ),
}

pub(super) fn writer(
    part: std::sync::Weak<PartitionLog>,
    mut active: Active,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    config: FileLogConfig,
) {
    let mut buf = Vec::with_capacity(config.max_batch_bytes + 64 * 1024);
    let mut appends: Vec<oneshot::Sender<LogResult<Offset>>> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<LogResult<()>>> = Vec::new();
    let mut new_index: Vec<(u64, u64)> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let Some(part) = part.upgrade() else { return };
        buf.clear();
        new_index.clear();
        if active.len >= config.segment_bytes && active.next > active.seg.base {
            match roll(&part, &mut active) {
                Ok(()) => {}
                Err(e) => part.fail(format!("cannot start a new segment: {e}")),
            }
        }
        let failure = part.failure();
        let mut cut = None;
        let mut new_epoch = false;
        let mut next = active.next;
        let mut pos = active.len;
        let mut cmd = Some(first);
        // Whether this write took everything that was queued (decided when
        // the batch is formed, so the same appends make the same writes).
        let mut drained = false;
        loop {
            match cmd.take() {
                Some(Cmd::Append(rec, done)) => {
                    if let Some(reason) = &failure {
                        let _ = done.send(Err(LogError::Failed {
                            partition: part.id,
                            reason: reason.clone(),
                        }));
                    } else {
                        if pos - active.last_indexed >= INDEX_EVERY {
                            new_index.push((next.0, pos));
                            active.last_indexed = pos;
                        }
                        new_epoch |= part.epochs.note(rec.epoch, next);
                        let starts_write = buf.is_empty();
                        pos += frame::encode_flagged(&mut buf, next, &rec, starts_write) as u64;
                        next = next.next();
                        appends.push(done);
                    }
                }
                Some(Cmd::Flush(done)) => flushes.push(done),
                Some(c @ Cmd::Hold(_)) => {
                    cut = Some(c);
                    break;
                }
                Some(c @ (Cmd::CutAndArchive(..) | Cmd::SkipTo(..))) => {
                    // Finish what is queued before it first.
                    cut = Some(c);
                    break;
                }
                None => {}
            }
            if buf.len() >= config.max_batch_bytes {
                break;
            }
            match rx.try_recv() {
                Ok(c) => cmd = Some(c),
                Err(_) => {
                    drained = true;
                    break;
                }
            }
        }
        if !buf.is_empty() {
            let started = tokio::time::Instant::now();
            // The epoch history names a new epoch before its first record
            // is written, so it always covers the log.
            let history = if new_epoch {
                part.epochs
                    .persist()
                    .map_err(|e| std::io::Error::other(e.to_string()))
            } else {
                Ok(())
            };
            let written = history.and_then(|()| {
                active
                    .file
                    .write_all_at(&buf, active.len)
                    .and_then(|()| active.file.sync_data())
            });
            metrics::histogram!("fleet_hub_fsync_seconds").record(started.elapsed().as_secs_f64());
            if let Err(e) = written {
                // Never retry a failed fsync: the page cache state is unknown.
                part.fail(format!(
                    "write to {} failed: {e}",
                    active.seg.path.display()
                ));
                let err = LogError::Failed {
                    partition: part.id,
                    reason: e.to_string(),
                };
                for done in appends.drain(..) {
                    let _ = done.send(Err(err.clone()));
                }
                for done in flushes.drain(..) {
                    let _ = done.send(Err(err.clone()));
                }
                continue;
            }
            let first_offset = active.next;
            active.len = pos;
            active.next = next;
            active.index.extend_from_slice(&new_index);
            active
                .seg
                .index
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&new_index);
            active.seg.durable_len.store(pos, Ordering::Release);
            active.seg.next.store(next.0, Ordering::Release);
            part.hw.send_replace(next);
            metrics::gauge!("fleet_hub_partition_high_watermark", "partition" => part.id.0.to_string())
                .set(next.0 as f64);
            for (i, done) in appends.drain(..).enumerate() {
                let _ = done.send(Ok(Offset(first_offset.0 + i as u64)));
            }
            // After the acknowledgements: the mark only helps recovery tell
            // damage from a torn write, it acknowledges nothing.
            let synced = Mark {
                base: active.seg.base,
                len: pos,
            };
            let idle = drained;
            let moved = part
                .mark
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .advance(synced, idle);
            if let Err(e) = moved {
                tracing::warn!(partition = %part.id, error = %e, "cannot move the durable mark");
            }
        }
        for done in flushes.drain(..) {
            let result = match part.failure() {
                Some(reason) => Err(LogError::Failed {
                    partition: part.id,
                    reason,
                }),
                None => Ok(()),
            };
            let _ = done.send(result);
        }
        match cut {
            Some(Cmd::CutAndArchive(from, archive, done)) => {
                let _ = done.send(cut_and_archive(&part, &mut active, from, &archive));
            }
            Some(Cmd::SkipTo(base, history, done)) => {
                let _ = done.send(skip_to(&part, &mut active, base, history));
            }
            Some(Cmd::Hold(released)) => {
                drop(part);
                let _ = released.recv();
            }
            _ => {}
        }
    }
}
