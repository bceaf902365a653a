//! The secondary's side of a planned promotion, after the primary fenced:
//! catching up to exactly what the primary holds, and lifting the fence
//! when the promotion is abandoned.

use std::time::Duration;

use fleet_api::hub::{EpochBody, FenceResponse};
use fleet_api::{Epoch, PartitionId};
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
        for (i, hw) in fenced.high_watermarks.iter().enumerate() {
            let p = PartitionId(i as u32);
            self.ingest.refresh(p).await;
            let theirs = self.peer_epochs(peer, p).await.map_err(|e| {
                ControlError::Unavailable(format!(
                    "the primary's history of partition {p}: {e}; the primary was unfenced"
                ))
            })?;
            let theirs: Vec<_> = theirs
                .epochs
                .iter()
                .filter(|e| e.start < *hw)
                .map(|e| (e.epoch, e.start))
                .collect();
            let mine: Vec<_> = log
                .epoch_history(p)
                .into_iter()
                .filter(|(_, start)| start < hw)
                .collect();
            if mine != theirs {
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
        for peer in &self.peers {
            let done = self
                .call::<serde_json::Value>(
                    &format!("{peer}/v1/unfence"),
                    &EpochBody { epoch: Some(epoch) },
                    Duration::from_secs(5),
                )
                .await;
            if done.is_ok() {
                return;
            }
        }
        tracing::warn!(%epoch, "no hub of the primary region lifted the fence");
    }
}
