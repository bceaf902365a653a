//! One binary that runs any Fleet component, so that tests can start each as
//! its own process: `fleet-node hub run …`, `fleet-node registry-sync …`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let _self = args.next();
    let component = args
        .next()
        .and_then(|a| a.into_string().ok())
        .unwrap_or_default();
    // Each component parses its own argv, with its own name first.
    let rest: Vec<std::ffi::OsString> = std::iter::once(component.clone().into())
        .chain(args)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        match component.as_str() {
            "hub" => hub::cli::main_from(rest).await,
            "registry-sync" => registry_sync::cli::main_from(rest).await,
            "concierge" => concierge::cli::main_from(rest).await,
            "device-agent" => device_agent::cli::main_from(rest).await,
            "consume" => consumer::cli::main_from(rest).await,
            other => {
                eprintln!(
                    "fleet-node: unknown component {other:?} (hub, concierge, consume, device-agent, registry-sync)"
                );
                ExitCode::from(2)
            }
        }
    })
}
