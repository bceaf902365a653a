//! Checkpoint verification against the log being read: rewinding past
//! records a forced failover replaced, skipping what retention removed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_api::client::{ClientError, HubClient};
use fleet_api::hub::ReadUpto;
use fleet_api::{Epoch, ErrorCode, Offset, PartitionId};

use crate::Ctx;
use crate::store::Checkpoint;

impl Ctx {
    /// Checks that the record before the checkpoint is the one this primary
    /// holds there; after a forced failover the new primary may have written
    /// other records at those offsets, and the checkpoint is rewound to where
    /// both logs agree.
    pub(crate) async fn verify(
        &self,
        client: &HubClient,
        p: PartitionId,
        cp: Checkpoint,
    ) -> Verify {
        if cp.next == Offset::ZERO {
            return Verify::Same(None);
        }
        let before = Offset(cp.next.0 - 1);
        let mut hub_epoch = None;
        // Committed, not only replicated: the record before the checkpoint
        // was handled already; it need not be replicated yet to compare.
        let read = client
            .records_upto(p, before, 1, Duration::ZERO, ReadUpto::Committed)
            .await;
        let same = match read {
            Ok(resp) => {
                hub_epoch = resp.epoch;
                match resp.records.first() {
                    Some(r) if r.offset == before => r.epoch == cp.last_epoch,
                    _ => false,
                }
            }
            // Retention passed it: nothing to compare, nothing to re-read.
            Err(ClientError::Api {
                code: Some(ErrorCode::OffsetGone),
                ..
            }) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot verify the checkpoint yet");
                return Verify::Unknown;
            }
        };
        if same {
            return Verify::Same(hub_epoch);
        }
        // Found on the primary's whole epoch history, not on where the
        // checkpoint's epoch ends alone (KIP-279: the checkpoint's epoch may
        // be one the primary never wrote, after records of an older epoch
        // that it holds further).
        let to = match client.epochs(p).await {
            Ok(history) => history.agreed_until(cp.last_epoch, cp.next),
            Err(e) => {
                tracing::warn!(error = %e, "cannot find where the logs agree yet");
                return Verify::Unknown;
            }
        };
        let last_epoch = if to == Offset::ZERO {
            Epoch(0)
        } else {
            match client
                .records_upto(p, Offset(to.0 - 1), 1, Duration::ZERO, ReadUpto::Committed)
                .await
            {
                Ok(resp) => resp.records.first().map_or(Epoch(0), |r| r.epoch),
                Err(_) => Epoch(0),
            }
        };
        let rewound = Checkpoint {
            next: to,
            last_epoch,
        };
        match self.store.rewind(p, rewound, &self.instance).await {
            Ok(true) => {
                tracing::warn!(from = %cp.next, to = %to, "records past the checkpoint were replaced by a failover; re-reading from where the regions agree");
                self.counters.rewinds.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleet_consumer_rewinds_total", "group" => self.group())
                    .increment(1);
                Verify::Rewound(rewound, hub_epoch)
            }
            Ok(false) => Verify::Stop,
            Err(e) => {
                tracing::warn!(error = %e, "cannot rewind the checkpoint");
                Verify::Unknown
            }
        }
    }

    /// Retention removed records the group had not read: they cannot be
    /// delivered; say so loudly and continue from the oldest retained.
    pub(crate) async fn skip_to_log_start(
        &self,
        client: &HubClient,
        p: PartitionId,
        cp: Checkpoint,
        message: &str,
    ) -> Option<Checkpoint> {
        let status = client.status().await.ok()?;
        let start = status.partitions.get(p.0 as usize)?.log_start;
        if start <= cp.next {
            return None;
        }
        tracing::error!(from = %cp.next, to = %start, hub = %message, "records expired by retention before this group read them; skipping to the oldest retained");
        metrics::counter!("fleet_consumer_expired_records_total", "group" => self.group())
            .increment(start.0 - cp.next.0);
        let next = Checkpoint {
            next: start,
            last_epoch: Epoch(0),
        };
        match self.store.commit(p, next, &self.instance).await {
            Ok(true) => Some(next),
            _ => None,
        }
    }
}

/// Whether a checkpoint holds on the hub being read.
pub(crate) enum Verify {
    /// With the hub's epoch when known.
    Same(Option<Epoch>),
    Rewound(Checkpoint, Option<Epoch>),
    /// Could not tell (the hub did not answer): do not process yet.
    Unknown,
    Stop,
}
