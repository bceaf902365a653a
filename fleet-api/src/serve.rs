//! Serving an axum router with limits a hostile client cannot run past
//! (feature `http-server`): `axum::serve` has no header timeout and no
//! connection cap, so ~20,000 connections that each sent half a request
//! header held a hub's file descriptors (health checks, MQTT CONNECTs and
//! snapshots failed) while the concierge still called it healthy.
//!
//! Each connection must send its request headers within
//! [`HttpLimits::header_timeout`], at most [`HttpLimits::max_connections`]
//! are served at once (more wait in the kernel's accept queue), and a
//! shutdown lets requests in progress finish.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::limit::{Slots, source_key};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Limits of one HTTP server.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// How long a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Of those, from one client address (an IPv6 /64), so that one client
    /// cannot hold them all.
    pub max_per_source: usize,
}

impl Default for HttpLimits {
    /// 10 s for headers, 1,024 connections (well below a process's file
    /// descriptor limit, which MQTT devices need too).
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_per_source: 256,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve<L>(
    mut listener: L,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_source: Slots<IpAddr> = Slots::new(limits.max_per_source, limits.max_connections);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (io, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok(held) = per_source.take(&source_key(peer.ip())) else {
            tracing::debug!(%peer, "http connection refused: too many from this address");
            continue;
        };
        // Handlers see the client's address as `ConnectInfo` (per-source limits).
        let service = TowerToHyperService::new(tower::Layer::layer(
            &axum::Extension(axum::extract::ConnectInfo(peer)),
            router.clone(),
        ));
        let stop = shutdown.clone();
        connections.spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
            drop(held);
        });
        while connections.try_join_next().is_some() {}
    }
    // Requests in progress finish (each connection shuts down gracefully).
    while connections.join_next().await.is_some() {}
}
