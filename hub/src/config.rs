//! `hub run` configuration: one set of fields read from a TOML file, the
//! environment (`FLEET_*`) and flags (in rising precedence), then validated
//! into [`HubConfig`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_api::{Region, Role, Secret};
use serde::Deserialize;

use crate::front::FrontConfig;
use crate::ingest::Replication;
use crate::log::file::FileLogConfig;

/// Every setting of `hub run`, as flags, `FLEET_*` variables or TOML keys.
#[derive(Debug, Default, clap::Args, Deserialize)]
#[serde(default)]
pub struct RunArgs {
    /// TOML file with any of these settings (keys as the long flags, with `_`).
    #[arg(long, env = "FLEET_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This hub's region, e.g. `eu-west`.
    #[arg(long, env = "FLEET_REGION")]
    pub region: Option<String>,
    /// Directory for the event log, state and snapshots.
    #[arg(long, env = "FLEET_DATA")]
    pub data: Option<PathBuf>,
    /// Device registry: `sqlite://PATH` or `postgres://…`.
    #[arg(long, env = "FLEET_REGISTRY")]
    pub registry: Option<String>,
    /// Device MQTT listener address (port 0: any free port).
    #[arg(long, env = "FLEET_MQTT")]
    pub mqtt: Option<SocketAddr>,
    /// HTTP API listener address.
    #[arg(long, env = "FLEET_HTTP")]
    pub http: Option<SocketAddr>,
    /// Bearer token of the admin API (at least 16 characters).
    #[arg(long, env = "FLEET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Extra bearer token that may only read the log.
    #[arg(long, env = "FLEET_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<Secret>,
    /// The two hubs' shared replication credential (at least 16 characters,
    /// unlike the admin and read tokens); required with --peer. Only it
    /// drives replication: pulls that advance `replicated`, peer epochs,
    /// fencing for a planned promotion.
    #[arg(long, env = "FLEET_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<Secret>,
    /// Role of a new data directory (a stored role always wins) [default: primary].
    #[arg(long, env = "FLEET_ROLE")]
    pub role: Option<Role>,
    /// The other region's hub HTTP URL (replication). Repeat it (or
    /// separate with commas) for every hub of a region with several hubs.
    #[arg(long, env = "FLEET_PEER", value_delimiter = ',')]
    #[serde(deserialize_with = "one_or_many")]
    pub peer: Option<Vec<String>>,
    /// `sync` or `async` replication [default: async].
    #[arg(long, env = "FLEET_REPLICATION")]
    pub replication: Option<String>,
    /// Async replication lag beyond which ingest is throttled.
    #[arg(long, env = "FLEET_MAX_LAG_MS")]
    pub max_lag_ms: Option<u64>,
    /// HTTP API: how long a client has to send a request's headers, ms [default: 10000].
    #[arg(long, env = "FLEET_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// HTTP API: connections served at once [default: 1024].
    #[arg(long, env = "FLEET_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Detach a peer that stays unreachable this long: the region then runs
    /// alone (acknowledgements no longer wait for the peer) until the peer
    /// has caught up again [default: off, an operator detaches].
    #[arg(long, env = "FLEET_PEER_DETACH_AFTER_S")]
    pub peer_detach_after_s: Option<u64>,
    /// The event log: the embedded file log under --data (default), or NATS
    /// JetStream: `nats://HOST:PORT[,HOST:PORT…]/PREFIX?replicas=3&monitor=http://HOST:PORT,…`
    /// (the monitoring URLs of every server, to verify each fsyncs before
    /// it acknowledges).
    #[arg(long, env = "FLEET_EVENT_LOG")]
    pub log: Option<String>,
    /// Trust a JetStream whose servers may acknowledge before fsync (or that
    /// cannot be checked): acknowledged telemetry can then be lost on a
    /// power cut.
    #[arg(long, env = "FLEET_EVENT_LOG_ALLOW_UNSYNCED", num_args = 0..=1, default_missing_value = "true")]
    pub log_allow_unsynced: Option<bool>,
    /// Share the JetStream log with the region's other hubs, as this id
    /// (1-64 of A-Z a-z 0-9 _ -, unique in the region): partitions are
    /// divided among the live hubs by lease, and taken over within seconds
    /// when a hub dies.
    #[arg(long, env = "FLEET_HUB_ID")]
    pub hub_id: Option<String>,
    /// With --hub-id: a hub silent this long is taken for dead and its
    /// partitions taken over [default: 1500].
    #[arg(long, env = "FLEET_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Event log partitions, fixed when the log is created [default: 8].
    #[arg(long, env = "FLEET_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Live stream (embedded rumqttd) listener; needs --stream-password.
    #[arg(long, env = "FLEET_STREAM")]
    pub stream: Option<SocketAddr>,
    /// Live stream username [default: stream].
    #[arg(long, env = "FLEET_STREAM_USER")]
    pub stream_user: Option<String>,
    /// Live stream password; without it there is no live stream.
    #[arg(long, env = "FLEET_STREAM_PASSWORD", hide_env_values = true)]
    pub stream_password: Option<Secret>,
    /// PEM certificate chain: serve MQTT over TLS.
    #[arg(long, env = "FLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for an HTTPS peer, besides the public roots.
    #[arg(long, env = "FLEET_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// PEM certificate chain: serve the HTTP API over TLS (HTTPS).
    #[arg(long, env = "FLEET_HTTP_TLS_CERT", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key for --http-tls-cert.
    #[arg(long, env = "FLEET_HTTP_TLS_KEY", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// Largest accepted payload in bytes [default: 262144].
    #[arg(long, env = "FLEET_PAYLOAD_LIMIT")]
    pub payload_limit: Option<usize>,
    /// Time a new connection has to send CONNECT, in ms [default: 10000].
    #[arg(long, env = "FLEET_CONNECT_TIMEOUT_MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Authenticated CONNECTs per second, in all [default: 2000].
    #[arg(long, env = "FLEET_CONNECT_RATE")]
    pub connect_rate: Option<u32>,
    /// MQTT connections accepted per second from one address (IPv6: one
    /// /64); a failed login costs 10 [default: 500].
    #[arg(long, env = "FLEET_CONNECT_RATE_PER_SOURCE")]
    pub connect_rate_per_source: Option<u32>,
    /// Distinct subscription filters the live stream serves over its life;
    /// each costs up to 2 MiB of memory [default: 32].
    #[arg(long, env = "FLEET_STREAM_MAX_FILTERS")]
    pub stream_max_filters: Option<usize>,
    /// MQTT connections open at once [default: 100000].
    #[arg(long, env = "FLEET_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// MQTT connections not yet authenticated, in all [default: 4096].
    #[arg(long, env = "FLEET_MAX_PENDING_CONNECTS")]
    pub max_pending_connects: Option<usize>,
    /// MQTT connections not yet authenticated, per address [default: 256].
    #[arg(long, env = "FLEET_MAX_PENDING_PER_SOURCE")]
    pub max_pending_per_source: Option<usize>,
    /// Segment file size in bytes [default: 67108864].
    #[arg(long, env = "FLEET_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
    /// Retention: bytes kept per partition [default: unlimited].
    #[arg(long, env = "FLEET_RETENTION_BYTES")]
    pub retention_bytes: Option<u64>,
    /// Retention: hours kept [default: unlimited].
    #[arg(long, env = "FLEET_RETENTION_HOURS")]
    pub retention_hours: Option<u64>,
    /// How often retention looks for segments to delete (default 30000).
    #[arg(long, env = "FLEET_RETENTION_CHECK_MS")]
    pub retention_check_ms: Option<u64>,
    /// How often per-device state and what the peer pulled are written
    /// down; retention deletes only what they cover (default 60000).
    #[arg(long, env = "FLEET_SNAPSHOT_EVERY_MS")]
    pub snapshot_every_ms: Option<u64>,
    /// MQTT address to advertise when listening on a wildcard address.
    #[arg(long, env = "FLEET_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    #[arg(skip)]
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// The live stream settings.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub listen: SocketAddr,
    pub user: String,
    pub password: Secret,
    /// Distinct subscription filters the stream serves over its life.
    pub max_filters: usize,
    /// Watchers connected at once.
    pub max_watchers: usize,
}

