//! The fence for a planned promotion of the peer, in a region of several
//! hubs on one log.
//!
//! The fenced hub writes the fence (the epoch it is for, a fresh random id)
//! into the region's value; every hub following the value stops accepting,
//! flushes the partitions it writes and answers under `s.fenced.{hub}` with
//! the id, whether it still runs detached from the peer, and the high
//! watermarks of its partitions after the flush. The fenced hub reports the
//! region's final high watermarks only once every live hub has answered
//! this fence, and refuses (unfencing) while any hub runs detached: a
//! detached hub's partitions may hold acknowledged records the peer lacks,
//! behind the same high watermark as a tail the peer must still cut.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use fleet_api::{Epoch, Offset, PartitionId, Role};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::region::{RegionRole, fence_key, update};
use super::{Control, ControlError, log_of};
use crate::log::jetstream::Leases;

/// How long the fenced hub waits for every live hub's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(15);
/// At most this longer while its view of the region's hubs settles.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// A hub's answer to a fence.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    /// The fence's id.
    id: u64,
    /// This hub still runs detached from the peer.
    detached: bool,
    /// The partitions this hub writes, with their high watermarks after the
    /// flush.
    high_watermarks: Vec<(u32, u64)>,
}

impl Control {
    /// Follows the fence in the region's value `v` (already at this hub's
    /// epoch, this hub primary): stops and answers a new fence, lifts this
    /// hub's fence when the region's is gone.
    pub(super) async fn follow_fence(&self, kv: &Leases, v: &RegionRole, rev: u64) {
        let fenced_for = *self.fenced_for.lock().unwrap_or_else(|e| e.into_inner());
        match (v.fenced_for, v.fence_id) {
            (Some(e), Some(id)) => {
                let new = {
                    let mut seen = self.fence_seen.lock().unwrap_or_else(|e| e.into_inner());
                    let new = seen.is_none_or(|(seen_id, _)| seen_id != id);
                    if new {
                        *seen = Some((id, rev));
                    }
                    new
                };
                if new {
                    self.fence_here(Some(e)).await;
                    // Unfenced meanwhile (an operator, or a newer value):
                    // no answer, the fence must not pass on this hub's word.
                    let still = self.state.fenced()
                        && self
                            .fence_seen
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .is_some_and(|(seen_id, _)| seen_id == id);
                    if !still {
                        return;
                    }
                    let log = log_of(&self.ingest);
                    let answer = Answer {
                        id,
                        detached: self.state.detached().is_some(),
                        high_watermarks: self
                            .ingest
                            .owned_partitions()
                            .unwrap_or_default()
                            .into_iter()
                            .map(|p| (p.0, log.high_watermark(p).0))
                            .collect(),
                    };
                    let body = match serde_json::to_vec(&answer) {
                        Ok(b) => Bytes::from(b),
                        Err(_) => return,
                    };
                    if let Err(err) = kv.put_shared(&fence_key(kv.me()), body).await {
                        tracing::warn!(error = %err, "cannot tell the region this hub is fenced");
                    }
                }
            }
            // Only a value newer than the fence this hub wrote or followed
            // lifts it (a lagging watch may still show an older one).
            (None, _)
                if fenced_for.is_some()
                    && self.state.fenced()
                    && self
                        .fence_seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_none_or(|(_, fence_rev)| rev > fence_rev) =>
            {
                let _ = self.unfence_here(None);
            }
            _ => {}
        }
    }

