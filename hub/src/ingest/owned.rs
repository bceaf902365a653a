//! Which partitions this hub writes, on a log shared by several hubs of a
//! region. A partition is taken over only after its state is rebuilt from
//! the shared log, and nothing is decided for it while that runs: a
//! half-rebuilt ledger would acknowledge a resend as a duplicate of a
//! record it has not seen stored.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use fleet_api::{Offset, PartitionId};

use super::{Cover, Ingest, Replication, replay};
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
    /// view of it (whatever another hub wrote), rebuilds every device's last
    /// mid from the log, and only then takes publishes for it.
    ///
    /// # Errors
    /// When the log cannot be reloaded or read; `p` stays unowned.
    pub async fn take_over(&self, p: PartitionId) -> Result<(), LogError> {
        self.give_up(p).await;
        self.log.reload(p, true).await?;
        let mut accepted = HashMap::new();
        let start = self.log.log_start(p);
        replay(self.log.as_ref(), p, start, &mut accepted).await?;
        let mut part = self.part(p);
        part.accepted = accepted;
        part.next = self.log.high_watermark(p);
        part.unreplicated.clear();
        part.replicated_mid.clear();
        if self.mode == Replication::Off {
            let local = self.replicated[p.0 as usize].borrow().local;
            self.replicated[p.0 as usize].send_replace(Cover {
                offset: part.next,
                local,
            });
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
            // hold mids whose appends failed, and only a takeover's replay
            // says what is stored.
            let mut part = self.part(p);
            part.accepted.clear();
            part.unreplicated.clear();
            part.replicated_mid.clear();
            self.owned[p.0 as usize].swap(false, Ordering::AcqRel)
        };
        if was {
            let _ = self.log.flush(p).await;
            tracing::info!(partition = %p, "partition given up");
        }
        self.refresh(p).await;
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
