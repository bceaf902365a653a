//! `fleet bench replication`: what replication costs and how fast a region
//! takes over, in one run.
//!
//! Three targets, each its own processes, driven by the same MQTT load
//! generator as `fleet bench ingest`: a hub without replication (the
//! baseline), a pair with async replication and a pair with sync
//! replication (PUBACK after the secondary also holds the record). Rounds
//! alternate the targets; ratios are medians against the baseline.
//!
//! Then, on the pairs: replication lag sampled from the primary's
//! `/v1/status` under a steady load at a fraction of each pair's maximum;
//! planned promotions right after a burst of load (the secondary has to
//! catch up before it takes over), alternating direction; forced promotions
//! of a fresh async pair whose primary was killed with SIGKILL right after a
//! burst. A promotion's time is the wall time of `POST /v1/promote`; "first
//! PUBACK" adds a device connecting to the new primary and getting a
//! publish acknowledged.
//!
//! Last, catch-up: a fresh async pair whose secondary is killed while the
//! primary takes `--catch-up-records` records alone; the secondary restarts
//! on its data and pulls the backlog (from where it was, no full resync);
//! reported as records per second and time to lag 0.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fleet_api::concierge::FailoverResponse;
use fleet_api::hub::StatusResponse;
use fleet_api::{Epoch, Role};
use serde::Serialize;
use tokio::time::Instant;

use super::driver::{self, Client, Load};
use super::ingest::{BENCH_TOKEN, HubProcess, bench_clients, register, spawn_hub};
use super::{machine, median};

/// The bench pairs' replication credential.
const BENCH_PEER_TOKEN: &str = "bench-peer-token-0123456789";

#[derive(Debug, Args)]
pub struct ReplicationArgs {
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
    /// Rounds; each measures every target (and each promotion) once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Steady load for the lag phase, as a fraction of the pair's maximum.
    #[arg(long, default_value_t = 0.5)]
    steady: f64,
    /// Records the primary takes while its secondary is down, for the
    /// catch-up phase.
    #[arg(long, default_value_t = 1_000_000)]
    catch_up_records: u64,
}

/// A hub and, when replicating, its secondary.
struct Pair {
    name: &'static str,
    /// Index into `hubs` of the current primary.
    primary: usize,
    hubs: Vec<HubProcess>,
    epoch: u64,
    /// How each hub was started, to start it again on its data.
    members: Vec<Member>,
}

/// One replicating hub's command line.
#[derive(Clone)]
struct Member {
    data: std::path::PathBuf,
    region: &'static str,
    registry: String,
    args: Vec<String>,
}

impl Member {
    async fn spawn(&self) -> anyhow::Result<HubProcess> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        spawn_hub(&self.data, self.region, &self.registry, &args).await
    }
}

impl Pair {
    fn primary(&self) -> &HubProcess {
        &self.hubs[self.primary]
    }
}

#[derive(Debug, Serialize)]
struct Throughput {
    target: &'static str,
    msgs_per_s: f64,
    samples: Vec<f64>,
    ratio_to_off: f64,
    p99_puback_ms: f64,
}

