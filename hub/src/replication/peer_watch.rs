//! Watching the peer: this hub learns a higher epoch from it, and tells a
//! stale primary to demote. A hub that restarts as primary stays fenced
//! until a look at the peer succeeds (or the peer is detached), since
//! someone may have taken over meanwhile.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::{Role, UnixMillis};

use super::Control;

impl Control {
    /// Watches the peer: learns a higher epoch, fences a stale primary.
    pub(super) async fn peer_watch(self: Arc<Self>) {
        if self.peers.is_empty() {
            return;
        }
        let mut first = true;
        loop {
            // Any hub of the peer region speaks for it (they share role and
            // epoch); the peer is unreachable when none answers.
            let (peer, status) = match self.any_peer_status().await {
                Some((peer, s)) => (Some(peer), Some(s)),
                None => (None, None),
            };
            let unreachable_since = {
                let mut view = self.view();
                view.reachable = status.is_some();
                view.unreachable_since_ms = match (&status, view.unreachable_since_ms) {
                    (Some(_), _) => None,
                    (None, Some(t)) => Some(t),
                    (None, None) => Some(UnixMillis::now().0),
                };
                view.role = status.as_ref().map(|s| s.role);
                view.epoch = status.as_ref().map(|s| s.epoch);
                view.unreachable_since_ms
            };
            if let (Some(after), Some(since)) = (self.peer_detach_after, unreachable_since)
                && UnixMillis::now().0.saturating_sub(since) >= after.as_millis() as u64
                && self.state.detached().is_none()
                && self.state.get().role == Role::Primary
            {
                let why = format!("the peer has been unreachable for {} s", after.as_secs());
                if let Err(e) = self.detach(false, &why) {
                    tracing::warn!(error = %e, "cannot detach the unreachable peer");
                }
            }
            if let Some(s) = &status {
                self.check_partitions(s.partitions.len());
                let me = self.state.get();
                if s.epoch > me.epoch {
                    self.learn(s.epoch, "the peer holds a higher epoch");
                } else if me.role == Role::Primary
                    && s.role == Role::Primary
                    && s.epoch < me.epoch
                    && let Some(peer) = peer
                {
                    tracing::warn!(peer_epoch = %s.epoch, "the peer is a stale primary; telling it to demote");
                    self.tell_peer_to_demote(peer, me.epoch).await;
                }
            }
            // A restarted primary waits for a look that *succeeds* (see
            // `fence_until_checked`): an unanswered one proves nothing, and
            // during a partition the other region may have taken over. A
            // detached peer (an operator's decision, or
            // `--peer-detach-after-s`) no longer counts: it runs alone.
            if first && (status.is_some() || self.state.detached().is_some()) {
                first = false;
                // Only the restart check's own fence: a planned promotion's
                // fence (which may have come meanwhile) stays.
                if !self.fence_planned.load(std::sync::atomic::Ordering::SeqCst) {
                    if self.state.fenced() && self.state.get().role == Role::Primary {
                        tracing::info!("the peer was looked at (or is detached): accepting writes");
                    }
                    self.state.set_fenced(false);
                }
                self.looked.send_replace(true);
            }
            // Often: the concierge's automatic failover waits for the
            // secondary to have lost its primary too.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A hub that restarts as primary with a peer waits for one look at the
    /// peer before accepting writes: someone may have taken over meanwhile.
    pub fn fence_until_checked(&self) {
        if !self.peers.is_empty() && self.state.get().role == Role::Primary {
            self.state.set_fenced(true);
        }
    }

    /// Waits (at most `limit`) for the first look at the peer.
    pub async fn first_look(&self, limit: Duration) {
        if self.peers.is_empty() {
            return;
        }
        let mut rx = self.looked.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|l| *l)).await;
    }
}
