//! The `registry-sync` command line. `main.rs` only calls [`main`].

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use fleet_api::{DeviceId, DeviceStatus, Region, Tags};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::json;

use crate::ops::{self, FollowOptions, FollowStatus, Report};
use crate::store::{self, NewDevice, Patch, RegistryStore, redact_url};
use crate::{bench, keys};

/// Device identity registries: create devices, export, import and merge
/// registries between regions, and keep one converged with another.
///
/// Databases are `sqlite://PATH` (created when missing) or
/// `postgres://USER@HOST:PORT/DATABASE`.
#[derive(Debug, Parser)]
#[command(name = "registry-sync", version, propagate_version = true)]
pub struct Cli {
    /// Print a machine-readable JSON summary on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, disable, enable, show or remove devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Write the registry as fleet-registry/1 NDJSON (stdout, or a file written atomically).
    Export {
        #[command(flatten)]
        db: Db,
        /// Output file; stdout when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Merge a fleet-registry/1 file into the registry: validated whole, applied in one transaction.
    Import {
        #[command(flatten)]
        db: Db,
        /// The export file to read.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Report what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Merge one registry into another (last writer wins per device), in one transaction.
    Merge {
        #[command(flatten)]
        pair: Pair,
        /// Report what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what `merge --from A --into B` would change.
    Diff {
        #[command(flatten)]
        pair: Pair,
    },
    /// Keep --into converged with --from continuously, until Ctrl-C.
    Follow(FollowArgs),
    /// Measure export, import and merge against a plain batched INSERT.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct Db {
    /// Registry database URL.
    #[arg(long, env = "FLEET_DB", value_name = "URL")]
    db: String,
}

#[derive(Debug, Args)]
struct Pair {
    /// The registry to read.
    #[arg(long, env = "FLEET_FROM", value_name = "URL")]
    from: String,
    /// The registry to change.
    #[arg(long, env = "FLEET_INTO", value_name = "URL")]
    into: String,
}

#[derive(Debug, Args)]
struct FollowArgs {
    /// The registry to read.
    #[arg(long, env = "FLEET_FROM", value_name = "URL")]
    from: Option<String>,
    /// The registry to keep converged.
    #[arg(long, env = "FLEET_INTO", value_name = "URL")]
    into: Option<String>,
    /// Poll interval when caught up [default: 1000].
    #[arg(long, env = "FLEET_INTERVAL_MS")]
    interval_ms: Option<u64>,
    /// TOML file with `from`, `into`, `interval_ms`; flags and FLEET_* variables override it.
    #[arg(long, env = "FLEET_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Create a device and print its key once (or --count N devices into --keys-out).
    Add {
        #[command(flatten)]
        db: Db,
        /// The registry's region; required on the first write to a registry.
        #[arg(long, env = "FLEET_REGION")]
        region: Option<String>,
        /// The device id (1–128 of [A-Za-z0-9._:-]); not with --count.
        #[arg(required_unless_present = "count", conflicts_with = "count")]
        id: Option<String>,
        /// Create this many devices in one transaction, named PREFIX0…PREFIX(N-1).
        #[arg(long, requires = "prefix")]
        count: Option<u64>,
        /// Id prefix for --count.
        #[arg(long)]
        prefix: Option<String>,
        /// Write `{"device_id","key"}` lines here (mode 0600, must not exist) instead of stdout.
        #[arg(long, value_name = "FILE")]
        keys_out: Option<PathBuf>,
        /// Tags, a JSON object of at most 8 KiB.
        #[arg(long, default_value = "{}")]
        tags: String,
        /// Create the devices disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Refuse the device's connections from now on.
    Disable {
        #[command(flatten)]
        db: Db,
        id: String,
    },
    /// Allow a disabled device to connect again.
    Enable {
        #[command(flatten)]
        db: Db,
        id: String,
    },
    /// Remove the device (a tombstone that wins merges against older copies).
    Remove {
        #[command(flatten)]
        db: Db,
        id: String,
    },
    /// Print the stored record (never the key).
    Show {
        #[command(flatten)]
        db: Db,
        id: String,
    },
}

/// Runs the command line and returns the process exit code.
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
    init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry-sync: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .try_init();
}

async fn open(url: &str) -> anyhow::Result<Arc<dyn RegistryStore>> {
    store::open(url)
        .await
        .with_context(|| format!("open registry {}", redact_url(url)))
}

fn parse_id(s: &str) -> anyhow::Result<DeviceId> {
    DeviceId::new(s).with_context(|| format!("invalid device id {s:?}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Device(cmd) => device(cmd, json).await,
        Command::Export { db, out } => {
            let store = open(&db.db).await?;
            let pb = progress(
                Some(store.counts().await.map(|c| c.devices + c.tombstones)?),
                "export",
            );
            let n = match &out {
                Some(path) => ops::export_to_file(&*store, path, &pb).await?,
                None => {
                    ops::export(&*store, io::BufWriter::new(io::stdout().lock()), &pb)
                        .await?
                        .1
                }
            };
            pb.finish_and_clear();
            if let Some(path) = out {
                if json {
                    println!("{}", json!({"exported": n, "out": path}));
                } else {
                    eprintln!("exported {n} records to {}", path.display());
                }
            }
            Ok(())
        }
        Command::Import { db, input, dry_run } => {
            let store = open(&db.db).await?;
            let pb = progress(
                None,
                if dry_run {
                    "import (dry run)"
                } else {
                    "import"
                },
            );
            let report = ops::import_file(&*store, &input, dry_run, &pb)
                .await
                .with_context(|| format!("import {} refused, nothing applied", input.display()))?;
            pb.finish_and_clear();
            print_report(&report, dry_run, json);
            Ok(())
        }
        Command::Merge { pair, dry_run } => merge(&pair, dry_run, json).await,
        Command::Diff { pair } => merge(&pair, true, json).await,
        Command::Follow(args) => follow(args, json).await,
        Command::Bench(args) => bench::run(args, json).await,
    }
}

async fn merge(pair: &Pair, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let from = open(&pair.from).await?;
    let into = open(&pair.into).await?;
    let total = from.counts().await.map(|c| c.devices + c.tombstones)?;
    let pb = progress(Some(total), if dry_run { "diff" } else { "merge" });
    let report = ops::merge(&*from, &*into, dry_run, &pb)
        .await
        .context("merge failed, nothing applied")?;
    pb.finish_and_clear();
    print_report(&report, dry_run, json);
    Ok(())
}

fn print_report(report: &Report, dry_run: bool, json: bool) {
    let s = &report.summary;
    if json {
        // The summary shape of DESIGN.md, in its order; a dry run adds what it would change.
        #[derive(serde::Serialize)]
        struct DryRun<'a> {
            #[serde(flatten)]
            summary: &'a crate::Summary,
            dry_run: bool,
            first_inserted: &'a [DeviceId],
            first_updated: &'a [DeviceId],
            first_deleted: &'a [DeviceId],
        }
        let line = if dry_run {
            serde_json::to_string(&DryRun {
                summary: s,
                dry_run,
                first_inserted: &report.first_inserted,
                first_updated: &report.first_updated,
                first_deleted: &report.first_deleted,
            })
        } else {
            serde_json::to_string(s)
        };
        println!("{}", line.unwrap_or_default());
        return;
    }
    let verb = if dry_run { "would change" } else { "changed" };
    println!(
        "{verb} {} of {} records: {} inserted, {} updated, {} deleted, {} unchanged",
        s.changed(),
        s.total,
        s.inserted,
        s.updated,
        s.deleted,
        s.unchanged
    );
    if dry_run {
        for (kind, ids) in [
            ("insert", &report.first_inserted),
            ("update", &report.first_updated),
            ("delete", &report.first_deleted),
        ] {
            if !ids.is_empty() {
                let list: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
                println!("  {kind}: {}{}", list.join(", "), more(ids.len(), kind, s));
            }
        }
    }
}

fn more(shown: usize, kind: &str, s: &crate::Summary) -> String {
    let total = match kind {
        "insert" => s.inserted,
        "update" => s.updated,
        _ => s.deleted,
    };
    if total > shown as u64 {
        format!(" … and {} more", total - shown as u64)
    } else {
        String::new()
    }
}

async fn device(cmd: DeviceCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        DeviceCommand::Add {
            db,
            region,
            id,
            count,
            prefix,
            keys_out,
            tags,
            disabled,
        } => {
            let tags = Tags::parse(&tags).context("invalid --tags")?;
            let status = if disabled {
                DeviceStatus::Disabled
            } else {
                DeviceStatus::Enabled
            };
            let ids = match (id, count) {
                (Some(id), _) => vec![parse_id(&id)?],
                (None, Some(n)) => bulk_ids(prefix.as_deref().unwrap_or_default(), n)?,
                (None, None) => bail!("give a device id or --count"),
            };
            let store = open(&db.db).await?;
            if let Some(r) = region {
                let r = Region::new(&r).with_context(|| format!("invalid --region {r:?}"))?;
                store.claim_region(&r).await?;
            }
            add_devices(&*store, ids, tags, status, keys_out.as_deref(), json).await
        }
        DeviceCommand::Disable { db, id } => {
            let status = Some(DeviceStatus::Disabled);
            patch(
                &db,
                &id,
                Patch {
                    status,
                    ..Patch::default()
                },
                "disabled",
                json,
            )
            .await
        }
        DeviceCommand::Enable { db, id } => {
            let status = Some(DeviceStatus::Enabled);
            patch(
                &db,
                &id,
                Patch {
                    status,
                    ..Patch::default()
                },
                "enabled",
                json,
            )
            .await
        }
        DeviceCommand::Remove { db, id } => {
            let id = parse_id(&id)?;
            let store = open(&db.db).await?;
            let rec = store.remove(&id).await?;
            if json {
                println!("{}", serde_json::to_string(&rec)?);
            } else {
                println!("device {id} removed (tombstone version {})", rec.version);
            }
            Ok(())
        }
        DeviceCommand::Show { db, id } => {
            let id = parse_id(&id)?;
            let store = open(&db.db).await?;
            let Some(rec) = store.get(&id).await? else {
                bail!("device {id} does not exist");
            };
            println!("{}", serde_json::to_string(&rec)?);
            Ok(())
        }
    }
}

async fn patch(db: &Db, id: &str, patch: Patch, what: &str, json: bool) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let store = open(&db.db).await?;
    let rec = store.update(&id, patch).await?;
    if json {
        println!("{}", serde_json::to_string(&rec)?);
    } else {
        println!("device {id} {what} (version {})", rec.version);
    }
    Ok(())
}

fn bulk_ids(prefix: &str, count: u64) -> anyhow::Result<Vec<DeviceId>> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let width = (count - 1).to_string().len();
    (0..count)
        .map(|i| parse_id(&format!("{prefix}{i:0width$}")))
        .collect()
}

