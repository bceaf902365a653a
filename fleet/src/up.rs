//! `fleet up`: a whole two-region fleet on loopback with embedded defaults
//! (SQLite registries, file logs), every component its own process so that
//! any one can be killed: two hubs (a primary, b secondary) replicating, two
//! concierge replicas with their DNS fronts (127.0.0.1 and 127.0.0.2), and a
//! `registry-sync follow` per direction keeping the registries converged.
//! The drill and the end-to-end tests start fleets through this module.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_api::local::NatsCluster;
use fleet_api::{Region, Secret};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How components are started: a binary that takes `hub …`, `concierge …`,
/// `registry-sync …` and `device-agent …` as its first arguments (`fleet`
/// itself, or the test harness's `fleet-node`).
#[derive(Clone, Debug)]
pub struct Launcher {
    pub exe: PathBuf,
}

impl Launcher {
    /// This very binary.
    ///
    /// # Errors
    /// When the running executable cannot be found.
    pub fn current() -> anyhow::Result<Launcher> {
        Ok(Launcher {
            exe: std::env::current_exe().context("find the fleet binary")?,
        })
    }
}

/// A component process. Killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub label: String,
    pub log: PathBuf,
    pub ready: serde_json::Value,
    child: Child,
    args: Vec<String>,
    launcher: Launcher,
}

/// Flags whose values are secrets, and the variables that carry them
/// instead: a process's argv is readable by every user of the machine
/// (`ps`), its environment only by its owner.
const SECRET_FLAGS: [(&str, &str); 4] = [
    ("--admin-token", "FLEET_ADMIN_TOKEN"),
    ("--read-token", "FLEET_READ_TOKEN"),
    ("--peer-token", "FLEET_PEER_TOKEN"),
    ("--stream-password", "FLEET_STREAM_PASSWORD"),
];

/// `args` without secret flags, and those as environment variables.
fn split_secrets(args: &[String]) -> (Vec<String>, Vec<(&'static str, String)>) {
    let (mut argv, mut env) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match SECRET_FLAGS.iter().find(|(flag, _)| a == flag) {
            Some((_, var)) => {
                if let Some(value) = it.next() {
                    env.push((*var, value.clone()));
                }
            }
            None => argv.push(a.clone()),
        }
    }
    (argv, env)
}

