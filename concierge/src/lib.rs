//! The concierge: devices ask it which hub is active (over HTTP, after
//! finding it through its DNS front); operators watch the fleet and fail over
//! through it. It holds no state of its own: role and epoch live in the hubs,
//! so any number of replicas can run side by side.

pub mod api;
pub mod checks;
pub mod cli;
pub mod config;
pub mod dns;
pub mod dns_fast;
pub mod failover;
pub mod pacing;
pub mod page;
pub mod prom;
pub mod replicas;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::ConciergeConfig;
use crate::dns::{Backends, FrontHandler};
use crate::view::Fleet;

/// Sockets bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub http: TcpListener,
    /// One or more, sharing one port (see [`dns::bind`]).
    pub dns_udp: Vec<UdpSocket>,
    pub dns_tcp: TcpListener,
}

/// A running concierge replica.
pub struct Concierge {
    pub http_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub fleet: Arc<Fleet>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    dns: hickory_server::Server<FrontHandler>,
}

impl std::fmt::Debug for Concierge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Concierge")
            .field("http_addr", &self.http_addr)
            .field("dns_addr", &self.dns_addr)
            .finish_non_exhaustive()
    }
}

impl Concierge {
    /// Starts polling the hubs and serving HTTP and DNS.
    ///
    /// # Errors
    /// When a socket has no local address or the zone is invalid.
    pub async fn start(config: ConciergeConfig, listeners: Listeners) -> anyhow::Result<Concierge> {
        let _ = prom::handle();
        let http_addr = listeners.http.local_addr()?;
        let dns_addr = listeners
            .dns_udp
            .first()
            .ok_or_else(|| anyhow::anyhow!("no DNS socket"))?
            .local_addr()?;
        let config = Arc::new(config);
        let fleet = Fleet::new(config.clone());
        fleet.poll_once().await;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(fleet.clone().poll_loop(shutdown.clone()));
        if let Some(after) = config.auto_failover_after {
            tasks.spawn(failover::auto(fleet.clone(), after, shutdown.clone()));
        }
        let backends = Backends::default();
        let replicas = if config.replicas.is_empty() {
            let ip = if http_addr.ip().is_unspecified() {
                [127, 0, 0, 1].into()
            } else {
                http_addr.ip()
            };
            vec![SocketAddr::new(ip, http_addr.port())]
        } else {
            config.replicas.clone()
        };
        backends.set(replicas.iter().map(SocketAddr::ip).collect());
        let reach = match config.tls {
            None => replicas::Reach::Http,
            Some(_) => replicas::Reach::Https {
                host: config.host().trim_end_matches('.').to_string(),
                roots: config.hub_roots.clone(),
            },
        };
        tasks.spawn(replicas::watch(
            replicas,
            reach,
            backends.clone(),
            config.poll.max(Duration::from_millis(200)),
            shutdown.clone(),
        ));
        let handler = FrontHandler::new(&config.zone, config.ttl_s, backends.clone())?;
        // The full handler serves TCP, and UDP on an internal loopback
        // socket that the fast path relays what it cannot answer to.
        let internal: SocketAddr = if dns_addr.is_ipv4() {
            ([127, 0, 0, 1], 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let internal = UdpSocket::bind(internal).await?;
        let full = internal.local_addr()?;
        let dns = dns::serve(handler, vec![internal], listeners.dns_tcp);
        let zone = config.zone.clone();
        let fast = Arc::new(dns_fast::FastPath::new(
            &[format!("concierge.{zone}"), format!("ns.{zone}"), zone],
            backends,
            full,
        ));
        for socket in listeners.dns_udp {
            tasks.spawn(fast.clone().serve(Arc::new(socket), shutdown.clone()));
        }
        // Per replica, not split among them: the DNS front hands replicas
        // out in priority order, so one answers the fleet at a time (the
        // hubs' own connect rate is the backstop when several do).
        let rate = f64::from(config.connect_rate);
        let api = Arc::new(api::ApiState {
            fleet: fleet.clone(),
            pacer: pacing::Pacer::new(rate, f64::from(config.lookups_per_source)),
            long_polls: fleet_api::limit::Slots::new(
                config.long_polls_per_source as usize,
                config.http_limits.max_connections / 2,
            ),
        });
        let token = shutdown.clone();
        let http = listeners.http;
        let limits = config.http_limits;
        match &config.tls {
            None => {
                tasks.spawn(fleet_api::serve::serve(
                    http,
                    api::router(api),
                    limits,
                    token,
                ));
            }
            Some(tls) => {
                let https =
                    fleet_api::https::TlsListener::new(http, tls.clone(), Duration::from_secs(5))?;
                tasks.spawn(fleet_api::serve::serve(
                    https,
                    api::router(api),
                    limits,
                    token,
                ));
            }
        }
        tracing::info!(%http_addr, %dns_addr, zone = %config.zone, "concierge started");
        Ok(Concierge {
            http_addr,
            dns_addr,
            fleet,
            shutdown,
            tasks,
            dns,
        })
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let _ = self.dns.shutdown_gracefully().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}
