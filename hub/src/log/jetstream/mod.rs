//! The event log on NATS JetStream (`--log nats://…`): one stream per
//! partition (and generation), offsets are stream sequences minus one, and
//! records are the file log's frames (CRC included), so the read API and
//! records look exactly as with the file log.
//!
//! Nothing is trusted before the servers are verified to fsync before they
//! acknowledge (`jetstream { sync_interval: always }`, read from their
//! monitoring ports), unless the operator opts out.

mod body;
mod config;
mod last;
pub mod lease;
mod meta;
mod names;
mod purged;
mod read;
mod retention;
mod shared;
mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use fleet_api::{Epoch, Offset, PartitionId};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

/// The longest the log waits on the NATS client for one thing: handing it
/// a publish or a request (async-nats waits without bound while it
/// reconnects with its queue full), or an answer (async-nats's own
/// default).
const NATS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub use body::stored_body;
pub use config::{ConfigError, FsyncUnverified, JetStreamConfig, connection_name, verify_fsync};
pub use lease::{Leases, Placement};
use meta::{MetaStore, PartMeta};
pub use names::stream_layout;
use names::{StreamNames, push_u64};
use purged::PurgedStore;
pub use retention::RetentionPolicy;
use writer::{Cmd, Writer};

use super::{EventLog, LogError, LogResult, NewRecord, ReadLimits, Record};

/// Room for a frame's fixed fields, the largest device id and region, the
/// writer's id before the frame (`body::PREFIX`), and the message headers.
pub(super) const MESSAGE_OVERHEAD: usize = 1024;

/// What readers share with a partition's writer.
#[derive(Debug)]
pub(super) struct Part {
    id: PartitionId,
    /// The metadata and the high watermark, changed together (a reader
    /// never pairs a cut's generations with the old high watermark).
    view: RwLock<(PartMeta, Offset)>,
    streams: RwLock<HashMap<u32, stream::Stream>>,
    /// Follows the high watermark (wakes long polls).
    hw: watch::Sender<Offset>,
    failure: Mutex<Option<String>>,
    /// Retention purges nothing at or above it.
    floor: AtomicU64,
}

impl Part {
    /// Replaces the metadata and the high watermark at once.
    fn switch(&self, meta: PartMeta, hw: Offset) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = (meta, hw);
        self.hw.send_replace(hw);
    }

    fn set_meta(&self, meta: PartMeta) {
        self.view.write().unwrap_or_else(|e| e.into_inner()).0 = meta;
    }

    fn meta(&self) -> PartMeta {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    fn snapshot(&self) -> (PartMeta, Offset) {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stream(&self, generation: u32) -> Option<stream::Stream> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&generation)
            .cloned()
    }

    fn add_stream(&self, generation: u32, s: stream::Stream) {
        self.streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(generation, s);
    }

    fn advance(&self, hw: Offset) {
        {
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            if hw <= view.1 {
                return;
            }
            view.1 = hw;
        }
        self.hw.send_replace(hw);
    }

    fn fail(&self, why: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Durable records from `from` on (crossing generations).
    async fn read(&self, from: Offset, limits: ReadLimits) -> LogResult<Vec<Record>> {
        let (meta, hw) = self.snapshot();
        let hw = hw.0;
        if from.0 < meta.start {
            return Err(LogError::OffsetGone {
                partition: self.id,
                requested: from,
                start: Offset(meta.start),
            });
        }
        if from.0 >= hw || limits.max_records == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut at = from.0;
        let mut limits = limits;
        // Generation by generation until the limits or the end.
        while at < hw && limits.max_records > 0 {
            let (generation, _) = meta.gen_of(at);
            let end = meta
                .gens
                .iter()
                .map(|(_, first)| *first)
                .filter(|first| *first > at)
                .min()
                .map_or(hw, |first| first.min(hw));
            let s = self
                .stream(generation)
                .ok_or_else(|| LogError::Io(format!("generation {generation} has no stream")))?;
            let got = match read::read_range(self.id, &s, at, end, limits).await {
                Ok(got) => got,
                // Retention moved the start and purged meanwhile.
                Err(LogError::Corrupt { offset, .. }) if offset.0 < self.meta().start => {
                    return Err(LogError::OffsetGone {
                        partition: self.id,
                        requested: from,
                        start: Offset(self.meta().start),
                    });
                }
                Err(e) => return Err(e),
            };
            let bytes: usize = got.iter().map(|r| r.record.payload.len() + 64).sum();
            let full = got.len() < (end - at) as usize;
            limits.max_records -= got.len().min(limits.max_records);
            limits.max_bytes = limits.max_bytes.saturating_sub(bytes);
            out.extend(got);
            if full || limits.max_bytes == 0 {
                break;
            }
            at = end;
        }
        Ok(out)
    }
}

