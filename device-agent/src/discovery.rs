//! Finding the hub: resolve the concierge's name through the configured DNS
//! servers only (never /etc/resolv.conf or /etc/hosts), ask it for this
//! device's endpoint, and honour its `Retry-After`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fleet_api::concierge::EndpointResponse;
use fleet_api::{DeviceId, Epoch, ErrorBody, ErrorCode, Region};
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

/// The longest `Retry-After` honoured, in seconds.
pub const MAX_RETRY_AFTER_S: u64 = 300;

/// The longest a long-polling lookup waits for the next primary, seconds.
pub const LONG_POLL_S: u64 = 10;

/// What asking the concierge gave.
#[derive(Debug)]
pub enum Lookup {
    Endpoint(EndpointResponse),
    /// No hub is active (above the epoch asked for): a device that knows
    /// an epoch long-polls for the next one instead of sleeping.
    NoHub(Duration, String),
    /// Pacing (this address, or a full reconnect schedule): ask again
    /// after this long.
    RetryAfter(Duration, String),
}

/// How to ask.
#[derive(Clone, Debug, Default)]
pub struct Ask {
    /// Only a hub with an epoch above this one, waiting (long poll) up to
    /// [`LONG_POLL_S`] for it: the device saw the hub of this epoch go away.
    pub above: Option<Epoch>,
    /// The region the device is connected to: a refresh, which takes no
    /// slot of the reconnect schedule when it keeps the device there.
    pub connected_to: Option<Region>,
}

/// Errors of discovery: all of them mean "keep the last good endpoint".
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid concierge URL {0:?}: expected https://HOST:PORT")]
    BadUrl(String),
    #[error(
        "refusing plaintext concierge {0:?}: use https:// (pass --allow-plaintext only on a trusted network)"
    )]
    Plaintext(String),
    #[error("concierge: {0}")]
    Http(String),
    #[error("concierge answered {status}: {message}")]
    Api { status: u16, message: String },
}

/// A resolver pinned to `servers` (UDP, falling back to TCP), honouring TTLs.
pub fn resolver(servers: &[SocketAddr]) -> TokioResolver {
    let name_servers = servers
        .iter()
        .map(|s| {
            let mut udp = ConnectionConfig::udp();
            udp.port = s.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = s.port();
            NameServerConfig::new(s.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.ndots = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], name_servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .expect("resolver configuration")
}

/// Feeds reqwest's connector from the pinned resolver.
struct PinnedDns(Arc<TokioResolver>);

impl reqwest::dns::Resolve for PinnedDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let resolver = self.0.clone();
        Box::pin(async move {
            let ips = resolver.lookup_ip(name.as_str()).await?;
            let addrs: Vec<SocketAddr> = ips
                .iter()
                .map(|ip: IpAddr| SocketAddr::new(ip, 0))
                .collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Asks a concierge where devices should connect. One is shared by every
/// device of a process.
#[derive(Clone, Debug)]
pub struct Discovery {
    base: String,
    http: reqwest::Client,
}

impl Discovery {
    /// `concierge` like `https://concierge.fleet.test:7070`; its host is
    /// resolved through `dns` only, its certificate verified against `tls`.
    /// An `http://` concierge is refused unless `allow_plaintext`.
    ///
    /// # Errors
    /// When the URL is not https://HOST:PORT (or http:// when allowed).
    pub fn new(
        concierge: &str,
        dns: &[SocketAddr],
        tls: Arc<rustls::ClientConfig>,
        allow_plaintext: bool,
    ) -> Result<Discovery, DiscoveryError> {
        let ok = (concierge.starts_with("http://") || concierge.starts_with("https://"))
            && reqwest::Url::parse(concierge).is_ok_and(|u| u.host_str().is_some());
        if !ok {
            return Err(DiscoveryError::BadUrl(concierge.to_string()));
        }
        if concierge.starts_with("http://") && !allow_plaintext {
            return Err(DiscoveryError::Plaintext(concierge.to_string()));
        }
        let resolver = Arc::new(resolver(dns));
        let mut tls = (*tls).clone();
        // reqwest speaks HTTP/1.1 and HTTP/2 over a preconfigured TLS config
        // only if it is offered them by ALPN.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(!allow_plaintext)
            .dns_resolver(Arc::new(PinnedDns(resolver)))
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            // Replicas come and go: do not keep talking to one the DNS
            // front stopped handing out.
            .pool_idle_timeout(Duration::from_secs(5))
            // Long polls of many simulated devices each take a connection;
            // once answered, only a few are kept, so the pool does not
            // hold thousands of descriptors next to the devices' sockets.
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| DiscoveryError::Http(e.to_string()))?;
        Ok(Discovery {
            base: concierge.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// `GET /v1/devices/{id}/endpoint`.
    ///
    /// # Errors
    /// When no concierge answers or the answer is not understood.
    pub async fn lookup(&self, device: &DeviceId, ask: &Ask) -> Result<Lookup, DiscoveryError> {
        let url = format!("{}/v1/devices/{device}/endpoint", self.base);
        let mut req = self.http.get(&url);
        if let Some(e) = ask.above {
            req = req
                .query(&[("wait_for_epoch", e.0), ("wait_s", LONG_POLL_S)])
                .timeout(Duration::from_secs(LONG_POLL_S + 5));
        }
        if let Some(r) = &ask.connected_to {
            req = req.query(&[("connected_to", r.as_str())]);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| DiscoveryError::Http(fleet_api::error_chain(&e)))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            // A concierge (or whoever answers for it) cannot put a device
            // to sleep for hours.
            .map(|s| Duration::from_secs(s.min(MAX_RETRY_AFTER_S)));
        if status.is_success() {
            return resp
                .json::<EndpointResponse>()
                .await
                .map(Lookup::Endpoint)
                .map_err(|e| DiscoveryError::Http(e.to_string()));
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (Some(b.error.code), b.error.message),
            Err(_) => (None, text),
        };
        match (status.as_u16(), code, retry_after) {
            (503, Some(ErrorCode::NoActiveHub), wait) => Ok(Lookup::NoHub(
                wait.unwrap_or(Duration::from_secs(1)),
                message,
            )),
            (503, _, Some(wait)) => Ok(Lookup::RetryAfter(wait, message)),
            (code, _, _) => Err(DiscoveryError::Api {
                status: code,
                message,
            }),
        }
    }
}
