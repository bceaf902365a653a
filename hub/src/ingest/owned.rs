//! Which partitions this hub writes, on a log shared by several hubs of a
//! region. After a takeover nothing is decided for a device before its
//! last mid is learned from the log: a ledger that does not know it would
//! store a resend twice, or (knowing a failed, unstored mid) acknowledge a
//! resend as a duplicate of a record that is not stored.

use std::sync::atomic::Ordering;

use fleet_api::{DeviceId, Offset, PartitionId, partition_for};

use super::{Cover, Ingest, IngestError, Replication};
use crate::log::LogError;

impl Ingest {
    /// Whether this hub writes partition `p` now.
    pub fn owns(&self, p: PartitionId) -> bool {
        self.owned
            .get(p.0 as usize)
            .is_some_and(|o| o.load(Ordering::Acquire))
    }

    /// Whether the log is shared by several hubs of the region.
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// The partitions this hub writes, when the log is shared.
    pub fn owned_partitions(&self) -> Option<Vec<PartitionId>> {
        self.shared.then(|| {
            (0..self.log.partitions())
                .map(PartitionId)
                .filter(|p| self.owns(*p))
                .collect()
        })
    }

    /// Starts writing partition `p` (its lease is held): reloads the log's
    /// view of it (whatever another hub wrote) and takes publishes for it,
    /// each device's only once its last mid is learned from the log
    /// ([`Ingest::learn`], when it connects). Nothing is replayed, so a
    /// takeover costs the same however long the partition is.
    ///
    /// # Errors
    /// When the log cannot be reloaded; `p` stays unowned.
    pub async fn take_over(&self, p: PartitionId) -> Result<(), LogError> {
        self.give_up(p).await;
        self.log.reload(p, true).await?;
        let mut part = self.part(p);
        part.accepted.clear();
        part.learned.clear();
        part.lazy = true;
        part.era = part.era.wrapping_add(1);
        part.next = self.log.high_watermark(p);
        part.unreplicated.clear();
        part.replicated_mid.clear();
        // What the peer pulled counts again only from pulls served here:
        // a value this hub kept from an earlier turn may be above a cut
        // another hub made since.
        self.peer_pulled.cut(p, Offset(0));
        if self.mode == Replication::Off {
            let local = self.replicated[p.0 as usize].borrow().local;
            self.replicated[p.0 as usize].send_replace(Cover {
                offset: part.next,
                local,
            });
        } else {
            // Linked as the region is now: a detachment (or attachment)
            // decided while another hub wrote this partition must not carry
            // over from this hub's earlier look at it.
            part.linked = self.state.detached().is_none();
            let linked = part.linked;
            self.replicated[p.0 as usize].send_modify(|c| c.local = !linked);
        }
        self.owned[p.0 as usize].store(true, Ordering::Release);
        drop(part);
        tracing::info!(partition = %p, next = %part_next(self, p), "partition taken over");
        Ok(())
    }

    /// Stops writing partition `p`: nothing more is decided for it here,
    /// and what was decided before is waited for (it either becomes durable
    /// or fails unacknowledged). The log stops taking appends for it.
    pub async fn give_up(&self, p: PartitionId) {
        let was = {
            // Under the partition's lock: no publish is between its check
            // and its append once this returns. The ledger goes too: it may
            // hold mids whose appends failed, and only the log says what is
            // stored (looked up again after a takeover).
            let mut part = self.part(p);
            part.accepted.clear();
            part.learned.clear();
            part.era = part.era.wrapping_add(1);
            part.unreplicated.clear();
            part.replicated_mid.clear();
            self.owned[p.0 as usize].swap(false, Ordering::AcqRel)
        };
        // Retention purges only what this hub writes.
        self.log.set_retention_floor(p, Offset(0));
        if was {
            let _ = self.log.flush(p).await;
            tracing::info!(partition = %p, "partition given up");
        }
        self.refresh(p).await;
    }

    /// Learns `device`'s last mid from the log, once per takeover, before
    /// anything is decided for it (a device that has no record is new).
    ///
    /// # Errors
    /// When the partition is not (or no longer) this hub's, or the log
    /// cannot be read: the device is not taken now.
    pub async fn learn(&self, device: &DeviceId) -> Result<(), IngestError> {
        let p = partition_for(device, self.log.partitions());
        let era = {
            let part = self.part(p);
            if !self.owns(p) {
                return Err(IngestError::NotOwner(p));
            }
            if !part.lazy || part.learned.contains(device) {
                return Ok(());
            }
            part.era
        };
        let last = match self.log.last_of(p, device).await? {
            Some(r) if r.record.mid.is_some() => r.record.mid.map(|m| (m, r.offset)),
            // Its last record has no mid (plain publishes mixed with
            // numbered ones): the highest mid is further back, found by
            // reading the partition (rare; devices that number always do),
            // or among what retention purged.
            Some(_) => {
                let mut accepted = super::Accepted::new();
                super::replay(self.log.as_ref(), p, self.log.log_start(p), &mut accepted).await?;
                match accepted.remove(device) {
                    Some(found) => Some(found),
                    None => self.log.purged_last(p, device).await?,
                }
            }
            // None retained: its records (if it had any) were purged, its
            // last mid kept before they went. Asked after the log, which
            // keeps the record until that is written.
            None => self.log.purged_last(p, device).await?,
        };
        let mut part = self.part(p);
        if part.era != era || !self.owns(p) {
            return Err(IngestError::NotOwner(p));
        }
        // Learned once: a concurrent connect of the same device may have
        // learned it first, and decided publishes since.
        if part.learned.insert(device.clone())
            && let Some(found) = last
        {
            part.accepted.insert(device.clone(), found);
        }
        Ok(())
    }

    /// Reloads a partition this hub does not write, so that what other
    /// hubs wrote is readable here.
    pub async fn refresh(&self, p: PartitionId) {
        if self.owns(p) {
            return;
        }
        if let Err(e) = self.log.reload(p, false).await {
            tracing::warn!(partition = %p, error = %e, "cannot reload a partition written elsewhere; reads of it may lag");
        }
    }
}

fn part_next(ingest: &Ingest, p: PartitionId) -> Offset {
    ingest.part(p).next
}
