//! The partition's durable mark: how far its active segment is known to be
//! synced, kept in `p{N}/durable` (segment base, length, CRC; 20 bytes,
//! rewritten in place within one sector).
//!
//! Recovery uses it to tell a torn tail from damaged acknowledged data: a
//! bad frame below the mark was synced and acknowledged, so the partition
//! stops; above it, the frame flags decide (see `frame`). The writer moves
//! the mark after every 8th write when that write emptied its queue, and
//! after every 64th under load: at most one extra fsync per 8 writes.
//! (Counted, not timed: the same appends make the same disk operations,
//! which the seeded power-cut tests rely on.) The last few writes are thus
//! covered by the frame flags alone: damage to them with no later write
//! after it reads as a torn tail.
//!
//! A partition without a mark file (written by a version before it) is
//! recovered by the old rule (any valid later frame means corruption), then
//! synced and marked.
//! The mark never claims more than is durable: it is written after the data
//! it covers was synced, and lowered (synced) before the log is cut back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_api::Offset;
use fleet_api::storage::{Open, Storage, StorageFile};

use super::{io, sync_dir};
use crate::log::LogResult;

const NAME: &str = "durable";
const LEN: usize = 20;
/// Under a steady load, the mark moves at least every this many writes.
const AT_LEAST_EVERY: u32 = 64;
/// When the disk is idle, it moves at most every this many writes.
const IDLE_EVERY: u32 = 8;

/// What the mark file said at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    /// No usable mark (none, empty, damaged: a partition written before
    /// marks existed, or a mark never completed): the old, cautious rule.
    Legacy,
    /// Synced up to this mark.
    Marked(Mark),
}

impl Known {
    /// For recovery of the active segment starting at `base`: `None` for
    /// the legacy rule, else how many bytes are known synced.
    pub(super) fn synced(self, base: Offset) -> Option<u64> {
        match self {
            Known::Legacy => None,
            Known::Marked(m) => Some(if m.base == base { m.len } else { 0 }),
        }
    }
}

/// Where the synced part of the active segment ends, as far as is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub(super) base: Offset,
    pub(super) len: u64,
}

pub(super) struct DurableMark {
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    written: Option<Mark>,
    /// Writes since the mark last moved.
    since: u32,
}

fn encode(m: Mark) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[..8].copy_from_slice(&m.base.0.to_le_bytes());
    b[8..16].copy_from_slice(&m.len.to_le_bytes());
    let crc = crc32fast::hash(&b[..16]);
    b[16..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<Mark> {
    let b: &[u8; LEN] = b.try_into().ok()?;
    let crc = u32::from_le_bytes(b[16..].try_into().ok()?);
    (crc32fast::hash(&b[..16]) == crc).then(|| Mark {
        base: Offset(u64::from_le_bytes(b[..8].try_into().unwrap_or_default())),
        len: u64::from_le_bytes(b[8..16].try_into().unwrap_or_default()),
    })
}

impl DurableMark {
    /// Reads the mark of partition directory `dir` and opens it (creating
    /// it when missing). A file that is missing, empty or unreadable gives
    /// the legacy rule, the cautious one; recovery writes a real mark once
    /// the partition is known good.
    pub(super) fn open(fs: &dyn Storage, dir: &Path) -> LogResult<(DurableMark, Known)> {
        let path = dir.join(NAME);
        let (file, known) = match fs.open(&path, Open::ReadWrite) {
            Ok(f) => {
                let bytes = fs.read(&path).map_err(|e| io(path.display(), e))?;
                let known = decode(&bytes).map_or(Known::Legacy, Known::Marked);
                (f, known)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = fs
                    .open(&path, Open::CreateNew)
                    .map_err(|e| io(path.display(), e))?;
                sync_dir(fs, dir)?;
                (f, Known::Legacy)
            }
            Err(e) => return Err(io(path.display(), e)),
        };
        let written = match known {
            Known::Marked(m) => Some(m),
            Known::Legacy => None,
        };
        let mark = DurableMark {
            path,
            file,
            written,
            since: 0,
        };
        Ok((mark, known))
    }

    /// Forgets what the file says unless it is about the segment at
    /// `base`: the next [`Self::lower`] then rewrites it.
    pub(super) fn keep_only(&mut self, base: Offset) {
        if self.written.is_some_and(|m| m.base != base) {
            self.written = None;
        }
    }

    /// Records that `to` is synced, if the moment is right: the write
    /// emptied the queue (`idle`), or the mark is many writes behind.
    pub(super) fn advance(&mut self, to: Mark, idle: bool) -> LogResult<()> {
        self.since = self.since.saturating_add(1);
        let due = (idle && self.since >= IDLE_EVERY) || self.since >= AT_LEAST_EVERY;
        if self.written == Some(to) || !due {
            return Ok(());
        }
        self.write(to)
    }

    /// Writes and syncs the mark now (before a cut: to lower it).
    pub(super) fn write(&mut self, to: Mark) -> LogResult<()> {
        // Unknown until the write is synced: a failed write may still land
        // later, so nothing may be skipped on the strength of the old value.
        self.written = None;
        self.file
            .write_all_at(&encode(to), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io(self.path.display(), e))?;
        self.written = Some(to);
        self.since = 0;
        Ok(())
    }

    /// Lowers the mark to at most `to` when it claims more (before the
    /// log is cut back there).
    pub(super) fn lower(&mut self, to: Mark) -> LogResult<()> {
        match self.written {
            Some(m) if m.base == to.base && m.len <= to.len => Ok(()),
            _ => self.write(to),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_damage_is_ignored() {
        let m = Mark {
            base: Offset(7),
            len: 4096,
        };
        assert_eq!(decode(&encode(m)), Some(m));
        let mut bad = encode(m);
        bad[3] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&bad[..10]), None);
    }
}
