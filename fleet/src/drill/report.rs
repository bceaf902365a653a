//! What a drill found: the report (`--json`, `report.json`) and its
//! summary for a terminal.

use fleet_api::concierge::Mode;
use serde::Serialize;
use std::collections::HashMap;

use super::Lose;

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// Milliseconds from the loss of the primary to each step.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Steps {
    pub detect_ms: u64,
    pub promote_ms: u64,
    pub first_publish_ms: u64,
    pub failback_ms: u64,
    /// How long the lost region was away: from its loss (the kill, or the
    /// planned promotion) to its return (restart; planned: the failback).
    pub away_ms: u64,
    /// From the lost region's return until the survivor counts on it again
    /// (it caught up without a full resync).
    pub catch_up_ms: u64,
    /// Records the survivor wrote alone (without a second copy) meanwhile.
    pub written_while_detached: u64,
    /// Identity RPO: from a device created in region a (its hub's API) to
    /// region b's hub holding it (registry-sync and the hub's mirror).
    pub identity_rpo_ms: u64,
}

/// The drill's outcome (`--json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrillReport {
    /// Per-device RTO: its hub stopped serving it (kill, or the planned
    /// promotion's fence) → its first PUBACK from the new primary.
    pub rto_ms: Percentiles,
    /// Where the RTO went: the p99 device broken down, and each part's
    /// percentiles.
    pub rto: super::rto::Rto,
    pub sent: u64,
    pub acknowledged: u64,
    /// Distinct (device, mid) in the final primary's log.
    pub stored: u64,
    /// Distinct (device, mid) in each region's log.
    pub stored_by_region: HashMap<String, u64>,
    /// Acknowledged (replicated) but not stored: must be 0.
    pub lost: u64,
    /// Records stored twice: must be 0.
    pub duplicate_records: u64,
    pub duplicates_suppressed: u64,
    pub dropped: u64,
    pub peak_in_outbox: u64,
    /// Generated, not dropped, and not acknowledged at the end: still
    /// waiting in outboxes. Must be 0.
    pub waiting: u64,
    pub devices_moved: usize,
    /// Devices that never stored a record in the new region after losing
    /// the primary: must be 0.
    pub devices_not_moved: usize,
    pub steps: Steps,
    pub unreplicated_at_promotion: u64,
    pub registry_divergence: Divergence,
    pub archived_records: u64,
    pub archive_missing: u64,
    pub mode: Mode,
    pub lose: Lose,
    pub outage_s: u64,
    pub replication: String,
    pub devices: usize,
    pub duration_s: f64,
    pub timeline: String,
    pub html: String,
    pub passed: bool,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Divergence {
    /// Devices the registries disagreed on while the old region was away.
    pub before_failback: u64,
    /// After failback and `follow` catching up.
    pub after_failback: u64,
}

