//! `fleet bench connections`: what an idle device connection costs a
//! broker, and how fast it admits CONNECTs. Each target (the hub with its
//! registry's key check, the hub over TLS, a plain rumqttd, Mosquitto) runs
//! in its own process; load generators (this binary, `bench connect-load`)
//! run as separate processes, each from its own loopback address (past one
//! address's ephemeral ports) and under its own open-files limit. Measured
//! per target: the CONNECT rate of the whole herd, RSS per held connection
//! (the process's RSS with all of them, less before), and CPU at idle while
//! the devices send their keep-alives.
//!
//! The baselines are anonymous (Mosquitto and rumqttd check no key); the
//! hub looks every device's key up. Processes here may open at most
//! `ulimit -n` files (20,000 on these machines, not raisable), so a broker
//! holds up to about 18,000; the 100,000-device cost is projected from the
//! measured slope.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fleet_api::{DeviceId, DeviceKey};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::ingest::{BENCH_TOKEN, addr_of, bench_clients, register, spawn_mosquitto, spawn_self};
use super::machine;

#[derive(Debug, Args)]
pub struct ConnectionsArgs {
    /// Idle authenticated devices each target holds.
    #[arg(long, default_value_t = 5000)]
    devices: usize,
    /// Load-generator processes, each with its own loopback address.
    #[arg(long, default_value_t = 2)]
    generators: usize,
    /// CONNECTs in flight per generator.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds the idle CPU is measured over.
    #[arg(long, default_value_t = 5)]
    idle_s: u64,
    /// The devices' keep-alive, seconds (they ping at half of it).
    #[arg(long, default_value_t = 10)]
    keep_alive_s: u16,
    /// Comma-separated targets among hub, hub-tls, rumqttd, mosquitto.
    #[arg(long, default_value = "hub,hub-tls,rumqttd,mosquitto")]
    targets: String,
}

/// `bench connect-load`: one load generator (internal).
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    #[arg(long)]
    url: String,
    /// NDJSON of `{"device_id","key"}` (anonymous targets ignore keys).
    #[arg(long)]
    keys: PathBuf,
    /// Local address to connect from.
    #[arg(long)]
    from: IpAddr,
    #[arg(long)]
    concurrency: usize,
    #[arg(long)]
    keep_alive_s: u16,
    /// CA certificate for mqtts.
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    target: String,
    devices: usize,
    connected: u64,
    failed: u64,
    connects_per_s: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    bytes_per_connection: u64,
    projected_100k_mib: u64,
    cpu_idle_pct: f64,
}

/// The generator's report, one JSON line once every device has connected.
#[derive(Debug, Serialize, serde::Deserialize)]
struct Loaded {
    connected: u64,
    failed: u64,
    secs: f64,
    first_error: Option<String>,
}

/// Runs one load generator: connects every device of `keys`, prints
/// [`Loaded`], then keeps them alive until its stdin closes.
///
/// # Errors
/// When the keys cannot be read.
pub async fn load(args: LoadArgs) -> anyhow::Result<()> {
    raise_open_files();
    let devices: Vec<(DeviceId, DeviceKey)> = std::fs::read_to_string(&args.keys)?
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok((
                DeviceId::new(v["device_id"].as_str().unwrap_or_default())?,
                DeviceKey::parse(v["key"].as_str().unwrap_or_default())?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let tls = match &args.ca {
        Some(ca) => Some(device_agent::cli::tls_config(Some(ca))?),
        None => None,
    };
    let keep_alive = Duration::from_secs(args.keep_alive_s.into());
    let (connected, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(devices.len().max(1));
    let started = Instant::now();
    let mut held = Vec::new();
    for (id, key) in devices {
        let (gate, tls, url) = (gate.clone(), tls.clone(), args.url.clone());
        let (connected, failed, first_error) =
            (connected.clone(), failed.clone(), first_error.clone());
        let done = done_tx.clone();
        held.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let conn = device_agent::mqtt::connect_from(
                Some(args.from),
                &url,
                &id,
                &key,
                keep_alive,
                tls.as_ref(),
                true,
            )
            .await;
            drop(permit);
            let mut conn = match conn {
                Ok(c) => {
                    connected.fetch_add(1, Ordering::Relaxed);
                    c
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e.to_string());
                    let _ = done.send(()).await;
                    return;
                }
            };
            let _ = done.send(()).await;
            drop(done);
            // Idle: a PINGREQ at half the keep-alive, and its PINGRESP.
            loop {
                tokio::time::sleep(keep_alive / 2).await;
                conn.send(rumqttc::mqttbytes::v4::Packet::PingReq);
                if conn.flush().await.is_err() || !matches!(conn.fill().await, Ok(true)) {
                    return;
                }
                while let Ok(Some(_)) = conn.buffered_packet() {}
            }
        }));
    }
    drop(done_tx);
    while done_rx.recv().await.is_some() {}
    let report = Loaded {
        connected: connected.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs: started.elapsed().as_secs_f64(),
        first_error: first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    println!("{}", serde_json::to_string(&report)?);
    // Held until the bench closes stdin (or kills this process).
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1];
    let _ = stdin.read(&mut buf).await;
    for h in held {
        h.abort();
    }
    Ok(())
}

