//! `fleet bench concierge`: how many endpoint lookups and DNS queries the
//! concierge answers, against baselines in the same run.
//!
//! HTTP: `GET /v1/devices/{id}/endpoint` on a concierge replica (in front of
//! one live hub) against a trivial axum handler answering the same path with
//! a constant JSON body of the same shape, both their own processes on the
//! same tokio defaults, loaded by wrk. The concierge's reconnect pacing is
//! raised out of the way: it is a deliberate limit, not a speed.
//!
//! DNS: `concierge.<zone> A` from the concierge's DNS front against NSD,
//! Debian's production authoritative server, serving the same zone with two
//! server processes and response rate limiting off (its default of 200
//! answers/s per client would measure the limiter), both loaded by dnsperf
//! over UDP.
//!
//! Rounds alternate the targets; medians and ratios are reported. The tools
//! come from Debian: `scripts/bench-tools.sh` installs them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::ingest::{BENCH_TOKEN, addr_of, bench_clients, register, spawn_hub, spawn_self};
use super::{machine, median};

#[derive(Debug, Args)]
pub struct FrontArgs {
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds; each measures every target once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// dnsperf queries in flight.
    #[arg(long, default_value_t = 100)]
    outstanding: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    protocol: &'static str,
    target: &'static str,
    per_s: f64,
    samples: Vec<f64>,
    /// The server's CPU per 1,000 answers (DNS only), ms: the median.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ms_per_1000: Option<f64>,
}

/// The zone both DNS servers answer.
const ZONE: &str = "fleet.bench";

