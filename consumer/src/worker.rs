//! The worker of one partition: fetch from the primary, verify the
//! checkpoint, deliver, commit the checkpoint after success.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::client::ClientError;
use fleet_api::hub::WireRecord;
use fleet_api::{Epoch, ErrorCode, PartitionId};
use tokio_util::sync::CancellationToken;

use crate::breaker::Gate;
use crate::store::Checkpoint;
use crate::verify::Verify;
use crate::{Ctx, Outcome};

impl Ctx {
    /// Processes partition `p` from its checkpoint until stopped or the
    /// lease is lost.
    pub(crate) async fn work(self: Arc<Self>, p: PartitionId, stop: CancellationToken) {
        let me = format!("{}/{}", self.instance, p.0);
        let group = self.group();
        let partition_label = p.0.to_string();
        let mut cp = loop {
            match self.store.checkpoint(p).await {
                Ok(Some(cp)) => break cp,
                Ok(None) => {
                    tracing::warn!("no checkpoint row for this partition; stopping");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read checkpoint");
                    if !self.sleep_or(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        };
        // The hub whose log the checkpoint was checked against, and that
        // hub's epoch then (a change of either means: check again).
        let mut verified: Option<(usize, Option<Epoch>)> = None;
        let mut pending: Vec<WireRecord> = Vec::new();
        let mut unavailable = 0u32;
        let mut read_errors = 0u32;
        while !stop.is_cancelled() {
            let probing = match self.gate(&me).await {
                Gate::Proceed => false,
                Gate::Probe => true,
                Gate::Wait(d) => {
                    self.sleep_or(d, &stop).await;
                    continue;
                }
            };
            let Some(primary) = self.hubs.primary.borrow().clone() else {
                self.sleep_or(Duration::from_millis(200), &stop).await;
                continue;
            };
            let client = &self.hubs.clients[primary.idx];
            if verified.map(|v| v.0) != Some(primary.idx) {
                // Records in hand came from another log: fetch them again.
                pending.clear();
                match self.verify(client, p, cp).await {
                    Verify::Same(epoch) => verified = Some((primary.idx, epoch)),
                    Verify::Rewound(rewound, epoch) => {
                        cp = rewound;
                        verified = Some((primary.idx, epoch));
                    }
                    Verify::Unknown => {
                        // Processing on an unverified checkpoint could skip
                        // records; look again shortly.
                        self.sleep_or(Duration::from_millis(200), &stop).await;
                        continue;
                    }
                    Verify::Stop => return,
                }
            }
            if pending.is_empty() {
                let wait = if probing {
                    Duration::ZERO
                } else {
                    Duration::from_secs(1)
                };
                let fetched = tokio::select! {
                    () = stop.cancelled() => return,
                    r = client.records_upto(p, cp.next, self.config.batch, wait, self.config.upto) => r,
                };
                match fetched {
                    Ok(resp) => {
                        read_errors = 0;
                        let seen = verified.and_then(|v| v.1);
                        match (seen, resp.epoch) {
                            (Some(seen), Some(now)) if now != seen => {
                                // The hub changed epoch (promoted, or stepped
                                // down and reconciled): its log may differ.
                                tracing::info!(from = %seen, to = %now, "the hub's epoch changed; checking the checkpoint again");
                                verified = None;
                                self.hubs.nudge.notify_one();
                                continue;
                            }
                            (None, Some(now)) => {
                                if let Some(v) = verified.as_mut() {
                                    v.1 = Some(now);
                                }
                            }
                            _ => {}
                        }
                        metrics::gauge!("fleet_consumer_lag_records", "group" => group.clone(), "partition" => partition_label.clone())
                            .set(resp.high_watermark.0.saturating_sub(cp.next.0) as f64);
                        pending = resp.records;
                    }
                    Err(ClientError::Api {
                        code: Some(ErrorCode::OffsetGone),
                        message,
                        ..
                    }) => {
                        match self.skip_to_log_start(client, p, cp, &message).await {
                            Some(next) => cp = next,
                            None => {
                                self.sleep_or(Duration::from_secs(1), &stop).await;
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        read_errors += 1;
                        tracing::warn!(error = %e, "cannot read the log; looking for the primary again");
                        self.hubs.nudge.notify_one();
                        let d = (self.config.jitter)(self.config.retry.ceiling(read_errors));
                        self.sleep_or(d.max(Duration::from_millis(50)), &stop).await;
                        continue;
                    }
                }
            }
            if probing {
                if let Err(e) = self.handler.check().await {
                    tracing::warn!(error = %e, "probe: downstream still unavailable");
                    self.failure(&e).await;
                    continue;
                }
                if pending.is_empty() {
                    self.probe_succeeded(&me).await;
                    continue;
                }
            }
            if pending.is_empty() || (!probing && !self.breaker_closed()) {
                // Nothing to do, or the breaker opened during the fetch: the
                // batch waits in hand.
                continue;
            }
            let outcome = self.process(&pending, probing, &me, &stop).await;
            let done = match outcome {
                Outcome::Done => {
                    unavailable = 0;
                    pending.len()
                }
                Outcome::Stalled { done } => done,
            };
            if done > 0 {
                let last = &pending[done - 1];
                let next = Checkpoint {
                    next: last.offset.next(),
                    last_epoch: last.epoch,
                };
                match self.commit(p, next, &stop).await {
                    Ok(()) => {
                        cp = next;
                        pending.drain(..done);
                        metrics::gauge!("fleet_consumer_checkpoint", "group" => group.clone(), "partition" => partition_label.clone())
                            .set(cp.next.0 as f64);
                    }
                    Err(Stop) => return,
                }
            }
            if let Outcome::Stalled { .. } = outcome {
                unavailable += 1;
                let d = (self.config.jitter)(self.config.retry.ceiling(unavailable));
                self.sleep_or(d, &stop).await;
            }
        }
    }

    /// Writes the checkpoint, retrying store errors; `Err(Stop)` when the
    /// lease is gone or the worker is stopped.
    pub(crate) async fn commit(
        &self,
        p: PartitionId,
        to: Checkpoint,
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        loop {
            match self.store.commit(p, to, &self.instance).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::warn!("lease lost before the checkpoint; another instance redelivers");
                    return Err(Stop);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write checkpoint; retrying");
                    if !self.sleep_or(Duration::from_millis(500), stop).await {
                        return Err(Stop);
                    }
                }
            }
        }
    }
}

/// The worker must stop (lease lost or shutdown).
pub(crate) struct Stop;
