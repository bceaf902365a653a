//! Embedded log backend: per-partition segment files.
//!
//! Layout: `DIR/meta.json` (partition count, fixed at creation) and
//! `DIR/p{N}/{base_offset:020}.log` segments with `.idx` sparse indexes for
//! sealed segments. One writer thread per partition group-commits: it takes
//! every append that queued while the previous fsync ran, writes them with
//! one `write` and one `fdatasync`, and only then resolves their futures and
//! advances the high watermark that readers see.
//!
//! Recovery scans the active (last) segment. An invalid frame with nothing
//! valid after it is a torn tail (an unsynced write cut short): it is
//! truncated. An invalid frame followed by valid ones is corruption of data
//! that was acknowledged: the partition stops there, refuses writes and says
//! so, and readers get an error at that offset. Sealed segments are checked
//! by CRC on every read.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use fleet_api::{Offset, PartitionId};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::frame::{self, Decoded};
use super::{EventLog, LogError, LogResult, NewRecord, ReadLimits, Record};

/// Index every this many bytes of segment.
const INDEX_EVERY: u64 = 4096;

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
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    partitions: u32,
}

struct Segment {
    base: Offset,
    path: PathBuf,
    /// Read handle (`read_at` needs only `&self`).
    file: File,
    /// Sparse `(offset, position)` pairs, first entry `(base, 0)`.
    index: RwLock<Vec<(u64, u64)>>,
    /// Bytes that are durable and valid.
    durable_len: AtomicU64,
    /// One past the last durable offset in this segment.
    next: AtomicU64,
}

enum Cmd {
    Append(NewRecord, oneshot::Sender<LogResult<Offset>>),
    Flush(oneshot::Sender<LogResult<()>>),
    Truncate(Offset, PathBuf, oneshot::Sender<LogResult<u64>>),
}

struct Part {
    id: PartitionId,
    dir: PathBuf,
    segments: RwLock<Vec<Arc<Segment>>>,
    hw: watch::Sender<Offset>,
    tx: mpsc::UnboundedSender<Cmd>,
    failed: RwLock<Option<String>>,
    /// Records below this offset may be deleted by retention (set by the
    /// owner: everything durable, or everything replicated).
    retention_floor: AtomicU64,
}

impl Part {
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

/// The embedded event log.
pub struct FileLog {
    parts: Vec<Arc<Part>>,
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

fn sync_dir(dir: &Path) -> LogResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(format_args!("sync directory {}", dir.display()), e))
}

fn segment_path(dir: &Path, base: Offset, ext: &str) -> PathBuf {
    dir.join(format!("{:020}.{ext}", base.0))
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
        fs::create_dir_all(&config.dir).map_err(|e| io(config.dir.display(), e))?;
        let meta_path = config.dir.join("meta.json");
        match fs::read(&meta_path) {
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
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let meta = Meta {
                    format: 1,
                    partitions: config.partitions,
                };
                let tmp = config.dir.join("meta.json.tmp");
                let mut f = File::create(&tmp).map_err(|e| io(tmp.display(), e))?;
                f.write_all(&serde_json::to_vec(&meta).unwrap_or_default())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io(tmp.display(), e))?;
                fs::rename(&tmp, &meta_path).map_err(|e| io(meta_path.display(), e))?;
                sync_dir(&config.dir)?;
            }
            Err(e) => return Err(io(meta_path.display(), e)),
        }
        let mut parts = Vec::new();
        for p in 0..config.partitions {
            parts.push(open_partition(&config, PartitionId(p))?);
        }
        let retention = tokio::spawn(retention_loop(
            parts.iter().map(Arc::downgrade).collect(),
            config.clone(),
        ));
        Ok(Arc::new(FileLog { parts, retention }))
    }

    fn part(&self, p: PartitionId) -> LogResult<&Arc<Part>> {
        self.parts
            .get(p.0 as usize)
            .ok_or(LogError::NoSuchPartition(p))
    }

    /// Runs one retention pass now (normally it runs on a timer).
    pub fn enforce_retention(&self, config: &FileLogConfig) {
        for part in &self.parts {
            retain(part, config);
        }
    }
}

/// Result of scanning a segment's bytes.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// Every byte is valid frames.
    Clean,
    /// Invalid from `pos` on, with nothing valid after: an unsynced tail.
    TornTail { pos: u64 },
    /// Invalid at `pos` (offset `offset`), but valid frames follow.
    Corrupt {
        pos: u64,
        offset: Offset,
        detail: String,
    },
}

