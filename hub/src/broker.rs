//! The live stream: an embedded rumqttd that re-publishes every committed
//! record as `fleet/{region}/devices/{device_id}/events`, so that any standard
//! MQTT client with the stream credentials (dashboards, `mosquitto_sub`) can
//! watch. It is a view, not a store: when it falls behind, records are dropped
//! from the view and counted; durable consumption reads the event log.
//!
//! Only this module touches rumqttd, and it works around what
//! guides/rumqtt.md documents: `Config::default()` is unusable (settings are
//! spelled out), rumqttd cannot report its port (one is reserved and the
//! start is verified, retrying on a taken port), refused client ids poison
//! the listener (the auth hook refuses them first), its Prometheus exporter
//! would fight ours for the global recorder (never enabled), `LinkTx::publish`
//! blocks (it runs on a thread of its own), and there is no shutdown API (its
//! runtime is ours and is dropped; the router thread stays parked).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::LinkBuilder;
use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use subtle::ConstantTimeEq;

/// Messages the view may lag behind before it drops (and counts) records.
const FEED_QUEUE: usize = 20_000;

/// A running live stream.
pub struct LiveStream {
    addr: SocketAddr,
    feed: SyncSender<(String, Bytes)>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn router_config() -> RouterConfig {
    RouterConfig {
        // Far above real use: hitting the limit poisons the listener (rumqtt #991).
        max_connections: 100_000,
        max_outgoing_packet_count: 200,
        // A view keeps little history per filter; rumqttd never frees a
        // filter's log, so the gate bounds how many filters there are.
        max_segment_size: 1 << 20,
        max_segment_count: 2,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn settings(listen: SocketAddr, user: &str, password: &str) -> ServerSettings {
    let mut s = ServerSettings {
        name: "live-stream".to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let user = Arc::new(user.to_string());
    let password = Arc::new(password.to_string());
    s.set_auth_handler(move |client_id: String, u: String, p: String| {
        let (user, password) = (user.clone(), password.clone());
        async move {
            // Ids the router refuses later poison the listener: refuse them here.
            // (An empty id is fine: rumqttd assigns one.)
            let id_ok = !client_id.contains(['+', '#', '/', '$']);
            let user_ok = u.as_bytes().ct_eq(user.as_bytes());
            let pass_ok = p.as_bytes().ct_eq(password.as_bytes());
            id_ok && bool::from(user_ok & pass_ok)
        }
    });
    s
}

fn free_port(ip: std::net::IpAddr) -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))?.local_addr()
}

impl LiveStream {
    /// Starts the broker on `listen` (port 0: any free port).
    ///
    /// # Errors
    /// When no listener comes up.
    pub fn start(listen: SocketAddr, user: &str, password: &str) -> anyhow::Result<LiveStream> {
        let router_tx = Router::new(0, router_config()).spawn();
        let (link_tx, link_rx, _) = LinkBuilder::new("fleet-hub-feed", router_tx.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("live stream link: {e:?}"))?;
        let (feed, queue) = sync_channel::<(String, Bytes)>(FEED_QUEUE);
        std::thread::Builder::new()
            .name("live-stream-feed".into())
            .spawn(move || {
                let mut link_tx = link_tx;
                let _keep = link_rx;
                while let Ok((topic, payload)) = queue.recv() {
                    if link_tx.publish(topic, payload).is_err() {
                        return;
                    }
                }
            })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("live-stream")
            .enable_all()
            .build()?;
        for attempt in 0..5 {
            let addr = if listen.port() == 0 {
                free_port(listen.ip())?
            } else {
                listen
            };
            let mut server = Server::new(settings(addr, user, password), router_tx.clone(), V4);
            let (up_tx, up_rx) = std::sync::mpsc::channel();
            runtime.spawn(async move {
                if let Err(e) = server.start(LinkType::Remote).await {
                    let _ = up_tx.send(format!("{e}"));
                }
            });
            // rumqttd cannot say when (or whether) it bound: wait until it accepts.
            for _ in 0..200 {
                if let Ok(err) = up_rx.try_recv() {
                    anyhow::ensure!(
                        listen.port() == 0 && attempt < 4,
                        "live stream on {addr}: {err}"
                    );
                    break;
                }
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
                    return Ok(LiveStream {
                        addr,
                        feed,
                        runtime: Some(runtime),
                    });
                }
                std::thread::park_timeout(Duration::from_millis(10));
            }
        }
        anyhow::bail!("the live stream did not start on {listen}")
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that publishes into the view without blocking.
    pub fn publisher(&self) -> LivePublisher {
        LivePublisher {
            feed: self.feed.clone(),
            topics: HashMap::new(),
        }
    }
}

/// Publishes committed records into the view; drops and counts when full.
#[derive(Debug, Clone)]
pub struct LivePublisher {
    feed: SyncSender<(String, Bytes)>,
    topics: HashMap<String, String>,
}

impl LivePublisher {
    pub fn publish(&mut self, region: &str, device: &str, payload: Bytes) {
        let topic = self
            .topics
            .entry(device.to_string())
            .or_insert_with(|| format!("fleet/{region}/devices/{device}/events"))
            .clone();
        if self.topics.len() > 100_000 {
            self.topics.clear();
        }
        match self.feed.try_send((topic, payload)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("fleet_hub_live_stream_dropped_total").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// A plain rumqttd (anonymous, memory only, PUBACK before anything is
/// stored): the baseline that `fleet bench ingest` measures the hub against.
/// Not for serving devices.
pub struct BaselineBroker {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for BaselineBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaselineBroker")
            .field("addr", &self.addr)
            .finish()
    }
}

impl BaselineBroker {
    /// Starts on a free port of `ip`. Blocks until it accepts connections.
    ///
    /// # Errors
    /// When no listener comes up.
    pub fn start(ip: std::net::IpAddr) -> anyhow::Result<BaselineBroker> {
        let router_tx = Router::new(0, router_config()).spawn();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("baseline-rumqttd")
            .enable_all()
            .build()?;
        for _ in 0..5 {
            let addr = free_port(ip)?;
            let mut s = settings(addr, "", "");
            s.connections.external_auth = None;
            let mut server = Server::new(s, router_tx.clone(), V4);
            runtime.spawn(async move {
                let _ = server.start(LinkType::Remote).await;
            });
            for _ in 0..200 {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
                    return Ok(BaselineBroker {
                        addr,
                        _runtime: runtime,
                    });
                }
                std::thread::park_timeout(Duration::from_millis(10));
            }
        }
        anyhow::bail!("baseline rumqttd did not start")
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}
