//! `concierge run` configuration: TOML file, `FLEET_*` variables and flags
//! (rising precedence), validated into [`ConciergeConfig`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_api::{Region, Secret};
use serde::Deserialize;

/// Every setting of `concierge run`.
#[derive(Debug, Default, clap::Args, Deserialize)]
#[serde(default)]
pub struct RunArgs {
    /// TOML file with any of these settings (keys as the long flags, with `_`).
    #[arg(long, env = "FLEET_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HTTP listener (devices, operators).
    #[arg(long, env = "FLEET_HTTP")]
    pub http: Option<SocketAddr>,
    /// DNS front listener, UDP and TCP on the same port.
    #[arg(long, env = "FLEET_DNS")]
    pub dns: Option<SocketAddr>,
    /// The zone the DNS front is authoritative for, e.g. `fleet.test`.
    #[arg(long, env = "FLEET_ZONE")]
    pub zone: Option<String>,
    /// Bearer token of the admin API; also sent to hubs unless --hub-token is given.
    #[arg(long, env = "FLEET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// The hubs' admin token, when it differs from --admin-token.
    #[arg(long, env = "FLEET_HUB_TOKEN", hide_env_values = true)]
    pub hub_token: Option<Secret>,
    /// PEM CA certificate(s) to trust for HTTPS hubs and replicas, besides the public roots.
    #[arg(long, env = "FLEET_HUB_CA")]
    pub hub_ca: Option<PathBuf>,
    /// A region's hub: `REGION=HUB_HTTP_URL,MQTT_URL` (repeat per region).
    #[arg(long = "hub", env = "FLEET_HUBS", value_delimiter = ';')]
    pub hubs: Vec<String>,
    /// A concierge replica's HTTP address served by the DNS front, in
    /// priority order (repeat). Default: this replica only.
    #[arg(long = "replica", env = "FLEET_REPLICAS", value_delimiter = ';')]
    pub replicas: Vec<SocketAddr>,
    /// TTL of DNS answers and of endpoint answers, seconds [default: 5].
    #[arg(long, env = "FLEET_TTL_S")]
    pub ttl_s: Option<u32>,
    /// Promote the secondary (forced) after the primary has been down this
    /// long, seconds (fractions allowed; 0 promotes as soon as the primary
    /// has failed --failures consecutive checks and the secondary has lost
    /// it too).
    #[arg(long, env = "FLEET_AUTO_FAILOVER_AFTER_S")]
    pub auto_failover_after_s: Option<f64>,
    /// How often hubs and replicas are checked, ms [default: 500].
    #[arg(long, env = "FLEET_POLL_MS")]
    pub poll_ms: Option<u64>,
    /// Consecutive failed checks before a hub counts as down [default: 3].
    #[arg(long, env = "FLEET_FAILURES")]
    pub failures: Option<u32>,
    /// Reconnect slots per second this replica hands out (each answer names
    /// its device's start, `start_in_ms`): set it to what the hubs admit
    /// (`fleet bench connections`, and the hubs' `--connect-rate`)
    /// [default: 2000].
    #[arg(long, env = "FLEET_CONNECT_RATE")]
    pub connect_rate: Option<u32>,
    /// How long a planned failover waits for the target region's registry
    /// to hold what the source region's has, seconds [default: 10].
    #[arg(long, env = "FLEET_REGISTRY_WAIT_S")]
    pub registry_wait_s: Option<u64>,
    /// Endpoint lookups per second one client address (IPv6: one /64) may
    /// make before it is told to come back later [default: 100].
    #[arg(long, env = "FLEET_LOOKUPS_PER_SOURCE")]
    pub lookups_per_source: Option<u32>,
    /// Long-polling endpoint lookups (`wait_for_epoch`) one client address
    /// may hold at once; beyond it they are answered at once [default: 8].
    #[arg(long, env = "FLEET_LONG_POLLS_PER_SOURCE")]
    pub long_polls_per_source: Option<u32>,
    /// Time a client has to send request headers, ms [default: 10000].
    #[arg(long, env = "FLEET_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// HTTP connections served at once [default: 1024].
    #[arg(long, env = "FLEET_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// HTTP connections one client address (IPv6: one /64) may hold at
    /// once; raise it for fleets behind one NAT, whose devices long-poll
    /// together after a failover [default: 256].
    #[arg(long, env = "FLEET_HTTP_MAX_PER_SOURCE")]
    pub http_max_per_source: Option<usize>,
    /// Serve HTTPS with this PEM certificate chain (agents verify it with --ca).
    #[arg(long, env = "FLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[arg(skip)]
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// One region's hub as the concierge knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSpec {
    pub region: Region,
    /// Status and admin API, e.g. `http://10.0.0.5:8080`.
    pub http_url: String,
    /// What devices are told, e.g. `mqtts://eu.example.net:8883`.
    pub mqtt_url: String,
}

