//! Retention: deleting the oldest sealed segments by size and age.
//!
//! It never deletes the active segment, nor a segment holding records at or
//! above the partition's retention floor (what the owner still needs: not
//! yet durable, or not yet pulled by an attached peer).

use std::sync::atomic::Ordering;

use super::segment::segment_path;
use super::{FileLogConfig, PartitionLog};

pub(super) async fn retention_loop(
    parts: Vec<std::sync::Weak<PartitionLog>>,
    config: FileLogConfig,
) {
    if config.retention_bytes.is_none() && config.retention_age.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(config.retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for part in &parts {
            let Some(part) = part.upgrade() else { return };
            let config = config.clone();
            let _ = tokio::task::spawn_blocking(move || retain(&part, &config)).await;
        }
        metrics::counter!("fleet_hub_retention_passes_total").increment(1);
    }
}

/// Deletes the oldest sealed segments beyond the size or age limit, never
/// past the retention floor and never the active segment. The decision and
/// the removal (list and files) happen under one write lock, so a cut or a
/// reset running meanwhile cannot turn the victim into the active segment.
pub(super) fn retain(part: &PartitionLog, config: &FileLogConfig) {
    let floor = part.retention_floor.load(Ordering::Acquire);
    loop {
        let victim = {
            let mut segs = part.segments.write().unwrap_or_else(|e| e.into_inner());
            if segs.len() < 2 {
                return;
            }
            let total: u64 = segs
                .iter()
                .map(|s| s.durable_len.load(Ordering::Acquire))
                .sum();
            let oldest = &segs[0];
            let too_big = config.retention_bytes.is_some_and(|max| total > max);
            let too_old = config
                .retention_age
                .is_some_and(|age| part.fs.age(&oldest.path).is_ok_and(|a| a > age));
            let below_floor = oldest.next.load(Ordering::Acquire) <= floor;
            if !(too_big || too_old) || !below_floor {
                return;
            }
            let victim = segs.remove(0);
            // Under the lock too: a reset may create a segment of that name.
            let _ = part.fs.remove_file(&victim.path);
            let _ = part
                .fs
                .remove_file(&segment_path(&part.dir, victim.base, "idx"));
            victim
        };
        // Durable before the next deletion: unlinks must not survive a
        // power cut out of order (a hole at the start of the log).
        if let Err(e) = super::sync_dir(&*part.fs, &part.dir) {
            tracing::warn!(partition = %part.id, error = %e, "cannot sync the partition directory after retention");
            return;
        }
        tracing::info!(partition = %part.id, base = %victim.base, "retention deleted a segment");
    }
}
