//! The hub's metrics behind `GET /metrics`. (rumqttd's own exporter is never
//! enabled: it would fight for the process-global recorder, see `broker`.)

use std::sync::Once;

use metrics_exporter_prometheus::PrometheusHandle;

static DESCRIBED: Once = Once::new();

/// The process's Prometheus handle (installed on first use), with this
/// part's metrics described.
pub fn handle() -> &'static PrometheusHandle {
    fleet_api::prom::handle(&DESCRIBED, describe)
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
    describe_gauge!(
        "fleet_hub_peer_detached",
        "1 while the peer region is detached: this region runs alone, without a second copy"
    );
    describe_gauge!(
        "fleet_hub_written_while_detached_records",
        "records written since the peer was detached (no second copy yet)"
    );
    describe_counter!(
        "fleet_hub_peer_detaches_total",
        "detachments of the peer region, by whether an operator did it"
    );
    describe_counter!(
        "fleet_hub_mids_skipped_total",
        "mids a device skipped (it sent mid n after n-k-1): its outbox dropped them when full"
    );
    describe_counter!(
        "fleet_hub_replication_skipped_records_total",
        "records a secondary never received because the primary's retention deleted them first"
    );
    describe_gauge!(
        "fleet_hub_registry_devices",
        "devices in the registry as this hub's mirror holds it"
    );
    describe_gauge!(
        "fleet_hub_registry_max_version",
        "highest registry record version this hub has applied (compare regions)"
    );
}

/// Counters that alerts use start at zero, so that a rule sees them before
/// the first event.
pub fn zero_counters() {
    for name in [
        "fleet_hub_mids_skipped_total",
        "fleet_hub_replication_skipped_records_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}