/// A validated hub configuration.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub region: Region,
    pub data: PathBuf,
    pub registry: String,
    pub admin_token: Secret,
    pub read_token: Option<Secret>,
    pub role: Role,
    pub partitions: u32,
    /// The event log on JetStream instead of files under `data`.
    pub jetstream: Option<crate::log::jetstream::JetStreamConfig>,
    pub front: FrontConfig,
    pub stream: Option<StreamConfig>,
    pub segment_bytes: u64,
    pub retention_bytes: Option<u64>,
    pub retention_age: Option<Duration>,
    /// How often retention looks for segments to delete.
    pub retention_check: Duration,
    /// With a shared log: how long a silent hub still holds its partitions.
    pub lease_ttl: Duration,
    /// How often the registry mirror applies changes.
    pub auth_refresh: Duration,
    /// How often de-duplication state is snapshotted.
    pub snapshot_every: Duration,
    pub advertise: Option<SocketAddr>,
    /// Serve the HTTP API over TLS with this configuration.
    pub http_tls: Option<Arc<rustls::ServerConfig>>,
    /// Extra roots trusted when calling the peer over HTTPS.
    pub peer_roots: Vec<reqwest::Certificate>,
    /// The other region's hub (HTTP URL), when there is one.
    /// The other region's hubs (empty: no peer region).
    pub peers: Vec<String>,
    /// The peers' replication credential (both hubs hold the same); `None`
    /// without a peer.
    pub peer_token: Option<Secret>,
    pub replication: Replication,
    /// Async replication: throttle ingest beyond this lag.
    pub max_lag: Option<Duration>,
    /// Detach a peer unreachable this long (None: only operators detach).
    pub peer_detach_after: Option<Duration>,
    /// Header timeout and connection cap of the HTTP API.
    pub http_limits: fleet_api::serve::HttpLimits,
}

