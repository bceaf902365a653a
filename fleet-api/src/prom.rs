//! The process's Prometheus recorder behind every `GET /metrics` (feature
//! `prometheus`). The `metrics` recorder is process-global, so it is
//! installed once, by the first part of the process that asks; each part
//! describes its own metrics (see [`handle`]).

use std::sync::{Once, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Histogram buckets for every `*_seconds` metric: fsyncs and round trips
/// from 100 µs to 1 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
];

/// The process's Prometheus handle, installing the recorder on first use;
/// `describe` runs once per `once` (each part passes its own).
pub fn handle(once: &'static Once, describe: fn()) -> &'static PrometheusHandle {
    let handle = HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        handle
    });
    once.call_once(describe);
    handle
}
