//! `hub`: see `hub --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hub::cli::main().await
}
