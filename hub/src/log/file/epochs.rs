//! A partition's epoch history: the start offset of every epoch it holds or
//! held, in `p{N}/epochs`, so that it outlives retention (reconciling after
//! several failovers needs the epochs of records retention has deleted:
//! Kafka's leader-epoch cache).
//!
//! An entry is written (temporary file, fsync, rename, fsync of the
//! directory) before the first record of its epoch is written, so the file
//! always covers the log; recovery drops entries that start at or past the
//! recovered high watermark (their records never became durable). A log
//! without the file (made before it existed) or with an unreadable one gets
//! it rebuilt from its retained records, once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fleet_api::storage::{self, Storage};
use fleet_api::{Epoch, Offset};

use super::segment::Segment;
use super::{helper, io};
use crate::log::LogResult;
use crate::log::frame::Frames;

const MAGIC: &[u8; 4] = b"FEH1";

/// `(epoch, start offset)`, oldest first, epochs strictly increasing.
pub(super) type History = Vec<(Epoch, Offset)>;

pub(super) struct EpochCache {
    fs: Arc<dyn Storage>,
    path: PathBuf,
    entries: Mutex<History>,
}

impl EpochCache {
    /// Loads `dir/epochs`, keeping only entries below `hw`; `rebuild` scans
    /// the retained records when there is no usable file.
    pub(super) fn load(
        fs: Arc<dyn Storage>,
        dir: &Path,
        hw: Offset,
        rebuild: impl FnOnce() -> LogResult<History>,
    ) -> LogResult<EpochCache> {
        let path = dir.join("epochs");
        let read = fs.read(&path).ok().and_then(|b| decode(&b));
        let (mut entries, fresh) = match read {
            Some(e) => (e, false),
            None => {
                if fs.exists(&path) {
                    tracing::warn!(path = %path.display(), "unreadable epoch history; rebuilding it from the retained records");
                }
                (rebuild()?, true)
            }
        };
        let before = entries.len();
        entries.retain(|(_, start)| *start < hw);
        let cache = EpochCache {
            fs,
            path,
            entries: Mutex::new(entries),
        };
        if fresh || cache.len() != before {
            cache.persist()?;
        }
        Ok(cache)
    }

    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The history.
    pub(super) fn get(&self) -> History {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A record of `epoch` goes to `offset`: true when that starts an epoch
    /// (the caller persists before writing the record).
    pub(super) fn note(&self, epoch: Epoch, offset: Offset) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.last().is_none_or(|(last, _)| epoch > *last) {
            entries.push((epoch, offset));
            true
        } else {
            false
        }
    }

    /// Takes `history` as this partition's (after skipping forward, the
    /// offsets below are the primary's).
    pub(super) fn replace(&self, history: History) {
        *self.entries.lock().unwrap_or_else(|e| e.into_inner()) = history;
    }

    /// The log was cut back to `from`: epochs starting there or later go.
    pub(super) fn truncate(&self, from: Offset) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let before = entries.len();
        entries.retain(|(_, start)| *start < from);
        entries.len() != before
    }

    /// Writes the history durably.
    pub(super) fn persist(&self) -> LogResult<()> {
        let entries = self.get();
        let mut buf = Vec::with_capacity(8 + entries.len() * 16 + 4);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (e, o) in &entries {
            buf.extend_from_slice(&e.0.to_le_bytes());
            buf.extend_from_slice(&o.0.to_le_bytes());
        }
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        storage::replace_durable(&*self.fs, &self.path, &buf).map_err(helper)
    }
}

/// The epoch history of the retained records (segments oldest first).
pub(super) fn scan(fs: &dyn Storage, segments: &[Arc<Segment>]) -> LogResult<History> {
    let mut out: History = Vec::new();
    for seg in segments {
        let len = seg.durable_len.load(std::sync::atomic::Ordering::Acquire) as usize;
        let bytes = fs.read(&seg.path).map_err(|e| io(seg.path.display(), e))?;
        for f in Frames::new(&bytes[..len.min(bytes.len())]) {
            if out.last().is_none_or(|(e, _)| f.record.epoch > *e) {
                out.push((f.record.epoch, f.offset));
            }
        }
    }
    Ok(out)
}

fn decode(b: &[u8]) -> Option<History> {
    let body = b.get(..b.len().checked_sub(4)?)?;
    let crc = u32::from_le_bytes(b.get(body.len()..)?.try_into().ok()?);
    if crc32fast::hash(body) != crc || body.get(..4)? != MAGIC {
        return None;
    }
    let n = u32::from_le_bytes(body.get(4..8)?.try_into().ok()?) as usize;
    if body.len() != 8 + 16 * n {
        return None;
    }
    let entries: History = body[8..]
        .chunks_exact(16)
        .map(|c| {
            let e = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
            let o = u64::from_le_bytes(c[8..].try_into().unwrap_or([0; 8]));
            (Epoch(e), Offset(o))
        })
        .collect();
    let increasing = entries
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
    increasing.then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_survives_reloads_and_drops_what_never_became_durable() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            EpochCache::load(storage::real(), dir.path(), Offset(0), || Ok(Vec::new())).unwrap();
        assert!(c.note(Epoch(1), Offset(0)));
        assert!(!c.note(Epoch(1), Offset(5)));
        assert!(c.note(Epoch(3), Offset(10)));
        c.persist().unwrap();
        let again = EpochCache::load(storage::real(), dir.path(), Offset(20), || {
            panic!("not rebuilt")
        })
        .unwrap();
        assert_eq!(
            again.get(),
            vec![(Epoch(1), Offset(0)), (Epoch(3), Offset(10))]
        );
        // The records of epoch 3 never became durable.
        let short = EpochCache::load(storage::real(), dir.path(), Offset(10), || {
            panic!("not rebuilt")
        })
        .unwrap();
        assert_eq!(short.get(), vec![(Epoch(1), Offset(0))]);
        assert!(short.truncate(Offset(0)));
        assert!(short.get().is_empty());
    }

    #[test]
    fn a_corrupt_file_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("epochs"), b"FEH1garbage").unwrap();
        let c = EpochCache::load(storage::real(), dir.path(), Offset(9), || {
            Ok(vec![(Epoch(2), Offset(4))])
        })
        .unwrap();
        assert_eq!(c.get(), vec![(Epoch(2), Offset(4))]);
        let again = EpochCache::load(storage::real(), dir.path(), Offset(9), || {
            panic!("not rebuilt")
        })
        .unwrap();
        assert_eq!(again.get(), vec![(Epoch(2), Offset(4))]);
    }
}
