//! `device-agent --help`.

use clap::Parser;

/// The device agent: discovers the active hub and delivers telemetry from a durable outbox.
///
/// Not functional yet: this binary only prints its help.
#[derive(Debug, Parser)]
#[command(name = "device-agent", version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("device-agent: nothing to run yet; see --help");
    std::process::exit(2);
}
