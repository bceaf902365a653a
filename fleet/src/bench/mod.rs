//! `fleet bench …`: every benchmark measures its baseline in the same run,
//! alternating target by target over several rounds, and reports medians
//! and ratios next to the machine it ran on (see guides/benchmarks.md).

pub mod agent;
pub mod connections;
pub mod consume;
pub mod driver;
pub mod front;
pub mod ingest;
mod ingest_js;
pub mod replication;
mod takeover;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// QoS 1 ingest: the hub (durable) against rumqttd (memory only) and Mosquitto.
    Ingest(ingest::IngestArgs),
    /// Consumer groups: records/s through a no-op handler and the PostgreSQL
    /// sink, against reading the log alone.
    Consume(consume::ConsumeArgs),
    /// Replication: durable ingest with sync and async replication against
    /// none, replication lag under steady load, planned and forced promotion.
    Replication(replication::ReplicationArgs),
    /// The concierge: endpoint lookups/s against a trivial axum handler (wrk)
    /// and DNS queries/s against NSD (dnsperf).
    Concierge(front::FrontArgs),
    /// The device agent's footprint: binary size, RSS and CPU idle, at
    /// 1 msg/s, and of `simulate` with 1,000 devices.
    Agent(agent::AgentArgs),
    /// Connections per hub: idle authenticated devices held (RSS per
    /// connection, CPU at idle) and the CONNECT rate admitted, plain and
    /// TLS, against rumqttd and Mosquitto.
    Connections(connections::ConnectionsArgs),
    /// Internal: one load generator of `bench connections`.
    #[command(hide = true)]
    ConnectLoad(connections::LoadArgs),
    /// Internal: serve the trivial axum baseline and print its address.
    #[command(hide = true)]
    ServeAxum,
    /// Internal: serve a plain rumqttd baseline and print its address.
    #[command(hide = true)]
    ServeRumqttd,
}

/// Runs a benchmark command.
///
/// # Errors
/// Setup failures and failed phases.
pub async fn run(cmd: BenchCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Ingest(args) => ingest::run(args, json).await,
        BenchCommand::Consume(args) => consume::run(args, json).await,
        BenchCommand::Replication(args) => replication::run(args, json).await,
        BenchCommand::Concierge(args) => front::run(args, json).await,
        BenchCommand::Agent(args) => agent::run(args, json).await,
        BenchCommand::Connections(args) => connections::run(args, json).await,
        BenchCommand::ConnectLoad(args) => connections::load(args).await,
        BenchCommand::ServeAxum => front::serve_axum().await,
        BenchCommand::ServeRumqttd => {
            let broker = tokio::task::spawn_blocking(|| {
                hub::broker::BaselineBroker::start([127, 0, 0, 1].into())
            })
            .await??;
            println!("{}", serde_json::json!({"mqtt": broker.local_addr()}));
            registry_sync::cli::shutdown_signal().await;
            Ok(())
        }
    }
}

/// A one-line description of this machine for benchmark reports.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cores} vCPUs ({model}), {mem} GiB RAM")
}

/// The median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// A process's CPU time so far (user + system, all its threads), seconds.
///
/// # Errors
/// When the process is gone or `/proc` reads oddly.
pub(crate) fn cpu_s(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name (in parentheses, may hold spaces).
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are stat's fields 14 and 15: here 11 and 12.
    let ticks =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // Linux reports USER_HZ ticks, 100 per second on every architecture
    // Fleet builds for (the ABI fixes it; `sysconf` would need `unsafe`,
    // which the workspace forbids).
    Ok(ticks as f64 / 100.0)
}

/// [`cpu_s`] of `pid` and of its children (NSD serves from forked
/// processes).
///
/// # Errors
/// As [`cpu_s`].
pub(crate) fn tree_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut total = cpu_s(pid)?;
    for child in children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
    {
        total += tree_cpu_s(child).unwrap_or(0.0);
    }
    Ok(total)
}