async fn add_devices(
    store: &dyn RegistryStore,
    ids: Vec<DeviceId>,
    tags: Tags,
    status: DeviceStatus,
    keys_out: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let keys: Vec<_> = ids.iter().map(|_| keys::generate()).collect();
    let new: Vec<NewDevice> = ids
        .iter()
        .zip(&keys)
        .map(|(id, key)| NewDevice {
            device_id: id.clone(),
            key_sha256: key.hash(),
            status,
            tags: tags.clone(),
        })
        .collect();
    let lines: Vec<String> = ids
        .iter()
        .zip(&keys)
        .map(|(id, key)| json!({"device_id": id, "key": key.expose()}).to_string())
        .collect();
    // Keys are written (and synced) before the devices exist, so a crash can
    // leave unused keys but never devices whose keys nobody has.
    if let Some(path) = keys_out {
        write_keys(path, &lines)?;
    }
    let created = match store.create(new).await {
        Ok(c) => c,
        Err(e) => {
            if let Some(path) = keys_out {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    match (keys_out, created.as_slice()) {
        (Some(path), _) => {
            if json {
                println!(
                    "{}",
                    json!({"created": created.len(), "keys_out": path, "first": ids.first(), "last": ids.last()})
                );
            } else {
                println!(
                    "created {} devices ({} … {}); keys in {} (shown nowhere else)",
                    created.len(),
                    ids[0],
                    ids[ids.len() - 1],
                    path.display()
                );
            }
        }
        (None, [one]) if !json => {
            println!("device {} created in region {}", one.device_id, one.origin);
            println!(
                "key (shown once; give it to the device now): {}",
                keys[0].expose()
            );
        }
        (None, _) => {
            let mut out = io::stdout().lock();
            for line in &lines {
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}

fn write_keys(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    let what = || format!("write keys to {}", path.display());
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(what)?;
    let mut w = io::BufWriter::new(file);
    for line in lines {
        writeln!(w, "{line}").with_context(what)?;
    }
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(what)?;
    file.sync_all().with_context(what)?;
    Ok(())
}

/// The `follow` configuration file. Unknown fields are reported and ignored:
/// a service's config outlives a binary version.
#[derive(Debug, Default, Deserialize)]
struct FollowFile {
    from: Option<String>,
    into: Option<String>,
    interval_ms: Option<u64>,
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, toml::Value>,
}

async fn follow(args: FollowArgs, json: bool) -> anyhow::Result<()> {
    let file: FollowFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read config {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?
        }
        None => FollowFile::default(),
    };
    for key in file.unknown.keys() {
        tracing::warn!(field = %key, "unknown field in follow config, ignored");
    }
    let from = args.from.or(file.from).context("--from is required")?;
    let into = args.into.or(file.into).context("--into is required")?;
    let interval = Duration::from_millis(args.interval_ms.or(file.interval_ms).unwrap_or(1000));
    let from_store = open(&from).await?;
    let into_store = open(&into).await?;
    if !json {
        eprintln!(
            "following {} into {} every {} ms; Ctrl-C stops",
            redact_url(&from),
            redact_url(&into),
            interval.as_millis()
        );
    }
    let mut last_printed: Option<(u64, u64)> = None;
    let options = FollowOptions {
        interval,
        ..FollowOptions::default()
    };
    let status = ops::follow(
        &*from_store,
        &*into_store,
        options,
        shutdown_signal(),
        |s| {
            let key = (s.applied.total, s.lag);
            if last_printed != Some(key) {
                last_printed = Some(key);
                print_follow(s, json);
            }
        },
    )
    .await?;
    if !json {
        eprintln!(
            "stopped at watermark {} (lag {})",
            status.watermark, status.lag
        );
    }
    Ok(())
}

fn print_follow(s: &FollowStatus, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).unwrap_or_default());
    } else {
        println!(
            "applied {} changes ({} inserted, {} updated, {} deleted); watermark {}, lag {} changes",
            s.applied.changed(),
            s.applied.inserted,
            s.applied.updated,
            s.applied.deleted,
            s.watermark,
            s.lag
        );
    }
}

pub use fleet_api::process::shutdown_signal;

/// A progress bar on stderr when it is a terminal; hidden otherwise.
pub fn progress(len: Option<u64>, what: &'static str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = match len {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::new_spinner(),
    };
    let template = if len.is_some() {
        "{msg} [{bar:30}] {pos}/{len} records ({per_sec}, eta {eta})"
    } else {
        "{msg} {spinner} {pos} records ({per_sec})"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what);
    pb
}
