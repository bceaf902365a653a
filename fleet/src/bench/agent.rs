//! `fleet bench agent`: the device agent's footprint, the figures an
//! operator of small devices asks for first. The release `device-agent`
//! binary (not this one: it carries the servers) runs against a real hub
//! and concierge, and this command reads its resident memory and CPU time
//! from `/proc` while it is idle, while it sends one message per second
//! (each fsynced in its outbox, acknowledged by the hub), and while
//! `simulate` runs 1,000 devices at one message per second each.
//!
//! Not a race against a baseline: the targets are absolute (≤ 10 MiB RSS,
//! ≤ 1 % of a core at 1 msg/s), so there is no ratio.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

use super::ingest::{BENCH_TOKEN, addr_of, bench_clients, register, spawn_hub, spawn_self};
use super::machine;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Seconds each phase is measured.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Devices for the simulate phase.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// The device-agent binary [default: next to this one].
    #[arg(long)]
    agent: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Phase {
    phase: String,
    rss_mib: f64,
    peak_rss_mib: f64,
    cpu_percent_of_core: f64,
    /// Messages the hub stored during the phase.
    stored: u64,
}

/// Runs the measurement.
///
/// # Errors
/// When the agent binary is missing, a server does not start or a phase fails.
pub async fn run(args: AgentArgs, json: bool) -> anyhow::Result<()> {
    let agent = match args.agent {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this binary")?
            .join("device-agent"),
    };
    if !agent.is_file() {
        bail!(
            "no agent binary at {}: build it with `cargo build --release -p device-agent` (or pass --agent)",
            agent.display()
        );
    }
    if args.seconds < 2 || args.devices == 0 {
        bail!("--seconds must be at least 2 and --devices positive");
    }
    let size = std::fs::metadata(&agent)?.len();
    let stripped = stripped_size(&agent).await;
    let dir = tempfile::tempdir()?;
    let mut clients = bench_clients(args.devices.max(1));
    let registry = register(dir.path(), "bench", &mut clients).await?;
    let hub = spawn_hub(&dir.path().join("hub"), "bench", &registry, &[]).await?;
    let (_concierge, ready) = spawn_self(&[
        "concierge",
        "--json",
        "run",
        "--http",
        "127.0.0.1:0",
        "--dns",
        "127.0.0.1:0",
        "--zone",
        "fleet.bench",
        "--admin-token",
        BENCH_TOKEN,
        "--hub",
        &format!("bench=http://{},mqtt://{}", hub.http, hub.mqtt),
        "--connect-rate",
        "100000",
        "--lookups-per-source",
        "100000",
    ])
    .await
    .context("start the concierge")?;
    let concierge = format!(
        "http://concierge.fleet.bench:{}",
        addr_of(&ready, "http")?.port()
    );
    let dns = addr_of(&ready, "dns")?.to_string();
    let http = reqwest::Client::new();
    let hub_http = hub.http;
    let stored = || {
        let http = http.clone();
        async move { stored_total(&http, hub_http).await }
    };
    if !json {
        eprintln!("machine: {}", machine());
        eprintln!("agent: {}", agent.display());
    }

    // One agent: idle, then one message per second.
    let device = &clients[0];
    let mut one = Command::new(&agent)
        .args(["run", "--device-id", &device.id, "--concierge", &concierge])
        .arg("--allow-plaintext")
        .args(["--dns", &dns, "--outbox"])
        .arg(dir.path().join("outbox-one"))
        .env("FLEET_KEY", device.password.as_deref().unwrap_or_default())
        .env("FLEET_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start the agent")?;
    let pid = one.id().context("agent pid")?;
    let mut stdin = one.stdin.take().context("agent stdin")?;
    // Connected and settled: a first message comes back acknowledged.
    let base = stored().await?;
    stdin.write_all(b"{\"hello\":1}\n").await?;
    wait_stored(&stored, base + 1).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seconds = Duration::from_secs(args.seconds);
    let mut phases = Vec::new();
    let before = stored().await?;
    let idle = measure(pid, seconds, async {}).await?;
    phases.push(idle.phase("one agent, idle", stored().await? - before));
    let before = stored().await?;
    let busy = measure(pid, seconds, async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            let line = format!("{{\"reading\":{n},\"temperature\":21.5}}\n");
            if stdin.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await?;
    // The last message of the phase may still be on its way.
    wait_stored(&stored, before + args.seconds - 1).await?;
    phases.push(busy.phase("one agent, 1 msg/s", stored().await? - before));
    let _ = one.start_kill();
    let _ = one.wait().await;

    // simulate: many devices in one process.
    let keys = dir.path().join("keys.ndjson");
    let mut lines = String::new();
    for c in &clients[..args.devices] {
        lines.push_str(&serde_json::json!({"device_id": c.id, "key": c.password}).to_string());
        lines.push('\n');
    }
    std::fs::write(&keys, lines)?;
    let before = stored().await?;
    let mut sim = Command::new(&agent)
        .args(["simulate", "--keys"])
        .arg(&keys)
        .args([
            "--rate",
            "1",
            "--duration-s",
            &(args.seconds + 4).to_string(),
        ])
        .args([
            "--drain-timeout-s",
            "30",
            "--concierge",
            &concierge,
            "--allow-plaintext",
            "--dns",
            &dns,
        ])
        .arg("--outbox")
        .arg(dir.path().join("outbox-sim"))
        .env("FLEET_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start simulate")?;
    let pid = sim.id().context("simulate pid")?;
    // Past connecting 1,000 devices: measure the steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = measure(pid, seconds, async {}).await?;
    let status = tokio::time::timeout(Duration::from_secs(60), sim.wait())
        .await
        .context("simulate did not finish")??;
    if !status.success() {
        bail!("simulate failed: {status}");
    }
    phases.push(m.phase(
        &format!("simulate, {} devices × 1 msg/s", args.devices),
        stored().await? - before,
    ));

    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine(),
                "binary_bytes": size,
                "stripped_bytes": stripped,
                "phases": phases,
            })
        );
    } else {
        println!(
            "device-agent binary: {:.1} MiB{}",
            size as f64 / 1048576.0,
            stripped
                .map(|s| format!(" ({:.1} MiB stripped)", s as f64 / 1048576.0))
                .unwrap_or_default()
        );
        println!(
            "{:<34} {:>9} {:>14} {:>14} {:>8}",
            "phase", "RSS MiB", "peak RSS MiB", "CPU % of core", "stored"
        );
        for p in &phases {
            println!(
                "{:<34} {:>9.1} {:>14.1} {:>14.2} {:>8}",
                p.phase, p.rss_mib, p.peak_rss_mib, p.cpu_percent_of_core, p.stored
            );
        }
        println!("targets: one agent ≤ 10 MiB RSS and ≤ 1 % of a core at 1 msg/s");
    }
    Ok(())
}