impl HubConfig {
    /// A configuration with every default, for embedding and tests.
    pub fn new(region: Region, data: PathBuf, registry: String, admin_token: Secret) -> Self {
        Self {
            peer_token: None,
            peers: Vec::new(),
            replication: Replication::Off,
            max_lag: None,
            peer_detach_after: None,
            http_limits: fleet_api::serve::HttpLimits::default(),
            region,
            data,
            registry,
            admin_token,
            read_token: None,
            role: Role::Primary,
            partitions: 8,
            jetstream: None,
            front: FrontConfig::default(),
            stream: None,
            segment_bytes: 64 << 20,
            retention_bytes: None,
            retention_age: None,
            retention_check: Duration::from_secs(30),
            lease_ttl: Duration::from_millis(1500),
            auth_refresh: Duration::from_secs(1),
            snapshot_every: Duration::from_secs(60),
            advertise: None,
            http_tls: None,
            peer_roots: Vec::new(),
        }
    }

    pub fn log_config(&self) -> FileLogConfig {
        let mut c = FileLogConfig::new(self.data.join("log"), self.partitions);
        c.segment_bytes = self.segment_bytes;
        c.retention_bytes = self.retention_bytes;
        c.retention_age = self.retention_age;
        c.retention_interval = self.retention_check;
        c
    }
}

