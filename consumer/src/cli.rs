//! `fleet consume …` (also `fleet-consumer …`): the runner of the built-in
//! SQL sink, and the operator commands on a group's shared state (status,
//! breaker, dead letters).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use fleet_api::secret::redact_url;
use fleet_api::{Secret, UnixMillis};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::api::RunnerApi;
use crate::breaker::{BreakerPolicy, State};
use crate::sink::SqlSink;
use crate::store::{Backend, ConsumerStore, DeadLetter};
use crate::{Consumer, ConsumerConfig, Handler, RetryPolicy, Start};

/// Reliable consumers of the hubs' event logs: run the SQL sink, manage a group.
#[derive(Debug, Parser)]
#[command(name = "consume", version)]
pub struct Cli {
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ConsumeCommand,
}

/// Runs the command line (the first argument is the program name); returns
/// the exit code.
pub async fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    fleet_api::process::init_tracing("info");
    match run(cli.command, cli.json).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consume: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `consume` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConsumeCommand {
    /// Run a consumer instance that writes telemetry into a SQL table.
    Run(Box<ConsumeRunArgs>),
    /// Show a group's breaker, leases, checkpoints and pending dead letters.
    Status(GroupArgs),
    /// Open or close a group's circuit breaker by hand.
    Breaker {
        #[command(flatten)]
        group: GroupArgs,
        #[arg(value_enum)]
        action: BreakerAction,
    },
    /// List or replay a group's dead letters.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
}

/// Which group, in which store.
#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    /// The consumer group.
    #[arg(long, env = "FLEET_GROUP")]
    pub group: String,
    /// The group's shared store: `sqlite://PATH` or `postgres://…`.
    #[arg(long, env = "FLEET_CONSUMER_STORE")]
    pub store: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BreakerAction {
    Open,
    Close,
}

