//! The primary's side of replication: the pulls it serves (each one
//! advances `replicated`), where an epoch ends in its history, the lag it
//! measures, and the throttle that pauses ingest while async lag is over
//! `--max-lag-ms`.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::hub::{EpochEnd, EpochHistory, EpochStart};
use fleet_api::{Epoch, Offset, PartitionId, Role};
use tokio::sync::watch;

use super::{Control, ControlError, log_of};
use crate::sessions::Outbound;

impl Control {
    /// A replication pull arrived for `p` from `from`: everything below is
    /// durable at the secondary. Returns the epoch to report back.
    ///
    /// # Errors
    /// When this hub is not the primary, or the secondary is ahead of it.
    pub async fn on_pull(
        &self,
        p: PartitionId,
        from: Offset,
        their_epoch: Option<Epoch>,
    ) -> Result<Epoch, ControlError> {
        if let Some(e) = their_epoch {
            let current = self.state.get().epoch;
            if e.0 > current.0.saturating_add(super::role::MAX_EPOCH_LEAP) {
                // Neither learned nor counted as an acknowledgement.
                return Err(ControlError::Conflict(format!(
                    "the pull's epoch {e} is implausibly far above this hub's {current}"
                )));
            }
            if e > current {
                self.learn(e, "a replication pull carried a higher epoch");
            }
        }
        let now = self.state.get();
        if now.role != Role::Primary {
            return Err(ControlError::NotPrimary);
        }
        // The hub that writes `p` holds its devices' sessions and ledger:
        // only a pull it serves acknowledges them.
        if self.ingest.shared() && !self.ingest.owns(p) {
            return Err(ControlError::NotOwner(p));
        }
        if let Some(theirs) = self.partition_mismatch() {
            return Err(ControlError::Conflict(format!(
                "the peer has {theirs} partitions and this hub {}: replication is refused",
                self.partitions()
            )));
        }
        let hw = log_of(&self.ingest).high_watermark(p);
        if from > hw {
            // A replica ahead of this hub's view: before it cuts anything
            // on this word, make sure this hub still writes `p` (a paused
            // hub's view is stale, and the writer now is another).
            self.confirm_writer(p).await?;
            return Err(ControlError::Conflict(format!(
                "diverged: the replica asks from offset {from} but this log ends at {hw}; reconcile first"
            )));
        }
        for (device, mid) in self.ingest.advance_replicated(p, from) {
            self.sessions.send(&device, Outbound::Replicated(mid));
        }
        if their_epoch == Some(now.epoch) {
            {
                // A pull is as good a sign of life as an answered status.
                let mut view = self.view();
                view.reachable = true;
                view.unreachable_since_ms = None;
            }
            // A detached peer that reconciled with this history counts again
            // once it holds (nearly) everything.
            self.caught_up(p, from);
        }
        Ok(now.epoch)
    }

    /// In a region of several hubs: this hub still holds `p`'s lease, as
    /// the bucket itself says (an answer a replica may cut its log on is
    /// not given from a view a paused hub kept).
    async fn confirm_writer(&self, p: PartitionId) -> Result<(), ControlError> {
        let Some(kv) = &self.region else {
            return Ok(());
        };
        match kv.holder_now(p).await {
            Ok(Some(h)) if h == kv.me() => Ok(()),
            Ok(_) => Err(ControlError::NotOwner(p)),
            Err(e) => Err(ControlError::Unavailable(e.to_string())),
        }
    }

    /// `GET /v1/partitions/{p}/epoch_end?epoch=E`: the first offset written
    /// in an epoch later than `E` (the high watermark when there is none),
    /// and the largest epoch not above `E` in this history.
    ///
    /// # Errors
    /// When the log cannot be read.
    pub async fn epoch_end(&self, p: PartitionId, epoch: Epoch) -> Result<EpochEnd, ControlError> {
        // Only the primary's history is the one to reconcile against: a
        // secondary's answer could make its peer archive what it holds.
        if self.state.get().role != Role::Primary {
            return Err(ControlError::NotPrimary);
        }
        // Another hub's partition: this hub's view of its end may lag.
        if self.ingest.shared() && !self.ingest.owns(p) {
            return Err(ControlError::NotOwner(p));
        }
        self.confirm_writer(p).await?;
        let log = log_of(&self.ingest);
        // The end first: an epoch is in the history before its first record
        // moves the end, so this order never answers with a too-early end.
        let hw = log.high_watermark(p);
        Ok(super::history::epoch_end(&log.epoch_history(p), hw, epoch))
    }

    /// `GET /v1/partitions/{p}/epochs`: the epoch history of `p`.
    ///
    /// # Errors
    /// When the log cannot be read.
    pub async fn epochs(&self, p: PartitionId) -> Result<EpochHistory, ControlError> {
        let log = log_of(&self.ingest);
        let epochs = log
            .epoch_history(p)
            .into_iter()
            .map(|(epoch, start)| EpochStart { epoch, start })
            .collect();
        Ok(EpochHistory {
            epochs,
            high_watermark: log.high_watermark(p),
        })
    }

    /// Follows the throttle (true while async lag is over `--max-lag-ms`).
    pub fn throttle(&self) -> watch::Receiver<bool> {
        self.throttle.subscribe()
    }

    /// Measures replication lag every 50 ms: metrics, and the throttle.
    pub(super) async fn lag_monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            let primary = self.state.get().role == Role::Primary;
            let mut worst = Duration::ZERO;
            for p in 0..self.partitions() {
                let (records, age) = if primary {
                    self.ingest.lag(PartitionId(p))
                } else {
                    (0, Duration::ZERO)
                };
                worst = worst.max(age);
                if n.is_multiple_of(10) {
                    metrics::gauge!("fleet_hub_replication_lag_records", "partition" => p.to_string()).set(records as f64);
                }
            }
            if n.is_multiple_of(10) {
                metrics::gauge!("fleet_hub_replication_lag_seconds").set(worst.as_secs_f64());
                if !self.peers.is_empty() {
                    let link = self.peer_link();
                    let detached = link.state == fleet_api::hub::PeerState::Detached;
                    metrics::gauge!("fleet_hub_peer_detached").set(if detached {
                        1.0
                    } else {
                        0.0
                    });
                    metrics::gauge!("fleet_hub_written_while_detached_records")
                        .set(link.written_since.unwrap_or(0) as f64);
                }
                self.set_role_metrics();
            }
            if let Some(max) = self.max_lag {
                let on = *self.throttle.borrow();
                // Hysteresis: pause above the limit, resume below half of it.
                let next = if on { worst > max / 2 } else { worst > max };
                if next != on {
                    if next {
                        tracing::warn!(
                            lag_ms = worst.as_millis() as u64,
                            "replication lag over the limit: pausing ingest"
                        );
                    } else {
                        tracing::info!("replication caught up: resuming ingest");
                    }
                    self.throttle.send_replace(next);
                }
            }
        }
    }
}
