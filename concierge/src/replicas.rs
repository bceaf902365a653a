//! Health of the concierge replicas the DNS front hands out: each replica
//! checks every replica's `/healthz` (itself included) and serves the healthy
//! ones, in the configured priority order.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dns::Backends;

/// How replicas are reached: plain HTTP by address, or HTTPS under the
/// name devices use (`concierge.<zone>`, which their certificates name),
/// pinned to each replica's address and trusting `roots` besides the
/// public ones.
#[derive(Debug, Clone)]
pub enum Reach {
    Http,
    Https {
        host: String,
        roots: Vec<reqwest::Certificate>,
    },
}

/// Checks `replicas` every `every` until `shutdown`, updating `backends`.
pub async fn watch(
    replicas: Vec<SocketAddr>,
    reach: Reach,
    backends: Backends,
    every: Duration,
    shutdown: CancellationToken,
) {
    let timeout = every.clamp(Duration::from_millis(200), Duration::from_secs(2));
    let targets: Vec<(SocketAddr, String, reqwest::Client)> = replicas
        .iter()
        .map(|r| {
            let mut b = reqwest::Client::builder().timeout(timeout);
            let url = match &reach {
                Reach::Http => format!("http://{r}/healthz"),
                Reach::Https { host, roots } => {
                    b = b.resolve(host, *r);
                    for root in roots {
                        b = b.add_root_certificate(root.clone());
                    }
                    format!("https://{host}:{}/healthz", r.port())
                }
            };
            (*r, url, b.build().unwrap_or_default())
        })
        .collect();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let checks = targets.iter().map(|(r, url, http)| async move {
            let outcome = match http.get(url).send().await {
                Ok(resp) if resp.status().is_success() => Ok(()),
                Ok(resp) => Err(format!("answered {}", resp.status())),
                Err(e) => Err(fleet_api::error_chain(&e)),
            };
            (*r, outcome)
        });
        let results = futures::future::join_all(checks).await;
        let mut healthy: Vec<IpAddr> = Vec::new();
        for (r, outcome) in &results {
            if outcome.is_ok() && !healthy.contains(&r.ip()) {
                healthy.push(r.ip());
            }
        }
        if healthy.is_empty() {
            // Fail open: no replica passing (a wrong CA, an expired
            // certificate, this replica's own network) is more likely a
            // checking problem than every replica down, and an empty answer
            // would leave every device without a concierge.
            tracing::error!(
                "no concierge replica passes its health check; the DNS front serves them all"
            );
            for r in &replicas {
                if !healthy.contains(&r.ip()) {
                    healthy.push(r.ip());
                }
            }
        }
        if healthy != backends.get() {
            // Say why a replica is left out (a private CA not given with
            // --hub-ca shows up here as a certificate error).
            for (r, outcome) in &results {
                if let Err(why) = outcome {
                    tracing::warn!(replica = %r, error = %why, "concierge replica fails its health check");
                }
            }
            tracing::info!(healthy = ?healthy, "concierge replicas changed");
        }
        backends.set(healthy);
    }
}
