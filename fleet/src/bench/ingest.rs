//! `fleet bench ingest`: 100-byte QoS 1 publishes from many connections
//! against (a) the hub with its durable log, (b) rumqttd alone, memory only,
//! (c) Mosquitto on the same machine, each its own process and driven by the
//! same load generator. Reports msgs/s and PUBACK latency p50/p99, medians
//! over rounds that alternate the targets, and the hub's ratios.
//!
//! Mosquitto and rumqttd acknowledge from memory (Mosquitto's persistence
//! only snapshots); the hub acknowledges after fdatasync. The comparison is
//! of a durable path against non-durable ones.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fleet_api::{DeviceId, DeviceStatus, Region, Tags};
use registry_sync::store::NewDevice;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::driver::{self, Client, Load};
use super::{machine, median};

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Publishing connections (one device each).
    #[arg(long, default_value_t = 20)]
    connections: usize,
    /// QoS 1 publishes in flight per connection.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds; each round measures every target once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Comma-separated targets among hub, rumqttd, mosquitto.
    #[arg(long, default_value = "hub,rumqttd,mosquitto")]
    targets: String,
    /// Measure the brokers without a subscriber: they then acknowledge and
    /// discard every message (rumqttd drops a publish no filter matches).
    #[arg(long)]
    no_subscriber: bool,
    /// `file` (the targets above) or `jetstream`: the hub on an R3
    /// JetStream cluster against a raw async-nats publisher writing the same
    /// records to the same stream configuration, and against the file log.
    #[arg(long, default_value = "file")]
    log: String,
}

/// The bench hub's admin token.
pub(super) const BENCH_TOKEN: &str = "bench-admin-token-0000";

pub(super) struct Target {
    name: &'static str,
    pub(super) addr: SocketAddr,
    /// The hub's HTTP API (the baselines have none).
    pub(super) http: Option<SocketAddr>,
    pub(super) clients: Vec<Client>,
    /// The baselines' subscriber; the hub delivers into its durable log.
    drain: Option<driver::Drain>,
    _process: Child,
}

#[derive(Debug, Serialize)]
struct Row {
    target: &'static str,
    msgs_per_s: f64,
    samples: Vec<f64>,
    p50_ms_at_half_rate: f64,
    p99_ms_at_half_rate: f64,
}

