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

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_api::{DeviceId, DeviceKey};
use registry_sync::AuthOutcome;
use rumqttc::mqttbytes::Protocol;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::ingest::Ingest;
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
    /// Accepted CONNECTs per second (a token bucket with a one-second burst).
    pub connect_rate: u32,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for FrontConfig {
    fn default() -> Self {
        Self {
            payload_limit: 256 * 1024,
            max_inflight: 256,
            connect_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(5),
            connect_rate: 2000,
            tls: None,
        }
    }
}

/// Loads a rustls server configuration from PEM files (certificate chain and
/// private key).
///
/// # Errors
/// When a file is unreadable or holds no usable certificate or key.
pub fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse TLS certificate {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read TLS key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not match")?;
    Ok(Arc::new(config))
}

/// A token bucket on tokio time (pausable in tests); `governor` keeps its
/// own clock, which paused-time tests cannot drive.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            tokens: f64::from(rate.max(1)),
            last: Instant::now(),
        }
    }

    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
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
    tls: Option<tokio_rustls::TlsAcceptor>,
}

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
            bucket: Mutex::new(TokenBucket::new(config.connect_rate)),
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
                    let _ = tcp.set_nodelay(true);
                    let front = self.clone();
                    tokio::spawn(async move { front.handle(tcp, peer).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        self.sessions.kick_all(crate::sessions::Kick::Shutdown);
    }

    async fn handle(self: Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        match &self.tls {
            None => conn::run(tcp, &self, peer).await,
            Some(acceptor) => {
                match tokio::time::timeout(self.config.tls_handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => conn::run(tls, &self, peer).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "tls handshake failed");
                        metrics::counter!("fleet_hub_disconnects_total", "reason" => "tls_handshake").increment(1);
                    }
                    Err(_) => {
                        metrics::counter!("fleet_hub_disconnects_total", "reason" => "tls_timeout")
                            .increment(1);
                    }
                }
            }
        }
    }

    /// Decides whether a CONNECT may proceed.
    async fn admit(&self, c: &Connect) -> Result<DeviceId, Refusal> {
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
        if !self
            .bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_take()
        {
            return Err(Refusal(ServiceUnavailable, "rate_limited"));
        }
        if !self.state.accepting() {
            return Err(Refusal(ServiceUnavailable, "not_primary"));
        }
        let Ok(key) = DeviceKey::parse(&login.password) else {
            return Err(Refusal(BadUserNamePassword, "bad_credentials"));
        };
        match self.auth.verify(&device, &key).await {
            Ok(AuthOutcome::Enabled) => Ok(device),
            Ok(AuthOutcome::Disabled) => Err(Refusal(NotAuthorized, "disabled")),
            Ok(AuthOutcome::Unknown | AuthOutcome::WrongKey) => {
                Err(Refusal(BadUserNamePassword, "bad_credentials"))
            }
            Err(e) => {
                tracing::warn!(device_id = %device, error = %format!("{e:#}"), "registry unavailable for connect");
                Err(Refusal(ServiceUnavailable, "registry_unavailable"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_limits_the_rate() {
        let mut b = TokenBucket::new(10);
        let taken = (0..100).filter(|_| b.try_take()).count();
        assert_eq!(taken, 10, "one second of burst");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..100).filter(|_| b.try_take()).count(), 5);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            (0..100).filter(|_| b.try_take()).count(),
            10,
            "burst stays capped"
        );
    }
}
