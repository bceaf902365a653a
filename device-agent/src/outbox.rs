//! The device's outbox: every message stays here, on disk, until the hub
//! confirms it is stored in both regions (`replicated >= mid`).
//!
//! Append-only segment files of CRC-framed records survive kill -9 and power
//! loss: a torn tail is detected and cut, never replayed as garbage. Mids
//! come from here and never repeat, even after a reboot with an empty outbox
//! (`state.json` keeps the highest mid ever used, written durably before any
//! segment holding it is deleted). Only records that are durable here are
//! handed to the sender, so a mid the hub has seen can never be reused for
//! another message after a crash. The outbox is bounded by bytes: when full
//! it drops its oldest segment and counts every record dropped.
//!
//! Frame: `magic u8 | len u32 | crc32 u32 | mid u64 | enqueued_ms u64 | payload`.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use fleet_api::Mid;
use fleet_api::storage::{self, Open, Storage, StorageFile};
use serde::{Deserialize, Serialize};

const MAGIC: u8 = 0xA7;
/// The highest numbering base accepted from a hub (half of u64).
pub const MAX_BASE: u64 = u64::MAX / 2;
const HEADER: usize = 9;
const FIXED: usize = 16;

/// When appended records are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Every append waits for its fsync: survives power loss.
    Always,
    /// The owner calls [`Outbox::sync`] on a timer; up to that long of
    /// accepted messages can be lost to a power cut (not to a crash).
    Periodic,
    /// Never fsync: survives a crash of this process, not a power cut.
    Never,
}

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("payload of {0} bytes is larger than the outbox can hold")]
    TooLarge(usize),
    #[error(
        "the hub says this device's messages stand at mid {0}, which leaves no room to number new ones; refusing to publish under it"
    )]
    ImplausibleBase(u64),
    #[error(
        "{path} is unreadable ({reason}): refusing to guess where this device's message numbers stand; repair it, or start over with --reset-state (the agent then learns its numbering from the hub)"
    )]
    BadState { path: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, OutboxError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Everything up to here is confirmed replicated.
    acked: Mid,
    /// The highest mid ever handed out that is not in a segment any more.
    floor: Mid,
    /// What the hub's mids are above the outbox's own: a message with
    /// outbox mid `m` goes out as `base + m`. Unknown (`None`) for an outbox
    /// that starts without state (new volume, reflashed, `--reset-state`):
    /// the agent learns the hub's `committed` for the device before it
    /// publishes anything, so its mids never go backwards. A state file
    /// written before this field existed means 0.
    #[serde(default = "legacy_base")]
    base: Option<u64>,
}

fn legacy_base() -> Option<u64> {
    Some(0)
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Mid of the first record (valid once the segment has one).
    first: Mid,
    /// Mid of the last record; `first - 1` while empty.
    last: Mid,
    bytes: u64,
    records: u64,
}

/// A record ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub mid: Mid,
    pub payload: Bytes,
}

/// Counters of one outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutboxStats {
    /// Records waiting for `replicated`.
    pub in_outbox: u64,
    pub bytes: u64,
    /// Records dropped because the outbox was full, or lost to corruption.
    pub dropped: u64,
    /// The highest mid confirmed replicated.
    pub acked: Mid,
    /// The highest mid appended.
    pub last_mid: Mid,
    /// Added to every mid on the wire (0 until learned for a fresh outbox).
    pub base: u64,
}

/// A durable outbox in one directory.
#[derive(Debug)]
pub struct Outbox {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    fsync: Fsync,
    segments: VecDeque<Segment>,
    /// The last segment, written at its length.
    active: Option<Arc<dyn StorageFile>>,
    state: State,
    next_mid: Mid,
    /// The highest mid fsynced (or written, without fsync).
    durable: Mid,
    dirty: bool,
    dropped: u64,
    /// Read position: (segment first mid, byte offset, next mid there).
    cursor: Option<(Mid, u64, Mid)>,
    acks_since_save: u32,
}

