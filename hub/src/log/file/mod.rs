//! Embedded log backend: per-partition segment files.
//!
//! Layout: `DIR/meta.json` (partition count, fixed at creation) and
//! `DIR/p{N}/{base_offset:020}.log` segments with `.idx` sparse indexes for
//! sealed segments. One writer thread per partition group-commits: it takes
//! every append that queued while the previous fsync ran, writes them with
//! one `write` and one `fdatasync`, and only then resolves their futures and
//! advances the high watermark that readers see.
//!
//! Recovery scans the active (last) segment. An invalid frame below the
//! durable mark (`mark`), or followed by the valid first frame of a later
//! write, is corruption of data that was acknowledged: the partition stops
//! there, refuses writes and says so, and readers get an error at that
//! offset. Otherwise it is a torn tail (an unsynced write, cut short or with
//! sectors missing): it is truncated. Sealed segments are checked by CRC on
//! every read.
//!
//! - `segment`: segment files and their indexes.
//! - `recovery`: opening a partition, telling torn tails from corruption.
//! - `writer`: the group-commit writer thread.
//! - `read`: reads.
//! - `cut`: cutting a partition back, archiving what is cut; emptying it
//!   to continue at another offset.
//! - `epochs`: the partition's epoch history, kept beyond retention.
//! - `mark`: how far the active segment is known to be synced.
//! - `retention`: deleting old segments.

mod cut;
mod epochs;
mod mark;
mod read;
mod recovery;
mod retention;
mod segment;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fleet_api::storage::Storage;
use fleet_api::{Epoch, Offset, PartitionId};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::{EventLog, LogError, LogResult, NewRecord, ReadLimits, Record};
use segment::Segment;
use writer::Cmd;

/// Settings of the file log.
#[derive(Clone, Debug)]
pub struct FileLogConfig {
    pub dir: PathBuf,
    pub partitions: u32,
    /// A segment is sealed and a new one started beyond this size.
    pub segment_bytes: u64,
    /// At most this much is written per fsync.
    pub max_batch_bytes: usize,
    /// Delete the oldest sealed segments while a partition is larger.
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments last written longer ago.
    pub retention_age: Option<Duration>,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// The disk: the real one, or a simulated one in power-cut tests.
    pub storage: Arc<dyn Storage>,
}

impl FileLogConfig {
    pub fn new(dir: impl Into<PathBuf>, partitions: u32) -> Self {
        Self {
            dir: dir.into(),
            partitions,
            segment_bytes: 64 << 20,
            max_batch_bytes: 1 << 20,
            retention_bytes: None,
            retention_age: None,
            retention_interval: Duration::from_secs(30),
            storage: fleet_api::storage::real(),
        }
    }
}

/// The on-disk format: 2 added the write flag to frames and the durable
/// mark (format 1 logs are read, and upgraded).
const FORMAT: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    partitions: u32,
}

/// One partition of the file log: its segments, its high watermark, the
/// queue to its writer thread, and whether it refuses writes.
struct PartitionLog {
    id: PartitionId,
    dir: PathBuf,
    fs: Arc<dyn Storage>,
    segments: RwLock<Vec<Arc<Segment>>>,
    hw: watch::Sender<Offset>,
    tx: mpsc::UnboundedSender<Cmd>,
    failed: RwLock<Option<String>>,
    /// Records below this offset may be deleted by retention (set by the
    /// owner: everything durable, or everything replicated). 0 until then.
    retention_floor: AtomicU64,
    /// The start offset of every epoch, also of deleted records.
    epochs: epochs::EpochCache,
    /// How far the active segment is known to be synced (writer and cuts).
    mark: Mutex<mark::DurableMark>,
}

impl PartitionLog {
    fn fail(&self, reason: String) {
        tracing::error!(partition = %self.id, %reason, "partition refuses writes");
        let mut f = self.failed.write().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(reason);
    }

