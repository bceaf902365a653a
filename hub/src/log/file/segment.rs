//! Segment files and their sparse indexes.
//!
//! A segment `{base_offset:020}.log` holds the frames of consecutive offsets
//! from `base_offset`; a sealed segment has a `.idx` file of `(offset,
//! position)` pairs (CRC-checked; rebuilt by scanning when it is missing or
//! bad). The first index entry is always `(base, 0)`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use fleet_api::Offset;
use fleet_api::storage::{Open, Storage, StorageFile};

use super::{PartitionLog, io, sync_dir};
use crate::log::frame::Frames;
use crate::log::{LogError, LogResult};

/// Index every this many bytes of segment.
pub(super) const INDEX_EVERY: u64 = 4096;

pub(super) struct Segment {
    pub(super) base: Offset,
    pub(super) path: PathBuf,
    /// The file (positional reads need only `&self`).
    pub(super) file: Arc<dyn StorageFile>,
    /// Sparse `(offset, position)` pairs, first entry `(base, 0)`.
    pub(super) index: RwLock<Vec<(u64, u64)>>,
    /// Bytes that are durable and valid.
    pub(super) durable_len: AtomicU64,
    /// One past the last durable offset in this segment.
    pub(super) next: AtomicU64,
}

impl Segment {
    /// Byte position from which to walk to reach `offset` (the last index
    /// entry at or below it).
    pub(super) fn seek(&self, offset: Offset) -> u64 {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let k = index
            .partition_point(|(o, _)| *o <= offset.0)
            .saturating_sub(1);
        index.get(k).map_or(0, |(_, p)| *p)
    }
}

/// The writer's view of the active segment.
pub(super) struct Active {
    pub(super) seg: Arc<Segment>,
    pub(super) file: Arc<dyn StorageFile>,
    pub(super) len: u64,
    pub(super) next: Offset,
    pub(super) last_indexed: u64,
    pub(super) index: Vec<(u64, u64)>,
}

pub(super) fn segment_path(dir: &Path, base: Offset, ext: &str) -> PathBuf {
    dir.join(format!("{:020}.{ext}", base.0))
}

pub(super) fn read_index(fs: &dyn Storage, path: &Path, base: Offset) -> Option<Vec<(u64, u64)>> {
    let bytes = fs.read(path).ok()?;
    let (body, crc) = bytes.split_at(bytes.len().checked_sub(4)?);
    if crc32fast::hash(body).to_le_bytes() != crc || body.len() % 16 != 0 {
        return None;
    }
    let entries: Vec<(u64, u64)> = body
        .chunks_exact(16)
        .map(|c| {
            let o = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
            let p = u64::from_le_bytes(c[8..].try_into().unwrap_or_default());
            (o, p)
        })
        .collect();
    (entries.first() == Some(&(base.0, 0))).then_some(entries)
}

pub(super) fn write_index(fs: &dyn Storage, path: &Path, entries: &[(u64, u64)]) -> LogResult<()> {
    let mut body = Vec::with_capacity(entries.len() * 16 + 4);
    for (o, p) in entries {
        body.extend_from_slice(&o.to_le_bytes());
        body.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    // An index is only a hint (rebuilt by a scan when missing or bad), so
    // its directory entry need not be synced.
    let f = fs
        .open(path, Open::Truncate)
        .map_err(|e| io(path.display(), e))?;
    f.write_all_at(&body, 0)
        .and_then(|()| f.sync_data())
        .map_err(|e| io(path.display(), e))
}

pub(super) fn create_segment(fs: &dyn Storage, dir: &Path, base: Offset) -> LogResult<Active> {
    let path = segment_path(dir, base, "log");
    let file = fs
        .open(&path, Open::CreateNew)
        .map_err(|e| io(path.display(), e))?;
    sync_dir(fs, dir)?;
    let seg = Arc::new(Segment {
        base,
        path,
        file: file.clone(),
        index: RwLock::new(vec![(base.0, 0)]),
        durable_len: AtomicU64::new(0),
        next: AtomicU64::new(base.0),
    });
    Ok(Active {
        seg,
        file,
        len: 0,
        next: base,
        last_indexed: 0,
        index: vec![(base.0, 0)],
    })
}

/// Seals the active segment (index file) and starts the next one.
pub(super) fn roll(part: &PartitionLog, active: &mut Active) -> LogResult<()> {
    write_index(
        &*part.fs,
        &segment_path(&part.dir, active.seg.base, "idx"),
        &active.index,
    )?;
    let fresh = create_segment(&*part.fs, &part.dir, active.next)?;
    part.segments
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push(fresh.seg.clone());
    *active = fresh;
    Ok(())
}

/// Byte position of record `offset` in `seg` (which must hold it).
pub(super) fn position_of(fs: &dyn Storage, seg: &Segment, offset: Offset) -> LogResult<u64> {
    let bytes = fs.read(&seg.path).map_err(|e| io(seg.path.display(), e))?;
    let start = seg.seek(offset) as usize;
    Frames::at(&bytes, start)
        .find(|f| f.offset == offset)
        .map(|f| f.pos as u64)
        .ok_or_else(|| {
            LogError::Io(format!(
                "offset {offset} not found in {}",
                seg.path.display()
            ))
        })
}
