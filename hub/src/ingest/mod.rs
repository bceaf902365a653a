//! Between the device front and the event log: de-duplication by `mid`,
//! ordering, backpressure, what a device has durably stored here
//! (`committed`), and what the other region holds too (`replicated`).
//!
//! Per partition, one short critical section decides "duplicate or new" and
//! enqueues the append, so the log's offset order is exactly the order of
//! decisions and each record's offset is known when it is decided. A
//! duplicate is acknowledged only after a `flush` barrier proves that the
//! original (enqueued earlier) is durable, and, with sync replication, once
//! the secondary holds the original's offset.
//!
//! The secondary's pulls tell the primary how far each partition is
//! replicated (`R`); records below `R` are durable in both regions. A device's
//! `replicated` mid is its accepted mid once `R` passes its last record, and
//! otherwise the highest mid of its records that `R` has passed, tracked in a
//! queue of records not yet replicated.
//!
//! The per-device state survives restarts: it is snapshotted periodically
//! (with the log offset it covers) and the log tail after the snapshot is
//! replayed on start. A snapshot that claims more than the log holds (the log
//! lost a torn tail) is discarded, never trusted: trusting it would
//! acknowledge resends that are not stored.

mod owned;
mod readable;
mod snapshot;

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleet_api::{DeviceId, Mid, Offset, PartitionId, UnixMillis, partition_for};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::dedup_snapshot::{read_snapshot, snapshot_path};
use crate::log::{EventLog, LogError, NewRecord, ReadLimits, Record};
use crate::peer_pulled::PeerPulled;
use crate::state::HubState;

/// Why a publish was not taken.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("this hub is not the primary")]
    NotPrimary,
    #[error("partition {0} is written by another hub of the region")]
    NotOwner(PartitionId),
    #[error("the device's last mid in partition {0} is not known here yet")]
    NotLearned(PartitionId),
    #[error(
        "replication out of step on partition {partition}: expected offset {expected}, got {got}"
    )]
    OutOfStep {
        partition: PartitionId,
        expected: Offset,
        got: Offset,
    },
    #[error(
        "mid {got} jumps more than {} past the last accepted mid {last}",
        MAX_MID_JUMP
    )]
    MidJump { last: Mid, got: Mid },
    #[error(transparent)]
    Log(#[from] LogError),
}

/// How far one publish may move a device's mid past its last accepted one
/// (from 0 for a new device). Further is implausible for a sequence and
/// would let one publish (say mid u64::MAX) make every later one look like
/// a duplicate: acknowledged and never stored.
pub const MAX_MID_JUMP: u64 = 1 << 32;

/// How close (in records) a detached peer's pull must come to a partition's
/// end for the partition to count on the peer again. Exact equality would
/// rarely happen under steady ingest; the records in between were
/// acknowledged alone already, and every later one waits for the peer.
pub const RELINK_SLACK: u64 = 2000;

/// How writes are replicated to the other region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replication {
    /// No secondary: durable here is all there is.
    Off,
    /// Acknowledge when durable here; the secondary catches up.
    Async,
    /// Acknowledge only when durable in both regions.
    Sync,
}

/// Per device: the highest accepted mid and the offset of that record.
/// Per device: the highest accepted mid and the offset of its record.
pub type Accepted = HashMap<DeviceId, (Mid, Offset)>;

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

/// A record appended here and not yet known to be in the other region.
#[derive(Debug)]
struct Unreplicated {
    offset: Offset,
    device: Option<(DeviceId, Mid)>,
    at: Instant,
}

