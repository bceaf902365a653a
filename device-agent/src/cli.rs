//! The `device-agent` command line. `main.rs` only calls [`main`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use fleet_api::{DeviceId, DeviceKey};
use serde::Deserialize;
use tokio::sync::watch;

use crate::agent::{Agent, AgentConfig, SharedOutbox};
use crate::discovery::Discovery;
use crate::outbox::{Fsync, Outbox};
use crate::simulate::{self, AgentTuning, SimulateOptions};
use crate::source;

/// The device agent: finds the active hub through the concierge and delivers
/// telemetry from a durable outbox, keeping every message until the hub says
/// it is stored in both regions.
#[derive(Debug, Parser)]
#[command(name = "device-agent", version)]
pub struct Cli {
    /// Print a machine-readable JSON summary on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one device: telemetry from stdin lines and/or a Unix socket.
    Run(Box<RunArgs>),
    /// Run many virtual devices in this process (drills, load).
    Simulate(Box<SimulateArgs>),
}

/// Settings shared by `run` and `simulate` (flags, `FLEET_*`, TOML keys).
#[derive(Debug, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Common {
    /// The concierge, e.g. `https://concierge.fleet.test:7070`.
    #[arg(long, env = "FLEET_CONCIERGE")]
    concierge: Option<String>,
    /// DNS server(s) that resolve the concierge's name (repeat).
    #[arg(long, env = "FLEET_DNS", value_delimiter = ',')]
    dns: Vec<SocketAddr>,
    /// Outbox directory (`simulate`: one subdirectory per device).
    #[arg(long, env = "FLEET_OUTBOX")]
    outbox: Option<PathBuf>,
    /// Outbox size limit in bytes; beyond it the oldest messages are dropped and counted [default: 64 MiB].
    #[arg(long, env = "FLEET_MAX_OUTBOX_BYTES")]
    max_outbox_bytes: Option<u64>,
    /// `always` (every message, survives power loss), `never`, or a period in ms.
    #[arg(long, env = "FLEET_FSYNC")]
    fsync: Option<String>,
    /// CA certificate (PEM) for the https:// concierge and mqtts:// hubs;
    /// default: the public web roots.
    #[arg(long, env = "FLEET_CA")]
    ca: Option<PathBuf>,
    /// Accept an http:// concierge and mqtt:// hubs (loopback drills,
    /// trusted networks only). Without it a plaintext endpoint is refused,
    /// whatever the concierge answers.
    #[arg(long, env = "FLEET_ALLOW_PLAINTEXT")]
    allow_plaintext: bool,
    /// MQTT keep-alive, seconds [default: 30].
    #[arg(long, env = "FLEET_KEEP_ALIVE_S")]
    keep_alive_s: Option<u64>,
    /// Resend what is not replicated after this long without progress, seconds [default: 30].
    #[arg(long, env = "FLEET_ACK_TIMEOUT_S")]
    ack_timeout_s: Option<u64>,
    /// TOML file with these settings; flags and FLEET_* variables override it.
    #[arg(long, env = "FLEET_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// This device's id.
    #[arg(long, env = "FLEET_DEVICE_ID")]
    device_id: String,
    /// This device's key (prefer FLEET_KEY: command lines are visible to others).
    // Keys are base64url and may start with `-`: a value, not a flag.
    #[arg(
        long,
        env = "FLEET_KEY",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    key: String,
    #[command(flatten)]
    common: Common,
    /// Also take messages from this Unix socket (one per line; replies `ok MID`).
    #[arg(long, env = "FLEET_SOCKET")]
    socket: Option<PathBuf>,
    /// Do not read stdin.
    #[arg(long)]
    no_stdin: bool,
    /// Exit once stdin has ended and the outbox is empty.
    #[arg(long)]
    exit_when_drained: bool,
    /// Largest accepted message in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    payload_limit: usize,
    /// Start the numbering over from what the hub has for this device: set
    /// aside an unreadable outbox state file (its messages are kept and
    /// numbered above the hub's `committed`).
    #[arg(long)]
    reset_state: bool,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// `{"device_id","key"}` lines (from `registry-sync device add --keys-out`).
    #[arg(long)]
    keys: PathBuf,
    /// Simulate only the first N devices of the file.
    #[arg(long)]
    devices: Option<usize>,
    #[command(flatten)]
    common: Common,
    /// Messages per second per device.
    #[arg(long)]
    rate: f64,
    /// Seconds of generation.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Seconds to keep delivering after generation stops.
    #[arg(long, default_value_t = 60)]
    drain_timeout_s: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Write one JSON line per device (mids generated and acknowledged).
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Runs the command line; returns the exit code.
pub async fn main() -> ExitCode {
    main_from(std::env::args_os()).await
}