/// The JetStream event log of one region.
pub struct JetStreamLog {
    parts: Vec<Arc<Part>>,
    writers: Vec<mpsc::UnboundedSender<Cmd>>,
    max_message: usize,
    /// The partitions' leases, when several hubs share the log.
    leases: Option<Arc<Leases>>,
    names: StreamNames,
    store: MetaStore,
    purged: PurgedStore,
}

impl std::fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("partitions", &self.parts.len())
            .finish()
    }
}

impl JetStreamLog {
    /// Connects, verifies fsync (unless opted out), and opens or creates
    /// every partition's streams and metadata.
    pub async fn open(config: JetStreamConfig) -> Result<Arc<JetStreamLog>, LogError> {
        // Servers that are starting (with this hub, or after a region
        // came back) are waited for, for `retry_for`.
        let deadline = tokio::time::Instant::now() + config.retry_for;
        let client = config::connect_verified(&config, deadline).await?;
        let info = client.server_info();
        let max_message = info.max_payload;
        if max_message == 0 {
            return Err(LogError::Io(
                "the JetStream server announced no message limit".to_string(),
            ));
        }
        let js = jetstream::new(client);
        let names = StreamNames {
            prefix: config.prefix.clone(),
        };
        let kv = meta::open_bucket(&js, &names.bucket(), config.replicas, deadline).await?;
        let purged = PurgedStore::new(
            meta::open_bucket(&js, &names.purged(), config.replicas, deadline).await?,
        );
        let store = MetaStore::new(kv);
        let mut parts = Vec::new();
        let mut writers = Vec::new();
        for p in 0..config.partitions {
            let p = PartitionId(p);
            let (part, mut writer) = open_partition(&js, &names, &store, &config, p).await?;
            writer.max_message = max_message;
            writer.owned = config.hub_id.is_none();
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(writer.run(rx));
            parts.push(part);
            writers.push(tx);
        }
        if !config.allow_unsynced {
            tokio::spawn(config::fsync_recheck_loop(
                config.clone(),
                writers
                    .iter()
                    .map(mpsc::UnboundedSender::downgrade)
                    .collect(),
                config.fsync_recheck,
            ));
        }
        if !config.retention.is_off() {
            tokio::spawn(retention::retention_loop(
                parts.iter().map(Arc::downgrade).collect(),
                store.clone(),
                purged.clone(),
                writers
                    .iter()
                    .map(mpsc::UnboundedSender::downgrade)
                    .collect(),
                config.retention,
                config.retention_check,
            ));
        }
        let leases = match &config.hub_id {
            Some(me) => Some(Arc::new(
                Leases::open(
                    &js,
                    &names.leases(),
                    config.replicas,
                    me,
                    config.lease_ttl,
                    deadline,
                )
                .await?,
            )),
            None => None,
        };
        Ok(Arc::new(JetStreamLog {
            parts,
            writers,
            max_message,
            leases,
            names,
            store,
            purged,
        }))
    }

    /// One retention pass over every partition under `policy` now (the
    /// background pass runs every `retention_check`): how many records went.
    ///
    /// # Errors
    /// When a partition cannot be looked at or its metadata not updated.
    pub async fn retain_now(&self, policy: RetentionPolicy) -> LogResult<u64> {
        let mut total = 0;
        for (part, writer) in self.parts.iter().zip(&self.writers) {
            total += retention::retain_partition(part, &self.store, &self.purged, writer, policy)
                .await?;
        }
        Ok(total)
    }

    /// The partitions' leases, when several hubs share the log.
    pub fn leases(&self) -> Option<Arc<Leases>> {
        self.leases.clone()
    }