impl RunArgs {
    /// Flags and environment over the config file, when one is named.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn with_file(self) -> anyhow::Result<RunArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read config {}", path.display()))?;
        let file: RunArgs =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        for key in file.unknown.keys() {
            tracing::warn!(field = %key, file = %path.display(), "unknown config field, ignored");
        }
        Ok(fleet_api::merge_args!(RunArgs, self, file, {
            region, data, registry, mqtt, http, admin_token, read_token, peer_token, role, peer, replication,
            max_lag_ms, peer_detach_after_s, http_header_timeout_ms, http_max_connections, log, log_allow_unsynced, hub_id, lease_ttl_ms, partitions, stream, stream_user, stream_password, tls_cert, tls_key,
            peer_ca, http_tls_cert, http_tls_key, payload_limit, connect_timeout_ms, connect_rate, connect_rate_per_source, max_connections, max_pending_connects, max_pending_per_source, stream_max_filters, segment_bytes, retention_bytes, retention_hours, retention_check_ms, snapshot_every_ms, advertise,
        }))
    }

    /// Validates into a [`HubConfig`] and the two listen addresses.
    ///
    /// # Errors
    /// A missing or invalid setting, named.
    pub fn validate(self) -> anyhow::Result<(HubConfig, SocketAddr, SocketAddr)> {
        let RunArgs {
            config: _,
            region,
            data,
            registry,
            mqtt,
            http,
            admin_token,
            read_token,
            peer_token,
            role,
            peer,
            replication,
            max_lag_ms,
            peer_detach_after_s,
            http_header_timeout_ms,
            http_max_connections,
            log,
            log_allow_unsynced,
            hub_id,
            lease_ttl_ms,
            partitions,
            stream,
            stream_user,
            stream_password,
            tls_cert,
            tls_key,
            peer_ca,
            http_tls_cert,
            http_tls_key,
            payload_limit,
            connect_timeout_ms,
            connect_rate,
            connect_rate_per_source,
            max_connections,
            max_pending_connects,
            max_pending_per_source,
            stream_max_filters,
            segment_bytes,
            retention_bytes,
            retention_hours,
            retention_check_ms,
            snapshot_every_ms,
            advertise,
            unknown: _,
        } = self;
        let region = region.context("--region is required")?;
        let region =
            Region::new(&region).with_context(|| format!("invalid --region {region:?}"))?;
        let data = data.context("--data is required")?;
        let registry = registry.context("--registry is required")?;
        let mqtt = mqtt.context("--mqtt is required (e.g. 0.0.0.0:8883)")?;
        let http = http.context("--http is required (e.g. 0.0.0.0:8080)")?;
        let admin_token =
            admin_token.context("--admin-token (or FLEET_ADMIN_TOKEN) is required")?;
        if admin_token.expose().len() < 16 {
            bail!("--admin-token must be at least 16 characters");
        }
        if let Some(t) = &peer_token {
            if peer.is_none() {
                bail!("--peer-token needs --peer");
            }
            if t.expose().len() < 16 {
                bail!("--peer-token must be at least 16 characters");
            }
            if admin_token.matches(t.expose())
                || read_token.as_ref().is_some_and(|r| r.matches(t.expose()))
            {
                bail!(
                    "--peer-token must differ from the admin and read tokens (one credential per role)"
                );
            }
        } else if peer.is_some() {
            bail!(
                "--peer needs --peer-token (or FLEET_PEER_TOKEN): the two hubs' shared replication credential"
            );
        }
        if let Some(r) = &read_token
            && admin_token.matches(r.expose())
        {
            bail!("--read-token must differ from the admin token");
        }
        let mut c = HubConfig::new(region, data, registry, admin_token);
        c.peer_token = peer_token;
        c.replication = match (peer.is_some(), replication.as_deref()) {
            (false, None) => Replication::Off,
            (false, Some(_)) => bail!("--replication needs --peer (the other region's hub)"),
            (true, None | Some("async")) => Replication::Async,
            (true, Some("sync")) => Replication::Sync,
            (true, Some(other)) => bail!("--replication {other:?}: expected sync or async"),
        };
        for p in peer.iter().flatten() {
            let p = p.trim();
            if !(p.starts_with("http://") || p.starts_with("https://")) {
                bail!("--peer {p:?}: expected the other hub's HTTP URL (http://HOST:PORT)");
            }
            let p = p.trim_end_matches('/').to_string();
            if c.peers.contains(&p) {
                bail!("--peer {p} is given twice");
            }
            if p.starts_with("http://")
                && !["http://127.", "http://localhost", "http://[::1]"]
                    .iter()
                    .any(|l| p.starts_with(l))
            {
                tracing::warn!(peer = %p, "the peer is plain http: the peer token and replicated telemetry cross the network unencrypted; serve the API over https (--http-tls-cert) and use an https:// peer");
            }
            c.peers.push(p);
        }
        if peer.is_some() && c.peers.is_empty() {
            bail!("--peer is empty: expected the other region's hub URL(s)");
        }
        if let Some(ca) = peer_ca {
            if c.peers.is_empty() {
                bail!("--peer-ca needs --peer");
            }
            c.peer_roots = fleet_api::client::load_ca(&ca).context("--peer-ca")?;
        }
        if let Some(ms) = max_lag_ms {
            if c.replication != Replication::Async {
                bail!("--max-lag-ms applies to async replication only");
            }
            c.max_lag = Some(Duration::from_millis(ms.max(1)));
        }
        if let Some(s) = peer_detach_after_s {
            if c.peers.is_empty() {
                bail!("--peer-detach-after-s needs --peer");
            }
            if s == 0 {
                bail!("--peer-detach-after-s must be at least 1");
            }
            c.peer_detach_after = Some(Duration::from_secs(s));
        }
        if let Some(ms) = http_header_timeout_ms {
            if ms == 0 {
                bail!("--http-header-timeout-ms must be at least 1");
            }
            c.http_limits.header_timeout = Duration::from_millis(ms);
        }
        if let Some(n) = http_max_connections {
            if n == 0 {
                bail!("--http-max-connections must be at least 1");
            }
            c.http_limits.max_connections = n;
        }
        c.read_token = read_token;
        c.role = role.unwrap_or(Role::Primary);
        c.partitions = partitions.unwrap_or(8);
        if !(1..=1024).contains(&c.partitions) {
            bail!("--partitions must be between 1 and 1024");
        }
        if let Some(url) = log {
            let mut js = crate::log::jetstream::JetStreamConfig::parse(&url, c.partitions)?;
            js.allow_unsynced = log_allow_unsynced.unwrap_or(false);
            if let Some(id) = hub_id {
                if !crate::log::jetstream::lease::valid_hub_id(&id) {
                    bail!("invalid --hub-id {id:?}: expected 1-64 of A-Z a-z 0-9 _ -");
                }
                js.hub_id = Some(id);
            }
            c.jetstream = Some(js);
        } else if log_allow_unsynced.is_some() {
            bail!("--log-allow-unsynced applies only with --log nats://…");
        } else if hub_id.is_some() {
            bail!("--hub-id applies only with --log nats://… (a file log has one writer)");
        }
        if let Some(ms) = lease_ttl_ms {
            if !(200..=60_000).contains(&ms) {
                bail!("--lease-ttl-ms must be between 200 and 60000");
            }
            c.lease_ttl = Duration::from_millis(ms);
        }
        if let Some(limit) = payload_limit {
            let max = crate::log::frame::MAX_PAYLOAD;
            if !(1..=max).contains(&limit) {
                bail!(
                    "--payload-limit must be between 1 and {max} bytes (a log record holds at most that much payload)"
                );
            }
            c.front.payload_limit = limit;
        }
        if let Some(ms) = connect_timeout_ms {
            if ms == 0 {
                bail!("--connect-timeout-ms must be at least 1");
            }
            c.front.connect_timeout = Duration::from_millis(ms);
        }
        if let Some(rate) = connect_rate {
            if rate == 0 {
                bail!("--connect-rate must be at least 1");
            }
            c.front.connect_rate = rate;
        }
        if let Some(rate) = connect_rate_per_source {
            if rate == 0 {
                bail!("--connect-rate-per-source must be at least 1");
            }
            c.front.connect_rate_per_source = rate;
        }
        let asked = crate::fd_budget::Asked {
            mqtt: max_connections,
            pending: max_pending_connects,
            http: http_max_connections,
        };
        for (flag, value, field) in [
            (
                "--max-connections",
                max_connections,
                &mut c.front.max_connections,
            ),
            (
                "--max-pending-connects",
                max_pending_connects,
                &mut c.front.max_pending,
            ),
            (
                "--max-pending-per-source",
                max_pending_per_source,
                &mut c.front.max_pending_per_source,
            ),
        ] {
            if let Some(n) = value {
                if n == 0 {
                    bail!("{flag} must be at least 1");
                }
                *field = n;
            }
        }
        if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
            c.front.tls = Some(fleet_api::https::load_tls(&cert, &key)?);
        }
        if let (Some(cert), Some(key)) = (http_tls_cert, http_tls_key) {
            c.http_tls = Some(
                fleet_api::https::load_tls(&cert, &key)
                    .context("--http-tls-cert/--http-tls-key")?,
            );
        }
        c.stream = match stream_password {
            Some(password) => Some(StreamConfig {
                listen: stream.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                user: stream_user.unwrap_or_else(|| "stream".into()),
                password,
                max_filters: match stream_max_filters {
                    Some(0) => bail!("--stream-max-filters must be at least 1"),
                    Some(n) => n,
                    None => 32,
                },
                max_watchers: 1024,
            }),
            None if stream.is_some() => {
                bail!("--stream needs --stream-password (no anonymous watchers)")
            }
            None => None,
        };
        if let Some(b) = segment_bytes {
            if b < 4096 {
                bail!("--segment-bytes must be at least 4096");
            }
            c.segment_bytes = b;
        }
        c.retention_bytes = retention_bytes;
        c.retention_age = retention_hours.map(|h| Duration::from_secs(h * 3600));
        for (flag, ms) in [
            ("--retention-check-ms", retention_check_ms),
            ("--snapshot-every-ms", snapshot_every_ms),
        ] {
            if ms.is_some_and(|ms| !(50..=86_400_000).contains(&ms)) {
                bail!("{flag} must be between 50 and 86400000");
            }
        }
        if let Some(ms) = retention_check_ms {
            c.retention_check = Duration::from_millis(ms);
        }
        if let Some(ms) = snapshot_every_ms {
            c.snapshot_every = Duration::from_millis(ms);
        }
        c.advertise = advertise;
        // Caps not given are sized under the file-descriptor limit.
        let limit = crate::fd_budget::open_files_limit();
        let budget = crate::fd_budget::derive(limit, asked);
        c.front.max_connections = budget.mqtt;
        c.front.max_pending = budget.pending;
        c.http_limits.max_connections = budget.http;
        if let Some(s) = &mut c.stream {
            s.max_watchers = budget.stream;
        }
        if let Some(limit) = limit {
            let wanted =
                (budget.mqtt + 2 * budget.http + 3 * budget.stream) as u64 + budget.reserve;
            if wanted > limit {
                tracing::warn!(
                    limit,
                    wanted,
                    "the connection caps exceed the open-files limit: raise it (LimitNOFILE) or lower --max-connections/--http-max-connections"
                );
            }
        }
        tracing::info!(open_files = ?limit, mqtt = budget.mqtt, pending = budget.pending, http = budget.http, stream = budget.stream, "connection caps");
        Ok((c, mqtt, http))
    }
}

/// `peer = "URL"` or `peer = ["URL", …]` in a config file.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}