/// [`main`] with explicit arguments (the first is the program name).
pub async fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Run(args) => run(*args, cli.json).await,
        Command::Simulate(args) => simulate(*args, cli.json).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn merged(mut c: Common) -> anyhow::Result<Common> {
    let Some(path) = c.config.take() else {
        return Ok(c);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read config {}", path.display()))?;
    let f: Common =
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
    Ok(Common {
        concierge: c.concierge.or(f.concierge),
        dns: if c.dns.is_empty() { f.dns } else { c.dns },
        outbox: c.outbox.or(f.outbox),
        max_outbox_bytes: c.max_outbox_bytes.or(f.max_outbox_bytes),
        fsync: c.fsync.or(f.fsync),
        ca: c.ca.or(f.ca),
        allow_plaintext: c.allow_plaintext || f.allow_plaintext,
        keep_alive_s: c.keep_alive_s.or(f.keep_alive_s),
        ack_timeout_s: c.ack_timeout_s.or(f.ack_timeout_s),
        config: None,
    })
}

/// Checks a configuration file as `run --config PATH` would (nothing is
/// started): every error names the file.
///
/// # Errors
/// What is wrong with the file, and where.
pub fn check_config(path: &Path) -> anyhow::Result<()> {
    let c = Common {
        config: Some(path.to_path_buf()),
        ..Common::default()
    };
    prepare(c, "always", Some(PathBuf::from("outbox")))
        .map(|_| ())
        .with_context(|| format!("config {}", path.display()))
}

/// Parses `--fsync`: the policy and, for a period, how often.
fn fsync_policy(s: Option<&str>, default: &str) -> anyhow::Result<(Fsync, Option<Duration>)> {
    match s.unwrap_or(default) {
        "always" => Ok((Fsync::Always, None)),
        "never" => Ok((Fsync::Never, None)),
        ms => match ms.parse::<u64>() {
            Ok(ms) if ms > 0 => Ok((Fsync::Periodic, Some(Duration::from_millis(ms)))),
            _ => bail!("--fsync {ms:?}: expected always, never or a period in milliseconds"),
        },
    }
}

/// The TLS client configuration: `ca`'s certificates, or the public roots.
///
/// # Errors
/// When the CA file cannot be read or parsed.
pub fn tls_config(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("read CA {}", path.display()))?
            {
                roots.add(cert.with_context(|| format!("parse CA {}", path.display()))?)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

struct Ready {
    discovery: Discovery,
    outbox_dir: PathBuf,
    max_bytes: u64,
    fsync: (Fsync, Option<Duration>),
    tuning: AgentTuning,
}

fn prepare(
    c: Common,
    default_fsync: &str,
    default_outbox: Option<PathBuf>,
) -> anyhow::Result<Ready> {
    let c = merged(c)?;
    let concierge = c
        .concierge
        .context("--concierge is required (e.g. https://concierge.fleet.test:7070)")?;
    if c.dns.is_empty() {
        bail!(
            "--dns is required: the DNS server(s) that resolve the concierge (the system resolver is never used)"
        );
    }
    let tls = tls_config(c.ca.as_deref())?;
    let discovery = Discovery::new(&concierge, &c.dns, tls.clone(), c.allow_plaintext)?;
    let outbox_dir = c
        .outbox
        .or(default_outbox)
        .context("--outbox DIR is required")?;
    Ok(Ready {
        discovery,
        outbox_dir,
        max_bytes: c.max_outbox_bytes.unwrap_or(64 << 20).max(64 * 1024),
        fsync: fsync_policy(c.fsync.as_deref(), default_fsync)?,
        tuning: AgentTuning {
            keep_alive: Duration::from_secs(c.keep_alive_s.unwrap_or(30).max(1)),
            ack_timeout: Duration::from_secs(c.ack_timeout_s.unwrap_or(30).max(1)),
            window: 32,
            tls: Some(tls),
            allow_plaintext: c.allow_plaintext,
        },
    })
}

async fn run(args: RunArgs, json: bool) -> anyhow::Result<()> {
    let device = DeviceId::new(&args.device_id)
        .with_context(|| format!("invalid --device-id {:?}", args.device_id))?;
    let key = DeviceKey::parse(&args.key)
        .context("invalid --key: expected the 43-character key printed by `device add`")?;
    let r = prepare(args.common, "always", None)?;
    if args.reset_state {
        crate::outbox::reset_state(&r.outbox_dir)
            .with_context(|| format!("reset the state of outbox {}", r.outbox_dir.display()))?;
    }
    let outbox = Outbox::open(&r.outbox_dir, r.max_bytes, r.fsync.0)
        .with_context(|| format!("open outbox {}", r.outbox_dir.display()))?;
    let shared = SharedOutbox::new(outbox);
    let mut config = AgentConfig::new(device, key);
    config.keep_alive = r.tuning.keep_alive;
    config.ack_timeout = r.tuning.ack_timeout;
    config.tls = r.tuning.tls;
    config.allow_plaintext = r.tuning.allow_plaintext;
    let agent = Agent::new(config, r.discovery, shared.clone());
    let progress = agent.progress();
    let (stop_tx, stop) = watch::channel(false);
    let agent_task = tokio::spawn(agent.run(stop));
    if let Some(every) = r.fsync.1 {
        tokio::spawn(source::sync_every(shared.clone(), every));
    }
    let taken = Arc::new(source::Taken::default());
    if let Some(path) = &args.socket {
        source::socket(path, shared.clone(), args.payload_limit, taken.clone())
            .with_context(|| format!("bind socket {}", path.display()))?;
    }
    let stdin = (!args.no_stdin).then(|| {
        tokio::spawn(source::stdin(
            shared.clone(),
            args.payload_limit,
            taken.clone(),
        ))
    });
    let drained = async {
        if let Some(s) = stdin {
            let _ = s.await;
        }
        loop {
            if shared.run(|o| o.stats().in_outbox).await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        () = fleet_api::process::shutdown_signal() => {}
        () = drained, if args.exit_when_drained => {}
    }
    let _ = stop_tx.send(true);
    let _ = agent_task.await;
    let stats = shared.run(|o| o.stats()).await;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "accepted": taken.accepted.load(std::sync::atomic::Ordering::Relaxed),
                "refused": taken.refused.load(std::sync::atomic::Ordering::Relaxed),
                "acknowledged_up_to": stats.acked,
                "in_outbox": stats.in_outbox,
                "dropped": stats.dropped,
                "sessions": progress.sessions.load(std::sync::atomic::Ordering::Relaxed),
            })
        );
    }
    if let Ok(o) = Arc::try_unwrap(shared) {
        o.outbox
            .into_inner()
            .map_err(|_| anyhow::anyhow!("outbox lock poisoned"))?
            .close()?;
    }
    Ok(())
}

