//! The concierge's metrics behind `GET /metrics`.

use std::sync::Once;

use metrics_exporter_prometheus::PrometheusHandle;

static DESCRIBED: Once = Once::new();

/// The process's Prometheus handle (installed on first use), with this
/// part's metrics described.
pub fn handle() -> &'static PrometheusHandle {
    fleet_api::prom::handle(&DESCRIBED, describe)
}

fn describe() {
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
}