impl std::str::FromStr for HubSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<HubSpec> {
        let (region, urls) = s
            .split_once('=')
            .with_context(|| format!("--hub {s:?}: expected REGION=HUB_HTTP_URL,MQTT_URL"))?;
        let region = Region::new(region).with_context(|| format!("--hub {s:?}: invalid region"))?;
        let (http_url, mqtt_url) = urls
            .split_once(',')
            .with_context(|| format!("--hub {s:?}: expected REGION=HUB_HTTP_URL,MQTT_URL"))?;
        if !(http_url.starts_with("http://") || http_url.starts_with("https://")) {
            bail!("--hub {s:?}: the hub URL must start with http:// or https://");
        }
        let rest = mqtt_url
            .strip_prefix("mqtt://")
            .or_else(|| mqtt_url.strip_prefix("mqtts://"))
            .with_context(|| {
                format!("--hub {s:?}: the MQTT URL must start with mqtt:// or mqtts://")
            })?;
        match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => bail!("--hub {s:?}: the MQTT URL needs host:port"),
        }
        Ok(HubSpec {
            region,
            http_url: http_url.trim_end_matches('/').to_string(),
            mqtt_url: mqtt_url.to_string(),
        })
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct ConciergeConfig {
    /// Lowercase, with a trailing dot: `fleet.test.`.
    pub zone: String,
    pub admin_token: Secret,
    pub hub_token: Secret,
    /// Extra roots trusted for hubs serving HTTPS with a private CA.
    pub hub_roots: Vec<reqwest::Certificate>,
    pub hubs: Vec<HubSpec>,
    pub replicas: Vec<SocketAddr>,
    pub ttl_s: u32,
    pub auto_failover_after: Option<Duration>,
    pub poll: Duration,
    pub failures: u32,
    pub connect_rate: u32,
    /// Endpoint lookups per second per client address.
    pub lookups_per_source: u32,
    /// Long polls one client address may hold at once.
    pub long_polls_per_source: u32,
    /// A planned failover's bound on waiting for the target's registry.
    pub registry_wait: Duration,
    pub http_limits: fleet_api::serve::HttpLimits,
    /// HTTPS instead of HTTP.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl ConciergeConfig {
    /// Defaults for everything but the essentials.
    pub fn new(zone: &str, admin_token: Secret, hubs: Vec<HubSpec>) -> Self {
        Self {
            zone: normalize_zone(zone),
            hub_token: admin_token.clone(),
            hub_roots: Vec::new(),
            admin_token,
            hubs,
            replicas: Vec::new(),
            ttl_s: 5,
            auto_failover_after: None,
            poll: Duration::from_millis(500),
            failures: 3,
            connect_rate: 2000,
            lookups_per_source: 100,
            long_polls_per_source: 8,
            registry_wait: Duration::from_secs(10),
            http_limits: fleet_api::serve::HttpLimits::default(),
            tls: None,
        }
    }

    /// `concierge.<zone>`, the name devices resolve.
    pub fn host(&self) -> String {
        format!("concierge.{}", self.zone)
    }
}

fn normalize_zone(zone: &str) -> String {
    let z = zone.trim().trim_end_matches('.').to_ascii_lowercase();
    format!("{z}.")
}

