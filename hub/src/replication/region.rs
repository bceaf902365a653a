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
//! - a fence for a planned promotion is written into the region's value
//!   and answered by every hub (see `fence`);
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
use fleet_api::{Epoch, Role};
use serde::{Deserialize, Serialize};

use super::role::{Move, allowed};
use super::{Control, ControlError};
use crate::log::jetstream::Leases;
use crate::state::{Detached, HubState, RoleEpoch};

const ROLE_KEY: &str = "s.role";

pub(super) fn fence_key(hub: &str) -> String {
    format!("s.fenced.{hub}")
}

/// The region's role as stored in the lease bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RegionRole {
    pub(super) role: Role,
    pub(super) epoch: Epoch,
    /// Fenced for the peer's planned promotion to this epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fenced_for: Option<Epoch>,
    /// Which fence (a fresh random id for each): hubs answer with it, so an
    /// answer to an earlier, abandoned fence never counts for this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fence_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) detached: Option<Detached>,
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
pub(super) async fn read(kv: &Leases) -> Result<Option<(RegionRole, u64)>, ControlError> {
    match kv.read_shared(ROLE_KEY).await.map_err(unavailable)? {
        None => Ok(None),
        Some((bytes, rev)) => serde_json::from_slice(&bytes)
            .map(|v| Some((v, rev)))
            .map_err(|e| unavailable(format!("{ROLE_KEY} is not a region role: {e}"))),
    }
}

/// Writes `next` over the value seen at `seen`; `Ok(None)`: it changed,
/// else the revision written.
async fn swap(
    kv: &Leases,
    next: &RegionRole,
    seen: Option<u64>,
) -> Result<Option<u64>, ControlError> {
    let body = Bytes::from(serde_json::to_vec(next).map_err(unavailable)?);
    Ok(kv
        .swap_shared(ROLE_KEY, body, seen)
        .await
        .map_err(unavailable)?
        .ok())
}

/// Changes the region's value with `change` (None: leave it) until a
/// compare-and-set goes through; the revision written, if any.
pub(super) async fn update(
    kv: &Leases,
    mut change: impl FnMut(Option<&RegionRole>) -> Result<Option<RegionRole>, ControlError>,
) -> Result<Option<u64>, ControlError> {
    for _ in 0..50 {
        let seen = read(kv).await?;
        let Some(next) = change(seen.as_ref().map(|(v, _)| v))? else {
            return Ok(None);
        };
        if let Some(rev) = swap(kv, &next, seen.map(|(_, rev)| rev)).await? {
            return Ok(Some(rev));
        }
    }
    Err(ControlError::Unavailable(
        "the region's role keeps changing; try again".into(),
    ))
}

/// Retries `raise` (or another write of the region's value) until it lands.
async fn until_written<F, Fut>(what: &str, mut write: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ControlError>>,
{
    for attempt in 0..150u32 {
        match write().await {
            Ok(()) => return,
            Err(e) if attempt % 25 == 0 => {
                tracing::warn!(error = %e, what, "cannot write the region's value yet; retrying");
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::error!(what, "gave up writing the region's value");
}

/// Raises the region's role and epoch to this hub's (a hub that learned a
/// higher epoch, or stepped down), keeping a fence or detachment of the
/// same epoch.
async fn raise(kv: &Leases, state: &HubState, step_down: bool) -> Result<(), ControlError> {
    let _ = update(kv, |seen| {
        let mine = state.get();
        Ok(match seen {
            // A higher epoch moves the region; the same epoch only by an
            // operator's step-down (a hub that merely learned the epoch
            // must not demote a region that leads it).
            Some(v) if v.epoch > mine.epoch => None,
            Some(v) if v.epoch == mine.epoch && !(step_down && allowed(v.role_epoch(), mine)) => {
                None
            }
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
    .await?;
    Ok(())
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
        raise(&kv, &self.state, false).await?;
        if let Some((v, rev)) = read(&kv).await? {
            self.adopt(&kv, v, rev).await;
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
                .and_then(|(b, rev)| Some((serde_json::from_slice::<RegionRole>(&b).ok()?, rev)));
            if let Some((v, rev)) = seen {
                self.adopt(&kv, v, rev).await;
            }
        }
    }

    /// Moves this hub to the region's value: a higher epoch (or a step
    /// down), then at the same epoch a fence and a detachment.
    async fn adopt(&self, kv: &Leases, v: RegionRole, rev: u64) {
        let mine = self.state.get();
        let stepped_down = *self.stepped_down.lock().unwrap_or_else(|e| e.into_inner());
        // The region leads the epoch this hub only learned (from the peer
        // or a pull, before it saw the region's promotion): it leads too.
        let leads_learned = v.epoch == mine.epoch
            && v.role == Role::Primary
            && mine.role == Role::Secondary
            && stepped_down != Some(mine.epoch);
        if v.role_epoch() != mine && (allowed(mine, v.role_epoch()) || leads_learned) {
            let _ = self.transition(Move::Join(v.role_epoch()), "the region's role changed");
        } else if v.epoch < mine.epoch
            || (v.epoch == mine.epoch
                && stepped_down == Some(mine.epoch)
                && v.role == Role::Primary)
        {
            // This hub is ahead (a learned epoch, or an operator's step-down,
            // whose write did not land): the region follows it.
            let step_down = v.epoch == mine.epoch;
            if let Err(e) = raise(kv, &self.state, step_down).await {
                tracing::debug!(error = %e, "cannot raise the region's role yet");
            }
            return;
        }
        let mine = self.state.get();
        if v.epoch != mine.epoch || mine.role != Role::Primary {
            return;
        }
        self.follow_fence(kv, &v, rev).await;
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
    pub(super) fn raise_region(&self, step_down: bool) {
        if step_down {
            *self.stepped_down.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(self.state.get().epoch);
        }
        if let Some(kv) = self.region.clone() {
            let state = self.state.clone();
            tokio::spawn(async move {
                // Until it lands (a bucket briefly unreachable): the other
                // hubs learn a step-down from nowhere else.
                until_written("role", || raise(&kv, &state, step_down)).await;
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
        .map(|_| ())
    }

    /// This hub took the peer back: the region's detachment (a forced
    /// promotion's) is cleared, so hubs that start later do not follow it.
    /// In the background, until it lands.
    pub(super) fn clear_region_detached(&self) {
        let Some(kv) = self.region.clone() else {
            return;
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            until_written("detachment", || async {
                update(&kv, |seen| {
                    let mine = state.get();
                    Ok(match seen {
                        Some(v)
                            if v.epoch == mine.epoch
                                && v.role == Role::Primary
                                && v.detached.is_some() =>
                        {
                            Some(RegionRole {
                                detached: None,
                                ..v.clone()
                            })
                        }
                        _ => None,
                    })
                })
                .await
                .map(|_| ())
            })
            .await;
        });
    }
}