struct Sample {
    rss_kib: u64,
    peak_kib: u64,
    cpu: f64,
}

impl Sample {
    fn phase(&self, name: &str, stored: u64) -> Phase {
        Phase {
            phase: name.into(),
            rss_mib: self.rss_kib as f64 / 1024.0,
            peak_rss_mib: self.peak_kib as f64 / 1024.0,
            cpu_percent_of_core: self.cpu,
            stored,
        }
    }
}

/// CPU use of `pid` over `length` while `work` runs, and its memory at the end.
async fn measure(
    pid: u32,
    length: Duration,
    work: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let c0 = super::cpu_s(pid)?;
    // The whole length, whether or not `work` ends earlier.
    let _ = tokio::time::timeout(length, async {
        work.await;
        std::future::pending::<()>().await;
    })
    .await;
    let c1 = super::cpu_s(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        rss_kib: kib("VmRSS:"),
        peak_kib: kib("VmHWM:"),
        cpu: (c1 - c0) / wall * 100.0,
    })
}

async fn stored_total(http: &reqwest::Client, hub: std::net::SocketAddr) -> anyhow::Result<u64> {
    let s: fleet_api::hub::StatusResponse = http
        .get(format!("http://{hub}/v1/status"))
        .bearer_auth(BENCH_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(s.partitions.iter().map(|p| p.high_watermark.0).sum())
}

async fn wait_stored<F, Fut>(stored: &F, at_least: u64) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = stored().await?;
        if now >= at_least {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the hub stored {now} messages, expected {at_least} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The size of `path` after `strip` (binutils), when it is installed.
async fn stripped_size(path: &Path) -> Option<u64> {
    let out = tempfile::NamedTempFile::new().ok()?;
    let ok = Command::new("strip")
        .arg("-o")
        .arg(out.path())
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .ok()?
        .success();
    ok.then(|| std::fs::metadata(out.path()).ok().map(|m| m.len()))?
}
