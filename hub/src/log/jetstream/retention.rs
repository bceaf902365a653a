//! Retention on JetStream: the oldest records of a partition are purged by
//! size and age, as the file log deletes its oldest segments, never at or
//! above the partition's retention floor (what the hub still needs: not yet
//! pulled by an attached peer) nor the high watermark.
//!
//! The purge point is chosen here, outside the writer; the writer moves the
//! partition's start in the metadata first (compare-and-set, so readers see
//! "gone" rather than a hole) and only then purges the streams.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use fleet_api::PartitionId;
use tokio::sync::{mpsc, oneshot};

use super::Part;
use super::meta::MetaStore;
use super::purged::PurgedStore;
use super::writer::Cmd;
use crate::log::{LogError, LogResult};

/// The most records one pass purges from a partition (what a failed pass
/// has to read again; the devices' mids it keeps are bounded by the fleet).
const PER_PASS: u64 = 1_000_000;

/// How much a partition keeps: `bytes` (its streams' bytes) and `age` (the
/// servers' receive time of a record), each when set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub bytes: Option<u64>,
    pub age: Option<Duration>,
}

impl RetentionPolicy {
    pub fn is_off(&self) -> bool {
        self.bytes.is_none() && self.age.is_none()
    }
}

/// Every `every`, purges what `policy` lets go in each partition.
pub(super) async fn retention_loop(
    parts: Vec<std::sync::Weak<Part>>,
    meta: MetaStore,
    purged: PurgedStore,
    writers: Vec<mpsc::WeakUnboundedSender<Cmd>>,
    policy: RetentionPolicy,
    every: Duration,
) {
    let mut tick = super::ticker(every).await;
    loop {
        tick.tick().await;
        // Weak: a dropped log's writers end (and this with them) instead
        // of living on beside a reopened one.
        let Some(writers) = writers
            .iter()
            .map(mpsc::WeakUnboundedSender::upgrade)
            .collect::<Option<Vec<_>>>()
        else {
            return;
        };
        let Some(parts) = parts
            .iter()
            .map(std::sync::Weak::upgrade)
            .collect::<Option<Vec<_>>>()
        else {
            return;
        };
        // Partitions at once: a pass reads what it purges (to keep the
        // devices' mids), and one partition's pass must not wait for all
        // the others'.
        let passes = parts.iter().zip(&writers).map(|(part, writer)| {
            let (meta, purged) = (&meta, &purged);
            async move {
                if let Err(e) = retain_partition(part, meta, purged, writer, policy).await {
                    tracing::warn!(partition = %part.id, error = %e, "jetstream retention failed");
                }
            }
        });
        futures::future::join_all(passes).await;
        metrics::counter!("fleet_hub_retention_passes_total").increment(1);
    }
}

/// One retention pass over partition `part`: how many records went.
pub(super) async fn retain_partition(
    part: &Arc<Part>,
    meta: &MetaStore,
    purged: &PurgedStore,
    writer: &mpsc::UnboundedSender<Cmd>,
    policy: RetentionPolicy,
) -> LogResult<u64> {
    let Some(upto) = purge_point(part, policy).await? else {
        return Ok(0);
    };
    // Every purged device's last mid is kept first: the partition's next
    // writer learns it from there (the writer purges no further than this).
    // A pass reads at most PER_PASS records (memory and time stay bounded
    // however far behind retention is; the next pass goes on).
    let from = part.meta().start;
    let upto = upto.min(from.saturating_add(PER_PASS));
    let devices = part.note_purged(meta, purged, from, upto).await?;
    tracing::debug!(partition = %part.id, from, upto, devices, "purged devices' last mids kept");
    let (reply, rx) = oneshot::channel();
    writer
        .send(Cmd::Retain { from, upto, reply })
        .map_err(|_| LogError::Closed)?;
    let n = rx.await.map_err(|_| LogError::Closed)??;
    if n > 0 {
        tracing::info!(partition = %part.id, upto, purged = n, "jetstream retention purged old records");
    }
    Ok(n)
}

