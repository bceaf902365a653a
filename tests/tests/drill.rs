//! End-to-end drills through the same harness as `fleet drill`: a whole
//! fleet of processes, simulated devices, the loss of the primary region and
//! failback, with sync and async replication. Nothing acknowledged may be
//! lost or stored twice; the RTO is reported (not asserted: timing on a
//! shared machine varies).

use fleet::drill::{DrillOptions, DrillReport, Lose, run};
use fleet::up::Launcher;
use fleet_api::concierge::Mode;

/// Runs a drill set up by `set` in this test's log directory; prints and
/// returns its report.
async fn run_drill(name: &str, set: impl FnOnce(&mut DrillOptions)) -> DrillReport {
    let h = tests::harness!(name);
    let mut opts = DrillOptions::new(h.logs().join("run"));
    set(&mut opts);
    let launcher = Launcher {
        exe: env!("CARGO_BIN_EXE_fleet-node").into(),
    };
    let report = run(launcher, opts, |line| eprintln!("{name}: {line}"))
        .await
        .expect("the drill ran");
    println!("{}", fleet::drill::summary(&report));
    report
}

async fn drill(name: &str, mode: Mode, replication: &str) {
    drill_on(name, mode, replication, false).await;
}

async fn drill_on(name: &str, mode: Mode, replication: &str, jetstream: bool) {
    drill_with(name, mode, replication, jetstream, 1).await;
}

async fn drill_with(name: &str, mode: Mode, replication: &str, jetstream: bool, hubs: usize) {
    let report = run_drill(name, |opts| {
        opts.jetstream = jetstream;
        opts.hubs_per_region = hubs;
        opts.devices = 20;
        opts.rate = 10.0;
        opts.duration_s = 12;
        opts.kill_at_s = 4;
        opts.outage_s = 4;
        opts.mode = mode;
        opts.replication = replication.into();
    })
    .await;
    // Load, however much this machine generated (nominally ~1,500).
    assert!(report.sent > 100, "{report:?}");
    // The region stayed away the whole outage, however long starting the
    // fleet took (a kill scheduled from before the fleet was up once came
    // so late that failback followed the promotion by 130 ms).
    assert!(report.steps.away_ms >= 4000, "{:?}", report.steps);
    assert_eq!(report.lost, 0, "acknowledged but lost");
    assert_eq!(report.duplicate_records, 0, "stored twice");
    assert_eq!(
        report.acknowledged + report.dropped,
        report.sent,
        "something never settled"
    );
    assert_eq!(report.dropped, 0);
    assert_eq!(
        report.devices_moved, 20,
        "every device reached the new primary"
    );
    // The RTO is reported by PUBACK, with its breakdown: the p99 device's
    // parts add up to its RTO (each part is measured, none assumed).
    let b = report.rto.p99_breakdown;
    assert_eq!(report.rto.devices_moved, 20);
    assert!(b.rto > 0 && report.rto_ms.p99 == b.rto, "{:?}", report.rto);
    assert_eq!(
        b.detection + b.promotion + b.discovery + b.admission + b.connect + b.idle + b.publish,
        b.rto,
        "{b:?}"
    );
    if mode == Mode::Forced {
        assert!(b.detection > 0, "a kill is detected, not assumed: {b:?}");
    } else {
        assert_eq!(b.detection, 0, "a planned promotion needs no detection");
    }
    assert_eq!(report.registry_divergence.after_failback, 0);
    // Measured: a device created in a reached b's hub (the wait would have
    // failed the drill otherwise).
    assert!(report.steps.identity_rpo_ms > 0, "{:?}", report.steps);
    assert_eq!(report.archive_missing, 0);
    assert_eq!(report.waiting, 0, "left in outboxes");
    assert_eq!(report.devices_not_moved, 0, "devices that never moved");
    assert!(report.passed);
    assert!(std::path::Path::new(&report.timeline).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_drill_with_async_replication() {
    drill("forced_drill_with_async_replication", Mode::Forced, "async").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_drill_with_sync_replication() {
    drill("forced_drill_with_sync_replication", Mode::Forced, "sync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_drill_with_async_replication() {
    drill(
        "planned_drill_with_async_replication",
        Mode::Planned,
        "async",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_drill_with_sync_replication() {
    drill("planned_drill_with_sync_replication", Mode::Planned, "sync").await;
}

/// Both regions' logs on their own R3 JetStream clusters (three real
/// nats-server processes each, fsync before ack); losing region a kills its
/// hub and all three of its servers, and brings them back for failback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_drill_on_jetstream() {
    drill_on("forced_drill_on_jetstream", Mode::Forced, "async", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_drill_on_jetstream() {
    drill_on("planned_drill_on_jetstream", Mode::Planned, "sync", true).await;
}

/// Two hubs per region on each region's JetStream log: the devices spread
/// over the active region's hubs, each partition is pulled from the hub
/// that writes it, and the whole region a (both hubs, three servers) dies;
/// b's two hubs become primary together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_drill_with_two_hubs_per_region() {
    drill_with(
        "forced_drill_with_two_hubs_per_region",
        Mode::Forced,
        "sync",
        true,
        2,
    )
    .await;
}

/// A planned promotion of a region of two hubs from a region of two: the
/// fence stops both of a's hubs before b takes over, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_drill_with_two_hubs_per_region() {
    drill_with(
        "planned_drill_with_two_hubs_per_region",
        Mode::Planned,
        "async",
        true,
        2,
    )
    .await;
}

/// A region lost far longer than the devices' small outboxes could bridge
/// (128 KiB at 10 KB/s per device: about 13 s; the outage is 30 s): the
/// survivor runs alone, nothing is dropped or lost, and the returning region
/// catches up without a full resync. The outboxes still have to bridge the
/// failover itself (detection, promotion, reconnect: several seconds on a
/// loaded 2-core machine; 64 KiB proved too tight).
async fn long_outage(name: &str, lose: Lose, replication: &str) {
    let report = run_drill(name, |opts| {
        opts.devices = 10;
        opts.rate = 10.0;
        opts.payload_bytes = 1000;
        opts.max_outbox_bytes = Some(131_072);
        opts.duration_s = 40;
        opts.kill_at_s = 4;
        opts.outage_s = 30;
        opts.lose = lose;
        opts.replication = replication.into();
    })
    .await;
    // Load, however much this machine generated (nominally ~4,000).
    assert!(report.sent > 300, "{report:?}");
    assert!(report.steps.away_ms >= 30_000, "{:?}", report.steps);
    assert_eq!(report.dropped, 0, "outboxes overflowed");
    assert_eq!(report.lost, 0, "acknowledged but lost");
    assert_eq!(report.duplicate_records, 0, "stored twice");
    assert_eq!(report.acknowledged, report.sent, "something never settled");
    assert!(
        report.steps.written_while_detached > 0,
        "the survivor ran alone: {:?}",
        report.steps
    );
    assert!(report.steps.catch_up_ms > 0, "{:?}", report.steps);
    assert!(report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_primary_longer_than_outboxes_last_drops_nothing() {
    long_outage(
        "losing_the_primary_longer_than_outboxes_last_drops_nothing",
        Lose::Primary,
        "async",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_secondary_longer_than_outboxes_last_drops_nothing() {
    long_outage(
        "losing_the_secondary_longer_than_outboxes_last_drops_nothing",
        Lose::Secondary,
        "sync",
    )
    .await;
}
