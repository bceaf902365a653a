//! The `concierge` command line. `main.rs` only calls [`main`].

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::RunArgs;
use crate::{Concierge, Listeners};

/// The concierge: tells devices which hub is active (HTTP, found through its
/// own DNS front), shows the fleet, and fails over.
#[derive(Debug, Parser)]
#[command(name = "concierge", version)]
pub struct Cli {
    /// Print a JSON line with the bound addresses once serving.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a replica until Ctrl-C or SIGTERM.
    Run(Box<RunArgs>),
}

/// Runs the command line; returns the exit code.
pub async fn main() -> ExitCode {
    main_from(std::env::args_os()).await
}

/// [`main`] with explicit arguments (the first is the program name).
pub async fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("concierge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter when `FLEET_LOG` is unset: hickory-server logs every
/// DNS query at INFO (730k junk packets wrote 81 MB of log in 6 s), so its
/// messages are kept to errors; queries are counted in
/// `fleet_concierge_dns_queries_total` instead.
pub const DEFAULT_LOG: &str = "info,hickory_server=error";

fn init_tracing() {
    fleet_api::process::init_tracing(DEFAULT_LOG);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Run(args) = cli.command;
    let (config, http, dns) = args.with_file()?.validate()?;
    let http = TcpListener::bind(http)
        .await
        .with_context(|| format!("bind HTTP listener {http}"))?;
    let sockets = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (dns_udp, dns_tcp) = crate::dns::bind(dns, sockets)
        .await
        .with_context(|| format!("bind DNS listener {dns}"))?;
    let c = Concierge::start(
        config,
        Listeners {
            http,
            dns_udp,
            dns_tcp,
        },
    )
    .await?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"http": c.http_addr, "dns": c.dns_addr})
        );
    } else {
        println!("concierge: http {} dns {}", c.http_addr, c.dns_addr);
    }
    fleet_api::process::shutdown_signal().await;
    c.shutdown().await;
    Ok(())
}