/// The first offset to keep in `part` under `policy`, when records below it
/// may go: never above the retention floor or the high watermark.
pub(super) async fn purge_point(
    part: &Arc<Part>,
    policy: RetentionPolicy,
) -> LogResult<Option<u64>> {
    let (meta, hw) = part.snapshot();
    let limit = part.floor.load(Ordering::Acquire).min(hw.0);
    if limit <= meta.start {
        return Ok(None);
    }
    let mut upto = meta.start;
    if let Some(max) = policy.bytes {
        upto = upto.max(size_point(part, &meta, max).await?);
    }
    if let Some(age) = policy.age {
        upto = upto.max(age_point(part, meta.start, limit, age).await?);
    }
    let upto = upto.min(limit);
    Ok((upto > meta.start).then_some(upto))
}

/// Where the partition's retained bytes fall to `max`: whole older
/// generations first, then within one by its average record size. Only
/// live offsets count: from the start on, and in a generation only up to
/// where the next begins (a cut leaves the old tail in its stream, unread).
async fn size_point(part: &Arc<Part>, meta: &super::meta::PartMeta, max: u64) -> LogResult<u64> {
    let (first_gen, _) = meta.gen_of(meta.start);
    let gens: Vec<(u32, u64)> = meta
        .gens
        .iter()
        .copied()
        .filter(|(g, _)| *g >= first_gen)
        .collect();
    // (live from, live end, live bytes), oldest first.
    let mut live = Vec::new();
    for (i, &(generation, first)) in gens.iter().enumerate() {
        let Some(mut stream) = part.stream(generation) else {
            return Err(LogError::Io(format!(
                "generation {generation} has no stream"
            )));
        };
        let info = stream
            .info()
            .await
            .map_err(|e| LogError::Io(format!("stream info: {e}")))?;
        let s = &info.state;
        let from = first.max(meta.start);
        // Offset = sequence - 1: the stream's offsets end before last_sequence.
        let mut end = s.last_sequence;
        if let Some(&(_, next_first)) = gens.get(i + 1) {
            end = end.min(next_first);
        }
        let count = end.saturating_sub(from);
        let avg = s.bytes / s.messages.max(1);
        live.push((from, end, avg.saturating_mul(count)));
    }
    let total: u64 = live.iter().map(|l| l.2).sum();
    let mut over = total.saturating_sub(max);
    let mut upto = meta.start;
    for (from, end, bytes) in live {
        if over == 0 {
            break;
        }
        if bytes <= over {
            upto = end.max(from);
            over -= bytes;
            continue;
        }
        let avg = (bytes / end.saturating_sub(from).max(1)).max(1);
        upto = from + over.div_ceil(avg);
        break;
    }
    Ok(upto)
}

/// The first offset in `start..limit` that the servers received within
/// `age` (`limit` if none did): a binary search, records being in receive
/// order. Wall-clock time, as the servers' timestamps are.
async fn age_point(part: &Arc<Part>, start: u64, limit: u64, age: Duration) -> LogResult<u64> {
    let cutoff = SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    let (mut lo, mut hi) = (start, limit);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let generation = part.meta().gen_of(mid).0;
        let stream = part
            .stream(generation)
            .ok_or_else(|| LogError::Io(format!("generation {generation} has no stream")))?;
        let Some(m) = super::read::get(&stream, mid + 1).await? else {
            // Purged meanwhile: nothing below is kept anyway.
            lo = mid + 1;
            continue;
        };
        if m.time.unix_timestamp_nanos() < cutoff {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The partition's retention floor.
pub(super) fn set_floor(part: &Part, p: PartitionId, offset: u64) {
    part.floor.store(offset, Ordering::Release);
    tracing::trace!(partition = %p, floor = offset, "jetstream retention floor");
}