/// The human report.
pub fn summary(r: &DrillReport) -> String {
    let lost_what = match r.lose {
        Lose::Primary => format!("{} failover", r.mode.as_str()),
        Lose::Secondary => "secondary lost".to_string(),
    };
    let mut s = format!(
        "Fleet drill: {lost_what} ({} s outage), {} replication, {} devices, {:.0} s\n\n",
        r.outage_s, r.replication, r.devices, r.duration_s
    );
    s += &format!("  sent                  {}\n", r.sent);
    s += &format!(
        "  acknowledged          {} (replicated, or durable in the region running alone; gone from the outboxes)\n",
        r.acknowledged
    );
    s += &format!(
        "  stored                {} in the final primary's log {:?}\n",
        r.stored, r.stored_by_region
    );
    let verdict = if r.passed {
        "(nothing acknowledged was lost)"
    } else {
        "FAILED"
    };
    s += &format!("  lost                  {} {verdict}\n", r.lost);
    s += &format!(
        "  still waiting         {} in outboxes at the end (must be 0)\n",
        r.waiting
    );
    if r.lose == Lose::Primary {
        s += &format!(
            "  devices not moved     {} of {} (must be 0)\n",
            r.devices_not_moved, r.devices
        );
    }
    s += &format!("  stored twice          {}\n", r.duplicate_records);
    s += &format!("  duplicates suppressed {}\n", r.duplicates_suppressed);
    s += &format!(
        "  dropped by outboxes   {} (peak {} messages waiting)\n\n",
        r.dropped, r.peak_in_outbox
    );
    s += &format!(
        "  detect {} ms, promote {} ms, first publish in the new region {} ms, failback {} ms; the region was away {} ms\n",
        r.steps.detect_ms,
        r.steps.promote_ms,
        r.steps.first_publish_ms,
        r.steps.failback_ms,
        r.steps.away_ms
    );
    s += &format!(
        "  ran alone (peer detached): {} records written without a second copy; caught up {} ms after the region returned\n",
        r.steps.written_while_detached, r.steps.catch_up_ms
    );
    s += &format!(
        "  RTO per device (hub stopped serving it → first PUBACK from the new primary): p50 {} ms, p99 {} ms, max {} ms ({} devices moved)\n",
        r.rto_ms.p50, r.rto_ms.p99, r.rto_ms.max, r.devices_moved
    );
    let b = &r.rto.p99_breakdown;
    s += &format!(
        "    p99 device: detection {} + promotion {} + concierge answer {} + admission slot {} + connect {} + nothing to send {} + PUBACK {} ms\n",
        b.detection, b.promotion, b.discovery, b.admission, b.connect, b.idle, b.publish
    );
    s += &format!(
        "    p99 of each part: concierge answer {} ms, admission slot {} ms, connect {} ms, nothing to send {} ms, PUBACK {} ms\n",
        r.rto.discovery_ms.p99,
        r.rto.admission_ms.p99,
        r.rto.connect_ms.p99,
        r.rto.idle_ms.p99,
        r.rto.publish_ms.p99
    );
    s += &format!(
        "  identity RPO: a device created in region a was accepted by region b's hub after {} ms\n",
        r.steps.identity_rpo_ms
    );
    s += &format!(
        "  registry divergence: {} before failback, {} after\n",
        r.registry_divergence.before_failback, r.registry_divergence.after_failback
    );
    s += &format!(
        "  archived at failback: {} records, {} missing from the new history\n\n",
        r.archived_records, r.archive_missing
    );
    s += &format!("  timeline: {}\n  report:   {}", r.timeline, r.html);
    s
}

/// Whether a drill passed: every generated message acknowledged and stored
/// once, none dropped, none still waiting, nothing archived at failback that
/// the new history lacks, and (when the primary was lost) every device moved
/// to the new region.
pub fn verdict(r: &DrillReport) -> bool {
    r.lost == 0
        && r.duplicate_records == 0
        && r.dropped == 0
        && r.waiting == 0
        && r.acknowledged == r.sent
        && r.devices_not_moved == 0
        && r.archive_missing == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> DrillReport {
        DrillReport {
            sent: 100,
            acknowledged: 100,
            devices: 10,
            devices_moved: 10,
            ..DrillReport::default()
        }
    }

    #[test]
    fn a_drill_passes_only_when_everything_settled_and_every_device_moved() {
        assert!(verdict(&clean()));
        type Spoil = fn(&mut DrillReport);
        let cases: [(&str, Spoil); 7] = [
            ("archived but missing", |r| r.archive_missing = 1),
            ("lost", |r| r.lost = 1),
            ("stored twice", |r| r.duplicate_records = 1),
            ("dropped", |r| r.dropped = 1),
            ("still waiting", |r| {
                r.acknowledged = 99;
                r.waiting = 1;
            }),
            ("unacknowledged", |r| r.acknowledged = 99),
            ("a device never moved", |r| {
                r.devices_moved = 9;
                r.devices_not_moved = 1;
            }),
        ];
        for (what, spoil) in cases {
            let mut r = clean();
            spoil(&mut r);
            assert!(!verdict(&r), "{what}: passed");
        }
    }
}
