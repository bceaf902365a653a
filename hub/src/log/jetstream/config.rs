//! `--log nats://HOST:PORT[,HOST:PORT…]/PREFIX?replicas=N&monitor=URL[,URL…]`
//! and the check that every JetStream server of the cluster fsyncs before
//! it acknowledges.

use std::time::Duration;

/// Where the JetStream log lives and how it is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// `nats://host:port` of each server given.
    pub servers: Vec<String>,
    /// Names the streams (`{prefix}_p{P}_g{G}`), their subjects and the
    /// metadata bucket: one prefix per region's log.
    pub prefix: String,
    pub partitions: u32,
    /// Replicas of every stream (3 for R3).
    pub replicas: usize,
    /// The servers' monitoring URLs (`http://host:port`), read to verify
    /// `sync_interval: always` before any ack is trusted.
    pub monitors: Vec<String>,
    /// Trust acks of servers that may not fsync first (operator opt-out).
    pub allow_unsynced: bool,
    /// How long a write keeps being retried (leader elections, a restarting
    /// server) before the partition is failed.
    pub retry_for: Duration,
    /// What each partition keeps (the hub's --retention-* settings).
    pub retention: super::RetentionPolicy,
    /// How often retention looks for records to purge.
    pub retention_check: Duration,
    /// How often the servers' fsync setting is checked again after start
    /// (a server restarted with another configuration).
    pub fsync_recheck: Duration,
    /// Several hubs of the region share the log: this hub's id. No
    /// partition is written before this hub holds its lease and took it
    /// over ([`super::Leases`]). `None`: this hub is the log's only writer.
    pub hub_id: Option<String>,
    /// With `hub_id`: how long a silent hub still holds its partitions.
    pub lease_ttl: Duration,
}

/// A `--log` value that is not a usable JetStream URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--log {url:?}: {reason}")]
pub struct ConfigError {
    pub url: String,
    pub reason: String,
}

impl JetStreamConfig {
    /// Parses `--log`. The prefix defaults to `fleet`.
    pub fn parse(url: &str, partitions: u32) -> Result<JetStreamConfig, ConfigError> {
        let bad = |reason: &str| ConfigError {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("nats://")
            .ok_or_else(|| bad("expected nats://HOST:PORT[,HOST:PORT…]/PREFIX"))?;
        let (hosts, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut servers = Vec::new();
        for h in hosts.split(',') {
            let Some((host, port)) = h.rsplit_once(':') else {
                return Err(bad(&format!("server {h:?} has no port")));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("server {h:?} is not HOST:PORT")));
            }
            servers.push(format!("nats://{h}"));
        }
        let prefix = if path.is_empty() { "fleet" } else { path };
        if prefix.len() > 32
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad(&format!(
                "prefix {prefix:?} must be 1-32 of [A-Za-z0-9_-] (it names streams and subjects)"
            )));
        }
        let mut config = JetStreamConfig {
            servers,
            prefix: prefix.to_string(),
            partitions,
            replicas: 3,
            monitors: Vec::new(),
            allow_unsynced: false,
            retry_for: Duration::from_secs(30),
            retention: super::RetentionPolicy::default(),
            retention_check: Duration::from_secs(30),
            fsync_recheck: Duration::from_secs(30),
            hub_id: None,
            lease_ttl: Duration::from_millis(1500),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "replicas" => {
                    config.replicas = v
                        .parse()
                        .ok()
                        .filter(|r| (1..=5).contains(r))
                        .ok_or_else(|| bad(&format!("replicas={v:?}: expected 1 to 5")))?;
                }
                "monitor" => {
                    for m in v.split(',') {
                        if !m.starts_with("http://") && !m.starts_with("https://") {
                            return Err(bad(&format!(
                                "monitor {m:?}: expected http://HOST:PORT (the server's monitoring port)"
                            )));
                        }
                        config.monitors.push(m.trim_end_matches('/').to_string());
                    }
                }
                other => return Err(bad(&format!("unknown parameter {other:?}"))),
            }
        }
        Ok(config)
    }
}

/// What the monitoring endpoints said about one server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerSync {
    name: String,
    sync_always: bool,
    /// The names in its JetStream meta group it lists (itself included;
    /// only the meta leader lists the others).
    group: Vec<String>,
    /// The meta group's size as this server reports it.
    cluster_size: usize,
}