/// One partition's bookkeeping of what its devices stored here and what the
/// other region holds too.
#[derive(Debug)]
struct PartitionLedger {
    /// Per device: the highest mid accepted and the offset of that record.
    accepted: Accepted,
    /// The offset the next append will get.
    next: Offset,
    unreplicated: VecDeque<Unreplicated>,
    /// Per device: the highest mid the other region holds (from the queue).
    replicated_mid: HashMap<DeviceId, Mid>,
    /// The peer counts for this partition's acknowledgements. False while
    /// the peer is detached, until its pulls have caught up with `next`:
    /// then durable here is all an acknowledgement waits for, and nothing
    /// is queued for the peer (memory stays bounded however long it lasts).
    linked: bool,
    /// When the peer last pulled this partition: a detached peer that is
    /// catching up holds the retention floor too.
    pulled_at: Option<Instant>,
    /// Taken over on a shared log: a device is looked up in the log when it
    /// first comes ([`Ingest::learn`]) instead of replaying the partition;
    /// until then nothing is decided for it.
    lazy: bool,
    /// With `lazy`: the devices looked up since the takeover.
    learned: std::collections::HashSet<DeviceId>,
    /// Bumped at every takeover and give-up: a lookup that straddles one
    /// is not applied.
    era: u64,
}

/// A peer that pulled within this long counts as pulling.
const PULLING: Duration = Duration::from_secs(10);

/// What partition's acknowledgements may count as replicated (mirrors the
/// ledger for waiters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cover {
    /// Records below this offset are durable in the other region too.
    offset: Offset,
    /// The peer is detached from this partition: durable here suffices.
    local: bool,
}

/// The ingest pipeline of one hub.
pub struct Ingest {
    log: Arc<dyn EventLog>,
    state: Arc<HubState>,
    parts: Vec<Mutex<PartitionLedger>>,
    /// Per partition: records below this offset are in both regions, and
    /// whether the peer is detached.
    replicated: Vec<watch::Sender<Cover>>,
    /// On a secondary, per partition: below this the log is checked
    /// against the primary's history (reconciled, or pulled from it since).
    /// 0 after every move to secondary: a demoted primary's divergent tail
    /// is not served to readers while it waits to be archived.
    confirmed: Vec<std::sync::atomic::AtomicU64>,
    mode: Replication,
    snapshot_dir: PathBuf,
    budget: Arc<Semaphore>,
    /// How far the peer has durably pulled: retention's floor on a primary.
    peer_pulled: Arc<PeerPulled>,
    /// Per partition: this hub writes it. Always with a log of its own;
    /// on a log shared by several hubs, only from a takeover
    /// ([`Ingest::take_over`]) until the partition moves away.
    owned: Vec<std::sync::atomic::AtomicBool>,
    /// The log is shared by several hubs of the region.
    shared: bool,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("partitions", &self.parts.len())
            .field("mode", &self.mode)
            .finish()
    }
}

