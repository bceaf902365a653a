//! `device-agent`: see `device-agent --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    device_agent::cli::main().await
}