struct Scanned {
    index: Vec<(u64, u64)>,
    len: u64,
    next: Offset,
    outcome: Scan,
}

fn scan(buf: &[u8], base: Offset) -> Scanned {
    let mut index = vec![(base.0, 0)];
    let mut pos = 0usize;
    let mut expected = base;
    let mut last_indexed = 0u64;
    while pos < buf.len() {
        let bad = match frame::decode(&buf[pos..]) {
            Decoded::Frame { offset, len, .. } if offset == expected => {
                if pos as u64 - last_indexed >= INDEX_EVERY {
                    index.push((offset.0, pos as u64));
                    last_indexed = pos as u64;
                }
                pos += len;
                expected = expected.next();
                continue;
            }
            Decoded::Frame { offset, .. } => format!("offset {offset} where {expected} was due"),
            Decoded::Short { .. } => "record cut short".to_string(),
            Decoded::Bad(why) => why.to_string(),
        };
        let valid_after = (pos + 1..buf.len()).any(|q| {
            buf[q] == frame::MAGIC
                && matches!(frame::decode(&buf[q..]), Decoded::Frame { offset, .. } if offset > expected)
        });
        let outcome = if valid_after {
            Scan::Corrupt {
                pos: pos as u64,
                offset: expected,
                detail: bad,
            }
        } else {
            Scan::TornTail { pos: pos as u64 }
        };
        return Scanned {
            index,
            len: pos as u64,
            next: expected,
            outcome,
        };
    }
    Scanned {
        index,
        len: pos as u64,
        next: expected,
        outcome: Scan::Clean,
    }
}

fn read_index(path: &Path, base: Offset) -> Option<Vec<(u64, u64)>> {
    let bytes = fs::read(path).ok()?;
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

fn write_index(path: &Path, entries: &[(u64, u64)]) -> LogResult<()> {
    let mut body = Vec::with_capacity(entries.len() * 16 + 4);
    for (o, p) in entries {
        body.extend_from_slice(&o.to_le_bytes());
        body.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    let mut f = File::create(path).map_err(|e| io(path.display(), e))?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(path.display(), e))
}

/// The writer's view of the active segment.
struct Active {
    seg: Arc<Segment>,
    file: File,
    len: u64,
    next: Offset,
    last_indexed: u64,
    index: Vec<(u64, u64)>,
}

fn create_segment(dir: &Path, base: Offset) -> LogResult<Active> {
    let path = segment_path(dir, base, "log");
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io(path.display(), e))?;
    sync_dir(dir)?;
    let read = File::open(&path).map_err(|e| io(path.display(), e))?;
    let seg = Arc::new(Segment {
        base,
        path,
        file: read,
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

fn open_partition(config: &FileLogConfig, id: PartitionId) -> LogResult<Arc<Part>> {
    let dir = config.dir.join(format!("p{}", id.0));
    fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
    let mut bases: Vec<Offset> = fs::read_dir(&dir)
        .map_err(|e| io(dir.display(), e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse::<u64>().ok().map(Offset)
        })
        .collect();
    bases.sort();
    let mut segments = Vec::new();
    let mut failed = None;
    let active = if let Some((&last, sealed)) = bases.split_last() {
        for (i, &base) in sealed.iter().enumerate() {
            let path = segment_path(&dir, base, "log");
            let file = File::open(&path).map_err(|e| io(path.display(), e))?;
            let len = file.metadata().map_err(|e| io(path.display(), e))?.len();
            let next = bases[i + 1];
            let index = match read_index(&segment_path(&dir, base, "idx"), base) {
                Some(ix) => ix,
                None => {
                    let bytes = fs::read(&path).map_err(|e| io(path.display(), e))?;
                    let s = scan(&bytes, base);
                    let _ = write_index(&segment_path(&dir, base, "idx"), &s.index);
                    s.index
                }
            };
            segments.push(Arc::new(Segment {
                base,
                path,
                file,
                index: RwLock::new(index),
                durable_len: AtomicU64::new(len),
                next: AtomicU64::new(next.0),
            }));
        }
        let path = segment_path(&dir, last, "log");
        let bytes = fs::read(&path).map_err(|e| io(path.display(), e))?;
        let scanned = scan(&bytes, last);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io(path.display(), e))?;
        match &scanned.outcome {
            Scan::Clean => {}
            Scan::TornTail { pos } => {
                tracing::warn!(
                    partition = %id,
                    segment = %path.display(),
                    bytes = bytes.len() as u64 - pos,
                    "truncating a torn tail (writes that were never acknowledged)"
                );
                file.set_len(*pos)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io(path.display(), e))?;
            }
            Scan::Corrupt {
                pos,
                offset,
                detail,
            } => {
                failed = Some(format!(
                    "corrupt record at offset {offset} ({detail}) in {} at byte {pos}; valid records follow it, so it is not a torn write: restore this partition (for example by replication) before writing again",
                    path.display()
                ));
            }
        }
        let read = File::open(&path).map_err(|e| io(path.display(), e))?;
        let seg = Arc::new(Segment {
            base: last,
            path,
            file: read,
            index: RwLock::new(scanned.index.clone()),
            durable_len: AtomicU64::new(scanned.len),
            next: AtomicU64::new(scanned.next.0),
        });
        let last_indexed = scanned.index.last().map_or(0, |(_, p)| *p);
        Active {
            seg,
            file,
            len: scanned.len,
            next: scanned.next,
            last_indexed,
            index: scanned.index,
        }
    } else {
        create_segment(&dir, Offset(0))?
    };
    segments.push(active.seg.clone());
    let hw = active.next;
    let (tx, rx) = mpsc::unbounded_channel();
    let part = Arc::new(Part {
        id,
        dir,
        segments: RwLock::new(segments),
        hw: watch::Sender::new(hw),
        tx,
        failed: RwLock::new(None),
        retention_floor: AtomicU64::new(u64::MAX),
    });
    if let Some(reason) = failed {
        part.fail(reason);
    }
    // The writer holds only a weak reference: when the log is dropped, the
    // sender inside `Part` goes with it and the thread ends.
    let writer_part = Arc::downgrade(&part);
    let settings = config.clone();
    std::thread::Builder::new()
        .name(format!("log-p{}", id.0))
        .spawn(move || writer(writer_part, active, rx, settings))
        .map_err(|e| io("spawn log writer", e))?;
    Ok(part)
}

fn writer(
    part: std::sync::Weak<Part>,
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
        let mut truncation = None;
        let mut next = active.next;
        let mut pos = active.len;
        let mut cmd = Some(first);
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
                        pos += frame::encode(&mut buf, next, &rec) as u64;
                        next = next.next();
                        appends.push(done);
                    }
                }
                Some(Cmd::Flush(done)) => flushes.push(done),
                Some(Cmd::Truncate(from, archive, done)) => {
                    // Finish what is queued before it first.
                    truncation = Some((from, archive, done));
                    break;
                }
                None => {}
            }
            if buf.len() >= config.max_batch_bytes {
                break;
            }
            match rx.try_recv() {
                Ok(c) => cmd = Some(c),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            let started = tokio::time::Instant::now();
            let written = active
                .file
                .write_all_at(&buf, active.len)
                .and_then(|()| active.file.sync_data());
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
        if let Some((from, archive, done)) = truncation {
            let _ = done.send(truncate(&part, &mut active, from, &archive));
        }
    }
}

