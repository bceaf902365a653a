//! Role, epoch, fence and detachment of a region whose hubs share one
//! JetStream log (`--hub-id`).
//!
//! The region's value lives in the lease bucket under `s.role` and changes
//! only by compare-and-set; every hub follows it through the bucket's watch
//! and moves its own role with [`Control::transition`] (the same rule as
//! always: the epoch never goes back), so all hubs of a region are primary
//! or secondary together:
//!
//! - a promotion is a compare-and-set from `secondary` at the expected
//!   epoch to `primary` at the next one: of two hubs promoted at once, one
//!   wins;
//! - a hub that learns a higher epoch (or steps down) moves itself first,
//!   the safe direction, then raises the region's value to its own;
//! - a fence for a planned promotion is written into the region's value;
//!   every hub stops accepting, flushes the partitions it writes and answers
//!   under `s.fenced.{hub}`; the fenced hub reports the region's final high
//!   watermarks only when every live hub has answered;
//! - a forced promotion detaches the whole region (in its compare-and-set);
//!   each hub takes the peer back as the pulls of its own partitions catch
//!   up, and the first to do so clears the region's value. Other
//!   detachments (a peer unreachable too long, an operator's) are each
//!   hub's own.
//!
//! A hub that was paused through a fence (not live, so not waited for) may
//! still store a device's publish afterwards: it is acknowledged with a
//! PUBACK only, never as replicated, and the device resends it to the new
//! primary.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_api::{Epoch, Offset, PartitionId, Role};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::role::{Move, allowed};
use super::{Control, ControlError, log_of};
use crate::log::jetstream::Leases;
use crate::state::{Detached, HubState, RoleEpoch};

const ROLE_KEY: &str = "s.role";

fn fence_key(hub: &str) -> String {
    format!("s.fenced.{hub}")
}

/// The region's role as stored in the lease bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RegionRole {
    role: Role,
    epoch: Epoch,
    /// Fenced for the peer's planned promotion to this epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fenced_for: Option<Epoch>,
    /// Which fence (a fresh random id for each): hubs answer with it, so an
    /// answer to an earlier, abandoned fence never counts for this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fence_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detached: Option<Detached>,
}

