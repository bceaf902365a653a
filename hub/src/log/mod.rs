//! The event log: P partitions of records with dense offsets.
//!
//! Invariants every backend keeps:
//! - An append's future resolves only once the record is durable (fsync or
//!   the backend's equivalent); nothing is acknowledged before that.
//! - Offsets are dense per partition and assigned in call order of `append`.
//! - Readers see only durable records (`offset < high_watermark`).
//! - A corrupt record is never served: reads stop before it with an error.

pub mod file;
pub mod frame;
pub mod jetstream;

use std::fmt;

use bytes::Bytes;
use fleet_api::hub::WireRecord;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, UnixMillis};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// A record to append.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewRecord {
    pub device_id: DeviceId,
    pub mid: Option<Mid>,
    pub enqueued_at: UnixMillis,
    pub region: Region,
    pub epoch: Epoch,
    pub payload: Bytes,
}

/// A stored record.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Record {
    pub partition: PartitionId,
    pub offset: Offset,
    pub record: NewRecord,
}

impl Record {
    pub fn to_wire(&self) -> WireRecord {
        WireRecord {
            partition: self.partition,
            offset: self.offset,
            device_id: self.record.device_id.clone(),
            mid: self.record.mid,
            enqueued_at: self.record.enqueued_at,
            region: self.record.region.clone(),
            epoch: self.record.epoch,
            payload: self.record.payload.to_vec(),
        }
    }
}

/// Bounds of one read.
#[derive(Clone, Copy, Debug)]
pub struct ReadLimits {
    pub max_records: usize,
    pub max_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_records: 1000,
            max_bytes: 4 << 20,
        }
    }
}

/// Errors of the event log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("partition {0} does not exist")]
    NoSuchPartition(PartitionId),
    #[error(
        "partition {partition}: offset {requested} is no longer retained (log starts at {start})"
    )]
    OffsetGone {
        partition: PartitionId,
        requested: Offset,
        start: Offset,
    },
    #[error(
        "partition {partition}: corrupt record at offset {offset} ({detail}); it and what follows are not served"
    )]
    Corrupt {
        partition: PartitionId,
        offset: Offset,
        detail: String,
    },
    #[error("partition {partition} refuses writes: {reason}")]
    Failed {
        partition: PartitionId,
        reason: String,
    },
    #[error("{0}")]
    Io(String),
    #[error("the log is shut down")]
    Closed,
}

impl LogError {
    /// True when the same call may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, LogError::Io(_))
    }
}

pub type LogResult<T> = Result<T, LogError>;

/// A durable, partitioned event log (embedded files or NATS JetStream).
pub trait EventLog: Send + Sync + fmt::Debug + 'static {
    fn partitions(&self) -> u32;

    /// Enqueues `rec`; offsets follow call order per partition. The future
    /// resolves with the record's offset once it is durable.
    fn append(&self, p: PartitionId, rec: NewRecord) -> BoxFuture<'static, LogResult<Offset>>;

    /// Resolves once every record enqueued before this call is durable. `Ok`
    /// only if every earlier append on the partition succeeded, so a caller
    /// may acknowledge anything it enqueued before calling `flush`.
    fn flush(&self, p: PartitionId) -> BoxFuture<'static, LogResult<()>>;

    /// Durable records from `from` on, at most `limits`; empty at the end.
    fn read(
        &self,
        p: PartitionId,
        from: Offset,
        limits: ReadLimits,
    ) -> BoxFuture<'_, LogResult<Vec<Record>>>;

    /// One past the last durable offset.
    fn high_watermark(&self, p: PartitionId) -> Offset;

    /// The first retained offset.
    fn log_start(&self, p: PartitionId) -> Offset;

    /// Follows the high watermark (for long polls and tailers).
    fn watch(&self, p: PartitionId) -> watch::Receiver<Offset>;

    /// Why partition `p` refuses writes, if it does.
    fn partition_failure(&self, p: PartitionId) -> Option<String> {
        let _ = p;
        None
    }

    /// `Err` with the reasons when some partition refuses writes.
    fn health(&self) -> Result<(), Vec<String>>;

    /// Cuts records `from..` of partition `p` from the log after writing
    /// them to the file `archive` (frames, fsynced, never deleted): the
    /// divergent tail of an old primary at failback. Returns how many moved.
    fn cut_and_archive(
        &self,
        p: PartitionId,
        from: Offset,
        archive: std::path::PathBuf,
    ) -> BoxFuture<'static, LogResult<u64>>;

    /// The epoch history of partition `p`: `(epoch, start offset)` of every
    /// epoch it holds or held (also where retention deleted the records),
    /// oldest first. Epochs never decrease along a partition's offsets.
    fn epoch_history(&self, p: PartitionId) -> Vec<(Epoch, Offset)>;

    /// Empties partition `p` and continues it at `base` (above its high
    /// watermark): a secondary whose primary no longer holds the records in
    /// between. `history`: the epoch history below `base` (the primary's).
    /// Returns how many records were dropped.
    fn skip_to(
        &self,
        p: PartitionId,
        base: Offset,
        history: Vec<(Epoch, Offset)>,
    ) -> BoxFuture<'static, LogResult<u64>>;

    /// The last record of `device` in partition `p`, found without reading
    /// the partition; `None` when the device has none. Appends only ever
    /// raise a device's mid, so when it has a mid it is the highest. A
    /// backend that cannot answer this says so (then no hub shares it).
    fn last_of(
        &self,
        p: PartitionId,
        device: &DeviceId,
    ) -> BoxFuture<'_, LogResult<Option<Record>>> {
        let _ = (p, device);
        Box::pin(futures::future::ready(Err(LogError::Io(
            "this log cannot look up a device's last record".to_string(),
        ))))
    }

    /// The highest mid of `device` among records of `p` that retention
    /// purged, with the offset it was at, when that record is still in the
    /// partition's history; `None` when none was purged (a log that keeps
    /// every device's last mid elsewhere, as the file log's hub does in its
    /// snapshots, has none). Looked up when [`EventLog::last_of`] finds no
    /// numbered record.
    fn purged_last(
        &self,
        p: PartitionId,
        device: &DeviceId,
    ) -> BoxFuture<'_, LogResult<Option<(Mid, Offset)>>> {
        let _ = (p, device);
        Box::pin(futures::future::ready(Ok(None)))
    }

    /// Reloads partition `p` from the backend: on a log shared by several
    /// hubs, what another hub wrote becomes readable here. `own`: this hub
    /// writes the partition from now on (appends continue after whatever is
    /// stored; anything still in flight from before is refused); otherwise
    /// appends are refused. A log of one writer has nothing to reload.
    fn reload(&self, p: PartitionId, own: bool) -> BoxFuture<'static, LogResult<()>> {
        let _ = (p, own);
        Box::pin(futures::future::ready(Ok(())))
    }

    /// Allows retention to delete records below `offset` (they are covered
    /// by a snapshot, replicated, ...). Backends without retention ignore it.
    fn set_retention_floor(&self, p: PartitionId, offset: Offset) {
        let _ = (p, offset);
    }
}
