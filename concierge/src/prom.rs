//! The Prometheus exporter behind `GET /metrics` (the `metrics` recorder is
//! process-global: installed once).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        metrics::describe_counter!(
            "fleet_concierge_endpoint_requests_total",
            "endpoint answers by result"
        );
        metrics::describe_counter!(
            "fleet_concierge_dns_queries_total",
            "DNS queries by response code"
        );
        metrics::describe_counter!(
            "fleet_concierge_failovers_total",
            "promotions this replica made"
        );
        metrics::describe_gauge!(
            "fleet_concierge_region_healthy",
            "1 when the region's hub is healthy"
        );
        metrics::describe_gauge!("fleet_concierge_active_epoch", "epoch of the active hub");
        handle
    })
}