/// Sets the outbox's state file aside (as `state.json.bad-<ms>`, kept for
/// inspection): the outbox then opens as one without state, whose agent
/// learns its numbering from the hub.
///
/// # Errors
/// When the file cannot be moved.
pub fn reset_state(dir: &Path) -> Result<()> {
    let path = dir.join("state.json");
    if !path.exists() {
        return Ok(());
    }
    let aside = dir.join(format!("state.json.bad-{}", now_ms()));
    fs::rename(&path, &aside).map_err(io(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    tracing::warn!(state = %aside.display(), "outbox state set aside: numbering starts over above the hub's committed mid");
    Ok(())
}

fn segment_path(dir: &Path, first: Mid) -> PathBuf {
    dir.join(format!("seg-{:020}.log", first.0))
}

fn encode(out: &mut Vec<u8>, mid: Mid, enqueued_ms: u64, payload: &[u8]) {
    let start = out.len();
    out.push(MAGIC);
    out.extend_from_slice(&((FIXED + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&mid.0.to_le_bytes());
    out.extend_from_slice(&enqueued_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 5..start + 9].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the frame at the start of `buf`: `Some((mid, payload, len))`, or
/// `None` when the bytes are not a whole valid frame.
fn decode(buf: &[u8]) -> Option<(Mid, &[u8], usize)> {
    if buf.len() < HEADER || buf[0] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(buf[1..5].try_into().ok()?) as usize;
    if len < FIXED || buf.len() < HEADER + len {
        return None;
    }
    let body = &buf[HEADER..HEADER + len];
    if crc32fast::hash(body).to_le_bytes() != buf[5..9] {
        return None;
    }
    let mid = Mid(u64::from_le_bytes(body[..8].try_into().ok()?));
    Some((mid, &body[FIXED..], HEADER + len))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Outbox {
    /// Opens (recovering) or creates the outbox in `dir`, holding at most
    /// `max_bytes` of records.
    ///
    /// # Errors
    /// When the directory cannot be used.
    pub fn open(dir: &Path, max_bytes: u64, fsync: Fsync) -> Result<Outbox> {
        Self::open_on(storage::real(), dir, max_bytes, fsync)
    }

    /// [`Outbox::open`] on the given disk (a simulated one in tests).
    ///
    /// # Errors
    /// When the directory cannot be used.
    pub fn open_on(
        fs: Arc<dyn Storage>,
        dir: &Path,
        max_bytes: u64,
        fsync: Fsync,
    ) -> Result<Outbox> {
        storage::create_dir_durable(&*fs, dir).map_err(io(dir))?;
        // It may have been made by a process that died before syncing it.
        fs.sync_dir(dir).map_err(io(dir))?;
        let state_path = dir.join("state.json");
        // A missing state file is a fresh start; an unreadable one is never
        // taken for one (that would restart the numbering at 1).
        let state: State = match fs.read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| OutboxError::BadState {
                path: state_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(OutboxError::BadState {
                    path: state_path.clone(),
                    reason: e.to_string(),
                });
            }
        };
        let mut firsts: Vec<Mid> = fs
            .list(dir)
            .map_err(io(dir))?
            .iter()
            .filter_map(|name| {
                name.strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
                    .map(Mid)
            })
            .collect();
        firsts.sort();
        let mut segments = VecDeque::new();
        let mut dropped = 0;
        for first in firsts {
            let path = segment_path(dir, first);
            let bytes = fs.read(&path).map_err(io(&path))?;
            let (mut pos, mut last, mut records) = (0usize, Mid(first.0.saturating_sub(1)), 0u64);
            while let Some((mid, _, len)) = decode(&bytes[pos..]) {
                if last.0.checked_add(1) != Some(mid.0) {
                    break;
                }
                pos += len;
                last = mid;
                records += 1;
            }
            if pos < bytes.len() {
                // A torn tail (or corruption): cut it. Whatever it held was
                // never durable, or is lost; count what is lost for sure.
                tracing::warn!(segment = %path.display(), cut = bytes.len() - pos, "outbox: cutting an invalid tail");
                if decode(&bytes[pos..]).is_some() || pos + HEADER < bytes.len() {
                    dropped += 1;
                }
                let f = fs.open(&path, Open::ReadWrite).map_err(io(&path))?;
                f.set_len(pos as u64)
                    .and_then(|()| f.sync_data())
                    .map_err(io(&path))?;
            }
            segments.push_back(Segment {
                path,
                first,
                last,
                bytes: pos as u64,
                records,
            });
        }
        let last_used = segments
            .iter()
            .map(|s| s.last)
            .max()
            .unwrap_or(Mid(0))
            .max(state.floor)
            .max(state.acked);
        let next_mid = last_used.next();
        // Drop segments that are entirely acknowledged or empty-and-old.
        let segment_bytes = (max_bytes / 8).clamp(4096, 1 << 20);
        let mut outbox = Outbox {
            fs,
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            fsync,
            active: None, // opened below
            segments,
            state,
            next_mid,
            durable: last_used,
            dirty: false,
            dropped,
            cursor: None,
            acks_since_save: 0,
        };
        outbox.collect_acked()?;
        outbox.start_segment_if_needed(true)?;
        // Opened again at the first append: idle outboxes hold no file.
        outbox.active = None;
        Ok(outbox)
    }

    fn start_segment_if_needed(&mut self, reopen: bool) -> Result<()> {
        let need_new = self
            .segments
            .back()
            .is_none_or(|s| s.bytes >= self.segment_bytes);
        if need_new {
            // Periodic fsync: what the segment being sealed holds unsynced
            // is synced now, while its handle is here (the next `sync`
            // covers only the new segment).
            if self.dirty
                && let (Some(old), Some(seg)) = (&self.active, self.segments.back())
            {
                old.sync_data().map_err(io(&seg.path))?;
            }
            let path = segment_path(&self.dir, self.next_mid);
            let f = match self.fs.open(&path, Open::CreateNew) {
                Ok(f) => f,
                // Made by an earlier attempt whose directory sync failed:
                // it is empty (no record was written to it).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    self.fs.open(&path, Open::ReadWrite).map_err(io(&path))?
                }
                Err(e) => return Err(io(&path)(e)),
            };
            self.fs.sync_dir(&self.dir).map_err(io(&self.dir))?;
            self.segments.push_back(Segment {
                path,
                first: self.next_mid,
                last: Mid(self.next_mid.0 - 1),
                bytes: 0,
                records: 0,
            });
            self.active = Some(f);
        } else if reopen || self.active.is_none() {
            let path = &self
                .segments
                .back()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            self.active = Some(self.fs.open(path, Open::ReadWrite).map_err(io(path))?);
        }
        Ok(())
    }

    fn save_state(&mut self, durable: bool) -> Result<()> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let body = serde_json::to_vec(&self.state).unwrap_or_default();
        let f = self.fs.open(&tmp, Open::Truncate).map_err(io(&tmp))?;
        // Always synced: a rename of unsynced data can leave an empty state
        // file after a power cut, which the next start refuses. Only the
        // directory entry may lag when `durable` is false.
        f.write_all_at(&body, 0)
            .and_then(|()| f.sync_data())
            .map_err(io(&tmp))?;
        self.fs.rename(&tmp, &path).map_err(io(&path))?;
        if durable {
            self.fs.sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        self.acks_since_save = 0;
        Ok(())
    }

    /// Removes the oldest segment, remembering its mids in the state first.
    fn remove_front(&mut self) -> Result<()> {
        let Some(front) = self.segments.front() else {
            return Ok(());
        };
        if front.last > self.state.floor {
            self.state.floor = front.last;
            self.save_state(true)?;
        }
        let front = self.segments.pop_front().expect("front exists");
        self.fs.remove_file(&front.path).map_err(io(&front.path))?;
        if self.cursor.is_some_and(|(seg, _, _)| seg == front.first) {
            self.cursor = None;
        }
        Ok(())
    }

    /// Deletes sealed segments whose records are all acknowledged.
    fn collect_acked(&mut self) -> Result<()> {
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.last <= self.state.acked)
        {
            self.remove_front()?;
        }
        Ok(())
    }

    /// Appends a message and returns its mid (durable when [`Fsync::Always`]).
    ///
    /// # Errors
    /// When the payload cannot fit, or writing fails.
    pub fn append(&mut self, payload: &[u8]) -> Result<Mid> {
        let size = (HEADER + FIXED + payload.len()) as u64;
        if size > self.max_bytes / 2 {
            return Err(OutboxError::TooLarge(payload.len()));
        }
        // Full: drop the oldest records (whole segments), counting them.
        while self.bytes() + size > self.max_bytes && self.segments.len() > 1 {
            let front = self.segments.front().expect("two segments");
            let unacked = front
                .last
                .0
                .saturating_sub(self.state.acked.0.max(front.first.0 - 1));
            let lost = unacked.min(front.records);
            if lost > 0 {
                tracing::warn!(dropped = lost, "outbox full: dropping the oldest messages");
            }
            self.dropped += lost;
            let last = front.last;
            self.remove_front()?;
            // What was dropped counts as settled for the sender.
            self.state.acked = self.state.acked.max(last);
        }
        self.start_segment_if_needed(false)?;
        let mid = self.next_mid;
        let mut frame = Vec::with_capacity(size as usize);
        encode(&mut frame, mid, now_ms(), payload);
        let seg = self.segments.back_mut().expect("active segment");
        let active = self.active.as_ref().expect("active segment open");
        active
            .write_all_at(&frame, seg.bytes)
            .map_err(io(&seg.path))?;
        seg.last = mid;
        seg.bytes += size;
        seg.records += 1;
        self.next_mid = mid.next();
        match self.fsync {
            Fsync::Always => {
                active.sync_data().map_err(io(&seg.path))?;
                self.durable = mid;
            }
            Fsync::Never => self.durable = mid,
            Fsync::Periodic => self.dirty = true,
        }
        if !self.dirty {
            // Nothing left to sync: close the segment until the next
            // append, so an idle outbox holds no file open (10,000
            // simulated devices in one process would otherwise spend half
            // the open-files limit on outboxes).
            self.active = None;
        }
        Ok(mid)
    }

    /// Fsyncs what was appended since the last sync (the periodic policy).
    ///
    /// # Errors
    /// When the fsync fails.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            let path = self
                .segments
                .back()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            if let Some(active) = &self.active {
                active.sync_data().map_err(io(&path))?;
            }
            self.durable = Mid(self.next_mid.0 - 1);
            self.dirty = false;
            self.active = None;
        }
        Ok(())
    }

    /// The highest mid that is durable here (and may be sent).
    pub fn durable(&self) -> Mid {
        self.durable
    }

    /// The highest mid confirmed replicated.
    pub fn acked(&self) -> Mid {
        self.state.acked
    }

    fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Records `replicated >= mid`: they may be forgotten.
    ///
    /// # Errors
    /// When deleting a segment or writing the state fails.
    pub fn ack(&mut self, replicated: Mid) -> Result<()> {
        let replicated = replicated.min(Mid(self.next_mid.0 - 1));
        if replicated <= self.state.acked {
            return Ok(());
        }
        self.state.acked = replicated;
        self.collect_acked()?;
        self.acks_since_save += 1;
        // Losing ack progress only causes resends (which the hub
        // de-duplicates), so it is saved lazily and without fsync.
        if self.acks_since_save >= 64 {
            self.save_state(false)?;
        }
        Ok(())
    }

    /// Up to `max` durable records with mid >= `from`, in mid order.
    ///
    /// # Errors
    /// When a segment cannot be read.
    pub fn read_from(&mut self, from: Mid, max: usize) -> Result<Vec<Pending>> {
        let from = from.max(self.state.acked.next());
        let mut out = Vec::new();
        let Some(idx) = self.segments.iter().position(|s| s.last >= from) else {
            return Ok(out);
        };
        for seg in self.segments.iter().skip(idx) {
            if out.len() >= max || seg.first > self.durable {
                break;
            }
            let (mut pos, mut next) = match self.cursor {
                Some((first, pos, next)) if first == seg.first && next <= from.max(seg.first) => {
                    (pos, next)
                }
                _ => (0, seg.first),
            };
            let f = self.fs.open(&seg.path, Open::Read).map_err(io(&seg.path))?;
            let mut buf = vec![0u8; (seg.bytes - pos) as usize];
            let n = f.read_at(&mut buf, pos).map_err(io(&seg.path))?;
            buf.truncate(n);
            let mut at = 0;
            while out.len() < max {
                let Some((mid, payload, len)) = decode(&buf[at..]) else {
                    break;
                };
                if mid > self.durable {
                    break;
                }
                if mid >= from {
                    out.push(Pending {
                        mid,
                        payload: Bytes::copy_from_slice(payload),
                    });
                } else {
                    pos += len as u64;
                    next = mid.next();
                }
                at += len;
            }
            self.cursor = Some((seg.first, pos, next));
        }
        Ok(out)
    }

    pub fn stats(&self) -> OutboxStats {
        let last = Mid(self.next_mid.0 - 1);
        OutboxStats {
            in_outbox: last.0.saturating_sub(self.state.acked.0),
            bytes: self.bytes(),
            dropped: self.dropped,
            acked: self.state.acked,
            last_mid: last,
            base: self.state.base.unwrap_or(0),
        }
    }

    /// The offset of the hub's mids over this outbox's, once known.
    pub fn base(&self) -> Option<u64> {
        self.state.base
    }

    /// Sets the offset once, from the hub's `committed` for this device,
    /// durably, before anything is published.
    ///
    /// # Errors
    /// When the state cannot be written.
    pub fn set_base(&mut self, committed: Mid) -> Result<()> {
        if self.state.base.is_some() {
            return Ok(());
        }
        // Numbers above it must last: a base near the top of u64 would make
        // every new mid saturate into a "duplicate" the hub acknowledges
        // and drops.
        if committed.0 > MAX_BASE {
            return Err(OutboxError::ImplausibleBase(committed.0));
        }
        // In memory only once it is on disk: nothing may be published under
        // a base a restart would not know.
        self.state.base = Some(committed.0);
        if let Err(e) = self.save_state(true) {
            self.state.base = None;
            return Err(e);
        }
        Ok(())
    }

    /// Saves the acknowledgement state (at shutdown).
    ///
    /// # Errors
    /// When writing fails.
    pub fn close(mut self) -> Result<()> {
        self.sync()?;
        self.save_state(true)
    }
}

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
