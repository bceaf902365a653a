//! The consumer runner's metrics behind its `GET /metrics`.

use std::sync::Once;

use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::PrometheusHandle;

static DESCRIBED: Once = Once::new();

/// The process's Prometheus handle (installed on first use), with this
/// part's metrics described.
pub fn handle() -> &'static PrometheusHandle {
    fleet_api::prom::handle(&DESCRIBED, describe)
}

/// Creates the group's counters at zero, so that rates and alerts on them
/// work before the first event (a series that does not exist never alerts).
pub fn register(group: &str) {
    for name in [
        "fleet_consumer_records_total",
        "fleet_consumer_retries_total",
        "fleet_consumer_dead_letters_total",
        "fleet_consumer_rewinds_total",
        "fleet_consumer_expired_records_total",
    ] {
        metrics::counter!(name, "group" => group.to_string()).increment(0);
    }
}

fn describe() {
    describe_counter!(
        "fleet_consumer_records_total",
        "records a consumer group's handler accepted"
    );
    describe_counter!(
        "fleet_consumer_failures_total",
        "handler failures by kind (record, unavailable)"
    );
    describe_counter!(
        "fleet_consumer_retries_total",
        "retries of rejected records"
    );
    describe_counter!(
        "fleet_consumer_dead_letters_total",
        "records written to the dead-letter log"
    );
    describe_counter!(
        "fleet_consumer_breaker_transitions_total",
        "circuit breaker transitions this instance saw, by new state"
    );
    describe_gauge!(
        "fleet_consumer_breaker_state",
        "circuit breaker: 0 closed, 1 half-open, 2 open"
    );
    describe_gauge!(
        "fleet_consumer_checkpoint",
        "next offset to process per partition held"
    );
    describe_gauge!(
        "fleet_consumer_lag_records",
        "records behind the high watermark per partition held"
    );
    describe_gauge!(
        "fleet_consumer_partitions_held",
        "partitions this instance holds leases on"
    );
    describe_counter!(
        "fleet_consumer_rewinds_total",
        "checkpoints rewound because a failover replaced records past them"
    );
    describe_counter!(
        "fleet_consumer_expired_records_total",
        "records retention removed before the group read them"
    );
}
