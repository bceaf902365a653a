//! How far the peer has durably pulled each partition, persisted, so that
//! retention on a primary never deletes what an attached peer still needs,
//! not even right after a restart (when no pull has been served yet).
//!
//! The value only says "the peer held everything below this once"; it is
//! raised by the peer's pulls, lowered when this log is cut back, and
//! written (temporary file, fsync, rename, fsync of the directory) before
//! retention may rely on it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use fleet_api::storage::{self, Storage};
use fleet_api::{Offset, PartitionId};

const MAGIC: &[u8; 4] = b"FPP1";

/// Per partition, the offset below which the peer durably holds the log.
#[derive(Debug)]
pub struct PeerPulled {
    path: PathBuf,
    offsets: Vec<AtomicU64>,
    /// What was last written to disk.
    persisted: std::sync::Mutex<Vec<u64>>,
    fs: std::sync::Arc<dyn Storage>,
}

impl PeerPulled {
    /// Reads `dir/peer-pulled` (all zeros when missing or unreadable: the
    /// safe direction, retention then waits for the peer's next pulls).
    pub fn load(dir: &Path, partitions: u32) -> PeerPulled {
        Self::load_on(storage::real(), dir, partitions)
    }

    /// [`PeerPulled::load`] on the given disk.
    pub fn load_on(fs: std::sync::Arc<dyn Storage>, dir: &Path, partitions: u32) -> PeerPulled {
        let path = dir.join("peer-pulled");
        let n = partitions as usize;
        let read = fs.read(&path).ok().and_then(|b| decode(&b, n));
        if read.is_none() && fs.exists(&path) {
            tracing::warn!(path = %path.display(), "unreadable record of what the peer pulled; retention waits for its next pulls");
        }
        let values = read.unwrap_or_else(|| vec![0; n]);
        PeerPulled {
            path,
            offsets: values.iter().map(|v| AtomicU64::new(*v)).collect(),
            persisted: std::sync::Mutex::new(values),
            fs,
        }
    }

    /// The peer holds `p` below `upto`.
    pub fn advance(&self, p: PartitionId, upto: Offset) {
        if let Some(o) = self.offsets.get(p.0 as usize) {
            o.fetch_max(upto.0, Ordering::AcqRel);
        }
    }

    /// This log was cut back to `hw`: nothing above it is the peer's copy
    /// of this log any more.
    pub fn cut(&self, p: PartitionId, hw: Offset) {
        if let Some(o) = self.offsets.get(p.0 as usize) {
            o.fetch_min(hw.0, Ordering::AcqRel);
        }
    }

    /// What retention may rely on for `p`: the value on disk, or less when
    /// the log was cut back since.
    pub fn durable(&self, p: PartitionId) -> Offset {
        let persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        let on_disk = persisted.get(p.0 as usize).copied().unwrap_or(0);
        let now = self
            .offsets
            .get(p.0 as usize)
            .map_or(0, |o| o.load(Ordering::Acquire));
        Offset(on_disk.min(now))
    }

    /// Writes the current values when they changed.
    ///
    /// # Errors
    /// When the file cannot be written durably (the old values stay in force).
    pub fn persist(&self) -> std::io::Result<()> {
        let mut persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        let now: Vec<u64> = self
            .offsets
            .iter()
            .map(|o| o.load(Ordering::Acquire))
            .collect();
        if now == *persisted {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(8 + now.len() * 8 + 4);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(now.len() as u32).to_le_bytes());
        for v in &now {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        storage::replace_durable(&*self.fs, &self.path, &buf)?;
        *persisted = now;
        Ok(())
    }
}

fn decode(b: &[u8], n: usize) -> Option<Vec<u64>> {
    let body = b.get(..b.len().checked_sub(4)?)?;
    let crc = u32::from_le_bytes(b.get(body.len()..)?.try_into().ok()?);
    if crc32fast::hash(body) != crc || body.get(..4)? != MAGIC {
        return None;
    }
    let count = u32::from_le_bytes(body.get(4..8)?.try_into().ok()?) as usize;
    if count != n || body.len() != 8 + 8 * n {
        return None;
    }
    Some(
        body[8..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_a_reload_and_cuts_lower_them() {
        let dir = tempfile::tempdir().unwrap();
        let pp = PeerPulled::load(dir.path(), 2);
        assert_eq!(pp.durable(PartitionId(0)), Offset(0));
        pp.advance(PartitionId(0), Offset(50));
        pp.advance(PartitionId(0), Offset(40));
        // Not relied upon before it is on disk.
        assert_eq!(pp.durable(PartitionId(0)), Offset(0));
        pp.persist().unwrap();
        assert_eq!(pp.durable(PartitionId(0)), Offset(50));
        let again = PeerPulled::load(dir.path(), 2);
        assert_eq!(again.durable(PartitionId(0)), Offset(50));
        again.cut(PartitionId(0), Offset(30));
        assert_eq!(again.durable(PartitionId(0)), Offset(30));
        again.persist().unwrap();
        assert_eq!(
            PeerPulled::load(dir.path(), 2).durable(PartitionId(0)),
            Offset(30)
        );
    }

    #[test]
    fn a_corrupt_or_mismatched_file_means_nothing_pulled() {
        let dir = tempfile::tempdir().unwrap();
        let pp = PeerPulled::load(dir.path(), 2);
        pp.advance(PartitionId(1), Offset(9));
        pp.persist().unwrap();
        assert_eq!(
            PeerPulled::load(dir.path(), 3).durable(PartitionId(1)),
            Offset(0)
        );
        let path = dir.path().join("peer-pulled");
        let mut b = std::fs::read(&path).unwrap();
        b[10] ^= 1;
        std::fs::write(&path, b).unwrap();
        assert_eq!(
            PeerPulled::load(dir.path(), 2).durable(PartitionId(1)),
            Offset(0)
        );
    }
}