#[derive(Debug, clap::Subcommand)]
pub enum DeadLetterCommand {
    /// Print dead letters in log order (JSON lines with `--json`).
    List {
        #[command(flatten)]
        group: GroupArgs,
        /// Include replayed ones.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Hand pending dead letters to the SQL sink again; replayed ones are
    /// marked so. Exits non-zero when any still fails.
    Replay {
        #[command(flatten)]
        group: GroupArgs,
        /// The sink database: `postgres://…` or `sqlite://PATH`.
        #[arg(long, env = "FLEET_SINK")]
        sink: String,
        #[arg(long, env = "FLEET_SINK_TABLE", default_value = "telemetry")]
        sink_table: String,
        /// Only these dead letters (repeatable); default: every pending one.
        #[arg(long)]
        id: Vec<i64>,
    },
}

/// Every setting of `consume run`, as flags, `FLEET_*` variables or TOML keys.
#[derive(Debug, Default, clap::Args, Deserialize)]
#[serde(default)]
pub struct ConsumeRunArgs {
    /// TOML file with any of these settings (keys as the long flags, with `_`).
    #[arg(long, env = "FLEET_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The consumer group: instances of one group share its partitions.
    #[arg(long, env = "FLEET_GROUP")]
    pub group: Option<String>,
    /// A hub's HTTP URL; repeat for every hub of both regions (the primary is read).
    #[arg(long = "hub", env = "FLEET_HUBS", value_delimiter = ',')]
    pub hubs: Option<Vec<String>>,
    /// Bearer token for the hubs' read API (a read token or the admin token).
    #[arg(long, env = "FLEET_HUB_TOKEN", hide_env_values = true)]
    pub hub_token: Option<Secret>,
    /// PEM CA certificate(s) to trust for HTTPS hubs, besides the public roots.
    #[arg(long, env = "FLEET_HUB_CA")]
    pub hub_ca: Option<PathBuf>,
    /// The group's shared store: `sqlite://PATH` (one machine) or `postgres://…`.
    #[arg(long, env = "FLEET_CONSUMER_STORE")]
    pub store: Option<String>,
    /// Where telemetry goes: `postgres://…` or `sqlite://PATH`.
    #[arg(long, env = "FLEET_SINK")]
    pub sink: Option<String>,
    /// The sink table (created when missing).
    #[arg(long, env = "FLEET_SINK_TABLE")]
    pub sink_table: Option<String>,
    /// This instance's name (default: host, pid and a random suffix).
    #[arg(long, env = "FLEET_INSTANCE")]
    pub instance: Option<String>,
    /// Serve `/metrics`, `/v1/consumer` and the breaker API here.
    #[arg(long, env = "FLEET_HTTP")]
    pub http: Option<SocketAddr>,
    /// Bearer token for `POST /v1/breaker/{open,close}` (at least 16 characters).
    #[arg(long, env = "FLEET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Records per handler call at most (default 500).
    #[arg(long, env = "FLEET_BATCH")]
    pub batch: Option<usize>,
    /// How far to read: `replicated` (default: only what is stored in both
    /// regions, which no failover takes back) or `committed` (everything
    /// durable in the primary's region; a forced failover can take the
    /// unreplicated part out of the history after it was handled).
    #[arg(long, env = "FLEET_READ_UPTO")]
    pub read_upto: Option<String>,
    /// Attempts per rejected record before it is dead-lettered (default 3).
    #[arg(long, env = "FLEET_ATTEMPTS")]
    pub attempts: Option<u32>,
    /// Failures across the group that open the breaker (default 100)…
    #[arg(long, env = "FLEET_BREAKER_FAILURES")]
    pub breaker_failures: Option<u32>,
    /// …within this many seconds (default 30).
    #[arg(long, env = "FLEET_BREAKER_WINDOW_S")]
    pub breaker_window_s: Option<u64>,
    /// Seconds the breaker stays open before a probe (default 10).
    #[arg(long, env = "FLEET_BREAKER_COOLDOWN_S")]
    pub breaker_cooldown_s: Option<u64>,
    /// Lease lifetime in ms (default 10000): how soon a dead instance's
    /// partitions are taken over.
    #[arg(long, env = "FLEET_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Where a new group starts: `earliest` (default) or `latest`.
    #[arg(long, env = "FLEET_START", value_enum)]
    pub start: Option<StartArg>,
    #[arg(skip)]
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// [`Start`] as a flag and TOML value.
#[derive(Debug, Clone, Copy, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartArg {
    Earliest,
    Latest,
}

/// The validated runner settings.
#[derive(Debug)]
pub struct RunnerConfig {
    pub consumer: ConsumerConfig,
    pub sink: String,
    pub sink_table: String,
    pub http: Option<SocketAddr>,
    pub admin_token: Option<Secret>,
}

impl ConsumeRunArgs {
    /// Flags and environment over the config file, when one is named.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn with_file(self) -> anyhow::Result<ConsumeRunArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read config {}", path.display()))?;
        let file: ConsumeRunArgs =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        for key in file.unknown.keys() {
            tracing::warn!(field = %key, file = %path.display(), "unknown config field, ignored");
        }
        Ok(fleet_api::merge_args!(ConsumeRunArgs, self, file, {
            group, hubs, hub_token, hub_ca, store, sink, sink_table, instance, http, admin_token, batch, read_upto,
            attempts, breaker_failures, breaker_window_s, breaker_cooldown_s, lease_ttl_ms, start,
        }))
    }

    /// Validates into a [`RunnerConfig`].
    ///
    /// # Errors
    /// A missing or invalid setting, named, and the config file it may
    /// come from.
    pub fn validate(self) -> anyhow::Result<RunnerConfig> {
        match self.config.clone() {
            Some(path) => self
                .validate_settings()
                .with_context(|| format!("config {}", path.display())),
            None => self.validate_settings(),
        }
    }

