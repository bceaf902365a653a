//! A fixed budget of seeded power cuts under every durable structure (the
//! hub's event log, the agent's outbox, the hub's state files). Any number
//! more: `fleet torture --seeds N`.

use fleet::torture::{Target, torture};

fn seeds() -> u64 {
    std::env::var("FLEET_TORTURE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500)
}

fn run(target: Target) {
    let report = torture(&[target], 0..seeds(), |_| {});
    assert!(
        report.failures.is_empty(),
        "{} failing seeds, first: {:?} (replay: fleet torture --only {target:?} --seed N)",
        report.failures.len(),
        report.failures.first()
    );
    assert_eq!(report.seeds, seeds());
    assert!(
        report.power_cuts >= 2 * seeds(),
        "only {} power cuts",
        report.power_cuts
    );
}

#[test]
fn the_event_log_loses_nothing_acknowledged_to_power_cuts() {
    run(Target::Log);
}

#[test]
fn the_outbox_loses_nothing_handed_out_to_power_cuts() {
    run(Target::Outbox);
}

#[test]
fn state_files_hold_the_old_or_the_new_value_after_power_cuts() {
    run(Target::Files);
}
