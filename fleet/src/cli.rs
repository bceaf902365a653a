//! The `fleet` command line. Component subcommands hand their arguments to
//! that component's own parser unchanged.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Fleet: telemetry that survives the loss of a region.
#[derive(Debug, Parser)]
#[command(name = "fleet", version)]
struct Cli {
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub: `fleet hub run --help`.
    #[command(disable_help_flag = true)]
    Hub {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run a concierge replica: `fleet concierge run --help`.
    #[command(disable_help_flag = true)]
    Concierge {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Manage registries: `fleet registry-sync --help`.
    #[command(name = "registry-sync", disable_help_flag = true)]
    RegistrySync {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Reliable consumers of the logs (SQL sink runner, group tools): `fleet consume --help`.
    #[command(disable_help_flag = true)]
    Consume {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run a device agent or a simulation: `fleet device-agent --help`.
    #[command(name = "device-agent", disable_help_flag = true)]
    DeviceAgent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// A whole two-region fleet on loopback, until Ctrl-C.
    Up(UpArgs),
    /// Lose the primary region and fail back under load; report what was lost (nothing).
    Drill(DrillArgs),
    /// Benchmarks that report ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Seeded power cuts under every durable structure, on a simulated disk.
    Torture(crate::torture::TortureArgs),
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Run directory (data and logs) [default: run/up-<time>].
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// `async` or `sync` replication between the regions.
    #[arg(long, default_value = "async")]
    replication: String,
    /// Let the concierges promote the secondary after the primary is down this long.
    #[arg(long)]
    auto_failover_after_s: Option<f64>,
    /// The regions' event logs: `file` (embedded, no servers) or
    /// `jetstream` (a three-server R3 JetStream cluster per region, started
    /// here; needs `scripts/services.sh nats`).
    #[arg(long, default_value = "file")]
    log: String,
    /// Hubs per region (several need --log jetstream).
    #[arg(long, default_value_t = 1)]
    hubs_per_region: usize,
}

#[derive(Debug, clap::Args)]
struct DrillArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// `forced` (kill -9 the primary region) or `planned` (promote, no loss).
    #[arg(long, default_value = "forced")]
    mode: String,
    /// `async` or `sync` replication.
    #[arg(long, default_value = "async")]
    replication: String,
    /// Messages per second per device.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Seconds of telemetry.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Forced mode: the drill asks for the failover instead of letting the concierge decide.
    #[arg(long)]
    manual_promotion: bool,
    /// Seconds after the devices start when the primary is lost (large
    /// fleets need longer to connect) [default: a quarter of --duration-s,
    /// at least 3].
    #[arg(long)]
    kill_at_s: Option<u64>,
    /// Seconds the lost region stays away [default: a third of --duration-s, at least 3].
    #[arg(long)]
    outage_s: Option<u64>,
    /// `primary` (failover and failback) or `secondary` (the primary detaches it and runs alone).
    #[arg(long, default_value = "primary")]
    lose: String,
    /// Each simulated device's outbox limit in bytes (at least 65536); an
    /// outage far longer than it covers shows whether anything is dropped.
    #[arg(long)]
    max_outbox_bytes: Option<u64>,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Run directory (data, logs, report) [default: run/drill-<time>].
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// The regions' event logs: `file` (embedded, no servers) or
    /// `jetstream` (a three-server R3 JetStream cluster per region, started
    /// here; needs `scripts/services.sh nats`).
    #[arg(long, default_value = "file")]
    log: String,
    /// Hubs per region (several need --log jetstream).
    #[arg(long, default_value_t = 1)]
    hubs_per_region: usize,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs the command line; returns the exit code.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // Components parse their own arguments (and print their own help).
    match args.get(1).and_then(|a| a.to_str()) {
        Some("hub") => return runtime().block_on(hub::cli::main_from(args[1..].to_vec())),
        Some("registry-sync") => {
            return runtime().block_on(registry_sync::cli::main_from(args[1..].to_vec()));
        }
        Some("concierge") => {
            return runtime().block_on(concierge::cli::main_from(args[1..].to_vec()));
        }
        Some("consume") => {
            return runtime().block_on(consumer::cli::main_from(args[1..].to_vec()));
        }
        Some("device-agent") => {
            return runtime().block_on(device_agent::cli::main_from(args[1..].to_vec()));
        }
        _ => {}
    }
    let cli = Cli::parse_from(args);
    if matches!(cli.command, Command::Torture(_)) {
        // Power cuts make the log and the outbox complain by design; a
        // failing seed says what went wrong, and replays it.
        hub::cli::init_tracing_default("off");
    } else if matches!(cli.command, Command::Bench(_)) {
        // Benchmarks print their own report; components only warn.
        hub::cli::init_tracing_default("warn,rumqttd=off,hickory_server=error");
    } else {
        hub::cli::init_tracing();
    }
    let result = match cli.command {
        Command::Up(a) => runtime().block_on(up(a, cli.json)),
        Command::Drill(a) => runtime().block_on(drill(a, cli.json)),
        Command::Hub { .. }
        | Command::Concierge { .. }
        | Command::RegistrySync { .. }
        | Command::Consume { .. }
        | Command::DeviceAgent { .. } => {
            unreachable!("dispatched above")
        }
        Command::Bench(cmd) => runtime().block_on(crate::bench::run(cmd, cli.json)),
        Command::Torture(args) => crate::torture::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_dir(given: Option<std::path::PathBuf>, what: &str) -> std::path::PathBuf {
    given.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        std::path::PathBuf::from("run").join(format!("{what}-{secs}"))
    })
}

async fn up(args: UpArgs, json: bool) -> anyhow::Result<()> {
    let mut opts = crate::up::UpOptions::new(run_dir(args.dir, "up"));
    opts.replication = args.replication;
    opts.auto_failover_after_s = args.auto_failover_after_s;
    opts.ttl_s = 5;
    opts.jetstream = log_choice(&args.log, args.hubs_per_region)?;
    opts.hubs_per_region = args.hubs_per_region;
    let fleet = crate::up::Fleet::up(crate::up::Launcher::current()?, opts).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "dir": fleet.dir,
                "admin_token": fleet.admin_token.expose(),
                "concierge": fleet.concierge_url,
                "concierge_http": fleet.concierge_http,
                "dns": fleet.dns,
                "regions": fleet.regions.iter().map(|r| serde_json::json!({
                    "region": r.name, "http": r.http, "mqtt": r.mqtt, "stream": r.stream, "registry": r.registry,
                    "more_hubs": r.more.iter().map(|m| serde_json::json!({"http": m.http, "mqtt": m.mqtt})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "stream_password": fleet.stream_password.expose(),
            })
        );
    } else {
        print!("{}", fleet.describe());
    }
    registry_sync::cli::shutdown_signal().await;
    eprintln!("stopping");
    fleet.down().await;
    Ok(())
}

/// `--log` and `--hubs-per-region`: true for JetStream.
fn log_choice(log: &str, hubs_per_region: usize) -> anyhow::Result<bool> {
    let jetstream = match log {
        "file" => false,
        "jetstream" => true,
        other => anyhow::bail!("--log {other:?}: expected file or jetstream"),
    };
    match hubs_per_region {
        0 => anyhow::bail!("--hubs-per-region must be at least 1"),
        1 => {}
        n if !jetstream => {
            anyhow::bail!("--hubs-per-region {n} needs --log jetstream (a file log has one writer)")
        }
        n if n > 8 => anyhow::bail!("--hubs-per-region {n}: at most 8 on one machine"),
        _ => {}
    }
    Ok(jetstream)
}

async fn drill(args: DrillArgs, json: bool) -> anyhow::Result<()> {
    use fleet_api::concierge::Mode;
    let mode = match args.mode.as_str() {
        "forced" => Mode::Forced,
        "planned" => Mode::Planned,
        other => anyhow::bail!("--mode {other:?}: expected forced or planned"),
    };
    if !["async", "sync"].contains(&args.replication.as_str()) {
        anyhow::bail!(
            "--replication {:?}: expected async or sync",
            args.replication
        );
    }
    if args.devices == 0 || args.rate.is_nan() || args.rate <= 0.0 {
        anyhow::bail!("--devices and --rate must be positive");
    }
    let mut opts = crate::drill::DrillOptions::new(run_dir(args.dir, "drill"));
    opts.devices = args.devices;
    opts.mode = mode;
    opts.replication = args.replication;
    opts.rate = args.rate;
    opts.duration_s = args.duration_s.max(5);
    opts.auto_promotion = !args.manual_promotion;
    opts.kill_at_s = args.kill_at_s.unwrap_or((opts.duration_s / 4).max(3));
    opts.outage_s = args.outage_s.unwrap_or((opts.duration_s / 3).max(3));
    opts.lose = match args.lose.as_str() {
        "primary" => crate::drill::Lose::Primary,
        "secondary" => crate::drill::Lose::Secondary,
        other => anyhow::bail!("--lose {other:?}: expected primary or secondary"),
    };
    if args.max_outbox_bytes.is_some_and(|b| b < 65_536) {
        anyhow::bail!("--max-outbox-bytes must be at least 65536");
    }
    opts.max_outbox_bytes = args.max_outbox_bytes;
    if args.payload_bytes == 0 || args.payload_bytes > 256 * 1024 {
        anyhow::bail!("--payload-bytes must be between 1 and 262144");
    }
    opts.payload_bytes = args.payload_bytes;
    opts.jetstream = log_choice(&args.log, args.hubs_per_region)?;
    opts.hubs_per_region = args.hubs_per_region;
    let report = crate::drill::run(crate::up::Launcher::current()?, opts, |line| {
        eprintln!("drill: {line}")
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", crate::drill::summary(&report));
    }
    if !report.passed {
        anyhow::bail!(
            "the drill failed: {} acknowledged messages lost, {} stored twice, {} dropped by outboxes, {} of {} never acknowledged",
            report.lost,
            report.duplicate_records,
            report.dropped,
            report.sent.saturating_sub(report.acknowledged),
            report.sent
        );
    }
    Ok(())
}
