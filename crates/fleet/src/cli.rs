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
    /// Benchmarks that report ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
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
        _ => {}
    }
    let cli = Cli::parse_from(args);
    hub::cli::init_tracing();
    let result = match cli.command {
        Command::Hub { .. } | Command::Concierge { .. } | Command::RegistrySync { .. } => {
            unreachable!("dispatched above")
        }
        Command::Bench(cmd) => runtime().block_on(crate::bench::run(cmd, cli.json)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
