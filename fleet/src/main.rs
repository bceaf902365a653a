//! `fleet`: see `fleet --help`.

fn main() -> std::process::ExitCode {
    fleet::cli::main()
}