impl Proc {
    /// Starts `args` and, when `ready` is set, waits for its JSON ready line.
    /// Secret flags among `args` are passed in the environment instead.
    ///
    /// # Errors
    /// When the process cannot start or exits before it is ready.
    pub async fn start(
        launcher: &Launcher,
        dir: &Path,
        label: &str,
        args: Vec<String>,
        ready: bool,
    ) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{label}.log"));
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let (argv, secrets) = split_secrets(&args);
        let mut child = Command::new(&launcher.exe)
            .args(&argv)
            .envs(secrets)
            .env(
                "FLEET_LOG",
                std::env::var("FLEET_LOG")
                    .unwrap_or_else(|_| "info,rumqttd=warn,rumqttd::server::broker=off".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {label}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut first = serde_json::Value::Null;
        if ready {
            let line = tokio::time::timeout(Duration::from_secs(90), lines.next_line()).await;
            match line {
                Ok(Ok(Some(l))) => {
                    first = serde_json::from_str(&l)
                        .with_context(|| format!("{label}: ready line {l:?}"))?
                }
                _ => {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(10).collect();
                    bail!(
                        "{label} did not start:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proc {
            label: label.to_string(),
            log,
            ready: first,
            child,
            args,
            launcher: launcher.clone(),
        })
    }

    /// SIGKILL, and wait for it to be gone.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Starts the same command again (after a kill).
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart(&mut self, dir: &Path, ready: bool) -> anyhow::Result<()> {
        self.kill9().await;
        let fresh = Proc::start(&self.launcher, dir, &self.label, self.args.clone(), ready).await?;
        *self = fresh;
        Ok(())
    }

    /// SIGTERM, then wait (at most 10 s) for a clean exit.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        self.kill9().await;
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A free `127.0.0.1:PORT` below the kernel's ephemeral range (see the test
/// harness): components that must know each other's address before start.
///
/// # Errors
/// When no port is free.
pub fn reserve(ip: [u8; 4]) -> anyhow::Result<SocketAddr> {
    fleet_api::local::reserve_on(ip).context("no free port")
}

/// How a fleet runs.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub dir: PathBuf,
    /// `async` or `sync`.
    pub replication: String,
    /// Concierge: promote automatically after the primary is down this
    /// long, seconds (0: as soon as it failed three checks in a row and
    /// the secondary lost it too).
    pub auto_failover_after_s: Option<f64>,
    /// How often the concierges check the hubs, ms.
    pub poll_ms: u64,
    /// Endpoint and DNS TTL, seconds.
    pub ttl_s: u32,
    pub partitions: u32,
    /// Hubs detach a peer unreachable this long (`--peer-detach-after-s`).
    pub peer_detach_after_s: Option<u64>,
    /// Async hubs throttle ingest beyond this lag (`--max-lag-ms`).
    pub max_lag_ms: Option<u64>,
    /// Each region's log on its own JetStream cluster (three nats-server
    /// processes, R3, fsync before ack) instead of the embedded file log.
    pub jetstream: bool,
    /// Hubs per region (several share the region's JetStream log).
    pub hubs_per_region: usize,
}

impl UpOptions {
    pub fn new(dir: PathBuf) -> UpOptions {
        UpOptions {
            dir,
            replication: "async".into(),
            auto_failover_after_s: None,
            poll_ms: 200,
            ttl_s: 2,
            partitions: 8,
            peer_detach_after_s: None,
            max_lag_ms: None,
            jetstream: false,
            hubs_per_region: 1,
        }
    }
}

/// One region: its hub and the follower that keeps its registry converged.
#[derive(Debug)]
pub struct RegionProcs {
    pub name: Region,
    pub hub: Proc,
    pub follower: Proc,
    pub registry: String,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub stream: SocketAddr,
    /// The region's JetStream cluster (with `--log jetstream`).
    pub nats: Option<NatsCluster>,
    /// The region's other hubs (`--hubs-per-region` above 1), on the same
    /// log as `hub`.
    pub more: Vec<MoreHub>,
}

/// A region's second (third…) hub.
#[derive(Debug)]
pub struct MoreHub {
    pub hub: Proc,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
}

impl RegionProcs {
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every hub's HTTP URL, the first hub's first.
    pub fn http_urls(&self) -> Vec<String> {
        std::iter::once(self.http)
            .chain(self.more.iter().map(|m| m.http))
            .map(|a| format!("http://{a}"))
            .collect()
    }

    /// Every hub's HTTP and MQTT address.
    fn hubs(&self) -> Vec<(SocketAddr, SocketAddr)> {
        std::iter::once((self.http, self.mqtt))
            .chain(self.more.iter().map(|m| (m.http, m.mqtt)))
            .collect()
    }
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    pub dir: PathBuf,
    pub launcher: Launcher,
    pub admin_token: Secret,
    pub stream_password: Secret,
    pub regions: Vec<RegionProcs>,
    pub concierges: Vec<Proc>,
    /// `http://concierge.fleet.test:PORT`, resolved only through `dns`.
    pub concierge_url: String,
    pub concierge_http: Vec<SocketAddr>,
    pub dns: Vec<SocketAddr>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

fn random_secret() -> Secret {
    // ThreadRng is a CSPRNG (ChaCha12) seeded from the OS.
    Secret::new(format!("{:032x}", rand::random::<u128>()))
}

impl Fleet {
    /// Starts a fleet in `opts.dir`.
    ///
    /// # Errors
    /// When a component does not start.
    pub async fn up(launcher: Launcher, opts: UpOptions) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(&opts.dir)?;
        let dir = std::fs::canonicalize(&opts.dir)?;
        let admin_token = random_secret();
        // The hubs' own replication credential, distinct from the admin token.
        let peer_token = random_secret();
        let stream_password = random_secret();
        let names = ["a", "b"];
        let registries: Vec<String> = names
            .iter()
            .map(|r| {
                format!(
                    "sqlite://{}",
                    dir.join(format!("registry-{r}.db")).display()
                )
            })
            .collect();
        for (r, url) in names.iter().zip(&registries) {
            let store = registry_sync::open(url).await?;
            store.claim_region(&Region::new(*r)?).await?;
            store.close().await;
        }
        let n = opts.hubs_per_region.max(1);
        if n > 1 && !opts.jetstream {
            anyhow::bail!("several hubs per region need the JetStream log");
        }
        let mut https = Vec::new();
        for _ in 0..2 {
            let mut region = Vec::new();
            for _ in 0..n {
                region.push(reserve([127, 0, 0, 1])?);
            }
            https.push(region);
        }
        let mut regions = Vec::new();
        for (i, r) in names.iter().enumerate() {
            // Every hub of the other region (any of them speaks for it).
            let peer = https[1 - i]
                .iter()
                .map(|a| format!("http://{a}"))
                .collect::<Vec<_>>()
                .join(",");
            let nats = if opts.jetstream {
                let nats_dir = dir.join(format!("nats-{r}"));
                std::fs::create_dir_all(&nats_dir)?;
                Some(
                    NatsCluster::start(&nats_dir, &format!("nats-{r}"), 3)
                        .await
                        .map_err(|e| anyhow::anyhow!("region {r}'s JetStream: {e}"))?,
                )
            } else {
                None
            };
            let mut started = Vec::new();
            for (j, http) in https[i].iter().copied().enumerate() {
                let suffix = if j == 0 {
                    String::new()
                } else {
                    (j + 1).to_string()
                };
                let data = dir.join(format!("hub-{r}{suffix}"));
                let mut args = vec![
                    "hub".into(),
                    "--json".into(),
                    "run".into(),
                    "--region".into(),
                    (*r).to_string(),
                    "--data".into(),
                    data.display().to_string(),
                    "--registry".into(),
                    registries[i].clone(),
                    "--mqtt".into(),
                    "127.0.0.1:0".into(),
                    "--http".into(),
                    http.to_string(),
                    "--admin-token".into(),
                    admin_token.expose().to_string(),
                    "--role".into(),
                    if i == 0 {
                        "primary".into()
                    } else {
                        "secondary".into()
                    },
                    "--peer".into(),
                    peer.clone(),
                    "--peer-token".into(),
                    peer_token.expose().to_string(),
                    "--replication".into(),
                    opts.replication.clone(),
                    "--partitions".into(),
                    opts.partitions.to_string(),
                    "--stream".into(),
                    "127.0.0.1:0".into(),
                    "--stream-password".into(),
                    stream_password.expose().to_string(),
                    // On loopback every device comes from one address: the
                    // per-address limits (there for fleets on many machines)
                    // would pace the whole fleet as one client.
                    "--connect-rate-per-source".into(),
                    "1000000".into(),
                    // What a hub admits on this kind of machine (`fleet bench
                    // connections`: 13,000-19,000 CONNECT/s), with room.
                    "--connect-rate".into(),
                    "10000".into(),
                    "--max-pending-per-source".into(),
                    "1000000".into(),
                ];
                if let Some(s) = opts.peer_detach_after_s {
                    args.extend(["--peer-detach-after-s".into(), s.to_string()]);
                }
                if let Some(n) = &nats {
                    args.extend(["--log".into(), n.log_url(&format!("fleet_{r}"))]);
                }
                if let Some(ms) = opts.max_lag_ms.filter(|_| opts.replication == "async") {
                    args.extend(["--max-lag-ms".into(), ms.to_string()]);
                }
                if n > 1 {
                    args.extend(["--hub-id".into(), format!("{r}{}", j + 1)]);
                }
                let mut hub =
                    Proc::start(&launcher, &dir, &format!("hub-{r}{suffix}"), args, true).await?;
                let addr = |k: &str| -> anyhow::Result<SocketAddr> {
                    hub.ready[k]
                        .as_str()
                        .context("address")?
                        .parse()
                        .context("address")
                };
                let (mqtt, stream) = (addr("mqtt")?, addr("stream")?);
                // Restarts keep the ports others know.
                if let Some(i) = hub.args.iter().position(|a| a == "--mqtt") {
                    hub.args[i + 1] = mqtt.to_string();
                }
                if let Some(i) = hub.args.iter().position(|a| a == "--stream") {
                    hub.args[i + 1] = stream.to_string();
                }
                started.push((hub, http, mqtt, stream));
            }
            let mut started = started.into_iter();
            let (hub, http, mqtt, stream) = started.next().context("a region without hubs")?;
            let more = started
                .map(|(hub, http, mqtt, _)| MoreHub { hub, http, mqtt })
                .collect();
            let other = &registries[1 - i];
            let follower = Proc::start(
                &launcher,
                &dir,
                &format!("follow-into-{r}"),
                strings(&[
                    "registry-sync",
                    "follow",
                    "--from",
                    other,
                    "--into",
                    &registries[i],
                    "--interval-ms",
                    "500",
                ]),
                false,
            )
            .await?;
            regions.push(RegionProcs {
                name: Region::new(*r)?,
                hub,
                follower,
                registry: registries[i].clone(),
                http,
                mqtt,
                stream,
                nats,
                more,
            });
        }
        // Two concierge replicas on one port of two loopback addresses, so
        // that the DNS front can hand out either.
        let port = reserve([127, 0, 0, 2])?.port();
        let concierge_http = vec![
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 2], port)),
        ];
        let dns_port = reserve([127, 0, 0, 2])?.port();
        let dns = vec![
            SocketAddr::from(([127, 0, 0, 1], dns_port)),
            SocketAddr::from(([127, 0, 0, 2], dns_port)),
        ];
        let mut concierges = Vec::new();
        for (i, (http, dns)) in concierge_http.iter().zip(&dns).enumerate() {
            let mut args = strings(&[
                "concierge",
                "--json",
                "run",
                "--http",
                &http.to_string(),
                "--dns",
                &dns.to_string(),
                "--zone",
                "fleet.test",
                "--admin-token",
                admin_token.expose(),
                "--ttl-s",
                &opts.ttl_s.to_string(),
                "--poll-ms",
                &opts.poll_ms.to_string(),
                // On loopback every device asks from one address (see the
                // hubs' flags above): lift the per-address limits, and let
                // every device of a large drill hold a long poll.
                "--lookups-per-source",
                "1000000",
                "--long-polls-per-source",
                "1000000",
                "--http-max-connections",
                "19000",
                "--http-max-per-source",
                "19000",
                // The hubs' rate: the herd after a failover is scheduled
                // at what the new primary admits.
                "--connect-rate",
                "10000",
            ]);
            for r in &regions {
                for (http, mqtt) in r.hubs() {
                    args.push("--hub".into());
                    args.push(format!("{}=http://{http},mqtt://{mqtt}", r.name));
                }
            }
            for h in &concierge_http {
                args.push("--replica".into());
                args.push(h.to_string());
            }
            if let Some(after) = opts.auto_failover_after_s {
                args.push("--auto-failover-after-s".into());
                args.push(after.to_string());
            }
            concierges.push(
                Proc::start(&launcher, &dir, &format!("concierge-{}", i + 1), args, true).await?,
            );
        }
        Ok(Fleet {
            concierge_url: format!("http://concierge.fleet.test:{port}"),
            dir,
            launcher,
            admin_token,
            stream_password,
            regions,
            concierges,
            concierge_http,
            dns,
        })
    }

