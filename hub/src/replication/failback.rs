//! Failback: the divergent tail of an old primary is set aside in an archive
//! file (never deleted), and the failback report says which archived
//! records the new history lacks.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use fleet_api::hub::{ArchivedRange, FailbackReport, MissingRecord};
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId};

use super::{Control, ControlError, log_of};
use crate::log::frame::Frames;
use crate::log::{LogError, ReadLimits};

impl Control {
    /// Moves records `from..hw` of partition `p` (written in epochs up to
    /// `epoch`, past the point the primary's history shares) into an
    /// archive file, cuts them from the log and rebuilds the partition's
    /// per-device state.
    pub(super) async fn archive_divergent(
        &self,
        p: PartitionId,
        epoch: Epoch,
        from: Offset,
        hw: Offset,
    ) -> Result<(), String> {
        let log = log_of(&self.ingest).clone();
        self.reconciling.store(true, Ordering::Release);
        let done = self.archive_divergent_inner(&log, p, epoch, from, hw).await;
        self.reconciling.store(false, Ordering::Release);
        done
    }

    async fn archive_divergent_inner(
        &self,
        log: &std::sync::Arc<dyn crate::log::EventLog>,
        p: PartitionId,
        epoch: Epoch,
        from: Offset,
        hw: Offset,
    ) -> Result<(), String> {
        let file = self
            .archive_dir
            .join(format!("p{}-epoch{}-{}-{}.log", p.0, epoch.0, from.0, hw.0));
        let moved = log
            .cut_and_archive(p, from, file.clone())
            .await
            .map_err(|e| e.to_string())?;
        self.ingest.rebuild(p).await.map_err(|e| e.to_string())?;
        self.archived
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ArchivedRange {
                partition: p,
                from,
                to: hw,
                epoch,
                file: file.display().to_string(),
            });
        metrics::counter!("fleet_hub_archived_records_total").increment(moved);
        Ok(())
    }

    /// `GET /v1/failback`: the archived ranges, and which archived
    /// `(device, mid)` this hub's history (the new primary's) lacks.
    ///
    /// # Errors
    /// When an archive or the log cannot be read.
    pub async fn failback_report(&self) -> Result<FailbackReport, ControlError> {
        let archived = self
            .archived
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut report = FailbackReport {
            archived: archived.clone(),
            ..FailbackReport::default()
        };
        let log = log_of(&self.ingest).clone();
        for range in archived {
            let bytes = tokio::fs::read(&range.file)
                .await
                .map_err(|e| LogError::Io(format!("{}: {e}", range.file)))?;
            let wanted: Vec<(DeviceId, Option<Mid>)> = Frames::new(&bytes)
                .map(|f| (f.record.device_id, f.record.mid))
                .collect();
            report.archived_records += wanted.len() as u64;
            // Everything in the new history of this partition from the cut on.
            let mut have: HashSet<(DeviceId, Mid)> = HashSet::new();
            // Retention may have passed the start of the range since.
            let mut from = range.from.max(log.log_start(range.partition));
            loop {
                let batch = log
                    .read(
                        range.partition,
                        from,
                        ReadLimits {
                            max_records: 10_000,
                            max_bytes: 64 << 20,
                        },
                    )
                    .await?;
                let Some(last) = batch.last() else { break };
                from = last.offset.next();
                for r in batch {
                    if let Some(m) = r.record.mid {
                        have.insert((r.record.device_id, m));
                    }
                }
            }
            // Devices resend what was never `replicated`: it lands after the cut.
            for (device, mid) in wanted {
                let present = mid.is_some_and(|m| have.contains(&(device.clone(), m)));
                if !present {
                    report.missing_count += 1;
                    if report.missing.len() < 1000 {
                        report.missing.push(MissingRecord {
                            device_id: device,
                            mid,
                        });
                    }
                }
            }
        }
        Ok(report)
    }
}
