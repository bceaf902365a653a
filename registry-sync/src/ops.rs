//! Export, import, merge, diff and follow: the operations behind the CLI.
//!
//! Each applying operation runs in one transaction of the target registry:
//! it applies everything or nothing. Sources are streamed, so memory stays
//! flat however large the registries are.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::path::Path;
use std::time::Duration;

use fleet_api::{DeviceId, DeviceRecord, UnixMillis};
use futures::StreamExt;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::format::{Dedup, FormatError, Reader, Writer};
use crate::hlc;
use crate::merge::{Head, Outcome, Summary};
use crate::store::{ApplyTx, RegistryError, RegistryStore, Seq};

/// Records per apply batch (and per multi-row statement).
pub const BATCH: usize = 1000;

/// How many ids of each kind a report lists.
pub const FIRST_IDS: usize = 10;

/// Errors of the registry operations.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("--from and --into are the same registry")]
    SameRegistry,
}

impl OpError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> OpError {
        let what = what.into();
        move |source| OpError::Io { what, source }
    }
}

/// The counts of an import or merge plus the first ids of each kind of change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub summary: Summary,
    pub first_inserted: Vec<DeviceId>,
    pub first_updated: Vec<DeviceId>,
    pub first_deleted: Vec<DeviceId>,
}

impl Report {
    fn add(&mut self, rec: &DeviceRecord, outcome: Outcome) {
        self.summary.add(outcome);
        let list = match outcome {
            Outcome::Inserted => &mut self.first_inserted,
            Outcome::Updated => &mut self.first_updated,
            Outcome::Deleted => &mut self.first_deleted,
            Outcome::Unchanged => return,
        };
        if list.len() < FIRST_IDS {
            list.push(rec.device_id.clone());
        }
    }
}

async fn apply_batch(
    tx: &mut dyn ApplyTx,
    batch: &mut Vec<DeviceRecord>,
    report: &mut Report,
    progress: &ProgressBar,
) -> Result<(), OpError> {
    if batch.is_empty() {
        return Ok(());
    }
    let outcomes = tx.apply(batch).await?;
    for (rec, outcome) in batch.iter().zip(outcomes) {
        report.add(rec, outcome);
    }
    progress.inc(batch.len() as u64);
    batch.clear();
    Ok(())
}

async fn finish(tx: Box<dyn ApplyTx>, commit: bool) -> Result<(), OpError> {
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(())
}

/// Streams every record of `store` to `out` as `fleet-registry/1`.
/// Returns the output and the number of records.
///
/// # Errors
/// Database and write errors.
pub async fn export<W: Write>(
    store: &dyn RegistryStore,
    out: W,
    progress: &ProgressBar,
) -> Result<(W, u64), OpError> {
    let region = store.region().await?;
    let mut w = Writer::new(out, region, UnixMillis(hlc::wall_ms()))
        .map_err(OpError::io("write export"))?;
    let mut records = store.scan();
    while let Some(rec) = records.next().await {
        w.record(&rec?).map_err(OpError::io("write export"))?;
        progress.inc(1);
    }
    w.finish().map_err(OpError::io("write export"))
}

/// Exports into `path` atomically: a complete file appears under its name or
/// nothing does.
///
/// # Errors
/// Database and file errors.
pub async fn export_to_file(
    store: &dyn RegistryStore,
    path: &Path,
    progress: &ProgressBar,
) -> Result<u64, OpError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let what = format!("write {}", path.display());
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(OpError::io(what.clone()))?;
    let (out, n) = export(store, io::BufWriter::new(tmp), progress).await?;
    let tmp = out
        .into_inner()
        .map_err(|e| OpError::io(what.clone())(e.into_error()))?;
    tmp.as_file()
        .sync_all()
        .map_err(OpError::io(what.clone()))?;
    tmp.persist(path)
        .map_err(|e| OpError::io(what.clone())(e.error))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(n)
}

