//! Between the device front and the event log: de-duplication by `mid`,
//! ordering, backpressure, and what a device has durably stored.
//!
//! Per partition, one short critical section decides "duplicate or new" and
//! enqueues the append, so the log's offset order is exactly the order of
//! decisions. A duplicate is acknowledged only after a `flush` barrier
//! proves that the original (enqueued earlier) is durable. The same barrier
//! answers "what has this device durably stored" without a second map.
//!
//! The per-device state survives restarts: it is snapshotted periodically
//! (with the log offset it covers) and the log tail after the snapshot is
//! replayed on start. A snapshot that claims more than the log holds (the log
//! lost a torn tail) is discarded, never trusted: trusting it would
//! acknowledge resends that are not stored.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleet_api::{DeviceId, Mid, Offset, PartitionId, UnixMillis, partition_for};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::log::{EventLog, LogError, NewRecord, ReadLimits};
use crate::state::HubState;

/// Why a publish was not taken.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("this hub is not the primary")]
    NotPrimary,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What became of a publish once it is safe to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Appended at `offset`, durable.
    New { offset: Offset, mid: Option<Mid> },
    /// A resend of a durable record; not appended again.
    Duplicate { mid: Mid },
}

impl Stored {
    pub fn mid(&self) -> Option<Mid> {
        match self {
            Stored::New { mid, .. } => *mid,
            Stored::Duplicate { mid } => Some(*mid),
        }
    }
}

/// Resolves once the publish may be acknowledged.
pub type Pending = BoxFuture<'static, Result<Stored, IngestError>>;

struct Part {
    accepted: HashMap<DeviceId, Mid>,
    /// The offset the next append will get.
    next: Offset,
}

/// The ingest pipeline of one hub.
pub struct Ingest {
    log: Arc<dyn EventLog>,
    state: Arc<HubState>,
    parts: Vec<Mutex<Part>>,
    snapshot_dir: PathBuf,
    budget: Arc<Semaphore>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("partitions", &self.parts.len())
            .finish()
    }
}

/// Bytes of payload that may wait for fsync at once, hub-wide.
pub const DEFAULT_BUDGET: usize = 256 << 20;