/// Raises this process's soft open-files limit to its hard one (children,
/// the brokers and generators, inherit it); returns the limit in force.
fn raise_open_files() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            eprintln!("cannot raise the open-files limit: {e}");
        }
    }
    fleet_api::process::open_files_limit()
}

/// A process's resident set, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

struct Target {
    name: String,
    url: String,
    process: Child,
    ca: Option<PathBuf>,
}

async fn start(name: &str, dir: &Path, registry: &str) -> anyhow::Result<Target> {
    match name {
        "hub" | "hub-tls" => {
            let data = dir.join(name);
            let data = data.to_str().context("path")?;
            let mut args = vec![
                "hub",
                "--json",
                "run",
                "--region",
                "bench",
                "--data",
                data,
                "--registry",
                registry,
                "--mqtt",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--admin-token",
                BENCH_TOKEN,
                // The herd comes from a few loopback addresses.
                "--connect-rate-per-source",
                "1000000",
                "--max-pending-per-source",
                "1000000",
                "--connect-rate",
                "1000000",
            ];
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
            let tls = name == "hub-tls";
            if tls {
                let c = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
                std::fs::write(&cert, c.cert.pem())?;
                std::fs::write(&key, c.signing_key.serialize_pem())?;
                args.extend(["--tls-cert", &cert_s, "--tls-key", &key_s]);
            }
            let (process, ready) = spawn_self(&args).await.context("start the hub")?;
            let mqtt = addr_of(&ready, "mqtt")?;
            Ok(Target {
                name: name.into(),
                url: if tls {
                    format!("mqtts://localhost:{}", mqtt.port())
                } else {
                    format!("mqtt://{mqtt}")
                },
                process,
                ca: tls.then_some(cert),
            })
        }
        "rumqttd" => {
            let (process, ready) = spawn_self(&["bench", "serve-rumqttd"])
                .await
                .context("start rumqttd")?;
            Ok(Target {
                name: name.into(),
                url: format!("mqtt://{}", addr_of(&ready, "mqtt")?),
                process,
                ca: None,
            })
        }
        "mosquitto" => {
            let (process, addr) =
                spawn_mosquitto(dir, "connections", "max_connections -1\n").await?;
            Ok(Target {
                name: name.into(),
                url: format!("mqtt://{addr}"),
                process,
                ca: None,
            })
        }
        other => bail!("unknown target {other:?}: hub, hub-tls, rumqttd or mosquitto"),
    }
}

/// A running generator and its report.
struct Generator {
    child: Child,
    loaded: Loaded,
}