/// Validates a registry file and merges it into `store` in one transaction
/// (rolled back for a dry run, or when anything in the file is wrong).
///
/// # Errors
/// Any format error (nothing is applied) and database errors.
pub async fn import_reader<R: BufRead>(
    store: &dyn RegistryStore,
    input: R,
    dedup: Dedup,
    dry_run: bool,
    progress: &ProgressBar,
) -> Result<Report, OpError> {
    let mut reader = Reader::new(input, dedup)?;
    let mut tx = store.begin_apply().await?;
    let mut report = Report::default();
    let mut batch = Vec::with_capacity(BATCH);
    let result: Result<(), OpError> = async {
        while let Some(rec) = reader.next_record()? {
            batch.push(rec);
            if batch.len() == BATCH {
                apply_batch(&mut *tx, &mut batch, &mut report, progress).await?;
            }
        }
        apply_batch(&mut *tx, &mut batch, &mut report, progress).await
    }
    .await;
    match result {
        Ok(()) => {
            finish(tx, !dry_run).await?;
            Ok(report)
        }
        Err(e) => {
            tx.rollback().await?;
            Err(e)
        }
    }
}

/// [`import_reader`] on a file. Sorted files (every export) are checked for
/// duplicates with O(1) memory; an unsorted file is read again with an id map.
///
/// # Errors
/// As [`import_reader`], plus file errors.
pub async fn import_file(
    store: &dyn RegistryStore,
    path: &Path,
    dry_run: bool,
    progress: &ProgressBar,
) -> Result<Report, OpError> {
    let what = format!("read {}", path.display());
    let mut file = File::open(path).map_err(OpError::io(what.clone()))?;
    let first = import_reader(
        store,
        BufReader::new(&mut file),
        Dedup::Sorted,
        dry_run,
        progress,
    )
    .await;
    match first {
        Err(OpError::Format(FormatError::Unsorted { .. })) => {
            file.rewind().map_err(OpError::io(what))?;
            progress.set_position(0);
            import_reader(store, BufReader::new(file), Dedup::Map, dry_run, progress).await
        }
        other => other,
    }
}

/// Merges every record of `from` into `into` in one transaction of `into`
/// (rolled back for a dry run). `diff` is a dry run.
///
/// Only merge heads are compared at first; whole records are fetched from
/// `from` just for the devices that change, so merging registries that are
/// mostly converged reads little more than their keys.
///
/// # Errors
/// [`OpError::SameRegistry`] and database errors (nothing applied).
pub async fn merge(
    from: &dyn RegistryStore,
    into: &dyn RegistryStore,
    dry_run: bool,
    progress: &ProgressBar,
) -> Result<Report, OpError> {
    if from.store_id().await? == into.store_id().await? {
        return Err(OpError::SameRegistry);
    }
    let mut tx = into.begin_apply().await?;
    let mut report = Report::default();
    let result: Result<(), OpError> = async {
        let mut heads = from.scan_heads();
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let next = heads.next().await.transpose()?;
            let end = next.is_none();
            batch.extend(next);
            if batch.len() == BATCH || (end && !batch.is_empty()) {
                merge_batch(from, &mut *tx, &batch, &mut report, progress).await?;
                batch.clear();
            }
            if end {
                return Ok(());
            }
        }
    }
    .await;
    match result {
        Ok(()) => {
            finish(tx, !dry_run).await?;
            Ok(report)
        }
        Err(e) => {
            tx.rollback().await?;
            Err(e)
        }
    }
}

async fn merge_batch(
    from: &dyn RegistryStore,
    tx: &mut dyn ApplyTx,
    heads: &[(DeviceId, Head)],
    report: &mut Report,
    progress: &ProgressBar,
) -> Result<(), OpError> {
    let outcomes = tx.compare(heads).await?;
    let mut changing = Vec::new();
    for ((id, _), outcome) in heads.iter().zip(&outcomes) {
        if outcome.changes() {
            changing.push(id.clone());
        } else {
            report.summary.add(*outcome);
        }
    }
    if !changing.is_empty() {
        let mut records = from.get_many(&changing).await?;
        records.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        let applied = tx.apply(&records).await?;
        for (rec, outcome) in records.iter().zip(applied) {
            report.add(rec, outcome);
        }
    }
    progress.inc(heads.len() as u64);
    Ok(())
}

