//! The secondary's side of a planned promotion, after the primary fenced:
//! catching up to exactly what the primary holds, and lifting the fence
//! when the promotion is abandoned.

use std::time::Duration;

use fleet_api::hub::{EpochBody, FenceResponse};
use fleet_api::{Epoch, Offset, PartitionId};
use tokio::time::Instant;

use super::{Control, ControlError, log_of};

/// How long a planned promotion waits for this region to catch up.
const CATCH_UP: Duration = Duration::from_secs(60);

impl Control {
    /// Waits until this region holds every partition up to the fenced
    /// primary's high watermarks, then checks that what it holds is the
    /// primary's history (not an unreconciled tail of an older epoch that
    /// only happens to be as long).
    pub(super) async fn catch_up_to(
        &self,
        peer: &str,
        fenced: &FenceResponse,
    ) -> Result<(), ControlError> {
        let log = log_of(&self.ingest).clone();
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let behind: Vec<PartitionId> = fenced
                .high_watermarks
                .iter()
                .enumerate()
                .map(|(p, hw)| (PartitionId(p as u32), *hw))
                .filter(|(p, hw)| log.high_watermark(*p) < *hw)
                .map(|(p, _)| p)
                .collect();
            if behind.is_empty() {
                break;
            }
            // Partitions other hubs of this region pull: read how far they got.
            for p in behind {
                self.ingest.refresh(p).await;
            }
            if Instant::now() > deadline {
                return Err(ControlError::Unavailable(
                    "the secondary did not catch up within 60 s; the primary was unfenced".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Each partition's history as the fenced hub knows it: it read
        // every partition's end from the servers while it fenced (or writes
        // it), and histories do not change under a fence.
        for (i, hw) in fenced.high_watermarks.iter().enumerate() {
            let p = PartitionId(i as u32);
            self.ingest.refresh(p).await;
            let theirs = self.peer_epochs(peer, p).await.map_err(|e| {
                ControlError::Unavailable(format!(
                    "the primary's history of partition {p}: {e}; the primary was unfenced"
                ))
            })?;
            let theirs: Vec<(Epoch, Offset)> =
                theirs.epochs.iter().map(|e| (e.epoch, e.start)).collect();
            let mine = log.epoch_history(p);
            let from = [mine.first(), theirs.first()]
                .into_iter()
                .flatten()
                .map(|(_, s)| *s)
                .max()
                .unwrap_or(Offset(0));
            // Nothing below the end on one side to compare.
            if from >= *hw {
                continue;
            }
            if normal(&mine, from, *hw) != normal(&theirs, from, *hw) {
                return Err(ControlError::Conflict(format!(
                    "partition {p} here is not the primary's history below offset {hw} (it has not reconciled with it yet); the primary was unfenced, try again"
                )));
            }
        }
        Ok(())
    }

    /// An abandoned planned promotion to `epoch`: every hub of the primary
    /// region is asked to lift the fence (any of them lifts the region's).
    pub(super) async fn unfence_peers(&self, epoch: Epoch) {
        // Every hub: one not fenced itself answers 409 yet lifts the
        // region's fence, and a dead one answers nothing.
        let mut answered = false;
        for peer in &self.peers {
            let done = self
                .call::<serde_json::Value>(
                    &format!("{peer}/v1/unfence"),
                    &EpochBody { epoch: Some(epoch) },
                    Duration::from_secs(5),
                )
                .await;
            answered |= done.is_ok() || done.is_err_and(|e| e.starts_with("409"));
        }
        if !answered {
            tracing::warn!(%epoch, "no hub of the primary region answered the unfence");
        }
    }
}

/// A partition's epoch history below `end`, in the form two logs of the
/// same history agree on: an entry followed by one at the same start is
/// dropped (an epoch noted whose first record never landed), and what lies
/// below `from` (where one of the two histories begins: a retained start, a
/// history rebuilt from retained records) is folded into the epoch in force
/// there.
fn normal(history: &[(Epoch, Offset)], from: Offset, end: Offset) -> Vec<(Epoch, Offset)> {
    let mut kept: Vec<(Epoch, Offset)> = Vec::new();
    for &(epoch, start) in history.iter().filter(|(_, s)| *s < end) {
        match kept.last_mut() {
            Some(last) if last.1 == start => *last = (epoch, start),
            _ => kept.push((epoch, start)),
        }
    }
    let in_force = kept.iter().rev().find(|(_, s)| *s <= from).map(|(e, _)| *e);
    in_force
        .map(|e| (e, from))
        .into_iter()
        .chain(kept.into_iter().filter(|(_, s)| *s > from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[(u64, u64)]) -> Vec<(Epoch, Offset)> {
        v.iter().map(|(e, s)| (Epoch(*e), Offset(*s))).collect()
    }

    #[test]
    fn histories_of_the_same_log_agree_and_an_unreconciled_tail_does_not() {
        let end = Offset(900);
        let primary = h(&[(1, 0), (2, 500), (4, 800)]);
        // The same history, rebuilt from retained records from 300 on.
        let rebuilt = h(&[(1, 300), (2, 500), (4, 800)]);
        let from = Offset(300);
        assert_eq!(normal(&primary, from, end), normal(&rebuilt, from, end));
        // An epoch noted before a record that never landed, then the next.
        let orphan = h(&[(1, 0), (2, 500), (3, 800), (4, 800)]);
        assert_eq!(
            normal(&primary, Offset(0), end),
            normal(&orphan, Offset(0), end)
        );
        // Entries at or past the end do not count.
        let longer = h(&[(1, 0), (2, 500), (4, 800), (5, 900)]);
        assert_eq!(
            normal(&primary, Offset(0), end),
            normal(&longer, Offset(0), end)
        );
        // A log as long as the primary's that never took epoch 4: a tail
        // of epoch 2 where the primary has epoch 4.
        let stale = h(&[(1, 0), (2, 500)]);
        assert_ne!(
            normal(&primary, Offset(0), end),
            normal(&stale, Offset(0), end)
        );
        // Nothing written on either side.
        assert_eq!(normal(&[], Offset(0), end), normal(&[], Offset(0), end));
    }
}
