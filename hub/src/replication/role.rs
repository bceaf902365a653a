//! The role/epoch state machine.
//!
//! Every change of role and epoch goes through [`Control::transition`],
//! which holds one lock while it checks the rule and persists the result,
//! so no two changes interleave and the epoch never decreases. The rule,
//! written once in [`allowed`]: a higher epoch may come with either role;
//! under the same epoch only a primary may step down; nothing else moves.

use fleet_api::{Epoch, Role};

use super::{Control, ControlError};
use crate::sessions::Kick;
use crate::state::RoleEpoch;

/// How far ahead of this hub's epoch a learned epoch may be. Each promotion
/// raises it by one, so a real peer is at most a few ahead.
pub const MAX_EPOCH_LEAP: u64 = 1000;

/// A requested change of role and epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Move {
    /// Follow a higher epoch as secondary (learned from the peer, a
    /// replication pull or a concierge).
    Follow(Epoch),
    /// Step down from primary under the current epoch (an operator's demote).
    StepDown,
    /// Become primary at a higher epoch (a promotion).
    Lead(Epoch),
    /// Take the region's role and epoch (written by another hub of it) when
    /// its epoch is not lower than this hub's: at start the region's word
    /// beats a role this hub had alone under the same epoch; while running,
    /// the caller allows it by the rule above, or for a region that leads
    /// an epoch this hub only learned.
    Join(RoleEpoch),
}

impl Move {
    /// Where the move leads from `now`.
    fn target(self, now: RoleEpoch) -> RoleEpoch {
        match self {
            Move::Follow(epoch) => RoleEpoch {
                role: Role::Secondary,
                epoch,
            },
            Move::StepDown => RoleEpoch {
                role: Role::Secondary,
                epoch: now.epoch,
            },
            Move::Lead(epoch) => RoleEpoch {
                role: Role::Primary,
                epoch,
            },
            Move::Join(re) => re,
        }
    }
}

/// What [`Control::transition`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Moved {
    /// The rule allowed the move; it is persisted (or, for a move to
    /// secondary that could not be persisted, this hub is fenced).
    Done,
    /// The rule refused the move: role and epoch are still `current`.
    Refused { current: RoleEpoch },
}

/// The transition rule: `epoch' > epoch` (either role), or the same epoch
/// with a primary stepping down.
pub(super) fn allowed(now: RoleEpoch, next: RoleEpoch) -> bool {
    next.epoch > now.epoch
        || (next.epoch == now.epoch && now.role == Role::Primary && next.role == Role::Secondary)
}

impl Control {
    /// The one place role and epoch change, under one lock.
    ///
    /// A move to secondary persists the new role first, then closes every
    /// device connection; if it cannot be persisted the hub fences itself
    /// anyway (the safe direction). A move to primary unfences.
    ///
    /// # Errors
    /// When a move to primary cannot be persisted (nothing changes then).
    pub(super) fn transition(&self, m: Move, why: &str) -> Result<Moved, ControlError> {
        let guard = self.role_change.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.state.get();
        let next = m.target(now);
        let ok = match m {
            Move::Join(_) => next.epoch >= now.epoch && next != now,
            _ => allowed(now, next),
        };
        if !ok {
            return Ok(Moved::Refused { current: now });
        }
        if next.role == Role::Secondary {
            // Before the role shows: readers of this hub get nothing
            // unchecked against the new primary from the moment it is one.
            self.ingest.unconfirm_all();
        }
        let stored = self.state.set(next);
        debug_assert!(self.state.get().epoch >= now.epoch, "the epoch went back");
        if stored.is_ok() {
            // A new role starts attached and knowing nothing replicated: a
            // detachment (or a peer position) of the old role must not let
            // the new one acknowledge alone. A forced promotion detaches
            // again right after.
            if self.state.detached().is_some()
                && let Err(e) = self.state.set_detached(None)
            {
                tracing::warn!(error = %e, "cannot persist the end of the detachment");
            }
            self.ingest.reattach();
        }
        match next.role {
            Role::Primary => {
                stored.map_err(|e| {
                    ControlError::Unavailable(format!("cannot persist the new role: {e}"))
                })?;
                self.fence_planned
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                self.state.set_fenced(false);
                drop(guard);
            }
            Role::Secondary => {
                if let Err(e) = stored {
                    // Cannot persist: stop accepting anyway, the safe direction.
                    tracing::error!(error = %e, "cannot persist the demotion; fencing");
                    self.state.set_fenced(true);
                } else {
                    self.state.set_fenced(false);
                }
                drop(guard);
                if now.role == Role::Primary {
                    tracing::warn!(old = %now.epoch, new = %next.epoch, why, "demoted: no longer the primary");
                    metrics::counter!("fleet_hub_demotions_total").increment(1);
                    self.sessions.kick_all(Kick::Moving(next.epoch));
                } else {
                    tracing::info!(epoch = %next.epoch, why, "following a higher epoch");
                }
            }
        }
        self.set_role_metrics();
        Ok(Moved::Done)
    }

