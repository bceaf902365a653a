//! `fleet-consumer`: the consumer runner and group tools on their own, for
//! machines that run consumers only (the same as `fleet consume`).

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-consumer: error: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(consumer::cli::main_from(std::env::args_os()))
}