    /// Region `r` (0 = a, 1 = b).
    pub fn region(&self, r: usize) -> &RegionProcs {
        &self.regions[r]
    }

    /// Kills a whole region: its hub, its registry follower and its
    /// JetStream servers, if any (SIGKILL).
    pub async fn kill_region(&mut self, r: usize) {
        self.regions[r].hub.kill9().await;
        for m in &mut self.regions[r].more {
            m.hub.kill9().await;
        }
        self.regions[r].follower.kill9().await;
        if let Some(n) = &mut self.regions[r].nats {
            n.kill_all();
        }
    }

    /// Starts a killed region again.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart_region(&mut self, r: usize) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        if let Some(n) = &mut self.regions[r].nats {
            n.restart_all().await.map_err(anyhow::Error::msg)?;
        }
        self.regions[r].hub.restart(&dir, true).await?;
        for m in &mut self.regions[r].more {
            m.hub.restart(&dir, true).await?;
        }
        self.regions[r].follower.restart(&dir, false).await?;
        Ok(())
    }

    /// Stops everything (SIGTERM, then SIGKILL).
    pub async fn down(mut self) {
        for c in &mut self.concierges {
            c.stop().await;
        }
        for r in &mut self.regions {
            r.follower.stop().await;
            for m in &mut r.more {
                m.hub.stop().await;
            }
            r.hub.stop().await;
        }
    }

    /// What `fleet up` prints.
    pub fn describe(&self) -> String {
        let c = &self.concierge_http[0];
        let mut s = format!(
            "Fleet is up. Run directory (logs, data): {}\n\n",
            self.dir.display()
        );
        s += &format!("  admin token        {}\n", self.admin_token.expose());
        for (i, r) in self.regions.iter().enumerate() {
            s += &format!(
                "  region {} ({})  mqtt://{}  http://{}  live stream mqtt://{}\n",
                r.name,
                if i == 0 { "primary" } else { "secondary" },
                r.mqtt,
                r.http,
                r.stream
            );
            for m in &r.more {
                s += &format!(
                    "    and hub          mqtt://{}  http://{} (same log)\n",
                    m.mqtt, m.http
                );
            }
            if let Some(n) = &r.nats {
                s += &format!(
                    "    its log: JetStream {} (R3, fsync before ack; monitors {})\n",
                    n.urls(),
                    n.monitors()
                );
            }
        }
        s += &format!(
            "  concierge          {} (replicas {} and {})\n",
            self.concierge_url, self.concierge_http[0], self.concierge_http[1]
        );
        s += &format!(
            "  DNS front          {} and {} (zone fleet.test)\n",
            self.dns[0], self.dns[1]
        );
        s += &format!("  status page        http://{c}/\n\nTry:\n");
        s += &format!(
            "  dig @{} -p {} concierge.fleet.test +short\n",
            self.dns[0].ip(),
            self.dns[0].port()
        );
        s += &format!("  curl http://{c}/v1/regions\n");
        s += &format!(
            "  mosquitto_sub -p {} -u stream -P {} -t 'fleet/#' -v\n",
            self.regions[0].stream.port(),
            self.stream_password.expose()
        );
        s += &format!(
            "  fleet registry-sync device add --db {} my-device\n",
            self.regions[0].registry
        );
        s += &format!(
            "  echo '{{\"t\":21.5}}' | FLEET_KEY=<key> fleet device-agent run --device-id my-device --concierge {} --allow-plaintext --dns {} --outbox /tmp/my-device --exit-when-drained\n",
            self.concierge_url, self.dns[0]
        );
        s += &format!(
            "  curl -X POST -H 'Authorization: Bearer {}' http://{c}/v1/failover -d '{{\"to\":\"b\",\"mode\":\"planned\"}}'\n",
            self.admin_token.expose()
        );
        s += "\nCtrl-C stops everything.\n";
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_leave_argv_for_the_environment() {
        let args: Vec<String> = [
            "hub",
            "run",
            "--admin-token",
            "admin-secret-0123456789",
            "--region",
            "a",
            "--peer-token",
            "peer-secret-0123456789",
            "--stream-password",
            "stream-secret-0123456789",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (argv, env) = split_secrets(&args);
        assert_eq!(argv, ["hub", "run", "--region", "a"]);
        assert_eq!(
            env,
            [
                ("FLEET_ADMIN_TOKEN", "admin-secret-0123456789".to_string()),
                ("FLEET_PEER_TOKEN", "peer-secret-0123456789".to_string()),
                (
                    "FLEET_STREAM_PASSWORD",
                    "stream-secret-0123456789".to_string()
                ),
            ]
        );
    }
}