/// Runs the benchmark.
///
/// # Errors
/// When a tool is missing, a server does not start or a phase fails.
pub async fn run(args: FrontArgs, json: bool) -> anyhow::Result<()> {
    for tool in ["wrk", "dnsperf", "nsd"] {
        which(tool)?;
    }
    if args.rounds == 0 || args.seconds == 0 || args.connections == 0 {
        bail!("--rounds, --seconds and --connections must be positive");
    }
    let dir = tempfile::tempdir()?;
    let mut clients = bench_clients(1);
    let registry = register(dir.path(), "bench", &mut clients).await?;
    let hub = spawn_hub(&dir.path().join("hub"), "bench", &registry, &[]).await?;
    let (concierge, ready) = spawn_self(&[
        "concierge",
        "--json",
        "run",
        "--http",
        "127.0.0.1:0",
        "--dns",
        "127.0.0.1:0",
        "--zone",
        ZONE,
        "--admin-token",
        BENCH_TOKEN,
        "--hub",
        &format!("bench=http://{},mqtt://{}", hub.http, hub.mqtt),
        "--connect-rate",
        "1000000000",
        // The load generator is one address.
        "--lookups-per-source",
        "1000000000",
    ])
    .await
    .context("start the concierge")?;
    let concierge_http = addr_of(&ready, "http")?;
    let concierge_dns = addr_of(&ready, "dns")?;
    let (_axum, ready) = spawn_self(&["bench", "serve-axum"])
        .await
        .context("start the axum baseline")?;
    let axum = addr_of(&ready, "http")?;
    let (nsd_server, nsd) = start_nsd(dir.path()).await?;
    let pids = [
        concierge.id().context("the concierge exited")?,
        nsd_server.id().context("nsd exited")?,
    ];
    let path = "/v1/devices/bench-0000/endpoint";
    wait_http_ok(concierge_http, path).await?;
    wait_http_ok(axum, path).await?;
    let queries = dir.path().join("queries.txt");
    std::fs::write(&queries, format!("concierge.{ZONE} A\n"))?;
    for addr in [concierge_dns, nsd] {
        if dnsperf(addr, &queries, 1, args.outstanding).await? <= 0.0 {
            bail!("the DNS server at {addr} answered nothing");
        }
    }
    if !json {
        eprintln!("machine: {}", machine());
        eprintln!(
            "wrk -t1 -c{} GET {path}; dnsperf -c1 -q{} UDP 'concierge.{ZONE} A'; {} s phases, {} rounds",
            args.connections, args.outstanding, args.seconds, args.rounds
        );
    }
    let http_targets = [("concierge", concierge_http), ("axum", axum)];
    let dns_targets = [("concierge", concierge_dns), ("nsd", nsd)];
    let mut http_rates = vec![Vec::new(); 2];
    let mut dns_rates = vec![Vec::new(); 2];
    let mut dns_cpu = vec![Vec::new(); 2];
    for round in 0..args.rounds {
        for (i, (name, addr)) in http_targets.iter().enumerate() {
            let r = wrk(*addr, path, args.connections, args.seconds).await?;
            if !json {
                eprintln!("  round {} http {name:<10} {r:>9.0} req/s", round + 1);
            }
            http_rates[i].push(r);
        }
        for (i, (name, addr)) in dns_targets.iter().enumerate() {
            let cpu0 = super::tree_cpu_s(pids[i])?;
            let r = dnsperf(*addr, &queries, args.seconds, args.outstanding).await?;
            let cpu =
                (super::tree_cpu_s(pids[i])? - cpu0) * 1e6 / (r * args.seconds as f64).max(1.0);
            if !json {
                eprintln!(
                    "  round {} dns  {name:<10} {r:>9.0} qps  {cpu:.2} ms CPU per 1,000",
                    round + 1
                );
            }
            dns_rates[i].push(r);
            dns_cpu[i].push(cpu);
        }
    }
    let mut rows = Vec::new();
    for (i, (name, _)) in http_targets.iter().enumerate() {
        rows.push(Row {
            protocol: "http",
            target: name,
            per_s: median(&http_rates[i]),
            samples: http_rates[i].clone(),
            cpu_ms_per_1000: None,
        });
    }
    for (i, (name, _)) in dns_targets.iter().enumerate() {
        rows.push(Row {
            protocol: "dns",
            target: name,
            per_s: median(&dns_rates[i]),
            samples: dns_rates[i].clone(),
            cpu_ms_per_1000: Some(median(&dns_cpu[i])),
        });
    }
    let http_ratio = rows[0].per_s / rows[1].per_s.max(1e-9);
    let dns_ratio = rows[2].per_s / rows[3].per_s.max(1e-9);
    let cpu_of = |r: &Row| r.cpu_ms_per_1000.unwrap_or(0.0);
    // Answers per CPU-second, front over NSD: above 1 the front costs less.
    let dns_cpu_ratio = cpu_of(&rows[3]) / cpu_of(&rows[2]).max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine(),
                "results": rows,
                "endpoint_vs_axum": http_ratio,
                "dns_vs_nsd": dns_ratio,
                "dns_per_cpu_vs_nsd": dns_cpu_ratio,
            })
        );
    } else {
        println!("{:<6} {:<10} {:>12}", "", "target", "per second");
        for r in &rows {
            println!("{:<6} {:<10} {:>12.0}", r.protocol, r.target, r.per_s);
        }
        println!("endpoint lookups: concierge / axum = {http_ratio:.2} (target ≥ 0.80)");
        println!("DNS queries:      front / NSD      = {dns_ratio:.2} (goal ≥ 1.00)");
        println!(
            "DNS answers per CPU-second: front / NSD = {dns_cpu_ratio:.2} ({:.2} vs {:.2} ms per 1,000)",
            cpu_of(&rows[2]),
            cpu_of(&rows[3])
        );
    }
    Ok(())
}