/// Runs the benchmark.
///
/// # Errors
/// When a target does not start or a phase fails.
pub async fn run(args: IngestArgs, json: bool) -> anyhow::Result<()> {
    match args.log.as_str() {
        "file" => {}
        "jetstream" => {
            return super::ingest_js::run(
                args.connections,
                args.window,
                args.payload,
                args.seconds,
                args.rounds,
                json,
            )
            .await;
        }
        other => bail!("--log {other:?}: expected file or jetstream"),
    }
    let dir = tempfile::tempdir()?;
    let mut targets = Vec::new();
    for name in args.targets.split(',').map(str::trim) {
        targets.push(match name {
            "hub" => start_hub(dir.path(), args.connections).await?,
            "rumqttd" => start_rumqttd(args.connections).await?,
            "mosquitto" => start_mosquitto(dir.path(), args.connections).await?,
            other => bail!("unknown target {other:?}: hub, rumqttd or mosquitto"),
        });
    }
    if !args.no_subscriber {
        for t in targets.iter_mut().filter(|t| t.name != "hub") {
            t.drain = Some(driver::Drain::start(t.addr, "devices/#").await?);
        }
    }
    if !json {
        eprintln!("machine: {}", machine());
        eprintln!(
            "{} connections × {} in flight, {} B payloads, QoS 1, {} s phases, {} rounds; {}",
            args.connections,
            args.window,
            args.payload,
            args.seconds,
            args.rounds,
            if args.no_subscriber {
                "brokers without subscribers (they discard)"
            } else {
                "each broker delivers to one subscriber, the hub to its durable log"
            }
        );
    }
    let flat_out = Load {
        window: args.window,
        payload: args.payload,
        duration: Duration::from_secs(args.seconds),
        rate: None,
    };
    // Warm-up: connections, page cache, allocator; not measured.
    for t in &targets {
        driver::run(
            t.addr,
            &t.clients,
            Load {
                duration: Duration::from_secs(1),
                ..flat_out
            },
        )
        .await?;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds {
        for (i, t) in targets.iter().enumerate() {
            let before = t
                .drain
                .as_ref()
                .map(|d| d.received.load(std::sync::atomic::Ordering::Relaxed));
            let m = driver::run(t.addr, &t.clients, flat_out)
                .await
                .with_context(|| format!("{} phase", t.name))?;
            let delivered = t
                .drain
                .as_ref()
                .zip(before)
                .map(|(d, b)| {
                    format!(
                        ", subscriber got {}",
                        d.received.load(std::sync::atomic::Ordering::Relaxed) - b
                    )
                })
                .unwrap_or_default();
            if !json {
                eprintln!(
                    "  round {} {:<9} {:>9.0} msgs/s ({} acked{delivered})",
                    round + 1,
                    t.name,
                    m.rate(),
                    m.acked
                );
            }
            rates[i].push(m.rate());
        }
    }
    // Latency at half of the hub's maximum (or of the first target's).
    let half = median(&rates[0]) / 2.0;
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for _ in 0..args.rounds {
        for (i, t) in targets.iter().enumerate() {
            let mut m = driver::run(
                t.addr,
                &t.clients,
                Load {
                    rate: Some(half),
                    ..flat_out
                },
            )
            .await?;
            p50[i].push(m.latency_ms(0.5));
            p99[i].push(m.latency_ms(0.99));
        }
    }
    let rows: Vec<Row> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| Row {
            target: t.name,
            msgs_per_s: median(&rates[i]),
            samples: rates[i].clone(),
            p50_ms_at_half_rate: median(&p50[i]),
            p99_ms_at_half_rate: median(&p99[i]),
        })
        .collect();
    let hub = rows
        .iter()
        .find(|r| r.target == "hub")
        .map(|r| r.msgs_per_s);
    let ratio = |name: &str| {
        let base = rows.iter().find(|r| r.target == name)?.msgs_per_s;
        Some(hub? / base)
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine(),
                "half_rate_msgs_per_s": half,
                "results": rows,
                "hub_vs_rumqttd": ratio("rumqttd"),
                "hub_vs_mosquitto": ratio("mosquitto"),
            })
        );
    } else {
        println!(
            "{:<10} {:>12} {:>22} {:>22}",
            "target", "msgs/s", "p50 PUBACK ms @half", "p99 PUBACK ms @half"
        );
        for r in &rows {
            println!(
                "{:<10} {:>12.0} {:>22.2} {:>22.2}",
                r.target, r.msgs_per_s, r.p50_ms_at_half_rate, r.p99_ms_at_half_rate
            );
        }
        println!("half rate: {half:.0} msgs/s");
        if let Some(r) = ratio("rumqttd") {
            println!("hub / rumqttd   = {r:.2} (target ≥ 0.70)");
        }
        if let Some(r) = ratio("mosquitto") {
            println!("hub / mosquitto = {r:.2} (target ≥ 1.00)");
        }
    }
    Ok(())
}

fn clients(n: usize, prefix: &str) -> Vec<Client> {
    (0..n)
        .map(|i| Client {
            id: format!("{prefix}{i:04}"),
            password: None,
            next_mid: Arc::new(AtomicU64::new(1)),
        })
        .collect()
}

/// Spawns this binary with `args` and reads its JSON ready line.
pub(super) async fn spawn_self(args: &[&str]) -> anyhow::Result<(Child, serde_json::Value)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(args)
        .env("FLEET_LOG", "error,rumqttd=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("no ready line within 30 s")??
        .context("exited before it was ready")?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, serde_json::from_str(&line)?))
}

pub(super) fn addr_of(ready: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
    Ok(ready[key]
        .as_str()
        .with_context(|| format!("no {key} address in {ready}"))?
        .parse()?)
}