    /// A fence for the peer's planned promotion to `epoch`, for the whole
    /// region. Returns the final high watermarks.
    pub(super) async fn fence_region(&self, epoch: Epoch) -> Result<Vec<Offset>, ControlError> {
        let Some(kv) = self.region.clone() else {
            return Err(ControlError::Unavailable("no region".into()));
        };
        let mine = self.state.get();
        // A fresh fence every time (a retry too): every hub stops and
        // answers again.
        let id = rand::random::<u64>();
        // Before the write: this hub's own watch must not answer it (and
        // no older value may lift it meanwhile); put back if it fails.
        let before = self
            .fence_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((id, u64::MAX));
        let written = update(&kv, |seen| match seen {
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
        .await;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                *self.fence_seen.lock().unwrap_or_else(|e| e.into_inner()) = before;
                // The write may have landed unanswered: take it back.
                lift(&kv, epoch, id).await;
                return Err(e);
            }
        };
        if let Some(rev) = written {
            *self.fence_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, rev));
        }
        // This hub fences itself at once; the others through the watch.
        self.fence_here(Some(epoch)).await;
        match self.fenced_end(&kv, id, epoch).await {
            Ok(hws) => Ok(hws),
            Err(e) => {
                // Only this fence: a newer one (a retry through another
                // hub), which this hub may already have answered, stays.
                let still_mine = self
                    .fence_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some_and(|(seen, _)| seen == id);
                if still_mine {
                    let _ = self.unfence_here(Some(epoch));
                }
                lift(&kv, epoch, id).await;
                Err(e)
            }
        }
    }

    /// The rest of [`Control::fence_region`]: the answers, and the ends.
    async fn fenced_end(
        &self,
        kv: &Leases,
        id: u64,
        epoch: Epoch,
    ) -> Result<Vec<Offset>, ControlError> {
        let answers = self.answers(kv, id).await?;
        if let Some((hub, _)) = answers.iter().find(|(_, a)| a.detached) {
            return Err(ControlError::Conflict(format!(
                "hub {hub} of this region still runs detached from the peer; a planned promotion waits until the peer holds every record there; unfenced"
            )));
        }
        // Each partition's end as its writer flushed it.
        let mut flushed: HashMap<u32, u64> = HashMap::new();
        for (_, a) in &answers {
            for (p, hw) in &a.high_watermarks {
                let e = flushed.entry(*p).or_default();
                *e = (*e).max(*hw);
            }
        }
        let log = log_of(&self.ingest).clone();
        let mut high_watermarks = Vec::new();
        for p in 0..self.partitions() {
            let p = PartitionId(p);
            let hw = if self.ingest.owns(p) {
                self.ingest.barrier(p).await?
            } else {
                // Another hub's: what it flushed, or (written by no live
                // hub) the end read from the servers now.
                self.ingest.refresh(p).await;
                log.high_watermark(p)
                    .max(Offset(flushed.get(&p.0).copied().unwrap_or(0)))
            };
            high_watermarks.push(hw);
        }
        // Still this fence, and this hub still fenced: nothing lifted it
        // while the ends were read.
        let current = super::region::read(kv).await?;
        let intact = current.is_some_and(|(v, _)| {
            v.fence_id == Some(id) && v.fenced_for == Some(epoch) && v.role == Role::Primary
        }) && self.state.fenced();
        if !intact {
            return Err(ControlError::Conflict(
                "the fence was lifted or replaced while it was being taken".into(),
            ));
        }
        Ok(high_watermarks)
    }

    /// Every other live hub's answer to fence `id`, waited for.
    async fn answers(&self, kv: &Leases, id: u64) -> Result<Vec<(String, Answer)>, ControlError> {
        // A view settles within the lease time after a (re)watch; all of it
        // stays below the promoting peer's 30 s call.
        let deadline = Instant::now() + ANSWER_WAIT + (self.lease_ttl * 2).min(SETTLE_WAIT);
        loop {
            let placement = kv.placement(self.lease_ttl);
            // An unsettled view may not know a live hub at all.
            if !placement.settled {
                if Instant::now() > deadline {
                    return Err(ControlError::Unavailable(
                        "this hub's view of the region's hubs is not current; unfenced".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let live = placement.live;
            let mut missing = Vec::new();
            let mut answers = Vec::new();
            for hub in live.iter().filter(|h| h.as_str() != kv.me()) {
                let answer = kv
                    .read_shared(&fence_key(hub))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|(b, _)| serde_json::from_slice::<Answer>(&b).ok())
                    .filter(|a| a.id == id);
                match answer {
                    Some(a) => answers.push((hub.clone(), a)),
                    None => missing.push(hub.clone()),
                }
            }
            if missing.is_empty() {
                return Ok(answers);
            }
            if Instant::now() > deadline {
                return Err(ControlError::Unavailable(format!(
                    "hubs {} of this region did not confirm the fence; unfenced",
                    missing.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Takes fence `id` for `epoch` out of the region's value, a few times
/// until it goes (best effort: an operator's unfence is the rest).
async fn lift(kv: &Leases, epoch: Epoch, id: u64) {
    for _ in 0..5 {
        match unfence_in(kv, Some(epoch), Some(id)).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "cannot lift a failed fence yet"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lifts the region's fence in the bucket (for `only_for`, when given;
/// only fence `id`, when given).
pub(super) async fn unfence_in(
    kv: &Leases,
    only_for: Option<Epoch>,
    id: Option<u64>,
) -> Result<(), ControlError> {
    update(kv, |seen| match seen {
        Some(v)
            if v.fenced_for.is_some()
                && only_for.is_none_or(|e| v.fenced_for == Some(e))
                && id.is_none_or(|id| v.fence_id == Some(id)) =>
        {
            Ok(Some(RegionRole {
                fenced_for: None,
                fence_id: None,
                ..v.clone()
            }))
        }
        _ => Ok(None),
    })
    .await
    .map(|_| ())
}
