//! Periodic snapshots of every partition's per-device state, and the
//! retention floors they allow.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::{Offset, PartitionId};

use super::{Ingest, PULLING, Replication};
use crate::dedup_snapshot::{snapshot_path, write_snapshot};

impl Ingest {
    /// Writes a snapshot of every partition's per-device state and lets log
    /// retention delete what the snapshots cover and, on a primary, what
    /// the attached peer has durably pulled (as recorded on disk).
    pub async fn snapshot(&self) {
        // File writes and fsyncs run off the runtime's threads.
        let pulled = self.peer_pulled.clone();
        match tokio::task::spawn_blocking(move || pulled.persist()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot record what the peer pulled; retention keeps the previous floor");
            }
            Err(e) => tracing::warn!(error = %e, "recording what the peer pulled did not finish"),
        }
        let secondary = self.state.get().role == fleet_api::Role::Secondary;
        if self.shared {
            // A takeover learns devices from the shared log (and what its
            // retention purged), never from one hub's snapshot: only the
            // floors are set, and only this hub's partitions have any.
            for p in (0..self.log.partitions()).map(PartitionId) {
                let floor = if self.owns(p) {
                    self.floor(p, secondary, self.log.high_watermark(p))
                } else {
                    Offset(0)
                };
                self.log.set_retention_floor(p, floor);
            }
            return;
        }
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
            let written = tokio::task::spawn_blocking(move || {
                write_snapshot(&*fleet_api::storage::real(), &path, upto, &map)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match written {
                Ok(()) => self
                    .log
                    .set_retention_floor(p, self.floor(p, secondary, upto)),
                Err(e) => tracing::warn!(partition = %p, error = %e, "cannot write dedup snapshot"),
            }
        }
        metrics::counter!("fleet_hub_dedup_snapshots_total").increment(1);
    }

    /// How far retention may purge `p`, which is covered up to `upto`: a
    /// primary's retention must also keep what the attached secondary has
    /// not pulled; a detached peer holds the floor only while it pulls
    /// (catching up), and nobody pulls from a secondary.
    fn floor(&self, p: PartitionId, secondary: bool, upto: Offset) -> Offset {
        let held = {
            let part = self.part(p);
            part.linked || part.pulled_at.is_some_and(|t| t.elapsed() < PULLING)
        };
        match self.mode {
            Replication::Off => upto,
            _ if secondary || !held => upto,
            _ => upto.min(self.peer_pulled.durable(p)),
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
