//! Health of the concierge replicas the DNS front hands out: each replica
//! checks every replica's `/healthz` (itself included) and serves the healthy
//! ones, in the configured priority order.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dns::Backends;

/// Checks `replicas` every `every` until `shutdown`, updating `backends`.
pub async fn watch(
    replicas: Vec<SocketAddr>,
    backends: Backends,
    every: Duration,
    shutdown: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .timeout(every.clamp(Duration::from_millis(200), Duration::from_secs(2)))
        .build()
        .unwrap_or_default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let checks = replicas.iter().map(|r| {
            let http = http.clone();
            async move {
                let ok = http
                    .get(format!("http://{r}/healthz"))
                    .send()
                    .await
                    .is_ok_and(|resp| resp.status().is_success());
                (r.ip(), ok)
            }
        });
        let results = futures::future::join_all(checks).await;
        let mut healthy: Vec<IpAddr> = Vec::new();
        for (ip, ok) in results {
            if ok && !healthy.contains(&ip) {
                healthy.push(ip);
            }
        }
        if healthy != backends.get() {
            tracing::info!(healthy = ?healthy, "concierge replicas changed");
        }
        backends.set(healthy);
    }
}
