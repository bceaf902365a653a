//! Fleet's own MQTT 3.1.1 front for devices, on the public codec of the
//! rumqtt family (`rumqttc::mqttbytes::v4`).
//!
//! Why not rumqttd here: it PUBACKs from memory before anything is durable,
//! cannot tell which client published (no per-device topic ACL), and closes
//! refused connections without a CONNACK code (guides/rumqtt.md). This front
//! acknowledges a publish only when the ingest pipeline says it is durable,
//! checks every topic against the device's own namespace, and answers every
//! refused CONNECT with its proper return code.

mod conn;
pub mod topic;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_api::limit::{KeyedBuckets, Slot, Slots, TokenBucket, source_key};
use fleet_api::{DeviceId, DeviceKey};
use registry_sync::AuthOutcome;
use rumqttc::mqttbytes::Protocol;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::ingest::{Ingest, IngestError};
use crate::sessions::Sessions;
use crate::state::HubState;

/// Settings of the device front.
#[derive(Clone, Debug)]
pub struct FrontConfig {
    /// Largest accepted payload; larger publishes close the connection.
    pub payload_limit: usize,
    /// Unacknowledged publishes per connection before it stops reading.
    pub max_inflight: usize,
    /// Time allowed from accept to a complete CONNECT (after TLS).
    pub connect_timeout: Duration,
    /// Time allowed for a TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Authenticated CONNECTs per second in all (a token bucket with a
    /// one-second burst); spent only by CONNECTs with a valid key, so
    /// wrong passwords cannot use it up.
    pub connect_rate: u32,
    /// Connections accepted per second from one source address (IPv6: one
    /// /64), with a one-second burst; a failed login costs its source
    /// [`FAILED_LOGIN_COST`] more.
    pub connect_rate_per_source: u32,
    /// Connections open at once, in all (file descriptors are finite).
    pub max_connections: usize,
    /// Connections that have not authenticated yet, in all.
    pub max_pending: usize,
    /// Connections that have not authenticated yet, per source address.
    pub max_pending_per_source: usize,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// What a failed login costs its source, in connections of its rate: six
/// clients looping on a wrong password pay for their own attempts instead
/// of everyone's.
pub const FAILED_LOGIN_COST: f64 = 10.0;

impl Default for FrontConfig {
    fn default() -> Self {
        Self {
            payload_limit: 256 * 1024,
            max_inflight: 256,
            connect_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(5),
            connect_rate: 2000,
            connect_rate_per_source: 500,
            max_connections: 100_000,
            max_pending: 4096,
            max_pending_per_source: 256,
            tls: None,
        }
    }
}

/// Handles of the per-publish counters (a labelled lookup per publish costs
/// more than the counting).
pub(crate) struct FrontMetrics {
    pub publishes_qos0: metrics::Counter,
    pub publishes_qos1: metrics::Counter,
    pub publish_bytes: metrics::Counter,
}

impl FrontMetrics {
    fn new() -> Self {
        Self {
            publishes_qos0: metrics::counter!("fleet_hub_publishes_total", "qos" => "0"),
            publishes_qos1: metrics::counter!("fleet_hub_publishes_total", "qos" => "1"),
            publish_bytes: metrics::counter!("fleet_hub_publish_bytes_total"),
        }
    }
}

/// The device front of one hub.
pub struct Front {
    pub(crate) metrics: FrontMetrics,
    /// True while ingest is throttled (async replication lag over its limit).
    pub(crate) throttle: tokio::sync::watch::Receiver<bool>,
    config: FrontConfig,
    ingest: Arc<Ingest>,
    auth: Arc<Auth>,
    sessions: Arc<Sessions>,
    state: Arc<HubState>,
    bucket: Mutex<TokenBucket>,
    sources: KeyedBuckets<IpAddr>,
    pending: Slots<IpAddr>,
    connections: Arc<Semaphore>,
    pub(crate) accept_health: Arc<AcceptHealth>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Whether the device listener can accept: the last time `accept` failed
/// (out of file descriptors and the like). `/healthz` reports a hub whose
/// listener failed recently as unhealthy, so the concierge stops sending
/// devices to a hub that cannot take them.
#[derive(Debug, Default)]
pub struct AcceptHealth {
    last_failure: Mutex<Option<(Instant, String)>>,
}

/// How long a failed `accept` keeps the hub unhealthy.
const ACCEPT_FAILURE_HOLD: Duration = Duration::from_secs(5);

impl AcceptHealth {
    fn failed(&self, error: &std::io::Error) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), error.to_string()));
    }

    /// The error of an `accept` that failed within the last few seconds.
    pub fn problem(&self) -> Option<String> {
        let last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((at, error)) if at.elapsed() < ACCEPT_FAILURE_HOLD => Some(format!(
                "the MQTT listener cannot accept connections: {error}"
            )),
            _ => None,
        }
    }
}

/// Counts a connection turned away before its CONNECT was read.
fn count_refused(reason: &'static str) {
    metrics::counter!("fleet_hub_connects_total", "result" => reason).increment(1);
}

