//! The peer link: whether the other region counts for acknowledgements.
//!
//! A region that loses its peer for good (a forced promotion, an operator's
//! `POST /v1/peer/detach`, or a peer unreachable for longer than
//! `--peer-detach-after-s`) *detaches* it and runs alone: `replicated`
//! means durable here (acks say `"detached":true`), sync mode acknowledges
//! locally, nothing is throttled, and nothing is queued for the peer, so
//! memory stays bounded however long it lasts. The detachment is persisted
//! with role and epoch.
//!
//! The peer comes back by catching up: once its pulls of a partition reach
//! everything this hub holds there, that partition counts on it again; when
//! all do, the peer is attached. A peer detached by an operator is taken
//! back only after `POST /v1/peer/attach`.

use fleet_api::hub::{PeerLink, PeerState};
use fleet_api::{Offset, PartitionId, Role, UnixMillis};

use super::{Control, ControlError, log_of};
use crate::sessions::Outbound;
use crate::state::Detached;

impl Control {
    /// Detaches the peer (idempotent; an operator's detach makes an
    /// automatic one manual).
    ///
    /// # Errors
    /// Without a peer, or when the state cannot be persisted.
    pub fn detach(&self, manual: bool, why: &str) -> Result<PeerLink, ControlError> {
        // In a region of several hubs, each hub detaches on its own view of
        // the peer (its own pulls): one hub's lost route must not make the
        // others acknowledge alone while their pulls still flow. Only a
        // forced promotion detaches the whole region (in its compare-and-set).
        self.detach_here(manual, why)
    }

    /// A detachment as of now.
    pub(super) fn detachment(&self, manual: bool) -> Detached {
        let log = log_of(&self.ingest);
        Detached {
            since_ms: UnixMillis::now().0,
            manual,
            high_watermarks: (0..log.partitions())
                .map(|p| log.high_watermark(PartitionId(p)).0)
                .collect(),
        }
    }

    /// Detaches the peer on this hub (see [`Control::detach`]).
    pub(super) fn detach_here(&self, manual: bool, why: &str) -> Result<PeerLink, ControlError> {
        if self.peers.is_empty() {
            return Err(ControlError::Conflict("this hub has no peer".into()));
        }
        {
            let _one = self.role_change.lock().unwrap_or_else(|e| e.into_inner());
            if self.state.get().role != Role::Primary {
                return Err(ControlError::Conflict(
                    "only the primary detaches its peer (a secondary acknowledges nothing)".into(),
                ));
            }
            let next = match self.state.detached() {
                Some(d) if d.manual || !manual => None,
                Some(d) => Some(Detached { manual: true, ..d }),
                None => Some(self.detachment(manual)),
            };
            if let Some(next) = next {
                self.state.set_detached(Some(next)).map_err(|e| {
                    ControlError::Unavailable(format!("cannot persist the detachment: {e}"))
                })?;
                tracing::warn!(
                    why,
                    manual,
                    "peer detached: this region runs alone, without a second copy"
                );
                metrics::counter!("fleet_hub_peer_detaches_total", "manual" => manual.to_string())
                    .increment(1);
            }
            // Under the same lock as the persisted state, so that a change
            // of role (which re-attaches) cannot fall in between. Sync
            // waiters are released and queued records count as durable
            // here; tell their devices.
            for (device, mid) in self.ingest.detach() {
                self.sessions.send(&device, Outbound::Replicated(mid));
            }
        }
        Ok(self.peer_link())
    }

    /// `POST /v1/peer/attach`: lets the peer back in; partitions count on it
    /// again as its pulls catch up with them.
    ///
    /// # Errors
    /// Without a peer, or when the state cannot be persisted.
    pub fn attach(&self) -> Result<PeerLink, ControlError> {
        if self.peers.is_empty() {
            return Err(ControlError::Conflict("this hub has no peer".into()));
        }
        {
            let _one = self.role_change.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(d) = self.state.detached().filter(|d| d.manual) {
                self.state
                    .set_detached(Some(Detached { manual: false, ..d }))
                    .map_err(|e| {
                        ControlError::Unavailable(format!("cannot persist the attachment: {e}"))
                    })?;
                tracing::info!("peer may attach again once it has caught up");
            }
        }
        self.attach_if_caught_up();
        Ok(self.peer_link())
    }

    /// A pull of the detached peer reached `from` in `p`: the partition
    /// counts on the peer again when that is everything it holds.
    pub(super) fn caught_up(&self, p: PartitionId, from: Offset) {
        let Some(d) = self.state.detached() else {
            // In a region of several hubs, a partition taken over while
            // this hub was detached may still be unlinked after the hub
            // attached: it counts on the peer again the same way.
            if self.in_region() && !self.ingest.linked(p) {
                let _ = self.ingest.relink(p, from);
            }
            return;
        };
        if d.manual || self.state.get().role != Role::Primary {
            return;
        }
        if self.ingest.relink(p, from) {
            self.attach_if_caught_up();
        }
    }

    /// Attaches the peer when every partition counts on it again.
    fn attach_if_caught_up(&self) {
        let partitions = self.partitions();
        let _one = self.role_change.lock().unwrap_or_else(|e| e.into_inner());
        let Some(d) = self.state.detached() else {
            return;
        };
        // In a region of several hubs, each hub takes the peer back for
        // the partitions it writes (the others' pulls reach their hubs).
        let counts = |p: PartitionId| !self.in_region() || self.ingest.owns(p);
        if d.manual
            || (0..partitions)
                .map(PartitionId)
                .any(|p| counts(p) && !self.ingest.linked(p))
        {
            return;
        }
        match self.state.set_detached(None) {
            Ok(()) => {
                self.clear_region_detached();
                let detached_for_s = UnixMillis::now().0.saturating_sub(d.since_ms) / 1000;
                tracing::info!(
                    detached_for_s,
                    "peer attached again: it holds every record, acknowledgements wait for both regions"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot persist the attachment; still detached"),
        }
    }

    /// Whether this hub has a peer region.
    pub fn has_peer(&self) -> bool {
        !self.peers.is_empty()
    }

    /// `peer` of `GET /v1/status`.
    pub fn peer_link(&self) -> PeerLink {
        let log = log_of(&self.ingest);
        match self.state.detached() {
            Some(d) => PeerLink {
                state: PeerState::Detached,
                since_ms: Some(d.since_ms),
                written_since: Some(
                    (0..log.partitions())
                        .map(|p| {
                            let hw = log.high_watermark(PartitionId(p)).0;
                            hw.saturating_sub(
                                d.high_watermarks.get(p as usize).copied().unwrap_or(hw),
                            )
                        })
                        .sum(),
                ),
                manual: d.manual,
                partitions_caught_up: (0..log.partitions())
                    .filter(|p| self.ingest.linked(PartitionId(*p)))
                    .count() as u32,
            },
            None => {
                let view = self.view();
                PeerLink {
                    state: if view.reachable || view.unreachable_since_ms.is_none() {
                        PeerState::Attached
                    } else {
                        PeerState::Unreachable
                    },
                    since_ms: view.unreachable_since_ms.filter(|_| !view.reachable),
                    written_since: None,
                    manual: false,
                    partitions_caught_up: log.partitions(),
                }
            }
        }
    }
}
