//! Promotion of this hub (planned or forced), and the fencing a primary
//! does for the planned promotion of its peer.
//!
//! Promotions are serialized by `Control::promotion`; the role change itself
//! is `Control::transition`, which refuses an epoch that is not higher than
//! the current one (another promotion, or a learned epoch, got there first).

use std::time::Duration;

use fleet_api::concierge::{FailoverResponse, Mode, PromoteRequest, UnreplicatedRange};
use fleet_api::hub::{EpochBody, FenceResponse};
use fleet_api::{Epoch, PartitionId, Role};
use tokio::time::Instant;

use super::role::{Move, Moved};
use super::{Control, ControlError, log_of};
use crate::sessions::Kick;

impl Control {
    /// `POST /v1/fence`: stop accepting writes, flush, report the final high
    /// watermarks (the first step of a planned promotion of the peer).
    ///
    /// # Errors
    /// When this hub is not the primary, or a partition cannot be flushed.
    pub async fn fence(&self, body: EpochBody) -> Result<FenceResponse, ControlError> {
        let now = self.state.get();
        if now.role != Role::Primary {
            return Err(ControlError::NotPrimary);
        }
        if body.epoch.is_some_and(|e| e <= now.epoch) {
            return Err(ControlError::EpochMismatch {
                current: now.epoch,
                expected: body.epoch.unwrap_or(now.epoch),
            });
        }
        if let Some(d) = self.state.detached() {
            let caught_up = (0..self.partitions())
                .filter(|p| self.ingest.linked(PartitionId(*p)))
                .count();
            return Err(ControlError::Conflict(format!(
                "the peer is detached (it has caught up with {caught_up} of {} partitions{}); a planned promotion waits until it holds every record",
                self.partitions(),
                if d.manual {
                    ", and an operator must attach it"
                } else {
                    ""
                }
            )));
        }
        if self.in_region() {
            // Every hub of the region stops, not only this one; an
            // operator's fence is one for the next epoch.
            let epoch = match body.epoch {
                Some(e) => e,
                None => Epoch(now.epoch.0.checked_add(1).ok_or_else(|| {
                    ControlError::Conflict("the epoch cannot grow any further".into())
                })?),
            };
            let high_watermarks = self.fence_region(epoch).await?;
            return Ok(FenceResponse { high_watermarks });
        }
        self.fence_here(body.epoch).await;
        let mut high_watermarks = Vec::new();
        for p in 0..self.partitions() {
            high_watermarks.push(self.ingest.barrier(PartitionId(p)).await?);
        }
        Ok(FenceResponse { high_watermarks })
    }

    /// Stops this hub's writes for the peer's promotion to `epoch` (`None`:
    /// an operator's fence) and closes its device connections; in a region
    /// of several hubs, also flushes the partitions this hub writes.
    pub(super) async fn fence_here(&self, epoch: Option<Epoch>) {
        *self.fenced_for.lock().unwrap_or_else(|e| e.into_inner()) = epoch;
        self.fence_planned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.set_fenced(true);
        self.sessions
            .kick_all(epoch.map_or(Kick::Demoted, Kick::Moving));
        tracing::warn!(for_epoch = ?epoch.map(|e| e.0), "fenced: no more writes while the peer takes over");
        if self.in_region() {
            for p in self.ingest.owned_partitions().unwrap_or_default() {
                if let Err(e) = self.ingest.barrier(p).await {
                    tracing::warn!(partition = %p, error = %e, "cannot flush a fenced partition");
                }
            }
        }
    }

    /// `POST /v1/unfence`: a planned promotion was abandoned. `only_for`:
    /// the peer's call, which may only take back a fence for that epoch.
    ///
    /// # Errors
    /// When `only_for` is not the epoch this hub was fenced for.
    pub fn unfence(&self, only_for: Option<Epoch>) -> Result<(), ControlError> {
        // The region's fence goes even when this hub's own was lifted
        // already (or never set on this hub).
        let here = self.unfence_here(only_for);
        if let Some(kv) = self.region.clone() {
            tokio::spawn(async move {
                if let Err(e) = super::fence::unfence_in(&kv, only_for, None).await {
                    tracing::warn!(error = %e, "cannot lift the region's fence");
                }
            });
        }
        here
    }

    /// Lifts this hub's own fence (see [`Control::unfence`]).
    pub(super) fn unfence_here(&self, only_for: Option<Epoch>) -> Result<(), ControlError> {
        if let Some(e) = only_for {
            let fenced_for = *self.fenced_for.lock().unwrap_or_else(|e| e.into_inner());
            if !self.state.fenced() || fenced_for != Some(e) {
                return Err(ControlError::Conflict(format!(
                    "not fenced for epoch {e}; only an operator unfences otherwise"
                )));
            }
        }
        self.fence_planned
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *self.fenced_for.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if self.state.fenced() {
            tracing::warn!("unfenced: accepting writes again");
            self.state.set_fenced(false);
        }
        Ok(())
    }