/// Bytes of payload that may wait for fsync at once, hub-wide.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// Rebuilds one partition's per-device state from `from` to the end of the log.
async fn replay(
    log: &dyn EventLog,
    p: PartitionId,
    mut from: Offset,
    accepted: &mut Accepted,
) -> Result<(), LogError> {
    let hw = log.high_watermark(p);
    from = from.max(log.log_start(p));
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
                let e = accepted
                    .entry(r.record.device_id.clone())
                    .or_insert((m, r.offset));
                if m >= e.0 {
                    *e = (m, r.offset);
                }
            }
        }
    }
    Ok(())
}

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
        mode: Replication,
    ) -> Result<Arc<Ingest>, LogError> {
        Self::open_with(log, state, data_dir, budget_bytes, mode, false).await
    }

    /// [`Ingest::open`]; `shared`: the log is shared by several hubs of the
    /// region, so no partition is written here before it is taken over
    /// (and nothing is rebuilt before: the takeover does that).
    ///
    /// # Errors
    /// When the log cannot be read.
    pub async fn open_with(
        log: Arc<dyn EventLog>,
        state: Arc<HubState>,
        data_dir: &Path,
        budget_bytes: usize,
        mode: Replication,
        shared: bool,
    ) -> Result<Arc<Ingest>, LogError> {
        let snapshot_dir = data_dir.join("dedup");
        crate::log::file::create_dir_durable(&snapshot_dir)?;
        let mut parts = Vec::new();
        let mut replicated = Vec::new();
        let confirmed = (0..log.partitions())
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        let linked = state.detached().is_none();
        let peer_pulled = Arc::new(PeerPulled::load(&snapshot_dir, log.partitions()));
        for p in 0..log.partitions() {
            let p = PartitionId(p);
            let hw = log.high_watermark(p);
            let (mut accepted, covered) = match read_snapshot(
                &*fleet_api::storage::real(),
                &snapshot_path(&snapshot_dir, p),
            ) {
                Some((upto, map)) if upto <= hw => (map, upto),
                Some((upto, _)) => {
                    tracing::warn!(partition = %p, snapshot = %upto, log = %hw, "dedup snapshot is ahead of the log; rebuilding from the log");
                    (HashMap::new(), Offset(0))
                }
                None => (HashMap::new(), Offset(0)),
            };
            if !shared {
                replay(log.as_ref(), p, covered, &mut accepted).await?;
            }
            // Before the peer's first pull, what it pulled before the
            // restart still holds the floor.
            log.set_retention_floor(
                p,
                if shared {
                    // Nothing is this hub's before a takeover.
                    Offset(0)
                } else if mode == Replication::Off || !linked {
                    covered
                } else {
                    covered.min(peer_pulled.durable(p))
                },
            );
            parts.push(Mutex::new(PartitionLedger {
                accepted,
                next: hw,
                unreplicated: VecDeque::new(),
                replicated_mid: HashMap::new(),
                linked,
                pulled_at: None,
                lazy: false,
                learned: std::collections::HashSet::new(),
                era: 0,
            }));
            // Until the secondary says otherwise, nothing written before a
            // restart counts as replicated (unless there is no secondary).
            let r = if mode == Replication::Off {
                hw
            } else {
                Offset(0)
            };
            replicated.push(watch::Sender::new(Cover {
                offset: r,
                local: !linked,
            }));
        }
        let count = parts.len();
        Ok(Arc::new(Ingest {
            log,
            state,
            parts,
            replicated,
            confirmed,
            mode,
            snapshot_dir,
            budget: Arc::new(Semaphore::new(budget_bytes.min(Semaphore::MAX_PERMITS))),
            peer_pulled,
            owned: (0..count)
                .map(|_| std::sync::atomic::AtomicBool::new(!shared))
                .collect(),
            shared,
        }))
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    pub fn mode(&self) -> Replication {
        self.mode
    }

    pub fn state(&self) -> &Arc<HubState> {
        &self.state
    }

    /// Payload bytes in flight, hub-wide: acquire before [`Ingest::submit`].
    pub fn budget(&self) -> &Arc<Semaphore> {
        &self.budget
    }

    fn part(&self, p: PartitionId) -> std::sync::MutexGuard<'_, PartitionLedger> {
        self.parts[p.0 as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn wait_replicated(
        &self,
        p: PartitionId,
        past: Offset,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.replicated[p.0 as usize].subscribe();
        async move {
            let _ = rx.wait_for(|c| c.local || c.offset > past).await;
        }
    }

    /// Once writes are stopped (fenced or demoted): waits for every publish
    /// that was decided before, in partition `p`, to be durable. Returns the
    /// high watermark then: nothing decided before the stop is above it,
    /// and nothing after the stop is appended.
    ///
    /// # Errors
    /// When the partition cannot be flushed.
    pub async fn barrier(&self, p: PartitionId) -> Result<Offset, LogError> {
        let flushed = {
            // Taking the lock waits out a publish that is between its check
            // and its append; the flush queues behind that append.
            let _part = self.part(p);
            self.log.flush(p)
        };
        flushed.await?;
        Ok(self.log.high_watermark(p))
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
        let p = partition_for(device, self.log.partitions());
        let mut part = self.part(p);
        // Decided under the partition's lock, which a fence takes after it
        // stops writes ([`Ingest::barrier`]): no publish that saw this hub
        // accepting can reach the log after the fence's flush.
        let re = self.state.get();
        if !self.state.accepting() {
            return Err(IngestError::NotPrimary);
        }
        if !self.owns(p) {
            return Err(IngestError::NotOwner(p));
        }
        if part.lazy && !part.learned.contains(device) {
            return Err(IngestError::NotLearned(p));
        }
        let sync = self.mode == Replication::Sync && part.linked;
        if let Some(m) = mid
            && let Some(&(last, at)) = part.accepted.get(device)
            && last >= m
        {
            // The barrier is queued under the lock: nothing (a reload at a
            // takeover) can come between it and the original's append.
            let barrier = self.log.flush(p);
            drop(part);
            metrics::counter!("fleet_hub_duplicates_total").increment(1);
            let replicated = sync.then(|| self.wait_replicated(p, at));
            return Ok(async move {
                barrier.await?;
                if let Some(r) = replicated {
                    r.await;
                }
                drop(permit);
                Ok(Stored::Duplicate { mid: m })
            }
            .boxed());
        }
        if let Some(m) = mid {
            let last = part.accepted.get(device).map_or(Mid(0), |(l, _)| *l);
            if m.0.saturating_sub(last.0) > MAX_MID_JUMP {
                return Err(IngestError::MidJump { last, got: m });
            }
            // Agents number densely; a hole is what a full outbox dropped.
            if last > Mid(0) && m.0 > last.0 + 1 {
                metrics::counter!("fleet_hub_mids_skipped_total").increment(m.0 - last.0 - 1);
            }
        }
        let offset = part.next;
        if let Some(m) = mid {
            match part.accepted.get_mut(device) {
                Some(e) => *e = (m, offset),
                None => {
                    part.accepted.insert(device.clone(), (m, offset));
                }
            }
        }
        if self.mode != Replication::Off && part.linked {
            part.unreplicated.push_back(Unreplicated {
                offset,
                device: mid.map(|m| (device.clone(), m)),
                at: Instant::now(),
            });
        }
        part.next = offset.next();
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
        let replicated = sync.then(|| self.wait_replicated(p, offset));
        Ok(async move {
            let offset = durable.await?;
            if let Some(r) = replicated {
                r.await;
            }
            drop(permit);
            Ok(Stored::New { offset, mid })
        }
        .boxed())
    }

    /// Appends a record pulled from the primary, at the primary's offset.
    /// The future resolves when it is durable here.
    ///
    /// # Errors
    /// [`IngestError::OutOfStep`] when the offset is not the next one here.
    pub fn replicate(
        &self,
        record: Record,
    ) -> Result<BoxFuture<'static, Result<(), IngestError>>, IngestError> {
        let p = record.partition;
        let mut part = self.part(p);
        if !self.owns(p) {
            return Err(IngestError::NotOwner(p));
        }
        if record.offset != part.next {
            return Err(IngestError::OutOfStep {
                partition: p,
                expected: part.next,
                got: record.offset,
            });
        }
        if let Some(m) = record.record.mid {
            let e = part
                .accepted
                .entry(record.record.device_id.clone())
                .or_insert((m, record.offset));
            if m >= e.0 {
                *e = (m, record.offset);
            }
        }
        part.next = record.offset.next();
        let durable = self.log.append(p, record.record);
        drop(part);
        let expected = record.offset;
        Ok(async move {
            let got = durable.await?;
            if got != expected {
                return Err(IngestError::OutOfStep {
                    partition: p,
                    expected,
                    got,
                });
            }
            Ok(())
        }
        .boxed())
    }

    /// The highest mids of `device` durable here and in both regions: what
    /// the hub may report as `committed` and `replicated`.
    ///
    /// # Errors
    /// When the device's partition failed.
    pub async fn acked(
        &self,
        device: &DeviceId,
    ) -> Result<(Option<Mid>, Option<Mid>), IngestError> {
        self.learn(device).await?;
        let p = partition_for(device, self.log.partitions());
        let (mid, barrier) = {
            let part = self.part(p);
            // A partition written elsewhere (or being taken over) has no
            // trustworthy ledger here; nor has a device not learned since
            // the last takeover (one may have run since `learn` above).
            if !self.owns(p) {
                return Err(IngestError::NotOwner(p));
            }
            if part.lazy && !part.learned.contains(device) {
                return Err(IngestError::NotLearned(p));
            }
            (
                part.accepted.get(device).map(|(m, _)| *m),
                self.log.flush(p),
            )
        };
        barrier.await?;
        Ok((mid, self.replicated_mid(device)))
    }

    /// The highest mid of `device` the other region holds durably.
    pub fn replicated_mid(&self, device: &DeviceId) -> Option<Mid> {
        let p = partition_for(device, self.log.partitions());
        let r = self.replicated[p.0 as usize].borrow().offset;
        let part = self.part(p);
        if !self.owns(p) {
            return None;
        }
        if !part.linked {
            // Detached: durable here is what `replicated` means.
            return part.accepted.get(device).map(|(m, _)| *m);
        }
        let whole = part
            .accepted
            .get(device)
            .filter(|(_, at)| *at < r)
            .map(|(m, _)| *m);
        whole.max(part.replicated_mid.get(device).copied())
    }

    /// The secondary holds partition `p` below `upto`. Returns the devices
    /// whose `replicated` mid advanced, with that mid.
    pub fn advance_replicated(&self, p: PartitionId, upto: Offset) -> Vec<(DeviceId, Mid)> {
        let Some(tx) = self.replicated.get(p.0 as usize) else {
            return Vec::new();
        };
        let mut advanced: HashMap<DeviceId, Mid> = HashMap::new();
        self.peer_pulled.advance(p, upto);
        let mut part = self.part(p);
        part.pulled_at = Some(Instant::now());
        let moved = tx.send_if_modified(|c| {
            if upto > c.offset {
                c.offset = upto;
                true
            } else {
                false
            }
        });
        if !moved || !part.linked {
            return Vec::new();
        }
        while part.unreplicated.front().is_some_and(|u| u.offset < upto) {
            let Some(u) = part.unreplicated.pop_front() else {
                break;
            };
            if let Some((d, m)) = u.device {
                let e = advanced.entry(d).or_insert(m);
                *e = (*e).max(m);
            }
        }
        for (d, m) in &advanced {
            let e = part.replicated_mid.entry(d.clone()).or_insert(*m);
            *e = (*e).max(*m);
        }
        // The map only needs devices with records still unreplicated.
        if part.replicated_mid.len() > 4 * part.unreplicated.len() + 1024 {
            let pending: std::collections::HashSet<&DeviceId> = part
                .unreplicated
                .iter()
                .filter_map(|u| u.device.as_ref().map(|(d, _)| d))
                .collect();
            let keep: HashMap<DeviceId, Mid> = part
                .replicated_mid
                .iter()
                .filter(|(d, _)| pending.contains(d))
                .map(|(d, m)| (d.clone(), *m))
                .collect();
            part.replicated_mid = keep;
        }
        advanced.into_iter().collect()
    }

    /// Records below this offset of `p` are in both regions.
    pub fn replicated_offset(&self, p: PartitionId) -> Offset {
        self.replicated
            .get(p.0 as usize)
            .map_or(Offset(0), |r| r.borrow().offset)
    }

    /// The partition of `device`'s records.
    pub fn partition_of(&self, device: &DeviceId) -> PartitionId {
        partition_for(device, self.log.partitions())
    }

    /// Whether the peer counts for `p`'s acknowledgements (see
    /// [`Ingest::detach`]).
    pub fn linked(&self, p: PartitionId) -> bool {
        self.part(p).linked
    }

    /// The peer no longer counts: every partition acknowledges what is
    /// durable here, sync waiters are released, and the queue of records
    /// waiting for the peer is dropped (bounded memory while it lasts).
    /// Returns the devices whose `replicated` mid moves up, with that mid.
    pub fn detach(&self) -> Vec<(DeviceId, Mid)> {
        let mut advanced: HashMap<DeviceId, Mid> = HashMap::new();
        for (i, tx) in self.replicated.iter().enumerate() {
            let mut part = self.part(PartitionId(i as u32));
            part.linked = false;
            for u in part.unreplicated.drain(..) {
                if let Some((d, m)) = u.device {
                    let e = advanced.entry(d).or_insert(m);
                    *e = (*e).max(m);
                }
            }
            part.replicated_mid.clear();
            tx.send_modify(|c| c.local = true);
        }
        advanced.into_iter().collect()
    }

    /// Every partition counts on the peer again, from nothing: nothing is
    /// known to be replicated until the peer's next pulls say so. Used at
    /// every change of role, so that neither a detachment nor what an
    /// earlier role learned carries over.
    pub fn reattach(&self) {
        for (i, tx) in self.replicated.iter().enumerate() {
            let mut part = self.part(PartitionId(i as u32));
            part.linked = true;
            part.unreplicated.clear();
            part.replicated_mid.clear();
            tx.send_replace(Cover {
                offset: Offset(0),
                local: false,
            });
        }
    }

    /// The detached peer pulled `p` from `from`: when that is within
    /// [`RELINK_SLACK`] records of everything this partition holds, the peer
    /// counts again from here on (records before were acknowledged alone
    /// already; later ones wait for it). True when the partition is linked
    /// (now or already).
    pub fn relink(&self, p: PartitionId, from: Offset) -> bool {
        let Some(tx) = self.replicated.get(p.0 as usize) else {
            return false;
        };
        let mut part = self.part(p);
        if part.linked {
            return true;
        }
        if part.next.0.saturating_sub(from.0) > RELINK_SLACK {
            return false;
        }
        part.linked = true;
        tx.send_modify(|c| {
            c.offset = c.offset.max(from);
            c.local = false;
        });
        true
    }

    /// Records not yet in the other region, and the age of the oldest.
    pub fn lag(&self, p: PartitionId) -> (u64, Duration) {
        // A partition another hub of the region writes is its lag to report
        // (its pulls, and so its replicated point, are there).
        if self.mode == Replication::Off || (self.shared() && !self.owns(p)) {
            return (0, Duration::ZERO);
        }
        let records = self
            .log
            .high_watermark(p)
            .0
            .saturating_sub(self.replicated_offset(p).0);
        let age = self
            .part(p)
            .unreplicated
            .front()
            .map_or(Duration::ZERO, |u| u.at.elapsed());
        (records, if records == 0 { Duration::ZERO } else { age })
    }

    /// Forgets what was decided about partition `p` after its log was cut
    /// back (failback) and rebuilds it from the log.
    ///
    /// # Errors
    /// When the log cannot be read.
    pub async fn rebuild(&self, p: PartitionId) -> Result<(), LogError> {
        let mut accepted = HashMap::new();
        if !self.shared {
            let start = self.log.log_start(p);
            replay(self.log.as_ref(), p, start, &mut accepted).await?;
        }
        let mut part = self.part(p);
        if self.shared {
            // Every device is learned again from the cut log (and what its
            // retention purged), as after a takeover.
            part.learned.clear();
            part.lazy = true;
            part.era = part.era.wrapping_add(1);
        }
        part.accepted = accepted;
        part.next = self.log.high_watermark(p);
        part.unreplicated.clear();
        part.replicated_mid.clear();
        self.peer_pulled.cut(p, part.next);
        drop(part);
        let _ = fs::remove_file(snapshot_path(&self.snapshot_dir, p));
        self.log.set_retention_floor(p, Offset(0));
        Ok(())
    }

    /// Partition `p` was skipped forward to `base` (its primary no longer
    /// holds the records in between): the next replicated record is there.
    /// Per-device state is kept: the mids it holds were stored once.
    pub fn skipped(&self, p: PartitionId, base: Offset) {
        let mut part = self.part(p);
        part.next = base;
        part.unreplicated.clear();
    }
}