/// Refuses unless every server of the JetStream meta group reports
/// `sync_always` through one of `monitors` (servers that are down are
/// tolerated while a majority is verified, one per unreachable monitor).
/// Returns the verified servers' names.
pub async fn verify_fsync(config: &JetStreamConfig) -> Result<Vec<String>, FsyncUnverified> {
    use FsyncUnverified::{Refused, Unreachable};
    if config.monitors.is_empty() {
        return Err(Refused(
            "cannot verify that the JetStream servers fsync before they acknowledge: give their \
             monitoring URLs (…?monitor=http://HOST:PORT,…) or opt out with --log-allow-unsynced"
                .to_string(),
        ));
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Refused(e.to_string()))?;
    let mut seen = Vec::new();
    let mut unreachable = Vec::new();
    for m in &config.monitors {
        match read_server(&http, m).await {
            Ok(s) => seen.push(s),
            Err(Unread::Down(why)) => unreachable.push(why),
            Err(Unread::Bad(why)) => return Err(Refused(why)),
        }
    }
    let mut group: Vec<String> = seen.iter().flat_map(|s| s.group.clone()).collect();
    group.sort();
    group.dedup();
    // Only the meta leader lists the group; every server knows its size
    // once it has joined (a starting one may not have yet: every
    // monitoring URL given counts as a member).
    let size = seen
        .iter()
        .map(|s| s.cluster_size)
        .max()
        .unwrap_or(0)
        .max(group.len())
        .max(config.monitors.len());
    let unverified = size
        - group
            .iter()
            .filter(|n| seen.iter().any(|s| &s.name == *n))
            .count();
    if unverified > unreachable.len() {
        return Err(Refused(format!(
            "the JetStream cluster has {size} servers but the monitoring URLs reach only {} of them: \
             every server's fsync setting must be verified (give each server's monitoring URL)",
            size - unverified
        )));
    }
    // A server that is down acknowledges nothing now; a majority of the
    // group must be verified (a down one is checked when this hub next
    // starts).
    let verified = size - unverified;
    if verified * 2 <= size {
        return Err(Unreachable(format!(
            "only {verified} of the {size} JetStream servers could be checked for fsync: {}",
            unreachable.join("; ")
        )));
    }
    if let Some(s) = seen.iter().find(|s| !s.sync_always) {
        return Err(FsyncUnverified::Unsynced(format!(
            "JetStream server {} acknowledges before fsync (set jetstream {{ sync_interval: always }}, \
             nats-server >= 2.11) or opt out with --log-allow-unsynced",
            s.name
        )));
    }
    if unverified > 0 {
        tracing::warn!(
            unverified,
            unreachable = %unreachable.join("; "),
            "jetstream servers unreachable; their fsync setting is not verified"
        );
    }
    if size < config.replicas {
        return Err(Refused(format!(
            "replicas={} but the JetStream cluster has {size} server(s)",
            config.replicas
        )));
    }
    Ok(seen.into_iter().map(|s| s.name).collect())
}

