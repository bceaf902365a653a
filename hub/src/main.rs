//! `hub`: see `hub --help`.

/// mimalloc, not glibc's malloc: measured on the hub's ingest path
/// (`fleet bench ingest --log jetstream`, see the README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hub::cli::main().await
}
