//! `concierge --help`.

use clap::Parser;

/// The concierge: tells devices which hub is active, with its DNS front.
///
/// Not functional yet: this binary only prints its help.
#[derive(Debug, Parser)]
#[command(name = "concierge", version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("concierge: nothing to run yet; see --help");
    std::process::exit(2);
}