#[derive(Debug, Serialize)]
struct Lag {
    target: &'static str,
    rate_msgs_per_s: f64,
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct CatchUp {
    /// Records the secondary lacked when it returned.
    backlog: u64,
    /// From its restart to the primary reporting lag 0.
    ms: f64,
    records_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Promotion {
    mode: &'static str,
    promote_ms: Vec<f64>,
    first_puback_ms: Vec<f64>,
    /// Forced only: records the new primary knew it had not replicated.
    unreplicated: Vec<u64>,
}

/// Runs the benchmark.
///
/// # Errors
/// When a hub does not start or a phase fails.
pub async fn run(args: ReplicationArgs, json: bool) -> anyhow::Result<()> {
    if args.connections == 0 || args.rounds == 0 || !(0.0..=1.0).contains(&args.steady) {
        bail!("--connections and --rounds must be positive and --steady within 0..=1");
    }
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let mut clients = bench_clients(args.connections);
    let mut pairs = Vec::new();
    for name in ["off", "async", "sync"] {
        pairs.push(start_pair(&http, &dir.path().join(name), name, &mut clients).await?);
    }
    if !json {
        eprintln!("machine: {}", machine());
        eprintln!(
            "{} connections × {} in flight, {} B payloads, QoS 1, {} s phases, {} rounds",
            args.connections, args.window, args.payload, args.seconds, args.rounds
        );
    }
    let flat_out = Load {
        window: args.window,
        payload: args.payload,
        duration: Duration::from_secs(args.seconds),
        rate: None,
    };
    let burst = Load {
        duration: Duration::from_secs(1),
        ..flat_out
    };
    for p in &pairs {
        driver::run(p.primary().mqtt, &clients, burst).await?;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    for round in 0..args.rounds {
        for (i, p) in pairs.iter().enumerate() {
            let mut m = driver::run(p.primary().mqtt, &clients, flat_out)
                .await
                .with_context(|| format!("{} phase", p.name))?;
            if !json {
                eprintln!(
                    "  round {} {:<6} {:>9.0} msgs/s ({} acked)",
                    round + 1,
                    p.name,
                    m.rate(),
                    m.acked
                );
            }
            rates[i].push(m.rate());
            p99s[i].push(m.latency_ms(0.99));
        }
    }
    let base = median(&rates[0]);
    let throughput: Vec<Throughput> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| Throughput {
            target: p.name,
            msgs_per_s: median(&rates[i]),
            samples: rates[i].clone(),
            ratio_to_off: median(&rates[i]) / base.max(1e-9),
            p99_puback_ms: median(&p99s[i]),
        })
        .collect();

    let mut lags = Vec::new();
    for (i, p) in pairs.iter().enumerate().skip(1) {
        let rate = median(&rates[i]) * args.steady;
        let load = Load {
            rate: Some(rate),
            ..flat_out
        };
        let (m, samples) = tokio::join!(
            driver::run(p.primary().mqtt, &clients, load),
            sample_lag(&http, p.primary().http, load.duration)
        );
        m.with_context(|| format!("{} steady phase", p.name))?;
        let mut s = samples?;
        s.sort_by(f64::total_cmp);
        let q = |q: f64| {
            s.get(((s.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        lags.push(Lag {
            target: p.name,
            rate_msgs_per_s: rate,
            samples: s.len(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: s.last().copied().unwrap_or(0.0),
        });
    }

    let mut planned = Promotion {
        mode: "planned",
        promote_ms: Vec::new(),
        first_puback_ms: Vec::new(),
        unreplicated: Vec::new(),
    };
    let pair = &mut pairs[1];
    for _ in 0..args.rounds {
        driver::run(pair.primary().mqtt, &clients, burst).await?;
        let to = 1 - pair.primary;
        let (resp, promote, first) =
            promote(&http, &pair.hubs[to], pair.epoch, "planned", &clients[0]).await?;
        planned.promote_ms.push(promote);
        planned.first_puback_ms.push(first);
        planned.unreplicated.push(unreplicated(&resp));
        pair.primary = to;
        pair.epoch = resp.epoch.0;
        // The old primary follows the new one before the next round.
        let old = pair.hubs[1 - to].http;
        wait_until(&http, old, |s| {
            s.role == Role::Secondary && s.epoch == resp.epoch
        })
        .await?;
    }
    drop(pairs);

    let mut forced = Promotion {
        mode: "forced",
        promote_ms: Vec::new(),
        first_puback_ms: Vec::new(),
        unreplicated: Vec::new(),
    };
    for round in 0..args.rounds {
        let mut pair = start_pair(
            &http,
            &dir.path().join(format!("forced-{round}")),
            "async",
            &mut clients,
        )
        .await?;
        driver::run(pair.primary().mqtt, &clients, burst).await?;
        let mut victim = pair.hubs.remove(0);
        victim.process.start_kill()?;
        victim.process.wait().await?;
        let (resp, promote, first) =
            promote(&http, &pair.hubs[0], pair.epoch, "forced", &clients[0]).await?;
        forced.promote_ms.push(promote);
        forced.first_puback_ms.push(first);
        forced.unreplicated.push(unreplicated(&resp));
    }
    let promotions = [planned, forced];
    let catch_up = catch_up(
        &http,
        &dir.path().join("catch-up"),
        &mut clients,
        args.catch_up_records,
        flat_out,
    )
    .await
    .context("catch-up phase")?;
    report(json, &throughput, &lags, &promotions, &catch_up);
    Ok(())
}

/// A fresh async pair: the secondary is killed, the primary takes `records`
/// alone, the secondary returns on its data and catches up.
async fn catch_up(
    http: &reqwest::Client,
    dir: &Path,
    clients: &mut [Client],
    records: u64,
    load: Load,
) -> anyhow::Result<CatchUp> {
    let mut pair = start_pair(http, dir, "async", clients).await?;
    let primary = pair.hubs[0].http;
    let mut secondary = pair.hubs.remove(1);
    secondary.process.start_kill()?;
    secondary.process.wait().await?;
    let chunk = Load {
        duration: Duration::from_secs(2),
        ..load
    };
    let mut written = 0;
    while written < records {
        written += driver::run(pair.hubs[0].mqtt, clients, chunk).await?.acked;
    }
    let total = |s: &StatusResponse| s.partitions.iter().map(|p| p.high_watermark.0).sum::<u64>();
    let replicated = |s: &StatusResponse| s.partitions.iter().map(|p| p.replicated.0).sum::<u64>();
    let before = status(http, primary).await?;
    let backlog = total(&before) - replicated(&before);
    let started = Instant::now();
    let _back = pair.members[1].spawn().await?;
    let deadline = started + Duration::from_secs(600);
    loop {
        let s = status(http, primary).await?;
        if replicated(&s) >= total(&s) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the secondary did not catch up within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(CatchUp {
        backlog,
        ms: secs * 1e3,
        records_per_s: backlog as f64 / secs.max(1e-9),
    })
}

fn report(
    json: bool,
    throughput: &[Throughput],
    lags: &[Lag],
    promotions: &[Promotion],
    catch_up: &CatchUp,
) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine(),
                "throughput": throughput,
                "lag": lags,
                "promotion": promotions,
                "catch_up": catch_up,
            })
        );
        return;
    }
    println!(
        "{:<8} {:>12} {:>10} {:>16}",
        "target", "msgs/s", "× off", "p99 PUBACK ms"
    );
    for t in throughput {
        println!(
            "{:<8} {:>12.0} {:>10.2} {:>16.2}",
            t.target, t.msgs_per_s, t.ratio_to_off, t.p99_puback_ms
        );
    }
    println!(
        "\n{:<8} {:>14} {:>10} {:>10} {:>10}",
        "lag", "at msgs/s", "p50 ms", "p99 ms", "max ms"
    );
    for l in lags {
        println!(
            "{:<8} {:>14.0} {:>10.0} {:>10.0} {:>10.0}",
            l.target, l.rate_msgs_per_s, l.p50_ms, l.p99_ms, l.max_ms
        );
    }
    println!(
        "\n{:<10} {:>16} {:>22} {:>22}",
        "promotion", "promote ms p50", "first PUBACK ms p50", "unreplicated (each)"
    );
    for p in promotions {
        println!(
            "{:<10} {:>16.0} {:>22.0} {:>22}",
            p.mode,
            median(&p.promote_ms),
            median(&p.first_puback_ms),
            format!("{:?}", p.unreplicated)
        );
    }
    println!(
        "\ncatch-up: {} records pulled by a returning secondary in {:.0} ms ({:.0} records/s) to lag 0",
        catch_up.backlog, catch_up.ms, catch_up.records_per_s
    );
}

fn unreplicated(resp: &FailoverResponse) -> u64 {
    resp.unreplicated.iter().map(|r| r.to.0 - r.from.0).sum()
}

/// Starts `name`'s hubs: one without replication for "off", else a primary
/// and a secondary that replicate in that mode, and waits until they see
/// each other.
async fn start_pair(
    http: &reqwest::Client,
    dir: &Path,
    name: &'static str,
    clients: &mut [Client],
) -> anyhow::Result<Pair> {
    std::fs::create_dir_all(dir)?;
    if name == "off" {
        let registry = register(dir, "bench-a", clients).await?;
        let hub = spawn_hub(&dir.join("a"), "bench-a", &registry, &[]).await?;
        return Ok(Pair {
            name,
            primary: 0,
            hubs: vec![hub],
            epoch: 1,
            members: Vec::new(),
        });
    }
    let ports = [
        crate::up::reserve([127, 0, 0, 1])?,
        crate::up::reserve([127, 0, 0, 1])?,
    ];
    let mut hubs = Vec::new();
    let mut members = Vec::new();
    for (i, region) in ["bench-a", "bench-b"].into_iter().enumerate() {
        let registry = register(dir, region, clients).await?;
        let listen = ports[i].to_string();
        let peer = format!("http://{}", ports[1 - i]);
        let role = if i == 0 { "primary" } else { "secondary" };
        let member = Member {
            data: dir.join(region),
            region,
            registry,
            args: [
                "--http",
                &listen,
                "--role",
                role,
                "--peer",
                &peer,
                "--peer-token",
                BENCH_PEER_TOKEN,
                "--replication",
                name,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
        hubs.push(member.spawn().await?);
        members.push(member);
    }
    // A primary accepts writes once it has seen its peer (not merely been
    // pulled from).
    wait_until(http, hubs[0].http, |s| s.peer_reachable && !s.fenced).await?;
    wait_until(http, hubs[1].http, |s| s.peer_reachable).await?;
    Ok(Pair {
        name,
        primary: 0,
        hubs,
        epoch: 1,
        members,
    })
}

async fn status(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
) -> anyhow::Result<StatusResponse> {
    Ok(http
        .get(format!("http://{addr}/v1/status"))
        .bearer_auth(BENCH_TOKEN)
        .timeout(Duration::from_secs(2))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn wait_until(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    ok: impl Fn(&StatusResponse) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = status(http, addr).await
            && ok(&s)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the hub at {addr} did not reach the expected state within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The primary's reported replication lag every 100 ms for `length`.
async fn sample_lag(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    length: Duration,
) -> anyhow::Result<Vec<f64>> {
    // The load starts 200 ms after the driver is called (see driver::run).
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + length - Duration::from_millis(100);
    tokio::time::sleep_until(start).await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut out = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        out.push(status(http, addr).await?.replication_lag_ms as f64);
    }
    Ok(out)
}

/// Promotes `to` and times the request and the first acknowledged publish
/// of `device` on it.
async fn promote(
    http: &reqwest::Client,
    to: &HubProcess,
    expected: u64,
    mode: &str,
    device: &Client,
) -> anyhow::Result<(FailoverResponse, f64, f64)> {
    let started = Instant::now();
    let resp = http
        .post(format!("http://{}/v1/promote", to.http))
        .bearer_auth(BENCH_TOKEN)
        .json(&serde_json::json!({"expected_epoch": Epoch(expected), "mode": mode}))
        .timeout(Duration::from_secs(90))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("{mode} promotion refused: {}", resp.text().await?);
    }
    let resp: FailoverResponse = resp.json().await?;
    let promote_ms = started.elapsed().as_secs_f64() * 1e3;
    let deadline = started + Duration::from_secs(30);
    loop {
        let once = tokio::time::timeout(
            Duration::from_secs(5),
            driver::publish_once(to.mqtt, device, 100),
        );
        if let Ok(Ok(())) = once.await {
            let first = started.elapsed().as_secs_f64() * 1e3;
            return Ok((resp, promote_ms, first));
        }
        if Instant::now() > deadline {
            bail!("no publish acknowledged by the new primary within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