/// Byte position of record `offset` in `seg` (which must hold it).
fn position_of(seg: &Segment, offset: Offset) -> LogResult<u64> {
    let bytes = fs::read(&seg.path).map_err(|e| io(seg.path.display(), e))?;
    let mut pos = {
        let index = seg.index.read().unwrap_or_else(|e| e.into_inner());
        let k = index
            .partition_point(|(o, _)| *o <= offset.0)
            .saturating_sub(1);
        index.get(k).map_or(0, |(_, p)| *p as usize)
    };
    while pos < bytes.len() {
        match frame::decode(&bytes[pos..]) {
            Decoded::Frame { offset: o, .. } if o == offset => return Ok(pos as u64),
            Decoded::Frame { len, .. } => pos += len,
            _ => break,
        }
    }
    Err(LogError::Io(format!(
        "offset {offset} not found in {}",
        seg.path.display()
    )))
}

/// Archives records `from..` and cuts the log back to `from`.
fn truncate(part: &Part, active: &mut Active, from: Offset, archive: &Path) -> LogResult<u64> {
    let hw = active.next;
    if from >= hw {
        return Ok(0);
    }
    // 1. Copy the tail out, durably, before anything is cut.
    let records = read_blocking(
        part,
        from,
        ReadLimits {
            max_records: usize::MAX,
            max_bytes: usize::MAX,
        },
    )?;
    let mut buf = Vec::new();
    for r in &records {
        frame::encode(&mut buf, r.offset, &r.record);
    }
    if let Some(dir) = archive.parent() {
        fs::create_dir_all(dir).map_err(|e| io(dir.display(), e))?;
    }
    let mut f = File::create(archive).map_err(|e| io(archive.display(), e))?;
    f.write_all(&buf)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(archive.display(), e))?;
    if let Some(dir) = archive.parent() {
        sync_dir(dir)?;
    }
    // 2. Cut: segments starting at or after `from` go, the one holding it shrinks.
    let mut segs = part.segments.write().unwrap_or_else(|e| e.into_inner());
    let keep = segs.iter().take_while(|s| s.base < from).count();
    if keep == 0 {
        return Err(LogError::Io(format!(
            "partition {}: offset {from} is below the retained log",
            part.id
        )));
    }
    for s in segs.drain(keep..) {
        let _ = fs::remove_file(&s.path);
        let _ = fs::remove_file(segment_path(&part.dir, s.base, "idx"));
    }
    let seg = segs[keep - 1].clone();
    let pos = position_of(&seg, from)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg.path)
        .map_err(|e| io(seg.path.display(), e))?;
    file.set_len(pos)
        .and_then(|()| file.sync_all())
        .map_err(|e| io(seg.path.display(), e))?;
    let _ = fs::remove_file(segment_path(&part.dir, seg.base, "idx"));
    sync_dir(&part.dir)?;
    let index: Vec<(u64, u64)> = {
        let mut ix = seg.index.write().unwrap_or_else(|e| e.into_inner());
        ix.retain(|(o, _)| *o < from.0);
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
    tracing::warn!(partition = %part.id, %from, moved = records.len(), archive = %archive.display(), "cut the log back; the tail is archived");
    Ok(records.len() as u64)
}