    fn validate_settings(self) -> anyhow::Result<RunnerConfig> {
        let group = self.group.context("--group is required")?;
        let hubs = self.hubs.unwrap_or_default();
        if hubs.is_empty() {
            bail!("--hub is required (each hub's HTTP URL, repeatable)");
        }
        for h in &hubs {
            if !(h.starts_with("http://") || h.starts_with("https://")) {
                bail!("--hub {h:?}: expected an http:// or https:// URL");
            }
        }
        let store = self
            .store
            .context("--store is required (sqlite://PATH or postgres://…)")?;
        Backend::of(&store).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
        let sink = self
            .sink
            .context("--sink is required (postgres://… or sqlite://PATH)")?;
        Backend::of(&sink).map_err(|e| anyhow::anyhow!("--sink: {e}"))?;
        if let Some(t) = &self.admin_token
            && t.expose().len() < 16
        {
            bail!("--admin-token must be at least 16 characters");
        }
        if self.http.is_some() && self.admin_token.is_none() {
            bail!("--http needs --admin-token (the breaker API is not anonymous)");
        }
        let mut c = ConsumerConfig::new(&group, hubs, &store);
        c.hub_token = self.hub_token;
        if let Some(ca) = &self.hub_ca {
            c.hub_roots = fleet_api::client::load_ca(ca).context("--hub-ca")?;
        }
        c.instance = self.instance;
        c.upto = match self.read_upto.as_deref() {
            None | Some("replicated") => fleet_api::hub::ReadUpto::Replicated,
            Some("committed") => fleet_api::hub::ReadUpto::Committed,
            Some(other) => bail!("--read-upto {other:?}: expected replicated or committed"),
        };
        if let Some(b) = self.batch {
            if b == 0 || b > 10_000 {
                bail!("--batch {b}: expected 1 to 10000");
            }
            c.batch = b;
        }
        if let Some(a) = self.attempts {
            if a == 0 {
                bail!("--attempts must be at least 1");
            }
            c.retry = RetryPolicy {
                attempts: a,
                ..c.retry
            };
        }
        let d = BreakerPolicy::default();
        c.breaker = BreakerPolicy {
            failures: self.breaker_failures.unwrap_or(d.failures),
            window: self.breaker_window_s.map_or(d.window, Duration::from_secs),
            cooldown: self
                .breaker_cooldown_s
                .map_or(d.cooldown, Duration::from_secs),
        };
        if c.breaker.failures == 0 || c.breaker.window.is_zero() {
            bail!("--breaker-failures and --breaker-window-s must be at least 1");
        }
        if let Some(ms) = self.lease_ttl_ms {
            if ms < 300 {
                bail!("--lease-ttl-ms {ms}: at least 300");
            }
            c.lease_ttl = Duration::from_millis(ms);
        }
        c.start = match self.start {
            Some(StartArg::Latest) => Start::Latest,
            _ => Start::Earliest,
        };
        Ok(RunnerConfig {
            consumer: c,
            sink,
            sink_table: self.sink_table.unwrap_or_else(|| "telemetry".into()),
            http: self.http,
            admin_token: self.admin_token,
        })
    }
}

/// Runs a `consume` subcommand.
///
/// # Errors
/// Bad input or failed operations, with context.
pub async fn run(cmd: ConsumeCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ConsumeCommand::Run(args) => run_consumer(args.with_file()?.validate()?, json).await,
        ConsumeCommand::Status(g) => {
            let store = open(&g).await?;
            let status = group_status(&store).await?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                println!("group {}: breaker {}", status.group, status.breaker);
                for p in &status.partitions {
                    println!(
                        "  partition {}: checkpoint {} (epoch {}), owner {}",
                        p.partition,
                        p.checkpoint,
                        p.last_epoch,
                        p.owner.as_deref().unwrap_or("-")
                    );
                }
                println!("  dead letters pending: {}", status.dead_letters_pending);
            }
            Ok(())
        }
        ConsumeCommand::Breaker { group, action } => {
            let store = open(&group).await?;
            let state = set_breaker(&store, action).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"group": group.group, "breaker": state.name()})
                );
            } else {
                println!("group {}: breaker {}", group.group, state.name());
            }
            Ok(())
        }
        ConsumeCommand::DeadLetters { command } => dead_letters(command, json).await,
    }
}

async fn open(g: &GroupArgs) -> anyhow::Result<ConsumerStore> {
    ConsumerStore::open(&g.store, &g.group)
        .await
        .with_context(|| format!("open consumer store {}", redact_url(&g.store)))
}

/// Opens (manually, until closed by hand) or closes the breaker.
///
/// # Errors
/// Store errors, or when other writers keep changing it.
pub async fn set_breaker(store: &ConsumerStore, action: BreakerAction) -> anyhow::Result<State> {
    let next = match action {
        BreakerAction::Open => State::Open {
            since_ms: UnixMillis::now().0,
            manual: true,
        },
        BreakerAction::Close => State::Closed,
    };
    for _ in 0..20 {
        let current = store.breaker().await?;
        if store.transition(current.generation, &next).await? {
            tracing::warn!(group = %store.group(), to = next.name(), "circuit breaker set by hand");
            return Ok(next);
        }
    }
    bail!("the breaker kept changing under us; try again")
}

/// A group's shared state, for `status` and `GET /v1/consumer`.
#[derive(Debug, serde::Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub breaker: &'static str,
    pub partitions: Vec<PartitionState>,
    pub dead_letters_pending: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct PartitionState {
    pub partition: u32,
    pub checkpoint: u64,
    pub last_epoch: u64,
    pub owner: Option<String>,
}

