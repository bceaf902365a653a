//! What every Fleet server process does the same way: log to stderr under
//! `FLEET_LOG`, and stop on Ctrl-C or SIGTERM (feature `process`).

/// Logs to stderr; `FLEET_LOG` filters (else, or when empty, `default`),
/// `FLEET_LOG_FORMAT=json` for JSON lines. A second call does nothing.
pub fn init_tracing(default: &str) {
    let filter = std::env::var("FLEET_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("FLEET_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Merges two argument structs (flags over file), field by field; every
/// field but `config` and `unknown` must be named.
#[macro_export]
macro_rules! merge_args {
    ($ty:ident, $hi:expr, $lo:expr, { $($field:ident),* $(,)? }) => {{
        let $ty { $($field,)* config, unknown } = $hi;
        let lo = $lo;
        $ty { $($field: $field.or(lo.$field),)* config: config.or(lo.config), unknown: lo.unknown.into_iter().chain(unknown).collect() }
    }};
}

/// The soft limit on open files, from `/proc/self/limits` (Linux); `None`
/// elsewhere or when unlimited.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