/// Source addresses remembered by the per-source limits.
const MAX_SOURCES: usize = 100_000;

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A refused CONNECT: the code sent back and the reason counted.
struct Refusal(ConnectReturnCode, &'static str);

impl Front {
    pub fn new(
        config: FrontConfig,
        ingest: Arc<Ingest>,
        auth: Arc<Auth>,
        sessions: Arc<Sessions>,
        state: Arc<HubState>,
        throttle: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Front> {
        let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        Arc::new(Front {
            metrics: FrontMetrics::new(),
            throttle,
            bucket: Mutex::new(TokenBucket::new(
                f64::from(config.connect_rate),
                f64::from(config.connect_rate),
            )),
            sources: KeyedBuckets::new(
                f64::from(config.connect_rate_per_source),
                f64::from(config.connect_rate_per_source),
                MAX_SOURCES,
            ),
            pending: Slots::new(config.max_pending_per_source, config.max_pending),
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            accept_health: Arc::default(),
            config,
            ingest,
            auth,
            sessions,
            state,
            tls,
        })
    }

    /// Accepts connections until `shutdown`; each runs in its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    // Refused here, the cheapest place: before any byte is read.
                    let Ok(open) = self.connections.clone().try_acquire_owned() else {
                        count_refused("connections_total");
                        continue;
                    };
                    let source = source_key(peer.ip());
                    if self.sources.try_take(&source).is_err() {
                        count_refused("source_rate");
                        continue;
                    }
                    let pending = match self.pending.take(&source) {
                        Ok(slot) => slot,
                        Err(full) => {
                            count_refused(full.reason());
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let front = self.clone();
                    // Plain and TLS connections are different tasks: a plain
                    // one does not carry room for a TLS stream (its task is
                    // most of what an idle device costs).
                    match self.tls.clone() {
                        None => {
                            tokio::spawn(async move {
                                conn::run(tcp, &front, peer, pending).await;
                                drop(open);
                            });
                        }
                        Some(acceptor) => {
                            tokio::spawn(async move {
                                front.handle_tls(acceptor, tcp, peer, pending).await;
                                drop(open);
                            });
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors or memory: back off, keep
                    // serving, and say so in /healthz. (Other errors, say a
                    // connection reset before it was accepted, are the
                    // client's.) EMFILE 24, ENFILE 23, ENOMEM 12, ENOBUFS 105.
                    if matches!(e.raw_os_error(), Some(24 | 23 | 12 | 105)) {
                        self.accept_health.failed(&e);
                    }
                    metrics::counter!("fleet_hub_accept_errors_total").increment(1);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        self.sessions.kick_all(crate::sessions::Kick::Shutdown);
    }

    async fn handle_tls(
        self: Arc<Self>,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        pending: Slot<IpAddr>,
    ) {
        match tokio::time::timeout(self.config.tls_handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => conn::run(tls, &self, peer, pending).await,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "tls handshake failed");
                metrics::counter!("fleet_hub_disconnects_total", "reason" => "tls_handshake")
                    .increment(1);
            }
            Err(_) => {
                metrics::counter!("fleet_hub_disconnects_total", "reason" => "tls_timeout")
                    .increment(1);
            }
        }
    }

    /// Decides whether a CONNECT may proceed.
    async fn admit(&self, c: &Connect, peer: SocketAddr) -> Result<DeviceId, Refusal> {
        use ConnectReturnCode::*;
        if c.protocol != Protocol::V4 {
            return Err(Refusal(RefusedProtocolVersion, "protocol_version"));
        }
        let device = DeviceId::new(c.client_id.as_str())
            .map_err(|_| Refusal(BadClientId, "bad_client_id"))?;
        let Some(login) = &c.login else {
            return Err(Refusal(BadUserNamePassword, "no_credentials"));
        };
        if login.username != c.client_id {
            return Err(Refusal(BadClientId, "client_id_not_username"));
        }
        if !self.state.accepting() {
            return Err(Refusal(ServiceUnavailable, "not_primary"));
        }
        let outcome = match DeviceKey::parse(&login.password) {
            Err(_) => AuthOutcome::WrongKey,
            Ok(key) => match self.auth.verify(&device, &key).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::warn!(device_id = %device, error = %format!("{e:#}"), "registry unavailable for connect");
                    return Err(Refusal(ServiceUnavailable, "registry_unavailable"));
                }
            },
        };
        match outcome {
            AuthOutcome::Enabled => {}
            AuthOutcome::Disabled => return Err(Refusal(NotAuthorized, "disabled")),
            AuthOutcome::Unknown | AuthOutcome::WrongKey => {
                // The offender pays, not the fleet: its source's bucket.
                self.sources
                    .charge(&source_key(peer.ip()), FAILED_LOGIN_COST);
                return Err(Refusal(BadUserNamePassword, "bad_credentials"));
            }
        }
        // The fleet-wide rate protects the hub from a storm of real devices;
        // only CONNECTs that authenticated spend it.
        if self
            .bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_take()
            .is_err()
        {
            return Err(Refusal(ServiceUnavailable, "rate_limited"));
        }
        // On a log shared by several hubs: the device's partition must be
        // this hub's, and its last mid known (looked up once after a
        // takeover). Otherwise it asks the concierge again.
        match self.ingest.learn(&device).await {
            Ok(()) => Ok(device),
            Err(IngestError::NotOwner(_)) => {
                Err(Refusal(ServiceUnavailable, "partition_elsewhere"))
            }
            Err(e) => {
                tracing::warn!(device_id = %device, error = %e, "cannot learn the device's last mid");
                Err(Refusal(ServiceUnavailable, "log_unavailable"))
            }
        }
    }
}