    fn failure(&self) -> Option<String> {
        self.failed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// While alive, a partition's writer waits ([`FileLog::hold`]).
#[derive(Debug)]
pub struct Hold {
    _release: std::sync::mpsc::Sender<()>,
}

/// The embedded event log.
pub struct FileLog {
    parts: Vec<Arc<PartitionLog>>,
    retention: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLog")
            .field("partitions", &self.parts.len())
            .finish()
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        self.retention.abort();
    }
}

fn io(what: impl std::fmt::Display, e: std::io::Error) -> LogError {
    LogError::Io(format!("{what}: {e}"))
}

/// Creates `dir` and any missing parents on the real disk so that they
/// survive a power cut: each new directory's entry is fsynced into its parent.
///
/// # Errors
/// When a directory cannot be created or synced.
pub fn create_dir_durable(dir: &Path) -> LogResult<()> {
    create_dir_durable_on(&*fleet_api::storage::real(), dir)
}

fn create_dir_durable_on(fs: &dyn Storage, dir: &Path) -> LogResult<()> {
    fleet_api::storage::create_dir_durable(fs, dir).map_err(|e| LogError::Io(e.to_string()))
}

fn sync_dir(fs: &dyn Storage, dir: &Path) -> LogResult<()> {
    fs.sync_dir(dir)
        .map_err(|e| io(format_args!("sync directory {}", dir.display()), e))
}

/// Errors of the storage helpers, which name their path already.
fn helper(e: std::io::Error) -> LogError {
    LogError::Io(e.to_string())
}

impl FileLog {
    /// Opens (recovering) or creates the log in `config.dir`. Must run inside
    /// a tokio runtime (retention runs as a task).
    ///
    /// # Errors
    /// When the directory cannot be used, or the partition count differs from
    /// the one the log was created with.
    pub fn open(config: FileLogConfig) -> LogResult<Arc<FileLog>> {
        if config.partitions == 0 || config.partitions > 1024 {
            return Err(LogError::Io(format!(
                "partitions must be 1..=1024, not {}",
                config.partitions
            )));
        }
        let fs = &*config.storage;
        create_dir_durable_on(fs, &config.dir)?;
        // It may have been made by a process that died before syncing it.
        sync_dir(fs, &config.dir)?;
        let meta_path = config.dir.join("meta.json");
        match fs.read(&meta_path) {
            Ok(bytes) => {
                let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| {
                    LogError::Io(format!(
                        "{} is not a log meta file: {e}",
                        meta_path.display()
                    ))
                })?;
                if meta.partitions != config.partitions {
                    return Err(LogError::Io(format!(
                        "the log in {} was created with {} partitions, not {}; the count is fixed",
                        config.dir.display(),
                        meta.partitions,
                        config.partitions
                    )));
                }
                if meta.format > FORMAT {
                    return Err(LogError::Io(format!(
                        "the log in {} has format {}, newer than this hub's {FORMAT}: run the newer hub (downgrades are not supported)",
                        config.dir.display(),
                        meta.format
                    )));
                }
                if meta.format < FORMAT {
                    // Older frames stay readable; new ones carry write flags
                    // (see `frame`), which an older hub cannot read.
                    let body = serde_json::to_vec(&Meta {
                        format: FORMAT,
                        partitions: meta.partitions,
                    })
                    .unwrap_or_default();
                    fleet_api::storage::replace_durable(fs, &meta_path, &body).map_err(helper)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let meta = Meta {
                    format: FORMAT,
                    partitions: config.partitions,
                };
                let body = serde_json::to_vec(&meta).unwrap_or_default();
                fleet_api::storage::replace_durable(fs, &meta_path, &body).map_err(helper)?;
            }
            Err(e) => return Err(io(meta_path.display(), e)),
        }
        let mut parts = Vec::new();
        for p in 0..config.partitions {
            parts.push(recovery::open_partition(&config, PartitionId(p))?);
        }
        let retention = tokio::spawn(retention::retention_loop(
            parts.iter().map(Arc::downgrade).collect(),
            config.clone(),
        ));
        Ok(Arc::new(FileLog { parts, retention }))
    }

    fn part(&self, p: PartitionId) -> LogResult<&Arc<PartitionLog>> {
        self.parts
            .get(p.0 as usize)
            .ok_or(LogError::NoSuchPartition(p))
    }

    /// Holds partition `p`'s writer until the returned guard is dropped:
    /// appends queued meanwhile go into one write (as far as the batch size
    /// allows). For deterministic tests of group commit.
    ///
    /// # Errors
    /// When there is no such partition or the log is closed.
    pub fn hold(&self, p: PartitionId) -> LogResult<Hold> {
        let (release, held) = std::sync::mpsc::channel();
        self.part(p)?
            .tx
            .send(Cmd::Hold(held))
            .map_err(|_| LogError::Closed)?;
        Ok(Hold { _release: release })
    }