/// Serves the trivial axum baseline until killed.
///
/// # Errors
/// When it cannot bind.
pub async fn serve_axum() -> anyhow::Result<()> {
    use axum::extract::Path as UrlPath;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/v1/devices/{id}/endpoint",
        get(|UrlPath(id): UrlPath<String>| async move {
            axum::Json(serde_json::json!({
                "device_id": id,
                "region": "bench",
                "mqtt_url": "mqtt://127.0.0.1:1",
                "epoch": 1,
                "ttl_s": 5,
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "{}",
        serde_json::json!({"http": listener.local_addr()?.to_string()})
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(registry_sync::cli::shutdown_signal())
        .await?;
    Ok(())
}

fn which(tool: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p).any(|d| d.join(tool).is_file())
                || Path::new("/usr/sbin").join(tool).is_file()
        })
        .unwrap_or(false);
    if !found {
        bail!(
            "{tool} is not installed: run scripts/bench-tools.sh (Debian's wrk, dnsperf and nsd)"
        );
    }
    Ok(())
}

async fn wait_http_ok(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}{path}")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("http://{addr}{path} did not answer 200 within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `cmd`, returns its stdout, fails with its stderr.
async fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value after `label` on the line that starts with it.
fn figure(text: &str, label: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {label:?} in:\n{text}"))
}

async fn wrk(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    let out = output(
        Command::new("wrk")
            .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
            .arg(format!("http://{addr}{path}")),
    )
    .await?;
    if out.contains("Non-2xx") {
        bail!("wrk saw errors against {addr}:\n{out}");
    }
    figure(&out, "Requests/sec:")
}

/// dnsperf's client sockets.
const DNS_CLIENTS: usize = 4;

async fn dnsperf(
    addr: SocketAddr,
    queries: &Path,
    seconds: u64,
    outstanding: usize,
) -> anyhow::Result<f64> {
    let out = output(
        Command::new("dnsperf")
            .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .arg("-d")
            .arg(queries)
            .args([
                "-l",
                &seconds.to_string(),
                // Several client sockets (source ports), as many devices
                // are: servers that spread sources over sockets (NSD's and
                // the front's SO_REUSEPORT) can use every core.
                "-c",
                &DNS_CLIENTS.to_string(),
                "-q",
                &outstanding.to_string(),
            ]),
    )
    .await?;
    let lost = figure(&out, "Queries lost:")?;
    let completed = figure(&out, "Queries completed:")?;
    if completed == 0.0 || lost > completed / 100.0 {
        bail!("dnsperf against {addr}: {lost} of {completed} queries lost");
    }
    if !out.contains("NOERROR") {
        bail!("dnsperf against {addr}: answers were not NOERROR:\n{out}");
    }
    figure(&out, "Queries per second:")
}

/// NSD serving [`ZONE`] on a free port, two server processes.
async fn start_nsd(dir: &Path) -> anyhow::Result<(Child, SocketAddr)> {
    let nsd_dir = dir.join("nsd");
    std::fs::create_dir_all(&nsd_dir)?;
    let addr = crate::up::reserve([127, 0, 0, 1])?;
    std::fs::write(
        nsd_dir.join("zone"),
        format!(
            "$ORIGIN {ZONE}.\n$TTL 5\n@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 5\n\
             @ IN NS ns.{ZONE}.\nns IN A 127.0.0.1\nconcierge IN A 127.0.0.1\n"
        ),
    )?;
    let d = nsd_dir.display();
    let conf = nsd_dir.join("nsd.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  ip-address: {ip}@{port}\n  port: {port}\n  server-count: 2\n  \
             username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  \
             database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  \
             logfile: \"{d}/nsd.log\"\n  verbosity: 0\n  hide-version: yes\n  \
             rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n  reuseport: yes\n\
             remote-control:\n  control-enable: no\n\
             zone:\n  name: {ZONE}\n  zonefile: \"{d}/zone\"\n",
            ip = addr.ip(),
            port = addr.port(),
        ),
    )?;
    let child = Command::new("nsd")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start nsd (scripts/bench-tools.sh installs it)")?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok((child, addr));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(nsd_dir.join("nsd.log")).unwrap_or_default();
    bail!("nsd did not listen on {addr}: {log}")
}