async fn generator(
    t: &Target,
    keys: &Path,
    from: IpAddr,
    args: &ConnectionsArgs,
) -> anyhow::Result<Generator> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "connect-load", "--url", &t.url, "--keys"])
        .arg(keys)
        .args(["--from", &from.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--keep-alive-s", &args.keep_alive_s.to_string()]);
    if let Some(ca) = &t.ca {
        cmd.arg("--ca").arg(ca);
    }
    let mut child = cmd
        .env("FLEET_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(600), lines.next_line())
        .await
        .context("the generator did not finish connecting within 600 s")??
        .context("the generator exited")?;
    Ok(Generator {
        child,
        loaded: serde_json::from_str(&line)?,
    })
}

/// One target: RSS before, the herd connects, RSS and idle CPU after.
async fn measure(
    t: &Target,
    parts: &[PathBuf],
    round: usize,
    args: &ConnectionsArgs,
) -> anyhow::Result<Row> {
    let pid = t.process.id().context("no pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid)?;
    let gens = futures::future::try_join_all(parts.iter().enumerate().map(|(g, keys)| {
        // 127.0.R.G: a fresh address per round and generator, so no
        // earlier round's TIME_WAIT ports are in the way.
        let from = IpAddr::from([
            127,
            0,
            u8::try_from(round % 250 + 1).unwrap_or(1),
            g as u8 + 2,
        ]);
        generator(t, keys, from, args)
    }))
    .await?;
    let connected: u64 = gens.iter().map(|g| g.loaded.connected).sum();
    let failed: u64 = gens.iter().map(|g| g.loaded.failed).sum();
    if let Some(e) = gens.iter().find_map(|g| g.loaded.first_error.clone()) {
        eprintln!("{}: {failed} connects failed, the first: {e}", t.name);
    }
    let secs = gens.iter().map(|g| g.loaded.secs).fold(0.0, f64::max);
    // Settle (allocator, a first round of keep-alives), then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let cpu0 = super::cpu_s(pid)?;
    tokio::time::sleep(Duration::from_secs(args.idle_s)).await;
    let cpu1 = super::cpu_s(pid)?;
    for mut g in gens {
        drop(g.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), g.child.wait()).await;
    }
    let per = (after.saturating_sub(before) * 1024)
        .checked_div(connected)
        .unwrap_or(0);
    Ok(Row {
        target: t.name.clone(),
        devices: args.devices,
        connected,
        failed,
        connects_per_s: connected as f64 / secs.max(1e-9),
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_connection: per,
        projected_100k_mib: (per * 100_000) / (1 << 20),
        cpu_idle_pct: 100.0 * (cpu1 - cpu0) / args.idle_s.max(1) as f64,
    })
}

/// Runs the benchmark.
///
/// # Errors
/// When a target does not start or a generator fails.
pub async fn run(args: ConnectionsArgs, json: bool) -> anyhow::Result<()> {
    if args.devices == 0 || args.generators == 0 {
        bail!("--devices and --generators must be at least 1");
    }
    let per_generator = args.devices.div_ceil(args.generators);
    if let Some(limit) = raise_open_files()
        && (args.devices as u64 + 200 > limit || per_generator as u64 + 200 > limit)
    {
        bail!(
            "{} devices need about {} open files in the broker (this machine allows {limit} per process): use at most {} devices",
            args.devices,
            args.devices + 200,
            limit.saturating_sub(200)
        );
    }
    let dir = tempfile::tempdir()?;
    let mut cs = bench_clients(args.devices);
    let registry = register(dir.path(), "bench", &mut cs).await?;
    let mut parts = Vec::new();
    for (g, chunk) in cs.chunks(per_generator).enumerate() {
        let path = dir.path().join(format!("keys-{g}.ndjson"));
        let mut text = String::new();
        for c in chunk {
            text += &serde_json::json!({"device_id": c.id, "key": c.password}).to_string();
            text.push('\n');
        }
        std::fs::write(&path, text)?;
        parts.push(path);
    }
    if !json {
        eprintln!("machine: {}", machine());
        eprintln!(
            "{} idle devices per target from {} generator processes ({} CONNECTs in flight each), keep-alive {} s; open files per process: {}",
            args.devices,
            parts.len(),
            args.concurrency,
            args.keep_alive_s,
            fleet_api::process::open_files_limit().map_or("unlimited".into(), |l| l.to_string())
        );
    }
    let mut rows = Vec::new();
    for (round, name) in args.targets.split(',').map(str::trim).enumerate() {
        let t = start(name, dir.path(), &registry).await?;
        let row = measure(&t, &parts, round, &args).await?;
        if !json {
            eprintln!(
                "{:<10} {:>6} held ({} failed)  {:>7.0} CONNECT/s  {:>6} B per connection (RSS {} → {} KiB; 100,000 ≈ {} MiB)  idle CPU {:.1} %",
                row.target,
                row.connected,
                row.failed,
                row.connects_per_s,
                row.bytes_per_connection,
                row.rss_before_kib,
                row.rss_after_kib,
                row.projected_100k_mib,
                row.cpu_idle_pct
            );
        }
        rows.push(row);
    }
    let find = |n: &str| rows.iter().find(|r| r.target == n);
    if json {
        println!("{}", serde_json::to_string(&rows)?);
    } else if let (Some(hub), Some(m)) = (find("hub"), find("mosquitto")) {
        println!(
            "hub / mosquitto: CONNECT rate {:.2} (target ≥ 1.00), bytes per connection {:.2} (hub {} B, target ≤ 2048)",
            hub.connects_per_s / m.connects_per_s.max(1e-9),
            hub.bytes_per_connection as f64 / m.bytes_per_connection.max(1) as f64,
            hub.bytes_per_connection
        );
        if let Some(r) = find("rumqttd") {
            println!(
                "hub / rumqttd: CONNECT rate {:.2}, bytes per connection {:.2}",
                hub.connects_per_s / r.connects_per_s.max(1e-9),
                hub.bytes_per_connection as f64 / r.bytes_per_connection.max(1) as f64
            );
        }
    }
    let failed: u64 = rows.iter().map(|r| r.failed).sum();
    if failed > 0 {
        bail!("{failed} connects failed");
    }
    Ok(())
}