impl Ingest {
    /// Rebuilds per-device state from the latest snapshot and the log.
    ///
    /// # Errors
    /// When the log cannot be read.
    pub async fn open(
        log: Arc<dyn EventLog>,
        state: Arc<HubState>,
        data_dir: &Path,
        budget_bytes: usize,
    ) -> Result<Arc<Ingest>, LogError> {
        let snapshot_dir = data_dir.join("dedup");
        fs::create_dir_all(&snapshot_dir)
            .map_err(|e| LogError::Io(format!("{}: {e}", snapshot_dir.display())))?;
        let mut parts = Vec::new();
        for p in 0..log.partitions() {
            let p = PartitionId(p);
            let hw = log.high_watermark(p);
            let (mut accepted, covered) = match read_snapshot(&snapshot_path(&snapshot_dir, p)) {
                Some((upto, map)) if upto <= hw => (map, upto),
                Some((upto, _)) => {
                    tracing::warn!(partition = %p, snapshot = %upto, log = %hw, "dedup snapshot is ahead of the log; rebuilding from the log");
                    (HashMap::new(), Offset(0))
                }
                None => (HashMap::new(), Offset(0)),
            };
            let mut from = covered.max(log.log_start(p));
            while from < hw {
                let batch = log
                    .read(
                        p,
                        from,
                        ReadLimits {
                            max_records: 10_000,
                            max_bytes: 64 << 20,
                        },
                    )
                    .await?;
                let Some(last) = batch.last() else { break };
                from = last.offset.next();
                for r in &batch {
                    if let Some(m) = r.record.mid {
                        let e = accepted.entry(r.record.device_id.clone()).or_insert(m);
                        *e = (*e).max(m);
                    }
                }
            }
            log.set_retention_floor(p, covered);
            parts.push(Mutex::new(Part { accepted, next: hw }));
        }
        Ok(Arc::new(Ingest {
            log,
            state,
            parts,
            snapshot_dir,
            budget: Arc::new(Semaphore::new(budget_bytes.min(Semaphore::MAX_PERMITS))),
        }))
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// Payload bytes in flight, hub-wide: acquire before [`Ingest::submit`].
    pub fn budget(&self) -> &Arc<Semaphore> {
        &self.budget
    }

    fn part(&self, p: PartitionId) -> std::sync::MutexGuard<'_, Part> {
        self.parts[p.0 as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Decides and enqueues one publish, synchronously, so that a device's
    /// publishes reach the log in the order they were read. The returned
    /// future resolves when the publish may be acknowledged; `permit` is
    /// held until then.
    ///
    /// # Errors
    /// [`IngestError::NotPrimary`] when the hub does not accept writes.
    pub fn submit(
        &self,
        device: &DeviceId,
        mid: Option<Mid>,
        payload: Bytes,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<Pending, IngestError> {
        let re = self.state.get();
        if !self.state.accepting() {
            return Err(IngestError::NotPrimary);
        }
        let p = partition_for(device, self.log.partitions());
        let mut part = self.part(p);
        if let Some(m) = mid
            && part.accepted.get(device).is_some_and(|last| *last >= m)
        {
            drop(part);
            metrics::counter!("fleet_hub_duplicates_total").increment(1);
            let barrier = self.log.flush(p);
            return Ok(async move {
                barrier.await?;
                drop(permit);
                Ok(Stored::Duplicate { mid: m })
            }
            .boxed());
        }
        if let Some(m) = mid {
            match part.accepted.get_mut(device) {
                Some(last) => *last = m,
                None => {
                    part.accepted.insert(device.clone(), m);
                }
            }
        }
        part.next = part.next.next();
        let durable = self.log.append(
            p,
            NewRecord {
                device_id: device.clone(),
                mid,
                enqueued_at: UnixMillis(registry_sync::hlc::wall_ms()),
                region: self.state.region().clone(),
                epoch: re.epoch,
                payload,
            },
        );
        drop(part);
        Ok(async move {
            let offset = durable.await?;
            drop(permit);
            Ok(Stored::New { offset, mid })
        }
        .boxed())
    }

    /// The highest mid of `device` that is durable: what the hub may report
    /// as `committed`.
    ///
    /// # Errors
    /// When the device's partition failed.
    pub async fn committed(&self, device: &DeviceId) -> Result<Option<Mid>, IngestError> {
        let p = partition_for(device, self.log.partitions());
        let (mid, barrier) = {
            let part = self.part(p);
            (part.accepted.get(device).copied(), self.log.flush(p))
        };
        barrier.await?;
        Ok(mid)
    }

    /// Writes a snapshot of every partition's per-device state and lets log
    /// retention delete what the snapshots cover.
    pub async fn snapshot(&self) {
        for p in 0..self.log.partitions() {
            let p = PartitionId(p);
            let (map, upto, barrier) = {
                let part = self.part(p);
                (part.accepted.clone(), part.next, self.log.flush(p))
            };
            if barrier.await.is_err() {
                continue;
            }
            let path = snapshot_path(&self.snapshot_dir, p);
            match write_snapshot(&path, upto, &map) {
                Ok(()) => self.log.set_retention_floor(p, upto),
                Err(e) => tracing::warn!(partition = %p, error = %e, "cannot write dedup snapshot"),
            }
        }
    }

    /// Snapshots every `every` until the task is dropped.
    pub async fn snapshot_loop(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.snapshot().await;
        }
    }
}

fn snapshot_path(dir: &Path, p: PartitionId) -> PathBuf {
    dir.join(format!("p{}.snap", p.0))
}

const SNAP_MAGIC: &[u8; 4] = b"FDS1";

fn write_snapshot(path: &Path, upto: Offset, map: &HashMap<DeviceId, Mid>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 + map.len() * 40);
    buf.extend_from_slice(SNAP_MAGIC);
    buf.extend_from_slice(&upto.0.to_le_bytes());
    buf.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (id, mid) in map {
        let b = id.as_str().as_bytes();
        buf.push(b.len() as u8);
        buf.extend_from_slice(b);
        buf.extend_from_slice(&mid.0.to_le_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension("snap.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_snapshot(path: &Path) -> Option<(Offset, HashMap<DeviceId, Mid>)> {
    let bytes = fs::read(path).ok()?;
    let (body, crc) = bytes.split_at(bytes.len().checked_sub(4)?);
    if crc32fast::hash(body).to_le_bytes() != crc || !body.starts_with(SNAP_MAGIC) {
        tracing::warn!(path = %path.display(), "ignoring an invalid dedup snapshot");
        return None;
    }
    let mut b = &body[4..];
    let take = |b: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h.to_vec())
    };
    let upto = Offset(u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?));
    let count = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
    let mut map = HashMap::with_capacity(count as usize);
    for _ in 0..count {
        let n = usize::from(take(&mut b, 1)?[0]);
        let id = DeviceId::new(String::from_utf8(take(&mut b, n)?).ok()?).ok()?;
        let mid = Mid(u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?));
        map.insert(id, mid);
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
        let map: HashMap<DeviceId, Mid> = (0..100)
            .map(|i| (DeviceId::new(format!("d{i}")).unwrap(), Mid(i * 3)))
            .collect();
        write_snapshot(&path, Offset(77), &map).unwrap();
        assert_eq!(read_snapshot(&path), Some((Offset(77), map)));
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(read_snapshot(&path), None);
    }
}
