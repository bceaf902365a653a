//! `registry-sync`: see `registry-sync --help`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    registry_sync::cli::main().await
}
