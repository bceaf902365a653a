//! `hub --help`.

use clap::Parser;

/// A region's hub: device MQTT ingest into a durable, partitioned event log.
///
/// Not functional yet: this binary only prints its help.
#[derive(Debug, Parser)]
#[command(name = "hub", version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("hub: nothing to run yet; see --help");
    std::process::exit(2);
}