impl RunArgs {
    /// Flags and environment over the file named by `--config`.
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
        let RunArgs {
            config,
            http,
            dns,
            zone,
            admin_token,
            hub_token,
            hub_ca,
            hubs,
            replicas,
            ttl_s,
            auto_failover_after_s,
            poll_ms,
            failures,
            connect_rate,
            registry_wait_s,
            lookups_per_source,
            long_polls_per_source,
            http_header_timeout_ms,
            http_max_connections,
            http_max_per_source,
            tls_cert,
            tls_key,
            unknown,
        } = self;
        Ok(RunArgs {
            config,
            http: http.or(file.http),
            dns: dns.or(file.dns),
            zone: zone.or(file.zone),
            admin_token: admin_token.or(file.admin_token),
            hub_token: hub_token.or(file.hub_token),
            hub_ca: hub_ca.or(file.hub_ca),
            hubs: if hubs.is_empty() { file.hubs } else { hubs },
            replicas: if replicas.is_empty() {
                file.replicas
            } else {
                replicas
            },
            ttl_s: ttl_s.or(file.ttl_s),
            auto_failover_after_s: auto_failover_after_s.or(file.auto_failover_after_s),
            poll_ms: poll_ms.or(file.poll_ms),
            failures: failures.or(file.failures),
            connect_rate: connect_rate.or(file.connect_rate),
            registry_wait_s: registry_wait_s.or(file.registry_wait_s),
            lookups_per_source: lookups_per_source.or(file.lookups_per_source),
            long_polls_per_source: long_polls_per_source.or(file.long_polls_per_source),
            http_header_timeout_ms: http_header_timeout_ms.or(file.http_header_timeout_ms),
            http_max_connections: http_max_connections.or(file.http_max_connections),
            http_max_per_source: http_max_per_source.or(file.http_max_per_source),
            tls_cert: tls_cert.or(file.tls_cert),
            tls_key: tls_key.or(file.tls_key),
            unknown,
        })
    }

    /// Validates; returns the configuration and the HTTP and DNS addresses.
    ///
    /// # Errors
    /// A missing or invalid setting, named.
    pub fn validate(self) -> anyhow::Result<(ConciergeConfig, SocketAddr, SocketAddr)> {
        let http = self.http.context("--http is required")?;
        let dns = self.dns.context("--dns is required")?;
        let zone = self.zone.context("--zone is required (e.g. fleet.test)")?;
        let labels_ok = zone.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        if !labels_ok {
            bail!("--zone {zone:?} is not a domain name");
        }
        let admin_token = self
            .admin_token
            .context("--admin-token (or FLEET_ADMIN_TOKEN) is required")?;
        if admin_token.expose().len() < 16 {
            bail!("--admin-token must be at least 16 characters");
        }
        if self.hubs.is_empty() {
            bail!("at least one --hub REGION=HUB_HTTP_URL,MQTT_URL is required");
        }
        let hubs = self
            .hubs
            .iter()
            .map(|h| h.parse())
            .collect::<anyhow::Result<Vec<HubSpec>>>()?;
        // A region may have several hubs (sharing one JetStream log); the
        // same hub twice is a mistake.
        for (i, h) in hubs.iter().enumerate() {
            if hubs[..i].iter().any(|o| o.http_url == h.http_url) {
                bail!("hub {} is given twice", h.http_url);
            }
        }
        let mut c = ConciergeConfig::new(&zone, admin_token, hubs);
        if let Some(t) = self.hub_token {
            c.hub_token = t;
        }
        if let Some(ca) = &self.hub_ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("--hub-ca: read {}", ca.display()))?;
            c.hub_roots = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--hub-ca: parse {}", ca.display()))?;
            if c.hub_roots.is_empty() {
                bail!("--hub-ca: no certificate in {}", ca.display());
            }
        }
        c.replicas = self.replicas;
        c.ttl_s = self.ttl_s.unwrap_or(5);
        if let Some(s) = self.auto_failover_after_s {
            if !(0.0..=86_400.0).contains(&s) {
                bail!("--auto-failover-after-s must be between 0 and 86400, got {s}");
            }
            c.auto_failover_after = Some(Duration::from_secs_f64(s));
        }
        c.poll = Duration::from_millis(self.poll_ms.unwrap_or(500).max(50));
        c.failures = self.failures.unwrap_or(3).max(1);
        c.connect_rate = self.connect_rate.unwrap_or(2000).max(1);
        if let Some(s) = self.registry_wait_s {
            if s > 3600 {
                bail!("--registry-wait-s must be at most 3600");
            }
            c.registry_wait = Duration::from_secs(s);
        }
        if let Some(n) = self.lookups_per_source {
            if n == 0 {
                bail!("--lookups-per-source must be at least 1");
            }
            c.lookups_per_source = n;
        }
        if let Some(n) = self.long_polls_per_source {
            if n == 0 {
                bail!("--long-polls-per-source must be at least 1");
            }
            c.long_polls_per_source = n;
        }
        if let Some(ms) = self.http_header_timeout_ms {
            if ms == 0 {
                bail!("--http-header-timeout-ms must be at least 1");
            }
            c.http_limits.header_timeout = Duration::from_millis(ms);
        }
        if let Some(n) = self.http_max_connections {
            if n == 0 {
                bail!("--http-max-connections must be at least 1");
            }
            c.http_limits.max_connections = n;
        }
        if let Some(n) = self.http_max_per_source {
            if n == 0 {
                bail!("--http-max-per-source must be at least 1");
            }
            c.http_limits.max_per_source = n;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                c.tls =
                    Some(fleet_api::https::load_tls(cert, key).context("--tls-cert/--tls-key")?);
            }
            (None, None) => {}
            _ => bail!("--tls-cert and --tls-key go together"),
        }
        Ok((c, http, dns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_specs_parse_and_explain_mistakes() {
        let h: HubSpec = "eu=http://127.0.0.1:8080/,mqtts://eu.example:8883"
            .parse()
            .unwrap();
        assert_eq!(h.region.as_str(), "eu");
        assert_eq!(h.http_url, "http://127.0.0.1:8080");
        assert_eq!(h.mqtt_url, "mqtts://eu.example:8883");
        for (bad, why) in [
            ("eu", "expected REGION="),
            ("e u=http://x,mqtt://y:1", "invalid region"),
            ("eu=ftp://x,mqtt://y:1", "http://"),
            ("eu=http://x,tcp://y:1", "mqtt://"),
            ("eu=http://x,mqtt://y", "host:port"),
        ] {
            let err = bad.parse::<HubSpec>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(normalize_zone("Fleet.Test"), "fleet.test.");
    }
}
