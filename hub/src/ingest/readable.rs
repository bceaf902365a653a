//! What readers (consumers) may see: the replicated prefix of each
//! partition, unless they ask for the committed one.
//!
//! A record beyond `replicated` is durable here only: a forced failover can
//! drop it from the history (it is archived, and its device resends it
//! under a new offset). A consumer that processed it would hold a result
//! the new history does not explain, so readers get the replicated prefix
//! by default.

use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_api::{Offset, PartitionId, Role};

use super::{Ingest, Replication};

impl Ingest {
    /// The end of the prefix of `p` that is durable in both regions (all of
    /// it without a peer, on a secondary, or while the peer is detached).
    pub fn readable(&self, p: PartitionId) -> Offset {
        let hw = self.log.high_watermark(p);
        match (self.mode, self.state.get().role) {
            (Replication::Off, _) => hw,
            // A secondary serves what it checked against the primary.
            (_, Role::Secondary) => hw.min(self.confirmed_offset(p)),
            // Detached: durable here is what `replicated` means.
            _ if !self.linked(p) => hw,
            _ => self.replicated_offset(p).min(hw),
        }
    }

    /// On a secondary: what the follower checked against the primary.
    fn confirmed_offset(&self, p: PartitionId) -> Offset {
        Offset(
            self.confirmed
                .get(p.0 as usize)
                .map_or(0, |c| c.load(Ordering::Acquire)),
        )
    }

    /// The follower checked partition `p` below `upto` against the
    /// primary's history.
    pub fn confirm(&self, p: PartitionId, upto: Offset) {
        if let Some(c) = self.confirmed.get(p.0 as usize) {
            c.fetch_max(upto.0, Ordering::AcqRel);
        }
        if let Some(r) = self.replicated.get(p.0 as usize) {
            // Wake waiting readers.
            r.send_modify(|_| {});
        }
    }

    /// A move to secondary: nothing is checked against the new primary yet.
    pub fn unconfirm_all(&self) {
        for c in &self.confirmed {
            c.store(0, Ordering::Release);
        }
    }

    /// Waits up to `wait` until [`Ingest::readable`] passes `past`; says
    /// whether it did.
    pub async fn wait_readable(&self, p: PartitionId, past: Offset, wait: Duration) -> bool {
        let Some(replicated) = self.replicated.get(p.0 as usize) else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut hw = self.log.watch(p);
        let mut covered = replicated.subscribe();
        let mut role = self.state.subscribe();
        let mut detached = self.state.subscribe_detached();
        loop {
            if self.readable(p) > past {
                return true;
            }
            tokio::select! {
                r = hw.changed() => if r.is_err() { return false },
                r = covered.changed() => if r.is_err() { return false },
                r = role.changed() => if r.is_err() { return false },
                r = detached.changed() => if r.is_err() { return false },
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}