    /// The largest payload a record may have here: the servers' message
    /// limit less a frame's fields and the headers.
    pub fn max_payload(&self) -> usize {
        self.max_message.saturating_sub(MESSAGE_OVERHEAD)
    }

    fn part(&self, p: PartitionId) -> LogResult<&Arc<Part>> {
        self.parts
            .get(p.0 as usize)
            .ok_or(LogError::NoSuchPartition(p))
    }

    fn call<T: Send + 'static>(
        &self,
        p: PartitionId,
        make: impl FnOnce(oneshot::Sender<LogResult<T>>) -> Cmd,
    ) -> BoxFuture<'static, LogResult<T>> {
        let Some(tx) = self.writers.get(p.0 as usize) else {
            return futures::future::ready(Err(LogError::NoSuchPartition(p))).boxed();
        };
        let (reply, rx) = oneshot::channel();
        if tx.send(make(reply)).is_err() {
            return futures::future::ready(Err(LogError::Closed)).boxed();
        }
        async move { rx.await.unwrap_or(Err(LogError::Closed)) }.boxed()
    }
}

async fn open_partition(
    js: &jetstream::Context,
    names: &StreamNames,
    store: &MetaStore,
    config: &JetStreamConfig,
    p: PartitionId,
) -> LogResult<(Arc<Part>, Writer)> {
    let io = |what: String| {
        move |e: Box<dyn std::error::Error + Send + Sync>| LogError::Io(format!("{what}: {e}"))
    };
    let (meta, revision) = load_or_create(js, names, store, config, p).await?;
    // A cluster that has just restarted answers before its streams have
    // leaders again: lookups are retried for `retry_for`.
    let deadline = tokio::time::Instant::now() + config.retry_for;
    let mut streams = HashMap::new();
    for &(generation, _) in &meta.gens {
        let name = names.stream(p, generation);
        let s = retrying(&name, deadline, || async {
            js.get_stream(&name)
                .await
                .map_err(|e| io(format!("stream {name}"))(e.into()))
        })
        .await?;
        streams.insert(generation, s);
    }
    let (current, _) = meta.current_gen();
    let stream = streams[&current].clone();
    let info = retrying(&names.stream(p, current), deadline, || {
        let mut stream = stream.clone();
        let name = names.stream(p, current);
        async move {
            stream
                .info()
                .await
                .cloned()
                .map_err(|e| io(format!("stream {name}"))(e.into()))
        }
    })
    .await?;
    let hw = info.state.last_sequence;
    check_stream(&info.config, config.replicas)
        .map_err(|why| LogError::Io(format!("stream {}: {why}", info.config.name)))?;
    let sealed = info.config.sealed;
    let part = Arc::new(Part {
        id: p,
        view: RwLock::new((meta.clone(), Offset(hw))),
        streams: RwLock::new(streams),
        hw: watch::Sender::new(Offset(hw)),
        failure: Mutex::new(None),
        floor: AtomicU64::new(0),
    });
    let mut writer = Writer::new(
        part.clone(),
        js.clone(),
        names.clone(),
        store.clone(),
        (meta.clone(), revision),
        stream,
        hw,
        config.retry_for,
        config.replicas,
    );
    // Epochs noted before a first record that never became durable.
    if meta.epochs.iter().any(|(_, start)| *start >= hw) {
        let mut fixed = meta;
        fixed.epochs.retain(|(_, start)| *start < hw);
        fixed.writer = writer.writer_id.to_string();
        let deadline = tokio::time::Instant::now() + config.retry_for;
        let rev = store.update(p, &fixed, revision, deadline).await?;
        writer.meta = fixed.clone();
        writer.revision = rev;
        part.set_meta(fixed);
    }
    // The history's last epoch must be the one its first record carries:
    // otherwise two writers interleaved and the history cannot be trusted.
    if let Some(&(epoch, start)) = writer.meta.epochs.last()
        && start >= writer.meta.start
    {
        let one = ReadLimits {
            max_records: 1,
            max_bytes: usize::MAX,
        };
        if let Some(r) = part.read(Offset(start), one).await?.first()
            && r.record.epoch.0 != epoch
        {
            return Err(LogError::Corrupt {
                partition: p,
                offset: Offset(start),
                detail: format!(
                    "the epoch history starts epoch {epoch} here, the record is of epoch {} (a second writer?)",
                    r.record.epoch.0
                ),
            });
        }
    }
    if sealed {
        writer.roll().await?;
    }
    collect_generations(js, names, p, &writer.meta).await;
    Ok((part, writer))
}