/// Seals the active segment (index file) and starts the next one.
fn roll(part: &Part, active: &mut Active) -> LogResult<()> {
    write_index(
        &segment_path(&part.dir, active.seg.base, "idx"),
        &active.index,
    )?;
    let fresh = create_segment(&part.dir, active.next)?;
    part.segments
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push(fresh.seg.clone());
    *active = fresh;
    Ok(())
}

async fn retention_loop(parts: Vec<std::sync::Weak<Part>>, config: FileLogConfig) {
    if config.retention_bytes.is_none() && config.retention_age.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(config.retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for part in &parts {
            let Some(part) = part.upgrade() else { return };
            let config = config.clone();
            let _ = tokio::task::spawn_blocking(move || retain(&part, &config)).await;
        }
    }
}

/// Deletes the oldest sealed segments beyond the size or age limit, never
/// past the retention floor and never the active segment.
fn retain(part: &Part, config: &FileLogConfig) {
    let floor = part.retention_floor.load(Ordering::Acquire);
    loop {
        let victim = {
            let segs = part.segments.read().unwrap_or_else(|e| e.into_inner());
            if segs.len() < 2 {
                return;
            }
            let total: u64 = segs
                .iter()
                .map(|s| s.durable_len.load(Ordering::Acquire))
                .sum();
            let oldest = &segs[0];
            let too_big = config.retention_bytes.is_some_and(|max| total > max);
            let too_old = config.retention_age.is_some_and(|age| {
                fs::metadata(&oldest.path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|a| a > age)
            });
            let below_floor = oldest.next.load(Ordering::Acquire) <= floor;
            if !(too_big || too_old) || !below_floor {
                return;
            }
            oldest.clone()
        };
        part.segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| !Arc::ptr_eq(s, &victim));
        let _ = fs::remove_file(&victim.path);
        let _ = fs::remove_file(segment_path(&part.dir, victim.base, "idx"));
        tracing::info!(partition = %part.id, base = %victim.base, "retention deleted a segment");
    }
}

