//! The de-duplication snapshot file of one partition (`dedup/p{N}.snap`):
//! the highest accepted mid of every device and the offset it covers,
//! written whole (temporary file, fsync, rename, fsync of the directory)
//! and CRC-checked when read; an invalid one is ignored (the log is
//! replayed instead).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fleet_api::storage::{self, Storage};

use fleet_api::{DeviceId, Mid, Offset, PartitionId};

use crate::ingest::Accepted;

pub fn snapshot_path(dir: &Path, p: PartitionId) -> PathBuf {
    dir.join(format!("p{}.snap", p.0))
}

const SNAP_MAGIC: &[u8; 4] = b"FDS2";

/// Writes a snapshot durably (old or new after a power cut, never a mix).
///
/// # Errors
/// When it cannot be written (the previous snapshot stays).
pub fn write_snapshot(
    fs: &dyn Storage,
    path: &Path,
    upto: Offset,
    map: &Accepted,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 + map.len() * 48);
    buf.extend_from_slice(SNAP_MAGIC);
    buf.extend_from_slice(&upto.0.to_le_bytes());
    buf.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (id, (mid, at)) in map {
        let b = id.as_str().as_bytes();
        buf.push(b.len() as u8);
        buf.extend_from_slice(b);
        buf.extend_from_slice(&mid.0.to_le_bytes());
        buf.extend_from_slice(&at.0.to_le_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    storage::replace_durable(fs, path, &buf)
}

/// Reads a snapshot: `None` when missing or invalid.
pub fn read_snapshot(fs: &dyn Storage, path: &Path) -> Option<(Offset, Accepted)> {
    let bytes = fs.read(path).ok()?;
    let (body, crc) = bytes.split_at(bytes.len().checked_sub(4)?);
    if crc32fast::hash(body).to_le_bytes() != crc || !body.starts_with(SNAP_MAGIC) {
        tracing::warn!(path = %path.display(), "ignoring an invalid dedup snapshot");
        return None;
    }
    let mut b = &body[4..];
    let mut take = |n: usize| -> Option<Vec<u8>> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        b = t;
        Some(h.to_vec())
    };
    let u64_of = |v: Vec<u8>| v.try_into().ok().map(u64::from_le_bytes);
    let upto = Offset(u64_of(take(8)?)?);
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let mut map = HashMap::with_capacity(count as usize);
    for _ in 0..count {
        let n = usize::from(take(1)?[0]);
        let id = DeviceId::new(String::from_utf8(take(n)?).ok()?).ok()?;
        let mid = Mid(u64_of(take(8)?)?);
        let at = Offset(u64_of(take(8)?)?);
        map.insert(id, (mid, at));
    }
    Some((upto, map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p0.snap");
        let map: Accepted = (0..100)
            .map(|i| {
                (
                    DeviceId::new(format!("d{i}")).unwrap(),
                    (Mid(i * 3), Offset(i * 7)),
                )
            })
            .collect();
        let fs = storage::real();
        write_snapshot(&*fs, &path, Offset(77), &map).unwrap();
        assert_eq!(read_snapshot(&*fs, &path), Some((Offset(77), map)));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_snapshot(&*fs, &path), None);
    }
}