    /// `POST /v1/promote`.
    ///
    /// # Errors
    /// An epoch mismatch (another promotion won), an unreachable primary for
    /// a planned promotion, or a hub that is already primary.
    pub async fn promote(&self, req: PromoteRequest) -> Result<FailoverResponse, ControlError> {
        let _one_at_a_time = self.promotion.lock().await;
        let started = Instant::now();
        let now = self.state.get();
        // Compare-and-set on the exact epoch: an expectation ahead of this
        // hub is as stale as one behind it.
        if req.expected_epoch != now.epoch {
            return Err(ControlError::EpochMismatch {
                current: now.epoch,
                expected: req.expected_epoch,
            });
        }
        if now.role == Role::Primary {
            return Err(ControlError::Conflict(format!(
                "this hub is already the primary at epoch {}",
                now.epoch
            )));
        }
        let next =
            Epoch(req.expected_epoch.0.checked_add(1).ok_or_else(|| {
                ControlError::Conflict("the epoch cannot grow any further".into())
            })?);
        let mut unreplicated = Vec::new();
        match req.mode {
            Mode::Planned => {
                if self.peers.is_empty() {
                    return Err(ControlError::Unavailable(
                        "no peer to take over from".into(),
                    ));
                }
                // Any hub of the primary region fences all of it.
                let mut fenced = None;
                let mut failures = Vec::new();
                for peer in &self.peers {
                    match self
                        .call::<FenceResponse>(
                            &format!("{peer}/v1/fence"),
                            &EpochBody { epoch: Some(next) },
                            Duration::from_secs(30),
                        )
                        .await
                    {
                        Ok(f) => {
                            fenced = Some((peer.clone(), f));
                            break;
                        }
                        Err(e) => failures.push(format!("{peer}: {e}")),
                    }
                }
                let Some((peer, fenced)) = fenced else {
                    // A fence may have landed unanswered (a timeout).
                    self.unfence_peers(next).await;
                    return Err(ControlError::Unavailable(format!(
                        "planned promotion needs the primary, which did not fence: {}; use forced",
                        failures.join("; ")
                    )));
                };
                // Catch up to exactly what the primary holds, then take
                // over; anything failing lifts the fence again.
                if let Err(e) = self.catch_up_to(&peer, &fenced).await {
                    self.unfence_peers(next).await;
                    return Err(e);
                }
                // The region's compare-and-set: refused, nothing was written
                // and the primary goes on; unclear (the bucket did not
                // answer), it stays fenced (this region may lead already).
                match self.lead_region(next, req.expected_epoch, None).await {
                    Ok(()) => {}
                    Err(e @ (ControlError::EpochMismatch { .. } | ControlError::Conflict(_))) => {
                        self.unfence_peers(next).await;
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
                // A failed switch here leaves the primary fenced, as before.
                self.switch_to_primary(next, req.expected_epoch)?;
                if let Err(e) = self
                    .call::<serde_json::Value>(
                        &format!("{peer}/v1/demote"),
                        &EpochBody { epoch: Some(next) },
                        Duration::from_secs(5),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "the old primary did not confirm its demotion; it will learn the epoch");
                }
            }
            Mode::Forced => {
                let view = self.view().clone();
                let log = log_of(&self.ingest);
                for (p, theirs) in view.high_watermarks.iter().enumerate() {
                    let mine = log.high_watermark(PartitionId(p as u32));
                    if *theirs > mine {
                        unreplicated.push(UnreplicatedRange {
                            partition: PartitionId(p as u32),
                            from: mine,
                            to: *theirs,
                        });
                    }
                }
                // The lost primary does not count until it returns and
                // catches up: acknowledgements must not wait for it (in a
                // region of several hubs, for any of them).
                let detached = (!self.peers.is_empty()).then(|| self.detachment(false));
                self.become_primary(next, req.expected_epoch, detached)
                    .await?;
                if !self.peers.is_empty() {
                    if let Err(e) = self.detach(false, "forced promotion: the old primary is lost")
                    {
                        tracing::warn!(error = %e, "cannot detach the lost primary");
                    }
                    for peer in self.peers.clone() {
                        tokio::spawn(self.tell_peer_to_demote(peer, next));
                    }
                }
            }
        }
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::warn!(epoch = %next, mode = req.mode.as_str(), took_ms, "promoted to primary");
        metrics::counter!("fleet_hub_promotions_total", "mode" => req.mode.as_str()).increment(1);
        Ok(FailoverResponse {
            region: self.state.region().clone(),
            epoch: next,
            mode: req.mode,
            took_ms,
            unreplicated,
            checks: Vec::new(),
        })
    }

    /// Moves to primary at `epoch`, unless a higher or equal epoch arrived
    /// while the promotion ran.
    async fn become_primary(
        &self,
        epoch: Epoch,
        expected: Epoch,
        detached: Option<crate::state::Detached>,
    ) -> Result<(), ControlError> {
        // The region first (one winner among its hubs), then this hub; the
        // others follow the region's value.
        self.lead_region(epoch, expected, detached).await?;
        self.switch_to_primary(epoch, expected)
    }

    /// This hub's own move to primary at `epoch` (after the region's).
    fn switch_to_primary(&self, epoch: Epoch, expected: Epoch) -> Result<(), ControlError> {
        // What the old primary sent was acknowledged by this hub's pulls;
        // from now on the old primary is the one pulling.
        match self.transition(Move::Lead(epoch), "promoted")? {
            Moved::Done => Ok(()),
            // This hub already followed the region's value it just wrote.
            Moved::Refused { current }
                if self.in_region()
                    && current
                        == (crate::state::RoleEpoch {
                            role: fleet_api::Role::Primary,
                            epoch,
                        }) =>
            {
                Ok(())
            }
            Moved::Refused { current } => Err(ControlError::EpochMismatch {
                current: current.epoch,
                expected,
            }),
        }
    }
}