impl RegionRole {
    fn role_epoch(&self) -> RoleEpoch {
        RoleEpoch {
            role: self.role,
            epoch: self.epoch,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> ControlError {
    ControlError::Unavailable(format!("the region's lease bucket: {e}"))
}

/// The region's value and its revision, read from the bucket.
async fn read(kv: &Leases) -> Result<Option<(RegionRole, u64)>, ControlError> {
    match kv.read_shared(ROLE_KEY).await.map_err(unavailable)? {
        None => Ok(None),
        Some((bytes, rev)) => serde_json::from_slice(&bytes)
            .map(|v| Some((v, rev)))
            .map_err(|e| unavailable(format!("{ROLE_KEY} is not a region role: {e}"))),
    }
}

/// Writes `next` over the value seen at `seen`; `Ok(false)`: it changed.
async fn swap(kv: &Leases, next: &RegionRole, seen: Option<u64>) -> Result<bool, ControlError> {
    let body = Bytes::from(serde_json::to_vec(next).map_err(unavailable)?);
    Ok(kv
        .swap_shared(ROLE_KEY, body, seen)
        .await
        .map_err(unavailable)?
        .is_ok())
}

/// Changes the region's value with `change` (None: leave it) until a
/// compare-and-set goes through.
async fn update(
    kv: &Leases,
    mut change: impl FnMut(Option<&RegionRole>) -> Result<Option<RegionRole>, ControlError>,
) -> Result<(), ControlError> {
    for _ in 0..50 {
        let seen = read(kv).await?;
        let Some(next) = change(seen.as_ref().map(|(v, _)| v))? else {
            return Ok(());
        };
        if swap(kv, &next, seen.map(|(_, rev)| rev)).await? {
            return Ok(());
        }
    }
    Err(ControlError::Unavailable(
        "the region's role keeps changing; try again".into(),
    ))
}

/// Raises the region's role and epoch to this hub's (a hub that learned a
/// higher epoch, or stepped down), keeping a fence or detachment of the
/// same epoch.
async fn raise(kv: &Leases, state: &HubState) -> Result<(), ControlError> {
    update(kv, |seen| {
        let mine = state.get();
        Ok(match seen {
            Some(v) if !allowed(v.role_epoch(), mine) => None,
            Some(v) => Some(RegionRole {
                role: mine.role,
                epoch: mine.epoch,
                fenced_for: None,
                fence_id: None,
                detached: (v.epoch == mine.epoch)
                    .then(|| v.detached.clone())
                    .flatten(),
            }),
            None => Some(RegionRole {
                role: mine.role,
                epoch: mine.epoch,
                fenced_for: None,
                fence_id: None,
                detached: state.detached(),
            }),
        })
    })
    .await
}

impl Control {
    /// Whether this hub shares role and epoch with other hubs of its region.
    pub(super) fn in_region(&self) -> bool {
        self.region.is_some()
    }

    /// At start: takes the region's role and epoch, or gives the region
    /// this hub's when the region has none (or an older epoch).
    ///
    /// # Errors
    /// When the bucket cannot be read or written.
    pub async fn join_region(&self) -> Result<(), ControlError> {
        let Some(kv) = self.region.clone() else {
            return Ok(());
        };
        if let Some((v, _)) = read(&kv).await? {
            let mine = self.state.get();
            if v.epoch >= mine.epoch && v.role_epoch() != mine {
                // The region's word wins over a role flag of a new data
                // directory and over a same-epoch role this hub had alone.
                self.transition(Move::Join(v.role_epoch()), "joining the region's role")?;
            }
        }
        raise(&kv, &self.state).await?;
        if let Some((v, _)) = read(&kv).await? {
            self.adopt(&kv, v).await;
        }
        tracing::info!(role = %self.state.get().role, epoch = %self.state.get().epoch, "joined the region's role");
        Ok(())
    }

    /// Follows the region's value for as long as the hub runs.
    pub(super) async fn follow_region(self: Arc<Self>, kv: Arc<Leases>) {
        let mut changes = kv.shared_changes();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = changes.changed() => {}
                _ = tick.tick() => {}
            }
            let seen = kv
                .seen_shared(ROLE_KEY)
                .and_then(|(b, _)| serde_json::from_slice::<RegionRole>(&b).ok());
            if let Some(v) = seen {
                self.adopt(&kv, v).await;
            }
        }
    }

    /// Moves this hub to the region's value: a higher epoch (or a step
    /// down), then at the same epoch a fence and a detachment.
    async fn adopt(&self, kv: &Leases, v: RegionRole) {
        let mine = self.state.get();
        if v.role_epoch() != mine && allowed(mine, v.role_epoch()) {
            let _ = self.transition(Move::Adopt(v.role_epoch()), "the region's role changed");
        }
        let mine = self.state.get();
        if v.epoch != mine.epoch || mine.role != Role::Primary {
            return;
        }
        let fenced_for = *self.fenced_for.lock().unwrap_or_else(|e| e.into_inner());
        match (v.fenced_for, v.fence_id) {
            (Some(e), Some(id)) => {
                let new = self
                    .fence_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(id)
                    != Some(id);
                if new {
                    self.fence_here(Some(e)).await;
                    let body = Bytes::from(id.to_string());
                    if let Err(err) = kv.put_shared(&fence_key(kv.me()), body).await {
                        tracing::warn!(error = %err, "cannot tell the region this hub is fenced");
                    }
                }
            }
            (None, _) if fenced_for.is_some() && self.state.fenced() => {
                let _ = self.unfence_here(None);
            }
            _ => {}
        }
        if let Some(d) = v.detached {
            let new = {
                let mut seen = self
                    .region_detached_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let new = *seen != Some(d.since_ms);
                *seen = Some(d.since_ms);
                new
            };
            if new
                && self.state.detached().is_none()
                && let Err(e) =
                    self.detach_here(d.manual, "another hub of the region detached the peer")
            {
                tracing::warn!(error = %e, "cannot follow the region's detachment");
            }
        }
    }

    /// After a move to secondary (learned or stepped down) on this hub:
    /// the region follows, in the background.
    pub(super) fn raise_region(&self) {
        if let Some(kv) = self.region.clone() {
            let state = self.state.clone();
            tokio::spawn(async move {
                // Until it lands (a bucket briefly unreachable): the other
                // hubs learn a step-down from nowhere else.
                for attempt in 0..150u32 {
                    match raise(&kv, &state).await {
                        Ok(()) => return,
                        Err(e) if attempt % 25 == 0 => {
                            tracing::warn!(error = %e, "cannot move the region's role to this hub's yet; retrying");
                        }
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tracing::error!("gave up moving the region's role to this hub's");
            });
        }
    }

    /// A promotion's compare-and-set on the region: `secondary` at
    /// `expected` becomes `primary` at `next` (with `detached` for a forced
    /// one). Without a region, nothing to do.
    pub(super) async fn lead_region(
        &self,
        next: Epoch,
        expected: Epoch,
        detached: Option<Detached>,
    ) -> Result<(), ControlError> {
        let Some(kv) = self.region.clone() else {
            return Ok(());
        };
        update(&kv, |seen| match seen {
            Some(v) if v.epoch != expected => Err(ControlError::EpochMismatch {
                current: v.epoch,
                expected,
            }),
            Some(v) if v.role == Role::Primary => Err(ControlError::Conflict(format!(
                "the region is already primary at epoch {}",
                v.epoch
            ))),
            _ => Ok(Some(RegionRole {
                role: Role::Primary,
                epoch: next,
                fenced_for: None,
                fence_id: None,
                detached: detached.clone(),
            })),
        })
        .await
    }

    /// Writes this hub's detachment (or attachment, `None`) into the
    /// region's value of the same epoch, in the background.
    pub(super) fn publish_detached(&self, detached: Option<Detached>) {
        let Some(kv) = self.region.clone() else {
            return;
        };
        if let Some(d) = &detached {
            *self
                .region_detached_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(d.since_ms);
        }
        let state = self.state.clone();
        tokio::spawn(async move {
            let done = update(&kv, |seen| {
                let mine = state.get();
                Ok(match seen {
                    Some(v)
                        if v.epoch == mine.epoch
                            && v.role == Role::Primary
                            && v.detached.is_some() != detached.is_some() =>
                    {
                        Some(RegionRole {
                            detached: detached.clone(),
                            ..v.clone()
                        })
                    }
                    _ => None,
                })
            })
            .await;
            if let Err(e) = done {
                tracing::warn!(error = %e, "cannot write the region's detachment");
            }
        });
    }

    /// A fence for the peer's planned promotion to `epoch`, for the whole
    /// region: written into the region's value, then waited for until every
    /// live hub has flushed and answered. Returns the final high watermarks.
    pub(super) async fn fence_region(&self, epoch: Epoch) -> Result<Vec<Offset>, ControlError> {
        let Some(kv) = self.region.clone() else {
            return Err(ControlError::Unavailable("no region".into()));
        };
        let mine = self.state.get();
        // A fresh fence every time (a retry too): every hub stops and
        // answers again.
        let id = rand::random::<u64>();
        *self.fence_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
        update(&kv, |seen| match seen {
            Some(v) if v.epoch != mine.epoch || v.role != Role::Primary => {
                Err(ControlError::NotPrimary)
            }
            Some(v) => Ok(Some(RegionRole {
                fenced_for: Some(epoch),
                fence_id: Some(id),
                ..v.clone()
            })),
            None => Err(ControlError::NotPrimary),
        })
        .await?;
        // This hub fences itself at once; the others through the watch.
        self.fence_here(Some(epoch)).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let live = kv.placement(self.lease_ttl).live;
            let mut missing = Vec::new();
            for hub in live.iter().filter(|h| h.as_str() != kv.me()) {
                let answered = kv
                    .read_shared(&fence_key(hub))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|(b, _)| std::str::from_utf8(&b).ok()?.parse::<u64>().ok());
                if answered != Some(id) {
                    missing.push(hub.clone());
                }
            }
            if missing.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.unfence_region(Some(epoch)).await;
                return Err(ControlError::Unavailable(format!(
                    "hubs {} of this region did not confirm the fence; unfenced",
                    missing.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = log_of(&self.ingest).clone();
        let mut high_watermarks = Vec::new();
        for p in 0..self.partitions() {
            let p = PartitionId(p);
            if self.ingest.owns(p) {
                high_watermarks.push(self.ingest.barrier(p).await?);
            } else {
                // Written (and flushed) by another hub: read its end now.
                self.ingest.refresh(p).await;
                high_watermarks.push(log.high_watermark(p));
            }
        }
        Ok(high_watermarks)
    }

    /// Lifts the region's fence (for `only_for`, when given).
    pub(super) async fn unfence_region(&self, only_for: Option<Epoch>) -> Result<(), ControlError> {
        let Some(kv) = self.region.clone() else {
            return Ok(());
        };
        // The region's fence goes even when this hub's own was lifted
        // already (or never set).
        let here = self.unfence_here(only_for);
        unfence_in(&kv, only_for).await?;
        here
    }
}

/// Lifts the region's fence in the bucket (for `only_for`, when given).
pub(super) async fn unfence_in(kv: &Leases, only_for: Option<Epoch>) -> Result<(), ControlError> {
    update(kv, |seen| match seen {
        Some(v) if v.fenced_for.is_some() && only_for.is_none_or(|e| v.fenced_for == Some(e)) => {
            Ok(Some(RegionRole {
                fenced_for: None,
                fence_id: None,
                ..v.clone()
            }))
        }
        _ => Ok(None),
    })
    .await
}