fn read_blocking(part: &Part, from: Offset, limits: ReadLimits) -> LogResult<Vec<Record>> {
    let hw = *part.hw.borrow();
    let segs: Vec<Arc<Segment>> = part
        .segments
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let start = segs.first().map_or(hw, |s| s.base);
    if from < start {
        return Err(LogError::OffsetGone {
            partition: part.id,
            requested: from,
            start,
        });
    }
    let mut out = Vec::new();
    if from >= hw {
        return Ok(out);
    }
    let mut bytes = 0usize;
    let mut cur = from;
    let mut i = segs.partition_point(|s| s.base <= from).saturating_sub(1);
    let corrupt = |offset: Offset, detail: String| LogError::Corrupt {
        partition: part.id,
        offset,
        detail,
    };
    while i < segs.len() && out.len() < limits.max_records && bytes < limits.max_bytes && cur < hw {
        let seg = &segs[i];
        let seg_next = Offset(seg.next.load(Ordering::Acquire));
        let end = seg.durable_len.load(Ordering::Acquire);
        if cur >= seg_next {
            i += 1;
            continue;
        }
        let mut pos = {
            let index = seg.index.read().unwrap_or_else(|e| e.into_inner());
            let k = index
                .partition_point(|(o, _)| *o <= cur.0)
                .saturating_sub(1);
            index.get(k).map_or(0, |(_, p)| *p)
        };
        let mut chunk = Vec::new();
        'segment: while pos < end && cur < seg_next {
            let want = (end - pos).min(256 * 1024).max(frame::HEADER as u64) as usize;
            chunk.resize(want, 0);
            let n = seg
                .file
                .read_at(&mut chunk, pos)
                .map_err(|e| io(seg.path.display(), e))?;
            chunk.truncate(n);
            let mut at = 0usize;
            loop {
                match frame::decode(&chunk[at..]) {
                    Decoded::Frame {
                        offset,
                        record,
                        len,
                    } => {
                        if offset > cur {
                            let e =
                                corrupt(cur, format!("offset {offset} found where {cur} was due"));
                            return if out.is_empty() { Err(e) } else { Ok(out) };
                        }
                        at += len;
                        if offset == cur {
                            bytes += record.payload.len();
                            out.push(Record {
                                partition: part.id,
                                offset,
                                record,
                            });
                            cur = cur.next();
                            if out.len() >= limits.max_records
                                || bytes >= limits.max_bytes
                                || cur >= seg_next
                            {
                                break 'segment;
                            }
                        }
                    }
                    Decoded::Short { need } => {
                        if pos + (at + need) as u64 > end {
                            let e = corrupt(cur, "record extends past the durable end".into());
                            return if out.is_empty() { Err(e) } else { Ok(out) };
                        }
                        if at == 0 {
                            // A frame larger than the chunk: read it whole.
                            chunk.resize(need, 0);
                            let n = seg
                                .file
                                .read_at(&mut chunk, pos)
                                .map_err(|e| io(seg.path.display(), e))?;
                            chunk.truncate(n);
                            continue;
                        }
                        break;
                    }
                    Decoded::Bad(why) => {
                        let e = corrupt(cur, why.to_string());
                        return if out.is_empty() { Err(e) } else { Ok(out) };
                    }
                }
            }
            pos += at as u64;
        }
        i += 1;
    }
    Ok(out)
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
            tokio::task::spawn_blocking(move || read_blocking(&part, from, limits))
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

    fn truncate(
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
        if part.tx.send(Cmd::Truncate(from, archive, done)).is_err() {
            return futures::future::ready(Err(LogError::Closed)).boxed();
        }
        async move { wait.await.unwrap_or(Err(LogError::Closed)) }.boxed()
    }

    fn set_retention_floor(&self, p: PartitionId, offset: Offset) {
        if let Ok(part) = self.part(p) {
            part.retention_floor.store(offset.0, Ordering::Release);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_tells_torn_tails_from_corruption() {
        let rec = |n: u8| NewRecord {
            device_id: fleet_api::DeviceId::new("d").unwrap(),
            mid: Some(fleet_api::Mid(u64::from(n))),
            enqueued_at: fleet_api::UnixMillis(1),
            region: fleet_api::Region::new("r").unwrap(),
            epoch: fleet_api::Epoch(1),
            payload: bytes::Bytes::from(vec![n; 100]),
        };
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for i in 0..3u8 {
            frame::encode(&mut buf, Offset(u64::from(i)), &rec(i));
            ends.push(buf.len());
        }
        assert_eq!(scan(&buf, Offset(0)).outcome, Scan::Clean);
        assert_eq!(scan(&buf, Offset(0)).next, Offset(3));
        assert_eq!(scan(&buf[..ends[1]], Offset(0)).outcome, Scan::Clean);
        for cut in ends[1] + 1..buf.len() {
            let s = scan(&buf[..cut], Offset(0));
            assert_eq!(
                s.outcome,
                Scan::TornTail {
                    pos: ends[1] as u64
                },
                "cut {cut}"
            );
            assert_eq!(s.next, Offset(2));
        }
        let mut mid = buf.clone();
        mid[ends[0] + 20] ^= 1; // inside record 1, record 2 intact after it
        match scan(&mid, Offset(0)).outcome {
            Scan::Corrupt { offset, .. } => assert_eq!(offset, Offset(1)),
            other => panic!("{other:?}"),
        }
    }
}