/// Where `follow` stands after one round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FollowStatus {
    /// Changes applied since `follow` started.
    #[serde(flatten)]
    pub applied: Summary,
    /// The source's change sequence applied so far.
    pub watermark: u64,
    /// Source changes not applied yet.
    pub lag: u64,
    /// Records applied in this round.
    pub round: u64,
}

/// Tunables of [`follow`].
#[derive(Clone, Copy, Debug)]
pub struct FollowOptions {
    /// Pause between polls when caught up.
    pub interval: Duration,
    /// Pause after a transient error (the source or target unreachable).
    pub retry: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(1000),
            retry: Duration::from_secs(2),
        }
    }
}

/// Keeps `into` converged with `from` until `shutdown` resolves: tails the
/// source's change sequence and applies each batch together with the new
/// watermark (stored in `into`, so a restart resumes where it stopped).
/// Transient database errors are retried; others end the follow.
///
/// # Errors
/// [`OpError::SameRegistry`] and non-transient database errors.
pub async fn follow(
    from: &dyn RegistryStore,
    into: &dyn RegistryStore,
    options: FollowOptions,
    shutdown: impl std::future::Future<Output = ()>,
    mut on_status: impl FnMut(&FollowStatus),
) -> Result<FollowStatus, OpError> {
    let source = from.store_id().await?;
    if source == into.store_id().await? {
        return Err(OpError::SameRegistry);
    }
    let mut status = FollowStatus {
        watermark: into.follow_watermark(&source).await?.0,
        ..FollowStatus::default()
    };
    tokio::pin!(shutdown);
    loop {
        let pause = match follow_round(from, into, &source, &mut status).await {
            Ok(full) => {
                on_status(&status);
                if full {
                    Duration::ZERO
                } else {
                    options.interval
                }
            }
            Err(e) if e.retryable() => {
                tracing::warn!(error = %format!("{e:#}"), "follow round failed, retrying");
                options.retry
            }
            // A record from the future: exiting would only restart on the
            // same batch; staying up keeps saying which record (and a clock
            // that is merely ahead catches up on its own).
            Err(e @ RegistryError::ImplausibleVersion { .. }) => {
                tracing::error!(error = %e, "follow is held up by a record with an implausible version; fix the source's clock or the record");
                options.retry
            }
            Err(e @ RegistryError::ImplausibleSeq { .. }) => {
                tracing::error!(error = %e, "follow is held up by a change numbered beyond the source's sequence");
                options.retry
            }
            Err(e) => return Err(e.into()),
        };
        tokio::select! {
            () = &mut shutdown => return Ok(status),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One batch; returns true when the batch was full (more may be waiting).
async fn follow_round(
    from: &dyn RegistryStore,
    into: &dyn RegistryStore,
    source: &str,
    status: &mut FollowStatus,
) -> Result<bool, RegistryError> {
    let changes = from
        .changes_since(Seq(status.watermark), BATCH as u32)
        .await?;
    // Read after the batch (so a change committed in between is within
    // it): every change must be numbered within the source's sequence. One
    // beyond it (a forged or corrupt row, or a negative sequence read as a
    // huge one) would move the watermark past everything the source will
    // ever write, silencing follow for good.
    let max = from.max_seq().await?;
    if let Some((seq, r)) = changes.iter().find(|(seq, _)| *seq > max) {
        return Err(RegistryError::ImplausibleSeq {
            device_id: r.device_id.clone(),
            seq: seq.0,
            max: max.0,
        });
    }
    status.round = changes.len() as u64;
    if let Some(&(last, _)) = changes.last() {
        let records: Vec<DeviceRecord> = changes.into_iter().map(|(_, r)| r).collect();
        let mut tx = into.begin_apply().await?;
        let outcomes = tx.apply(&records).await?;
        tx.set_follow_watermark(source, last).await?;
        tx.commit().await?;
        for o in outcomes {
            status.applied.add(o);
        }
        status.watermark = last.0;
    }
    status.lag = max.0.saturating_sub(status.watermark);
    Ok(status.round == BATCH as u64)
}
