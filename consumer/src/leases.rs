//! Leases: each instance keeps its fair share of the partitions and a
//! worker on each one it holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet_api::{Offset, PartitionId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::store::StoreError;
use crate::{Ctx, Start};

impl Ctx {
    /// Keeps this instance's fair share of partitions and a worker on each.
    pub(crate) async fn coordinate(self: Arc<Self>, cancel: CancellationToken) {
        let ttl = self.config.lease_ttl;
        let every = ttl / 3;
        let mut workers: BTreeMap<PartitionId, (CancellationToken, JoinHandle<()>)> =
            BTreeMap::new();
        let mut ensured = false;
        // The partition count comes from the first hub that answers.
        let mut primary = self.hubs.primary.subscribe();
        tokio::select! {
            () = cancel.cancelled() => {}
            _ = primary.wait_for(Option::is_some) => {}
        }
        loop {
            if !ensured {
                ensured = self.ensure_partitions().await;
            }
            if ensured && let Err(e) = self.rebalance(&mut workers, &cancel).await {
                tracing::warn!(error = %e, "lease round failed; retrying");
            }
            self.held.send_replace(workers.keys().copied().collect());
            metrics::gauge!("fleet_consumer_partitions_held", "group" => self.group())
                .set(workers.len() as f64);
            if !self.sleep_or(every, &cancel).await {
                break;
            }
        }
        for (stop, _) in workers.values() {
            stop.cancel();
        }
        for (_, (_, handle)) in std::mem::take(&mut workers) {
            let _ = handle.await;
        }
        if let Err(e) = self.store.leave(&self.instance).await {
            tracing::warn!(error = %e, "cannot release leases; they expire by themselves");
        }
        self.held.send_replace(Vec::new());
        tracing::info!("consumer stopped");
    }

    /// Creates the lease and checkpoint rows once the partitions are known.
    pub(crate) async fn ensure_partitions(&self) -> bool {
        let Some(primary) = self.hubs.primary.borrow().clone() else {
            return false;
        };
        let starts: Vec<Offset> = primary
            .partitions
            .iter()
            .map(|s| match self.config.start {
                Start::Earliest => Offset::ZERO,
                // The end of what this consumer reads: a start beyond the
                // replicated prefix could skip records a failover rewrites.
                Start::Latest => match self.config.upto {
                    fleet_api::hub::ReadUpto::Replicated => s.replicated,
                    fleet_api::hub::ReadUpto::Committed => s.high_watermark,
                },
            })
            .collect();
        match self.store.ensure_partitions(&starts).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot prepare partitions in the store");
                false
            }
        }
    }

    pub(crate) async fn rebalance(
        self: &Arc<Self>,
        workers: &mut BTreeMap<PartitionId, (CancellationToken, JoinHandle<()>)>,
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        let ttl = self.config.lease_ttl;
        let alive = self.store.heartbeat(&self.instance, ttl).await?;
        let held = self.store.renew(&self.instance, ttl).await?;
        // Workers whose lease is gone (expired and taken) or who stopped.
        workers.retain(|p, (stop, handle)| {
            let keep = held.contains(p) && !handle.is_finished();
            if !keep {
                if !held.contains(p) {
                    tracing::warn!(partition = %p, "lease lost; stopping its worker");
                }
                stop.cancel();
            }
            keep
        });
        for p in &held {
            if !workers.contains_key(p) {
                workers.insert(*p, self.spawn_worker(*p, cancel));
            }
        }
        let total = self
            .hubs
            .primary
            .borrow()
            .as_ref()
            .map_or(0, |p| p.partitions.len());
        let share = total.div_ceil(alive.max(1) as usize);
        if workers.len() < share {
            for p in self.store.claimable().await? {
                if workers.len() >= share || (p.0 as usize) >= total {
                    break;
                }
                if self.store.try_claim(p, &self.instance, ttl).await? {
                    tracing::info!(partition = %p, "partition taken");
                    workers.insert(p, self.spawn_worker(p, cancel));
                }
            }
        } else if workers.len() > share {
            let extra: Vec<PartitionId> = workers
                .keys()
                .rev()
                .take(workers.len() - share)
                .copied()
                .collect();
            for p in extra {
                if let Some((stop, handle)) = workers.remove(&p) {
                    stop.cancel();
                    let _ = handle.await;
                    self.store.release(p, &self.instance).await?;
                    tracing::info!(partition = %p, "partition handed over for balance");
                }
            }
        }
        Ok(())
    }

    pub(crate) fn spawn_worker(
        self: &Arc<Self>,
        p: PartitionId,
        parent: &CancellationToken,
    ) -> (CancellationToken, JoinHandle<()>) {
        let stop = parent.child_token();
        let span = tracing::info_span!("partition", partition = %p);
        let handle = tokio::spawn(self.clone().work(p, stop.clone()).instrument(span));
        (stop, handle)
    }
}