/// An interval for a background pass every `every`, its immediate first
/// tick taken (the first pass comes one period after start).
async fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    tick
}

/// `f` until it succeeds or `deadline` passes (then its last error).
async fn retrying<T, F, Fut>(what: &str, deadline: tokio::time::Instant, mut f: F) -> LogResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = LogResult<T>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(err) => {
                if tokio::time::Instant::now() + pause > deadline {
                    return Err(err);
                }
                tracing::warn!(what, error = %err, "jetstream not ready; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The partition's metadata, created with generation 0 when there is none
/// (by this hub or, racing, another). Transient errors (a bucket or stream
/// that has no leader yet) are retried for `retry_for`.
async fn load_or_create(
    js: &jetstream::Context,
    names: &StreamNames,
    store: &MetaStore,
    config: &JetStreamConfig,
    p: PartitionId,
) -> LogResult<(PartMeta, u64)> {
    let deadline = tokio::time::Instant::now() + config.retry_for;
    let mut pause = Duration::from_millis(50);
    loop {
        let err = match store.load(p).await {
            Ok(Some(found)) => return Ok(found),
            Ok(None) => {
                let cfg = names.config(p, 0, config.replicas, 0);
                let meta = PartMeta {
                    gens: vec![(0, 0)],
                    epochs: Vec::new(),
                    start: 0,
                    claimed: 0,
                    writer: String::new(),
                };
                match js.get_or_create_stream(cfg).await {
                    Err(e) => LogError::Io(format!("create stream {}: {e}", names.stream(p, 0))),
                    // An error here may be another hub's create winning:
                    // the next load tells.
                    Ok(_) => match store.create(p, &meta).await {
                        Ok(rev) => return Ok((meta, rev)),
                        Err(e) => e,
                    },
                }
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() + pause > deadline {
            return Err(err);
        }
        tracing::warn!(partition = %p, error = %err, "jetstream partition metadata not ready; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Deletes partition `p`'s streams of generations that `meta` no longer
/// lists (cut away, skipped, or claimed by an interrupted cut or roll).
/// Best effort: a leftover only costs disk.
async fn collect_generations(
    js: &jetstream::Context,
    names: &StreamNames,
    p: PartitionId,
    meta: &PartMeta,
) {
    use futures::TryStreamExt;
    let stem = format!("{}_p{}_g", names.prefix, p.0);
    let highest = meta.claimed.max(meta.current_gen().0);
    let mut found = Vec::new();
    let mut all = js.stream_names();
    loop {
        match all.try_next().await {
            Ok(Some(name)) => {
                if let Some(g) = name.strip_prefix(&stem).and_then(|g| g.parse::<u32>().ok())
                    && g <= highest
                    && !meta.gens.iter().any(|(x, _)| *x == g)
                {
                    found.push(name);
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(partition = %p, error = %e, "listing jetstream streams failed; old generations stay");
                return;
            }
        }
    }
    for name in found {
        match js.delete_stream(&name).await {
            Ok(_) => {
                tracing::info!(partition = %p, stream = %name, "deleted a stream no generation uses")
            }
            Err(e) => {
                tracing::warn!(partition = %p, stream = %name, error = %e, "could not delete an unused stream")
            }
        }
    }
}

/// Refuses a stream whose configuration could drop or lose records.
fn check_stream(c: &stream::Config, replicas: usize) -> Result<(), String> {
    if c.storage != stream::StorageType::File {
        return Err("not file storage: acknowledged records would not survive a restart".into());
    }
    if c.num_replicas != replicas {
        return Err(format!(
            "{} replica(s), the log wants {replicas}",
            c.num_replicas
        ));
    }
    if c.max_age != Duration::ZERO
        || c.max_messages > 0
        || c.max_bytes > 0
        || c.max_messages_per_subject > 0
    {
        return Err("limits (max_age, max_msgs, max_bytes) would delete records".into());
    }
    if !c.allow_direct {
        return Err("allow_direct is off".into());
    }
    Ok(())
}

impl EventLog for JetStreamLog {
    fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }

    fn append(&self, p: PartitionId, rec: NewRecord) -> BoxFuture<'static, LogResult<Offset>> {
        self.call(p, |reply| Cmd::Append { rec, reply })
    }

    fn flush(&self, p: PartitionId) -> BoxFuture<'static, LogResult<()>> {
        self.call(p, |reply| Cmd::Flush { reply })
    }

    fn read(
        &self,
        p: PartitionId,
        from: Offset,
        limits: ReadLimits,
    ) -> BoxFuture<'_, LogResult<Vec<Record>>> {
        async move { self.part(p)?.read(from, limits).await }.boxed()
    }

    fn high_watermark(&self, p: PartitionId) -> Offset {
        self.part(p).map_or(Offset(0), |part| part.snapshot().1)
    }

    fn log_start(&self, p: PartitionId) -> Offset {
        self.part(p)
            .map_or(Offset(0), |part| Offset(part.meta().start))
    }

    fn watch(&self, p: PartitionId) -> watch::Receiver<Offset> {
        match self.part(p) {
            Ok(part) => part.hw.subscribe(),
            Err(_) => watch::channel(Offset(0)).1,
        }
    }

    fn partition_failure(&self, p: PartitionId) -> Option<String> {
        self.part(p)
            .ok()?
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn health(&self) -> Result<(), Vec<String>> {
        let bad: Vec<String> = (0..self.partitions())
            .filter_map(|p| {
                self.partition_failure(PartitionId(p))
                    .map(|why| format!("partition {p}: {why}"))
            })
            .collect();
        if bad.is_empty() { Ok(()) } else { Err(bad) }
    }

    fn cut_and_archive(
        &self,
        p: PartitionId,
        from: Offset,
        archive: PathBuf,
    ) -> BoxFuture<'static, LogResult<u64>> {
        self.call(p, |reply| Cmd::Cut {
            from,
            archive,
            reply,
        })
    }

    fn epoch_history(&self, p: PartitionId) -> Vec<(Epoch, Offset)> {
        self.part(p)
            .map_or(Vec::new(), |part| part.meta().history())
    }

    fn skip_to(
        &self,
        p: PartitionId,
        base: Offset,
        history: Vec<(Epoch, Offset)>,
    ) -> BoxFuture<'static, LogResult<u64>> {
        // What the skip drops goes as a purge does: its devices' last mids
        // are kept first (a takeover of this shared log learns them).
        let (Ok(part), Some(writer)) = (self.part(p), self.writers.get(p.0 as usize)) else {
            return futures::future::ready(Err(LogError::NoSuchPartition(p))).boxed();
        };
        let (part, writer) = (part.clone(), writer.clone());
        let (store, purged) = (self.store.clone(), self.purged.clone());
        async move {
            let (meta, hw) = part.snapshot();
            part.note_purged(&store, &purged, meta.start, hw.0).await?;
            let (reply, rx) = oneshot::channel();
            writer
                .send(Cmd::Skip {
                    base,
                    history,
                    reply,
                })
                .map_err(|_| LogError::Closed)?;
            rx.await.unwrap_or(Err(LogError::Closed))
        }
        .boxed()
    }

    fn last_of(
        &self,
        p: PartitionId,
        device: &fleet_api::DeviceId,
    ) -> BoxFuture<'_, LogResult<Option<Record>>> {
        let device = device.clone();
        async move { self.part(p)?.last_of(&self.names, device.as_str()).await }.boxed()
    }

    fn purged_last(
        &self,
        p: PartitionId,
        device: &fleet_api::DeviceId,
    ) -> BoxFuture<'_, LogResult<Option<(fleet_api::Mid, Offset)>>> {
        let device = device.clone();
        async move {
            self.part(p)?
                .purged_last(&self.purged, device.as_str())
                .await
        }
        .boxed()
    }

    fn reload(&self, p: PartitionId, own: bool) -> BoxFuture<'static, LogResult<()>> {
        self.call(p, |reply| Cmd::Reload { own, reply })
    }

    fn set_retention_floor(&self, p: PartitionId, offset: Offset) {
        if let Ok(part) = self.part(p) {
            retention::set_floor(part, p, offset.0);
        }
    }
}