/// A hub process with `n` registered bench devices.
pub(super) async fn start_hub(dir: &Path, n: usize) -> anyhow::Result<Target> {
    let mut cs = clients(n, "bench-");
    let registry = register(dir, "bench", &mut cs).await?;
    let hub = spawn_hub(&dir.join("hub"), "bench", &registry, &[]).await?;
    Ok(Target {
        name: "hub",
        addr: hub.mqtt,
        http: Some(hub.http),
        clients: cs,
        drain: None,
        _process: hub.process,
    })
}

/// `n` bench clients without keys (see [`register`]).
pub(super) fn bench_clients(n: usize) -> Vec<Client> {
    clients(n, "bench-")
}

/// Creates `region`'s registry in `dir` holding `cs`; the first call gives
/// every client a key, later calls register the same keys (a second region).
pub(super) async fn register(
    dir: &Path,
    region: &str,
    cs: &mut [Client],
) -> anyhow::Result<String> {
    let registry = format!(
        "sqlite://{}",
        dir.join(format!("registry-{region}.db")).display()
    );
    let store = registry_sync::open(&registry).await?;
    store.claim_region(&Region::new(region)?).await?;
    let mut new = Vec::new();
    for c in cs.iter_mut() {
        let hash = match &c.password {
            Some(p) => fleet_api::DeviceKey::parse(p)?.hash(),
            None => {
                let key = registry_sync::keys::generate();
                c.password = Some(key.expose());
                key.hash()
            }
        };
        new.push(NewDevice {
            device_id: DeviceId::new(&c.id)?,
            key_sha256: hash,
            status: DeviceStatus::Enabled,
            tags: Tags::default(),
        });
    }
    store.create(new).await?;
    store.close().await;
    Ok(registry)
}

/// A hub process of this binary.
pub(super) struct HubProcess {
    pub(super) mqtt: SocketAddr,
    pub(super) http: SocketAddr,
    pub(super) process: Child,
}

/// Starts `fleet hub run` on `data` with the bench admin token and `extra` flags.
pub(super) async fn spawn_hub(
    data: &Path,
    region: &str,
    registry: &str,
    extra: &[&str],
) -> anyhow::Result<HubProcess> {
    let data = data.to_str().context("path")?;
    let mut args = vec![
        "hub",
        "--json",
        "run",
        "--region",
        region,
        "--data",
        data,
        "--registry",
        registry,
        "--mqtt",
        "127.0.0.1:0",
        "--admin-token",
        BENCH_TOKEN,
    ];
    if !extra.contains(&"--http") {
        args.extend(["--http", "127.0.0.1:0"]);
    }
    args.extend(extra);
    let (process, ready) = spawn_self(&args)
        .await
        .with_context(|| format!("start the {region} hub"))?;
    Ok(HubProcess {
        mqtt: addr_of(&ready, "mqtt")?,
        http: addr_of(&ready, "http")?,
        process,
    })
}

async fn start_rumqttd(n: usize) -> anyhow::Result<Target> {
    let (child, ready) = spawn_self(&["bench", "serve-rumqttd"])
        .await
        .context("start rumqttd")?;
    Ok(Target {
        name: "rumqttd",
        addr: addr_of(&ready, "mqtt")?,
        http: None,
        clients: clients(n, "bench-"),
        drain: None,
        _process: child,
    })
}

async fn start_mosquitto(dir: &Path, n: usize) -> anyhow::Result<Target> {
    // max_queued_messages 0: the default 1000 silently drops QoS 1 for slow subscribers.
    let (child, addr) = spawn_mosquitto(dir, "ingest", "max_queued_messages 0\n").await?;
    Ok(Target {
        name: "mosquitto",
        addr,
        http: None,
        clients: clients(n, "bench-"),
        drain: None,
        _process: child,
    })
}

/// Mosquitto on a free loopback port (anonymous, no persistence, no log),
/// with `extra` lines in its config; returns once it listens.
pub(super) async fn spawn_mosquitto(
    dir: &Path,
    name: &str,
    extra: &str,
) -> anyhow::Result<(Child, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join(format!("mosquitto-{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n{extra}"
        ),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start mosquitto (scripts/services.sh installs it)")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok((child, addr));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("mosquitto did not listen on {addr}")
}
