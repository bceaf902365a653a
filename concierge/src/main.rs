//! `concierge`: see `concierge --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    concierge::cli::main().await
}
