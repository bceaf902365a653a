//! The Prometheus exporter behind `GET /metrics`.
//!
//! The `metrics` recorder is process-global, so it is installed once; a
//! process normally runs one hub. (rumqttd's own exporter is never enabled:
//! it would fight for the same global slot, see `broker`.)

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("fleet_hub_fsync_seconds".into()),
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("fleet_hub_connections", "devices connected now");
    describe_counter!(
        "fleet_hub_connects_total",
        "CONNECT attempts by result (accepted or the refusal reason)"
    );
    describe_counter!("fleet_hub_disconnects_total", "ended connections by reason");
    describe_counter!(
        "fleet_hub_publishes_total",
        "telemetry publishes read, by QoS"
    );
    describe_counter!(
        "fleet_hub_publish_bytes_total",
        "telemetry payload bytes read"
    );
    describe_counter!(
        "fleet_hub_duplicates_total",
        "publishes with an already stored mid (acknowledged, not stored again)"
    );
    describe_counter!(
        "fleet_hub_acl_violations_total",
        "publishes or subscriptions outside the device's namespace"
    );
    describe_counter!(
        "fleet_hub_refused_total",
        "packets refused (too large, QoS 2, malformed, protocol)"
    );
    describe_histogram!(
        "fleet_hub_fsync_seconds",
        "duration of one group-commit write + fdatasync"
    );
    describe_gauge!(
        "fleet_hub_partition_high_watermark",
        "next offset per partition"
    );
    describe_counter!(
        "fleet_hub_live_stream_dropped_total",
        "records the live stream view dropped because it fell behind"
    );
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
