//! The `hub` command line. `main.rs` only calls [`main`].

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::RunArgs;
use crate::{Hub, Listeners};

/// A region's hub: devices publish telemetry over MQTT; it is acknowledged
/// once durable in the event log, streamed live and served over HTTP.
#[derive(Debug, Parser)]
#[command(name = "hub", version)]
pub struct Cli {
    /// Print a JSON line with the bound addresses once serving.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub until Ctrl-C or SIGTERM.
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
            eprintln!("hub: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `FLEET_LOG` filters (default `info`), `FLEET_LOG_FORMAT=json` for JSON lines.
pub fn init_tracing() {
    // rumqttd logs every closed probe connection as an error.
    init_tracing_default("info,rumqttd=warn,rumqttd::server::broker=off,hickory_server=error");
}

/// [`init_tracing`] with another filter when `FLEET_LOG` is unset.
pub fn init_tracing_default(default: &str) {
    fleet_api::process::init_tracing(default);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Run(args) = cli.command;
    let (config, mqtt, http) = args.with_file()?.validate()?;
    let mqtt = TcpListener::bind(mqtt)
        .await
        .with_context(|| format!("bind MQTT listener {mqtt}"))?;
    let http = TcpListener::bind(http)
        .await
        .with_context(|| format!("bind HTTP listener {http}"))?;
    let region = config.region.clone();
    let hub = Hub::start(config, Listeners { mqtt, http }).await?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "region": region,
                "mqtt": hub.mqtt_addr,
                "http": hub.http_addr,
                "stream": hub.stream_addr,
            })
        );
    } else {
        println!(
            "hub {region}: mqtt {} http {}{}",
            hub.mqtt_addr,
            hub.http_addr,
            hub.stream_addr
                .map(|a| format!(" stream {a}"))
                .unwrap_or_default()
        );
    }
    registry_sync::cli::shutdown_signal().await;
    tracing::info!("shutting down");
    hub.shutdown().await;
    Ok(())
}