    /// Runs one retention pass now (normally it runs on a timer).
    pub fn enforce_retention(&self, config: &FileLogConfig) {
        for part in &self.parts {
            retention::retain(part, config);
        }
    }
}

impl EventLog for FileLog {
    fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }

    fn append(&self, p: PartitionId, rec: NewRecord) -> BoxFuture<'static, LogResult<Offset>> {
        let part = match self.part(p) {
            Ok(part) => part,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        if let Some(reason) = part.failure() {
            return futures::future::ready(Err(LogError::Failed {
                partition: p,
                reason,
            }))
            .boxed();
        }
        let (done, wait) = oneshot::channel();
        if part.tx.send(Cmd::Append(rec, done)).is_err() {
            return futures::future::ready(Err(LogError::Closed)).boxed();
        }
        async move { wait.await.unwrap_or(Err(LogError::Closed)) }.boxed()
    }

    fn flush(&self, p: PartitionId) -> BoxFuture<'static, LogResult<()>> {
        let part = match self.part(p) {
            Ok(part) => part,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let (done, wait) = oneshot::channel();
        if part.tx.send(Cmd::Flush(done)).is_err() {
            return futures::future::ready(Err(LogError::Closed)).boxed();
        }
        async move { wait.await.unwrap_or(Err(LogError::Closed)) }.boxed()
    }

    fn read(
        &self,
        p: PartitionId,
        from: Offset,
        limits: ReadLimits,
    ) -> BoxFuture<'_, LogResult<Vec<Record>>> {
        let part = match self.part(p) {
            Ok(part) => part.clone(),
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        async move {
            tokio::task::spawn_blocking(move || read::read_blocking(&part, from, limits))
                .await
                .unwrap_or(Err(LogError::Closed))
        }
        .boxed()
    }

    fn high_watermark(&self, p: PartitionId) -> Offset {
        self.part(p).map_or(Offset(0), |part| *part.hw.borrow())
    }

    fn log_start(&self, p: PartitionId) -> Offset {
        self.part(p).map_or(Offset(0), |part| {
            let segs = part.segments.read().unwrap_or_else(|e| e.into_inner());
            segs.first().map_or(*part.hw.borrow(), |s| s.base)
        })
    }

    fn watch(&self, p: PartitionId) -> watch::Receiver<Offset> {
        match self.part(p) {
            Ok(part) => part.hw.subscribe(),
            Err(_) => watch::Sender::new(Offset(0)).subscribe(),
        }
    }

    fn cut_and_archive(
        &self,
        p: PartitionId,
        from: Offset,
        archive: PathBuf,
    ) -> BoxFuture<'static, LogResult<u64>> {
        let part = match self.part(p) {
            Ok(part) => part,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let (done, wait) = oneshot::channel();
        if part
            .tx
            .send(Cmd::CutAndArchive(from, archive, done))
            .is_err()
        {
            return futures::future::ready(Err(LogError::Closed)).boxed();
        }
        async move { wait.await.unwrap_or(Err(LogError::Closed)) }.boxed()
    }

    fn skip_to(
        &self,
        p: PartitionId,
        base: Offset,
        history: Vec<(Epoch, Offset)>,
    ) -> BoxFuture<'static, LogResult<u64>> {
        let part = match self.part(p) {
            Ok(part) => part,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let (done, wait) = oneshot::channel();
        if part.tx.send(Cmd::SkipTo(base, history, done)).is_err() {
            return futures::future::ready(Err(LogError::Closed)).boxed();
        }
        async move { wait.await.unwrap_or(Err(LogError::Closed)) }.boxed()
    }

    fn epoch_history(&self, p: PartitionId) -> Vec<(Epoch, Offset)> {
        self.part(p)
            .map(|part| part.epochs.get())
            .unwrap_or_default()
    }

    fn set_retention_floor(&self, p: PartitionId, offset: Offset) {
        if let Ok(part) = self.part(p) {
            part.retention_floor.store(offset.0, Ordering::Release);
        }
    }

    fn partition_failure(&self, p: PartitionId) -> Option<String> {
        self.part(p).ok().and_then(|part| part.failure())
    }

    fn health(&self) -> Result<(), Vec<String>> {
        let problems: Vec<String> = self
            .parts
            .iter()
            .filter_map(|p| p.failure().map(|r| format!("partition {}: {r}", p.id)))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