    /// Learns a higher epoch: persists the secondary role, then closes every
    /// device connection. Nothing is acknowledged after this. An epoch that
    /// is not higher than this hub's changes nothing.
    pub fn learn(&self, epoch: Epoch, why: &str) {
        let now = self.state.get().epoch;
        if epoch.0 > now.0.saturating_add(MAX_EPOCH_LEAP) {
            // Promotions raise the epoch by one; a leap like this is forged
            // or corrupt, and taking it would leave no room for promotions.
            tracing::warn!(current = %now, offered = %epoch, why, "ignoring an implausible epoch");
            metrics::counter!("fleet_hub_implausible_epochs_total").increment(1);
            return;
        }
        // A move to secondary never fails: it fences when it cannot persist.
        if let Ok(Moved::Done) = self.transition(Move::Follow(epoch), why) {
            self.raise_region(false);
        }
    }

    /// `POST /v1/demote`: learn a higher epoch, or (without one, as an
    /// operator) step down under the current epoch.
    pub fn demote(&self, body: fleet_api::hub::EpochBody) {
        match body.epoch {
            Some(e) => self.learn(e, "asked to demote"),
            None => {
                if let Ok(Moved::Done) = self.transition(Move::StepDown, "asked to step down") {
                    self.raise_region(true);
                }
            }
        }
    }

    pub(super) fn set_role_metrics(&self) {
        let re = self.state.get();
        metrics::gauge!("fleet_hub_epoch").set(re.epoch.0 as f64);
        metrics::gauge!("fleet_hub_is_primary").set(if re.role == Role::Primary {
            1.0
        } else {
            0.0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(role: Role, epoch: u64) -> RoleEpoch {
        RoleEpoch {
            role,
            epoch: Epoch(epoch),
        }
    }

    #[test]
    fn the_epoch_never_goes_back() {
        use Role::{Primary, Secondary};
        for (now, next, ok) in [
            (re(Secondary, 2), re(Secondary, 3), true),
            (re(Secondary, 2), re(Primary, 3), true),
            (re(Primary, 2), re(Secondary, 3), true),
            (re(Primary, 2), re(Secondary, 2), true),
            (re(Secondary, 2), re(Secondary, 2), false),
            (re(Secondary, 2), re(Primary, 2), false),
            (re(Primary, 2), re(Primary, 2), false),
            (re(Primary, 3), re(Secondary, 2), false),
            (re(Secondary, 3), re(Primary, 2), false),
        ] {
            assert_eq!(allowed(now, next), ok, "{now:?} -> {next:?}");
        }
    }

    #[test]
    fn moves_lead_where_they_say() {
        let now = re(Role::Primary, 4);
        assert_eq!(Move::StepDown.target(now), re(Role::Secondary, 4));
        assert_eq!(Move::Follow(Epoch(6)).target(now), re(Role::Secondary, 6));
        assert_eq!(Move::Lead(Epoch(5)).target(now), re(Role::Primary, 5));
    }
}
