//! `fleet`: see `fleet --help`.

/// mimalloc, not glibc's malloc: measured on the hub's ingest path
/// (`fleet bench ingest --log jetstream`, see the README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fleet::cli::main()
}