/// Reads a group's shared state.
///
/// # Errors
/// Store errors.
pub async fn group_status(store: &ConsumerStore) -> anyhow::Result<GroupStatus> {
    let breaker = store.breaker().await?.state.name();
    let owners: BTreeMap<_, _> = store.owners().await?.into_iter().collect();
    let partitions = store
        .checkpoints()
        .await?
        .into_iter()
        .map(|(p, cp)| PartitionState {
            partition: p.0,
            checkpoint: cp.next.0,
            last_epoch: cp.last_epoch.0,
            owner: owners.get(&p).cloned().flatten(),
        })
        .collect();
    let pending = store.dead_letters(true, 100_000).await?.len();
    Ok(GroupStatus {
        group: store.group().to_string(),
        breaker,
        partitions,
        dead_letters_pending: pending,
    })
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    pub replayed: u64,
    pub failed: u64,
}

/// Hands dead letters to `handler` again, oldest first; marks each that
/// succeeds. `ids` empty: every pending one.
///
/// # Errors
/// Store errors.
pub async fn replay(
    store: &ConsumerStore,
    handler: &dyn Handler,
    ids: &[i64],
) -> anyhow::Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let letters: Vec<DeadLetter> = store
        .dead_letters(true, u32::MAX)
        .await?
        .into_iter()
        .filter(|d| ids.is_empty() || ids.contains(&d.id))
        .collect();
    for d in letters {
        match handler.handle(std::slice::from_ref(&d.record)).await {
            Ok(()) => {
                store.mark_replayed(d.id).await?;
                report.replayed += 1;
            }
            Err(e) => {
                tracing::warn!(id = d.id, error = %e, "dead letter still fails");
                report.failed += 1;
            }
        }
    }
    Ok(report)
}

async fn dead_letters(cmd: DeadLetterCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        DeadLetterCommand::List { group, all, limit } => {
            let store = open(&group).await?;
            for d in store.dead_letters(!all, limit).await? {
                if json {
                    println!("{}", serde_json::to_string(&d)?);
                } else {
                    println!(
                        "#{} partition {} offset {} device {} mid {} attempts {}{}: {}",
                        d.id,
                        d.record.partition,
                        d.record.offset,
                        d.record.device_id,
                        d.record.mid.map_or("-".to_string(), |m| m.to_string()),
                        d.attempts,
                        if d.replayed_at.is_some() {
                            " (replayed)"
                        } else {
                            ""
                        },
                        d.reason
                    );
                }
            }
            Ok(())
        }
        DeadLetterCommand::Replay {
            group,
            sink,
            sink_table,
            id,
        } => {
            let store = open(&group).await?;
            let sink = SqlSink::open(&sink, &sink_table)
                .await
                .with_context(|| format!("open sink {}", redact_url(&sink)))?;
            let report = replay(&store, &sink, &id).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "replayed {}, still failing {}",
                    report.replayed, report.failed
                );
            }
            if report.failed > 0 {
                bail!("{} dead letters still fail", report.failed);
            }
            Ok(())
        }
    }
}

async fn run_consumer(config: RunnerConfig, json: bool) -> anyhow::Result<()> {
    // Install the recorder before anything is counted.
    let _ = crate::prom::handle();
    let sink = SqlSink::open(&config.sink, &config.sink_table)
        .await
        .with_context(|| format!("open sink {}", redact_url(&config.sink)))?;
    let group = config.consumer.group.clone();
    let consumer = Arc::new(
        Consumer::start(config.consumer, Arc::new(sink))
            .await
            .context("start consumer")?,
    );
    let mut http_addr = None;
    let server = match (config.http, config.admin_token) {
        (Some(addr), Some(token)) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind HTTP listener {addr}"))?;
            http_addr = Some(listener.local_addr()?);
            let api = Arc::new(RunnerApi {
                consumer: consumer.clone(),
                admin_token: token,
            });
            Some(tokio::spawn(crate::api::serve(listener, api)))
        }
        _ => None,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"group": group, "instance": consumer.instance(), "http": http_addr})
        );
    } else {
        println!(
            "consumer {group}/{}{}",
            consumer.instance(),
            http_addr.map(|a| format!(" http {a}")).unwrap_or_default()
        );
    }
    fleet_api::process::shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some(s) = server {
        s.abort();
    }
    // Gives the leases back now rather than letting them expire.
    consumer.shutdown().await;
    Ok(())
}
