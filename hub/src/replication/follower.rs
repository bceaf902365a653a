//! The secondary's side of replication: per partition, reconcile with the
//! primary's history once, then pull and append at the primary's offsets.
//! Each pull asks from this hub's high watermark, which acknowledges to the
//! primary everything below it.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::hub::RecordsResponse;
use fleet_api::{PartitionId, Role};

use super::{Control, history, log_of};
use crate::log::Record;

impl Control {
    /// Replicates partition `p` while this hub is secondary.
    pub(super) async fn pull_loop(self: Arc<Self>, p: PartitionId) {
        if self.peers.is_empty() {
            return;
        }
        // Pull only once the peer was looked at (its partition count among
        // other things).
        let _ = self.looked.subscribe().wait_for(|l| *l).await;
        let mut roles = self.state.subscribe();
        let log = log_of(&self.ingest).clone();
        let mut reconciled = false;
        loop {
            if roles.borrow_and_update().role != Role::Secondary {
                reconciled = false;
                let _ = roles.changed().await;
                continue;
            }
            if self.partition_mismatch().is_some() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            // A failed partition (a half-done cut, a failed write) does not
            // pull: a pull from its end would acknowledge what it may not
            // hold. Recovery at the next start puts it right.
            if log.partition_failure(p).is_some() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            // With several hubs in the region, the partition's owner pulls
            // it (the lease is the puller's lease); after a takeover the
            // new owner reconciles before it pulls.
            if !self.ingest.owns(p) {
                reconciled = false;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let Some(peer) = self.peer_for(p) else {
                return;
            };
            if !reconciled {
                match self.reconcile(&peer, p).await {
                    Ok(()) => {
                        reconciled = true;
                        self.ingest.confirm(p, log.high_watermark(p));
                    }
                    Err(e) => {
                        tracing::info!(partition = %p, %peer, error = %e, "cannot reconcile with the primary yet");
                        self.next_peer_for(p, &peer);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                }
            }
            let from = log.high_watermark(p);
            let epoch = self.state.get().epoch;
            let resp = self.pull(&peer, p, from, epoch).await;
            let page: RecordsResponse = match resp {
                Ok(r) if r.status().is_success() => match r.json().await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(partition = %p, error = %e, "unreadable replication answer");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    if status == reqwest::StatusCode::GONE {
                        // The primary's retention deleted what this hub has
                        // not pulled (it was detached meanwhile): continue
                        // where the primary's log starts now.
                        if let Err(e) = self.skip_to_primary_start(&peer, p).await {
                            tracing::warn!(partition = %p, error = %e, "cannot skip to the primary's retained log");
                        }
                    } else if status == reqwest::StatusCode::CONFLICT && text.contains("diverged") {
                        tracing::warn!(partition = %p, "this log is ahead of the primary's; reconciling");
                        reconciled = false;
                    } else {
                        // Not the primary, or (several hubs there) not the
                        // hub that writes this partition: ask the next one.
                        tracing::debug!(partition = %p, %status, %peer, "the peer does not serve replication now");
                        self.next_peer_for(p, &peer);
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(partition = %p, %peer, error = %e, "cannot reach the primary");
                    self.next_peer_for(p, &peer);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if let Some(e) = page.epoch
                && e > self.state.get().epoch
            {
                self.learn(e, "the primary's epoch");
            }
            {
                let mut view = self.view();
                view.reachable = true;
                if let Some(slot) = view.high_watermarks.get_mut(p.0 as usize) {
                    *slot = page.high_watermark;
                }
            }
            if self.state.get().role != Role::Secondary {
                continue;
            }
            let mut pending = Vec::with_capacity(page.records.len());
            let mut failed = false;
            for w in page.records {
                let record = Record {
                    partition: w.partition,
                    offset: w.offset,
                    record: crate::log::NewRecord {
                        device_id: w.device_id,
                        mid: w.mid,
                        enqueued_at: w.enqueued_at,
                        region: w.region,
                        epoch: w.epoch,
                        payload: w.payload.into(),
                    },
                };
                match self.ingest.replicate(record) {
                    Ok(done) => pending.push(done),
                    Err(e) => {
                        tracing::warn!(partition = %p, error = %e, "replication out of step; reconciling");
                        reconciled = false;
                        failed = true;
                        break;
                    }
                }
            }
            // Durable here before the next pull acknowledges them.
            for done in pending {
                if let Err(e) = done.await {
                    tracing::error!(partition = %p, error = %e, "cannot store replicated records");
                    failed = true;
                }
            }
            if !failed && reconciled {
                self.ingest.confirm(p, log.high_watermark(p));
            }
            if failed {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    /// Cutting or skipping this hub's log and promotions exclude each other
    /// (the same lock): a promotion that lands while a secondary waits for
    /// its primary's answer must not have its first acknowledged records cut.
    /// Granted only while this hub is still a secondary at `epoch`.
    async fn surgery(
        &self,
        epoch: fleet_api::Epoch,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, String> {
        let guard = self.promotion.lock().await;
        let now = self.state.get();
        if now.role != Role::Secondary || now.epoch != epoch {
            return Err(format!(
                "the role changed meanwhile ({} at epoch {}); not cutting",
                now.role, now.epoch
            ));
        }
        Ok(guard)
    }

    /// Skips partition `p` forward to where the primary's retained log
    /// starts, when it starts above this hub's high watermark.
    async fn skip_to_primary_start(&self, peer: &str, p: PartitionId) -> Result<(), String> {
        let status = self
            .peer_status(peer)
            .await
            .ok_or_else(|| "the primary does not answer".to_string())?;
        let start = status
            .partitions
            .get(p.0 as usize)
            .map(|s| s.log_start)
            .ok_or_else(|| format!("the primary reports no partition {p}"))?;
        let epoch = self.state.get().epoch;
        let log = log_of(&self.ingest).clone();
        let hw = log.high_watermark(p);
        if start <= hw {
            return Ok(());
        }
        // What this hub holds is a prefix of the primary's history (it
        // reconciled), so below `start` the primary's epoch history is its.
        let theirs = self.peer_epochs(peer, p).await?;
        let history = theirs
            .epochs
            .iter()
            .map(|e| (e.epoch, e.start))
            .filter(|(_, at)| *at < start)
            .collect();
        let _surgery = self.surgery(epoch).await?;
        if log.high_watermark(p) != hw {
            return Err("the log moved meanwhile".into());
        }
        tracing::error!(partition = %p, from = %hw, to = %start, "the primary no longer holds records this hub lacks (retention passed them while the peer was detached); skipping to its retained log");
        let dropped = log
            .skip_to(p, start, history)
            .await
            .map_err(|e| e.to_string())?;
        self.ingest.skipped(p, start);
        self.ingest.confirm(p, start);
        metrics::counter!("fleet_hub_replication_skipped_records_total").increment(start.0 - hw.0);
        tracing::warn!(partition = %p, dropped, "skipped forward");
        Ok(())
    }

    /// Cuts partition `p` back to the part of its history the primary
    /// shares (found on the whole epoch history, see `history`), archiving
    /// the rest.
    async fn reconcile(&self, peer: &str, p: PartitionId) -> Result<(), String> {
        let log = log_of(&self.ingest).clone();
        loop {
            let epoch = self.state.get().epoch;
            let hw = log.high_watermark(p);
            let mine = log.epoch_history(p);
            let Some(&(last_epoch, _)) = mine.last() else {
                // Nothing was ever written here.
                return Ok(());
            };
            let answer = self.peer_epoch_end(peer, p, last_epoch).await?;
            let own = history::first_after(&mine, hw, answer.epoch);
            let cut =
                history::divergence(last_epoch, hw, answer, own).map_err(|e| e.to_string())?;
            let Some(cut) = cut else {
                return Ok(());
            };
            let _surgery = self.surgery(epoch).await?;
            if log.high_watermark(p) != hw {
                continue;
            }
            self.archive_divergent(p, last_epoch, cut, hw).await?;
        }
    }
}