async fn simulate(args: SimulateArgs, json: bool) -> anyhow::Result<()> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of messages per second per device");
    }
    let text = std::fs::read_to_string(&args.keys)
        .with_context(|| format!("read --keys {}", args.keys.display()))?;
    let mut devices = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        #[derive(Deserialize)]
        struct KeyLine {
            device_id: DeviceId,
            key: String,
        }
        let k: KeyLine = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}", args.keys.display(), i + 1))?;
        let key = DeviceKey::parse(&k.key)
            .with_context(|| format!("{}: line {}: invalid key", args.keys.display(), i + 1))?;
        devices.push((k.device_id, key));
    }
    if let Some(n) = args.devices {
        devices.truncate(n);
    }
    if devices.is_empty() {
        bail!("{} holds no devices", args.keys.display());
    }
    let tmp = tempfile_dir()?;
    let r = prepare(args.common, "never", Some(tmp.clone()))?;
    let opts = SimulateOptions {
        devices,
        rate: args.rate,
        duration: Duration::from_secs(args.duration_s),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        outbox_dir: r.outbox_dir,
        max_outbox_bytes: r.max_bytes,
        fsync: r.fsync.0,
        payload_bytes: args.payload_bytes,
        agent: r.tuning,
    };
    let summary = simulate::run(r.discovery, opts, args.report, |s| {
        if !json {
            eprintln!(
                "devices {} generated {} acknowledged {} in outbox {} dropped {}",
                s.devices, s.generated, s.acknowledged, s.in_outbox, s.dropped
            );
        }
    })
    .await?;
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("device-agent-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_starts_with_a_dash_is_a_value() {
        let key = "-mZ0123456789abcdefghijklmnopqrstuvwxyzABCD";
        let cli = Cli::try_parse_from(["device-agent", "run", "--device-id", "d1", "--key", key])
            .expect("parses");
        match cli.command {
            Command::Run(args) => assert_eq!(args.key, key),
            Command::Simulate(_) => panic!("parsed as simulate"),
        }
    }
}