/// Connects to the servers once their fsync setting is verified (unless
/// the operator opted out), and only to a verified one. What may still be
/// starting (monitors not answering, JetStream not up, connections refused,
/// a connection to a server verified a moment later) is tried again until
/// `deadline`; a server that answers and does not fsync first is refused at
/// once.
pub(super) async fn connect_verified(
    config: &JetStreamConfig,
    deadline: tokio::time::Instant,
) -> Result<async_nats::Client, crate::log::LogError> {
    use crate::log::LogError;
    if config.allow_unsynced {
        tracing::warn!(
            "trusting JetStream acknowledgements without checking that the servers fsync first (--log-allow-unsynced)"
        );
    }
    let addrs = config
        .servers
        .iter()
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LogError::Io(format!("server address: {e}")))?;
    let mut pause = Duration::from_millis(50);
    loop {
        let why = match attempt(config, addrs.clone()).await {
            Ok(client) => return Ok(client),
            Err(FsyncUnverified::Refused(why) | FsyncUnverified::Unsynced(why)) => {
                return Err(LogError::Io(why));
            }
            Err(FsyncUnverified::Unreachable(why)) => why,
        };
        if tokio::time::Instant::now() + pause > deadline {
            return Err(LogError::Io(why));
        }
        tracing::warn!(why, "jetstream servers not ready yet; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

async fn attempt(
    config: &JetStreamConfig,
    addrs: Vec<async_nats::ServerAddr>,
) -> Result<async_nats::Client, FsyncUnverified> {
    let verified = if config.allow_unsynced {
        None
    } else {
        Some(verify_fsync(config).await?)
    };
    let client = async_nats::ConnectOptions::new()
        .name(connection_name(&config.prefix, config.hub_id.as_deref()))
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .map_err(|e| {
            FsyncUnverified::Unreachable(format!("connect to {}: {e}", config.servers.join(",")))
        })?;
    let name = client.server_info().server_name;
    if let Some(names) = verified
        && !names.contains(&name)
    {
        return Err(FsyncUnverified::Unreachable(format!(
            "connected to JetStream server {name}, which none of the monitoring URLs verified"
        )));
    }
    Ok(client)
}

/// The name the hub's connection shows in the servers' monitoring
/// (`/connz`): `fleet-hub {prefix}`, and the hub id when hubs share the log.
pub fn connection_name(prefix: &str, hub_id: Option<&str>) -> String {
    match hub_id {
        Some(id) => format!("fleet-hub {prefix} {id}"),
        None => format!("fleet-hub {prefix}"),
    }
}

/// Every `every`, checks again that the servers fsync before they
/// acknowledge; when one says that it does not, every partition refuses
/// writes (its acknowledgements cannot be trusted) until the operator fixes
/// the server and restarts the hub. Servers that do not answer are not
/// acknowledging anything: only logged.
pub(super) async fn fsync_recheck_loop(
    config: JetStreamConfig,
    writers: Vec<tokio::sync::mpsc::WeakUnboundedSender<super::writer::Cmd>>,
    every: Duration,
) {
    let mut tick = super::ticker(every).await;
    loop {
        tick.tick().await;
        if writers.iter().all(|w| w.strong_count() == 0) {
            return;
        }
        match verify_fsync(&config).await {
            Ok(_) => {}
            // A server restarting (a reset mid-answer, a body cut short) or
            // an odd answer is no proof of anything: only a server saying
            // it does not fsync first stops the writes.
            Err(FsyncUnverified::Unreachable(why) | FsyncUnverified::Refused(why)) => {
                tracing::warn!(why, "jetstream fsync re-check could not verify the servers");
            }
            Err(FsyncUnverified::Unsynced(why)) => {
                tracing::error!(why, "jetstream fsync re-check failed: refusing writes");
                for w in writers
                    .iter()
                    .filter_map(tokio::sync::mpsc::WeakUnboundedSender::upgrade)
                {
                    let _ = w.send(super::writer::Cmd::Fail { why: why.clone() });
                }
                return;
            }
        }
    }
}

/// Why the servers' fsync setting was not verified.
#[derive(Debug, thiserror::Error)]
pub enum FsyncUnverified {
    /// Too few servers answered (they may be starting): worth asking again.
    #[error("{0}")]
    Unreachable(String),
    /// What answered cannot be trusted to fsync before it acknowledges.
    #[error("{0}")]
    Refused(String),
    /// A server said it acknowledges before it fsyncs.
    #[error("{0}")]
    Unsynced(String),
}

/// Why a monitoring URL told nothing.
enum Unread {
    /// Nothing answers there (the server is down).
    Down(String),
    /// It answered, but not as a JetStream server's monitor.
    Bad(String),
}

async fn read_server(http: &reqwest::Client, monitor: &str) -> Result<ServerSync, Unread> {
    let url = format!("{monitor}/varz");
    let resp = http.get(&url).send().await.map_err(|e| {
        let why = format!("{url}: {}", fleet_api::error_chain(&e));
        if e.is_connect() || e.is_timeout() {
            Unread::Down(why)
        } else {
            Unread::Bad(why)
        }
    })?;
    let varz = resp
        .json::<serde_json::Value>()
        .await
        .map_err(|e| Unread::Bad(format!("{url}: {e}")))?;
    let name = varz["server_name"]
        .as_str()
        .ok_or_else(|| Unread::Bad(format!("{url}: no server_name")))?
        .to_string();
    let js = &varz["jetstream"];
    if js.is_null() || js["config"].is_null() {
        // A starting server answers before its JetStream is up.
        return Err(Unread::Down(format!(
            "{monitor}: server {name} has no JetStream (yet)"
        )));
    }
    let sync_always = js["config"]["sync_always"].as_bool().unwrap_or(false);
    let cluster_size = js["meta"]["cluster_size"].as_u64().unwrap_or(1) as usize;
    let mut group = vec![name.clone()];
    if let Some(replicas) = js["meta"]["replicas"].as_array() {
        group.extend(
            replicas
                .iter()
                .filter_map(|r| r["name"].as_str().map(str::to_string)),
        );
    }
    Ok(ServerSync {
        name,
        sync_always,
        group,
        cluster_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_prefix_and_options() {
        let c = JetStreamConfig::parse(
            "nats://127.0.0.1:4222,127.0.0.1:4223/fleet_a?replicas=3&monitor=http://127.0.0.1:8222,http://127.0.0.1:8223",
            4,
        )
        .unwrap();
        assert_eq!(
            c.servers,
            vec!["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
        );
        assert_eq!(c.prefix, "fleet_a");
        assert_eq!(c.replicas, 3);
        assert_eq!(c.monitors.len(), 2);
        let d = JetStreamConfig::parse("nats://h:1", 1).unwrap();
        assert_eq!((d.prefix.as_str(), d.replicas), ("fleet", 3));
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for bad in [
            "http://h:1",
            "nats://h",
            "nats://h:x",
            "nats://h:1/a.b",
            "nats://h:1/p?replicas=0",
            "nats://h:1/p?replicas=9",
            "nats://h:1/p?monitor=h:8222",
            "nats://h:1/p?what=1",
        ] {
            let e = JetStreamConfig::parse(bad, 1).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
