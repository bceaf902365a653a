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
}
