//! `registry-sync bench`: export, import and merge rates against a plain
//! batched `INSERT` of the same rows into the same backend, measured in the
//! same run (phases alternate round by round, medians reported).
//!
//! Memory: the bench generates rows on the fly and resets the kernel's peak
//! RSS mark before each phase (`/proc/self/clear_refs`), so the peak reported
//! for a phase is that phase's own.

use std::path::{Path, PathBuf};

use clap::Args;
use fleet_api::{
    DeviceId, DeviceKey, DeviceRecord, DeviceStatus, Region, Tags, UnixMillis, Version,
};
use indicatif::ProgressBar;
use serde::Serialize;
use sqlx::QueryBuilder;
use tokio::time::Instant;

use crate::ops;
use crate::store::{PostgresStore, RegistryStore, SqliteStore};
use crate::testing::TempPg;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Identities per registry.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Rounds per backend (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// sqlite, postgres or all.
    #[arg(long, default_value = "all")]
    backend: String,
    /// Server for scratch databases (created and dropped per round).
    #[arg(
        long,
        env = "FLEET_TEST_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres: String,
    /// Directory for SQLite files and export files [default: a temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, Serialize, Clone)]
struct PhaseResult {
    backend: &'static str,
    phase: &'static str,
    rows_per_s: f64,
    ratio_to_plain_insert: f64,
    peak_rss_mib: f64,
    samples: Vec<f64>,
}

const PHASES: [&str; 4] = [
    "plain insert",
    "export",
    "import (empty)",
    "merge (10% changed)",
];

/// Runs the benchmark and prints a table (or JSON).
///
/// # Errors
/// Database, file and setup errors.
pub async fn run(args: BenchArgs, json: bool) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let backends: Vec<&'static str> = match args.backend.as_str() {
        "sqlite" => vec!["sqlite"],
        "postgres" => vec!["postgres"],
        "all" => vec!["sqlite", "postgres"],
        other => anyhow::bail!("unknown --backend {other:?}: sqlite, postgres or all"),
    };
    if !json {
        eprintln!("{}", machine(&dir));
        eprintln!(
            "{} rows per registry, {} rounds per backend; phases alternate within each round",
            args.rows, args.rounds
        );
    }
    let mut results = Vec::new();
    for backend in backends {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
        let mut peaks = vec![0f64; PHASES.len()];
        for round in 0..args.rounds {
            let r = one_round(backend, &args, &dir, round).await?;
            for (i, (rate, peak)) in r.into_iter().enumerate() {
                samples[i].push(rate);
                peaks[i] = peaks[i].max(peak);
            }
            if !json {
                eprintln!("  {backend} round {} done", round + 1);
            }
        }
        let base = median(&samples[0]);
        for (i, phase) in PHASES.iter().enumerate() {
            let m = median(&samples[i]);
            results.push(PhaseResult {
                backend,
                phase,
                rows_per_s: m,
                ratio_to_plain_insert: m / base,
                peak_rss_mib: peaks[i],
                samples: samples[i].clone(),
            });
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({"rows": args.rows, "rounds": args.rounds, "results": results})
            )?
        );
    } else {
        println!(
            "{:<9} {:<20} {:>12} {:>8} {:>10}",
            "backend", "phase", "rows/s", "× insert", "peak RSS"
        );
        for r in &results {
            println!(
                "{:<9} {:<20} {:>12.0} {:>8.2} {:>7.0} MiB",
                r.backend, r.phase, r.rows_per_s, r.ratio_to_plain_insert, r.peak_rss_mib
            );
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// A deterministic identity for row `i`.
fn record(i: u64, region: &Region) -> DeviceRecord {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&i.to_le_bytes());
    DeviceRecord {
        device_id: DeviceId::new(format!("bench-{i:08}")).expect("valid id"),
        key_sha256: DeviceKey::from_bytes(key).hash(),
        status: DeviceStatus::Enabled,
        tags: Tags::parse(&format!(r#"{{"site":"s{}","rack":{}}}"#, i % 97, i % 13)).expect("tags"),
        created_at: UnixMillis(1_700_000_000_000),
        updated_at: UnixMillis(1_700_000_000_000),
        version: Version((1_700_000_000_000u64 << 16) + i),
        origin: region.clone(),
        deleted: false,
    }
}

enum Scratch {
    Sqlite(PathBuf),
    Pg(TempPg),
}

impl Scratch {
    async fn new(backend: &str, dir: &Path, name: &str) -> anyhow::Result<Scratch> {
        Ok(if backend == "sqlite" {
            let path = dir.join(format!("{name}.db"));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            Scratch::Sqlite(path)
        } else {
            Scratch::Pg(TempPg::new().await)
        })
    }

    fn url(&self) -> String {
        match self {
            Scratch::Sqlite(p) => format!("sqlite://{}", p.display()),
            Scratch::Pg(pg) => pg.url().to_string(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Scratch::Sqlite(path) = self {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

macro_rules! plain_insert {
    ($db:ty, $pool:expr, $rows:expr, $region:expr) => {{
        let mut tx = $pool.begin().await?;
        let mut i = 0u64;
        while i < $rows {
            let end = ($rows).min(i + ops::BATCH as u64);
            let mut qb = QueryBuilder::<$db>::new(
                "INSERT INTO devices (device_id, key_sha256, status, tags, created_at, updated_at, \
                 version, origin, deleted, seq) ",
            );
            qb.push_values(i..end, |mut b, n| {
                let r = record(n, $region);
                b.push_bind(r.device_id.into_string())
                    .push_bind(r.key_sha256.0.to_vec())
                    .push_bind(r.status.as_str())
                    .push_bind(r.tags.as_json().to_owned())
                    .push_bind(r.created_at.0 as i64)
                    .push_bind(r.updated_at.0 as i64)
                    .push_bind(r.version.0 as i64)
                    .push_bind(r.origin.into_string())
                    .push_bind(false)
                    .push_bind(n as i64 + 1);
            });
            qb.build().persistent(false).execute(&mut *tx).await?;
            i = end;
        }
        sqlx::query("UPDATE registry_meta SET hlc = $1, seq = $2 WHERE id = 1")
            .bind(((1_700_000_000_000u64 << 16) + $rows) as i64)
            .bind($rows as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }};
}

/// Plain batched INSERT of rows `0..rows` into a fresh registry; returns it.
async fn plain_insert(
    backend: &str,
    url: &str,
    rows: u64,
) -> anyhow::Result<std::sync::Arc<dyn RegistryStore>> {
    let region = Region::new("bench")?;
    if backend == "sqlite" {
        let s = SqliteStore::open(url).await?;
        plain_insert!(sqlx::Sqlite, s.pool(), rows, &region);
        Ok(std::sync::Arc::new(s))
    } else {
        let s = PostgresStore::open(url).await?;
        plain_insert!(sqlx::Postgres, s.pool(), rows, &region);
        Ok(std::sync::Arc::new(s))
    }
}

/// Resets the peak-RSS mark so that the next reading is this phase's own.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn timed<T>(
    rows: u64,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, (f64, f64))> {
    reset_peak();
    let t = Instant::now();
    let out = f.await?;
    let rate = rows as f64 / t.elapsed().as_secs_f64();
    Ok((out, (rate, peak_rss_mib())))
}

async fn one_round(
    backend: &str,
    args: &BenchArgs,
    dir: &Path,
    round: u32,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let rows = args.rows;
    let hidden = ProgressBar::hidden();
    let a = Scratch::new(backend, dir, &format!("bench-a-{round}")).await?;
    let b = Scratch::new(backend, dir, &format!("bench-b-{round}")).await?;
    let export_path = dir.join(format!("bench-{backend}-{round}.ndjson"));

    let (src, insert) = timed(rows, plain_insert(backend, &a.url(), rows)).await?;
    let ((), export) = timed(rows, async {
        ops::export_to_file(&*src, &export_path, &hidden).await?;
        Ok(())
    })
    .await?;
    let dst = crate::store::open(&b.url()).await?;
    let (report, import) = timed(rows, async {
        Ok(ops::import_file(&*dst, &export_path, false, &hidden).await?)
    })
    .await?;
    anyhow::ensure!(
        report.summary.inserted == rows,
        "import inserted {} of {rows}",
        report.summary.inserted
    );
    let _ = std::fs::remove_file(&export_path);

    // 10 % of the source changes (ids ending in 0) under newer versions.
    dst.close().await;
    let changed = concat!(
        "UPDATE devices SET version = version + 65536, tags = '{\"changed\":true}' ",
        "WHERE device_id LIKE '%0'"
    );
    match &a {
        Scratch::Sqlite(_) => {
            let s = SqliteStore::open(&a.url()).await?;
            sqlx::query(changed).execute(s.pool()).await?;
        }
        Scratch::Pg(_) => {
            let s = PostgresStore::open(&a.url()).await?;
            sqlx::query(changed).execute(s.pool()).await?;
        }
    }
    let (report, merge) = timed(rows, async {
        Ok(ops::merge(&*src, &*dst, false, &hidden).await?)
    })
    .await?;
    anyhow::ensure!(
        report.summary.updated == rows.div_ceil(10)
            && report.summary.unchanged == rows - rows.div_ceil(10),
        "merge changed {:?}",
        report.summary
    );
    Ok(vec![insert, export, import, merge])
}

fn machine(dir: &Path) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let disk = std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| {
            m.lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let dev = f.next()?;
                    let mnt = f.next()?;
                    dir.starts_with(mnt).then(|| (mnt.len(), dev.to_string()))
                })
                .max()
                .map(|(_, dev)| dev)
        })
        .unwrap_or_else(|| "unknown".into());
    format!("machine: {cores} cores, {mem} GiB RAM, files on {disk}")
}
