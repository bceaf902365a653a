//! One task per partition appends to the partition's current stream.
//!
//! Appends are pipelined, yet each publish carries the sequence the stream
//! must end at before it (`Nats-Expected-Last-Sequence`), and its body
//! starts with this writer's id (`body.rs`). So offsets are exactly call
//! order: if one publish is lost, every later one is refused by the server
//! rather than stored out of order (a device's later mid can never be
//! stored, then its earlier one dropped as a "duplicate"). After any error
//! the writer confirms the unconfirmed publishes one by one, in order, with
//! the same body: a resend of a stored one is refused (the stream moved past
//! its expected sequence), and the message stored at its offset is read
//! back: with this body (this writer's id, this offset) it is ours, with
//! another a second writer appended and the partition fails (it is fenced).
//!
//! The id is not `Nats-Msg-Id`: the servers' de-duplication would keep
//! every id of the last two minutes in memory and check it on every
//! publish, for nothing the expected sequence does not already guarantee
//! (measured by `fleet bench ingest --log jetstream`: see the README).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use fleet_api::{Epoch, Offset, PartitionId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::body::{self, WriterId};
use super::meta::{MetaStore, PartMeta};
use super::{Part, StreamNames};
use crate::log::{LogError, LogResult, NewRecord, ReadLimits, frame};

mod acks;
mod inflight;
mod reload;

use acks::{Acks, Answer};

/// Publishes awaiting acknowledgement per partition; more wait in the
/// channel. Bounds memory and what one resync must confirm.
const MAX_INFLIGHT: usize = 4096;

pub(super) enum Cmd {
    Append {
        rec: NewRecord,
        reply: oneshot::Sender<LogResult<Offset>>,
    },
    Flush {
        reply: oneshot::Sender<LogResult<()>>,
    },
    Cut {
        from: Offset,
        archive: PathBuf,
        reply: oneshot::Sender<LogResult<u64>>,
    },
    Skip {
        base: Offset,
        history: Vec<(Epoch, Offset)>,
        reply: oneshot::Sender<LogResult<u64>>,
    },
    /// Refuse writes from now on (the servers can no longer be trusted).
    Fail { why: String },
    /// Purge the records below `upto` (retention); replies how many went.
    Retain {
        /// The start the purged devices' mids were kept from: a writer
        /// whose start moved since (a cut, a skip, another hub) purges
        /// nothing.
        from: u64,
        upto: u64,
        reply: oneshot::Sender<LogResult<u64>>,
    },
    /// Reload the partition from the servers (another hub may have written
    /// it); `own`: write it from now on, else refuse appends.
    Reload {
        own: bool,
        reply: oneshot::Sender<LogResult<()>>,
    },
}

/// A publish not yet known to be stored.
struct Item {
    offset: u64,
    subject: async_nats::Subject,
    /// This writer's id, then the record's frame.
    body: Bytes,
    reply: oneshot::Sender<LogResult<Offset>>,
    flushes: Vec<oneshot::Sender<LogResult<()>>>,
    /// The servers' answer, once it came (answers come in any order).
    answer: Option<Answer>,
    /// The tick it was sent at.
    sent: u64,
}

pub(super) struct Writer {
    pub part: Arc<Part>,
    pub js: jetstream::Context,
    pub names: StreamNames,
    pub store: MetaStore,
    pub meta: PartMeta,
    pub revision: u64,
    pub stream: stream::Stream,
    /// The offset the next append gets.
    pub next: u64,
    /// Distinguishes this writer's messages from any other's.
    pub writer_id: WriterId,
    pub retry_for: Duration,
    pub replicas: usize,
    /// The servers' largest message.
    pub max_message: usize,
    inflight: VecDeque<Item>,
    acks: Acks,
    failed: Option<String>,
    /// The failure cannot be reloaded away (the servers do not fsync).
    sticky: bool,
    /// This hub writes the partition (always, unless the log is shared by
    /// several hubs: then from a takeover's reload on).
    pub owned: bool,
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        part: Arc<Part>,
        js: jetstream::Context,
        names: StreamNames,
        store: MetaStore,
        (meta, revision): (PartMeta, u64),
        stream: stream::Stream,
        next: u64,
        retry_for: Duration,
        replicas: usize,
    ) -> Writer {
        Writer {
            part,
            acks: Acks::new(js.client()),
            js,
            names,
            store,
            meta,
            revision,
            stream,
            next,
            writer_id: WriterId::new(),
            retry_for,
            replicas,
            max_message: usize::MAX,
            inflight: VecDeque::new(),
            failed: None,
            sticky: false,
            owned: true,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            self.settle().await;
            tokio::select! {
                biased;
                event = self.acks.event(!self.inflight.is_empty()) => self.on_event(event),
                cmd = rx.recv(), if self.inflight.len() < MAX_INFLIGHT => match cmd {
                    Some(cmd) => {
                        self.handle(cmd).await;
                        // Send what else is queued before looking at acks.
                        while self.inflight.len() < MAX_INFLIGHT {
                            match rx.try_recv() {
                                Ok(cmd) => self.handle(cmd).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
            }
        }
        self.drain().await;
    }

    fn p(&self) -> PartitionId {
        self.part.id
    }

    fn refuse(&self) -> LogError {
        LogError::Failed {
            partition: self.p(),
            reason: self.failed.clone().unwrap_or_default(),
        }
    }

    fn not_owned(&self) -> LogError {
        LogError::Failed {
            partition: self.p(),
            reason: "another hub of the region writes this partition".to_string(),
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Append { rec, reply } => {
                if !self.owned {
                    let _ = reply.send(Err(self.not_owned()));
                    return;
                }
                if self.failed.is_some() {
                    let _ = reply.send(Err(self.refuse()));
                    return;
                }
                if let Err(e) = self.note_epoch(rec.epoch).await {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.publish(rec, reply).await;
            }
            Cmd::Flush { reply } => {
                if self.failed.is_some() {
                    let _ = reply.send(Err(self.refuse()));
                } else if let Some(last) = self.inflight.back_mut() {
                    last.flushes.push(reply);
                } else {
                    let _ = reply.send(Ok(()));
                }
            }
            Cmd::Cut {
                from,
                archive,
                reply,
            } => {
                let r = match self.quiesce().await {
                    Ok(()) if !self.owned => Err(self.not_owned()),
                    Ok(()) => self.cut(from, archive).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Cmd::Skip {
                base,
                history,
                reply,
            } => {
                let r = match self.quiesce().await {
                    Ok(()) if !self.owned => Err(self.not_owned()),
                    Ok(()) => self.skip(base, history).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Cmd::Fail { why } => {
                self.sticky = true;
                if self.failed.is_none() {
                    self.fail(why);
                }
            }
            Cmd::Retain { from, upto, reply } => {
                let r = match self.failed {
                    Some(_) => Err(self.refuse()),
                    // Only the partition's writer moves its start.
                    None if !self.owned => Ok(0),
                    None if self.meta.start != from => Ok(0),
                    None => self.retain(upto).await,
                };
                let _ = reply.send(r);
            }
            Cmd::Reload { own, reply } => {
                let r = self.reload(own).await;
                let _ = reply.send(r);
            }
        }
    }

    /// Moves the partition's start up to `upto` (never past the retention
    /// floor or what is confirmed stored), then purges the streams below
    /// it: the metadata first, so that a reader finds those offsets gone,
    /// never missing.
    async fn retain(&mut self, upto: u64) -> LogResult<u64> {
        let floor = self.part.floor.load(std::sync::atomic::Ordering::Acquire);
        let upto = upto.min(floor).min(self.part.snapshot().1.0);
        let old = self.meta.start;
        if upto <= old {
            return Ok(0);
        }
        let mut meta = self.meta.clone();
        meta.start = upto;
        // Generations wholly below the new start go; the one holding it stays.
        let (keep, _) = meta.gen_of(upto);
        meta.gens.retain(|(g, _)| *g >= keep);
        self.set_meta(meta).await?;
        let stream = self
            .part
            .stream(keep)
            .ok_or_else(|| LogError::Io(format!("generation {keep} has no stream")))?;
        // Keeps sequences from upto + 1 (offset upto) on.
        if let Err(e) = stream.purge().sequence(upto + 1).await {
            // The start has moved: what stays unpurged is only disk (not
            // counted by size), purged by the next purge, which takes all
            // below its point.
            tracing::warn!(partition = %self.p(), upto, error = %e, "jetstream purge failed; the next purge takes it");
        }
        super::collect_generations(&self.js, &self.names, self.p(), &self.meta).await;
        Ok(upto - old)
    }

    /// Writes `(epoch, next)` into the history before the first record of a
    /// newer epoch, so the history always covers the log.
    async fn note_epoch(&mut self, epoch: Epoch) -> LogResult<()> {
        let last = self.meta.epochs.last().map(|e| e.0);
        match last {
            Some(l) if epoch.0 == l => return Ok(()),
            Some(l) if epoch.0 < l => {
                // Epochs never decrease along a partition (the history could
                // not describe it), and the caller counted on this offset:
                // refusing it and going on would shift every later record.
                // Stricter than the file log, which records no entry then.
                self.fail(format!("append of epoch {} after epoch {l}", epoch.0));
                return Err(self.refuse());
            }
            _ => {}
        }
        let mut meta = self.meta.clone();
        meta.epochs.push((epoch.0, self.next));
        self.set_meta(meta).await
    }

    async fn set_meta(&mut self, mut meta: PartMeta) -> LogResult<()> {
        meta.writer = self.writer_id.to_string();
        let deadline = Instant::now() + self.retry_for;
        match self
            .store
            .update(self.p(), &meta, self.revision, deadline)
            .await
        {
            Ok(rev) => {
                self.revision = rev;
                self.meta = meta.clone();
                self.part.set_meta(meta);
                Ok(())
            }
            Err(e) => {
                self.fail(e.to_string());
                Err(e)
            }
        }
    }

    /// Sends the publish now (in call order) and queues its acknowledgement.
    async fn publish(&mut self, rec: NewRecord, reply: oneshot::Sender<LogResult<Offset>>) {
        let offset = self.next;
        if rec.payload.len() + super::MESSAGE_OVERHEAD > self.max_message {
            // The caller counted on this offset (a replicated record comes
            // with it): refusing it and going on would shift every later
            // record. Fail, as the file log does on a write it cannot make.
            self.fail(format!(
                "a record of {} bytes exceeds the JetStream servers' message limit ({} bytes)",
                rec.payload.len(),
                self.max_message
            ));
            let _ = reply.send(Err(self.refuse()));
            return;
        }
        let (generation, _) = self.meta.current_gen();
        let subject = self
            .names
            .subject(self.p(), generation, rec.device_id.as_str());
        let mut item = Item {
            offset,
            subject: subject.into(),
            body: body::encode(self.writer_id, Offset(offset), &rec),
            reply,
            flushes: Vec::new(),
            answer: None,
            sent: self.acks.ticks,
        };
        let sent = self
            .acks
            .send(
                item.subject.clone(),
                offset,
                headers(&item),
                item.body.clone(),
            )
            .await;
        let failed = sent.is_err();
        if let Err(e) = sent {
            tracing::warn!(partition = %self.p(), offset, error = %e, "jetstream publish not sent; confirming in order");
            item.answer = Some(Err(e));
        }
        self.inflight.push_back(item);
        self.next += 1;
        if failed {
            // Confirm now rather than hand the client more (each would wait
            // as long again): what is in flight is stored or the partition
            // fails, and later appends are refused at once.
            self.resync().await;
        }
    }
}

/// A publish's headers, made for each send rather than kept with the item:
/// they follow from it, and a copy per publish showed in the hub's profile.
fn headers(item: &Item) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut expected = String::with_capacity(20);
    super::push_u64(&mut expected, item.offset);
    headers.insert("Nats-Expected-Last-Sequence", expected.as_str());
    headers
}

impl Writer {
    fn fail(&mut self, why: String) {
        tracing::error!(partition = %self.p(), reason = %why, "jetstream partition refuses writes");
        self.failed = Some(why.clone());
        self.part.fail(why);
        self.acks.new_round();
        for item in self.inflight.drain(..) {
            let err = LogError::Failed {
                partition: self.part.id,
                reason: self.failed.clone().unwrap_or_default(),
            };
            let _ = item.reply.send(Err(err.clone()));
            for f in item.flushes {
                let _ = f.send(Err(err.clone()));
            }
        }
    }

    /// Archives `from..` and continues the partition at `from` in a new
    /// generation (the old stream keeps the cut records, unread).
    async fn cut(&mut self, from: Offset, archive: PathBuf) -> LogResult<u64> {
        if from.0 >= self.next {
            return Ok(0);
        }
        let lo = from.0.max(self.meta.start);
        let records = self
            .part
            .read(
                Offset(lo),
                ReadLimits {
                    max_records: usize::MAX,
                    max_bytes: usize::MAX,
                },
            )
            .await?;
        let mut buf = Vec::new();
        for r in &records {
            frame::encode(&mut buf, r.offset, &r.record);
        }
        let fs = fleet_api::storage::real();
        let io = |e: std::io::Error| LogError::Io(format!("{}: {e}", archive.display()));
        if let Some(dir) = archive.parent() {
            fleet_api::storage::create_dir_durable(&*fs, dir).map_err(io)?;
        }
        fleet_api::storage::write_new_durable(&*fs, &archive, &buf).map_err(io)?;
        let generation = self.new_generation(from.0).await?;
        let mut meta = self.meta.clone();
        if from.0 < meta.start {
            meta.gens.clear();
            meta.start = from.0;
        }
        // Generations that begin at or after the cut hold only cut records.
        meta.gens.retain(|(_, first)| *first < from.0);
        meta.gens.push((generation, from.0));
        meta.epochs.retain(|(_, start)| *start < from.0);
        self.switch(meta, generation, from.0).await?;
        super::collect_generations(&self.js, &self.names, self.p(), &self.meta).await;
        tracing::warn!(partition = %self.p(), %from, moved = records.len(), archive = %archive.display(), "cut the log back; the tail is archived");
        Ok(records.len() as u64)
    }

    /// Continues the partition in a new generation at the high watermark:
    /// the current stream is sealed (a cut interrupted between sealing and
    /// switching, or a second writer, left it so) and takes no more writes.
    pub async fn roll(&mut self) -> LogResult<()> {
        let next = self.next;
        let generation = self.new_generation(next).await?;
        let mut meta = self.meta.clone();
        meta.gens.push((generation, next));
        self.switch(meta, generation, next).await?;
        tracing::warn!(partition = %self.p(), at = next, "the partition's stream was sealed; continuing in a new generation");
        Ok(())
    }

    /// Empties the partition and continues it at `base`.
    async fn skip(&mut self, base: Offset, history: Vec<(Epoch, Offset)>) -> LogResult<u64> {
        if base.0 < self.next {
            return Err(LogError::Failed {
                partition: self.p(),
                reason: format!("skip to {base} below the high watermark {}", self.next),
            });
        }
        let dropped = self.next - self.meta.start;
        let generation = self.new_generation(base.0).await?;
        let meta = PartMeta {
            gens: vec![(generation, base.0)],
            epochs: history
                .iter()
                .filter(|(_, o)| *o < base)
                .map(|(e, o)| (e.0, o.0))
                .collect(),
            start: base.0,
            claimed: generation,
            writer: String::new(),
        };
        self.switch(meta, generation, base.0).await?;
        super::collect_generations(&self.js, &self.names, self.p(), &self.meta).await;
        Ok(dropped)
    }

    /// Claims the next generation in the metadata (compare-and-set: a
    /// stale writer fails here, before it touches any stream), then creates
    /// its stream starting at `first` (replacing a leftover of an
    /// interrupted claim, which only this claim can own).
    async fn new_generation(&mut self, first: u64) -> LogResult<u32> {
        let generation = self
            .meta
            .claimed
            .max(self.meta.current_gen().0)
            .checked_add(1)
            .ok_or_else(|| LogError::Failed {
                partition: self.p(),
                reason: "generation numbers exhausted".to_string(),
            })?;
        let mut meta = self.meta.clone();
        meta.claimed = generation;
        self.set_meta(meta).await?;
        let name = self.names.stream(self.p(), generation);
        let _ = self.js.delete_stream(&name).await;
        let config = self
            .names
            .config(self.p(), generation, self.replicas, first);
        // Placement can fail for a moment (a peer that looks offline).
        let deadline = Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.js.create_stream(config.clone()).await {
                Ok(_) => return Ok(generation),
                Err(e) if Instant::now() + pause <= deadline => {
                    tracing::warn!(partition = %self.p(), stream = %name, error = %e, "create stream failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(LogError::Io(format!("create stream {name}: {e}"))),
            }
        }
    }

    /// Seals the current stream (a stale writer's publishes are refused
    /// there from now on), checks that nothing landed in it behind this
    /// writer's back, then switches the metadata and the view. Any failure
    /// after the seal fails the partition (a restart rolls on).
    async fn switch(&mut self, mut meta: PartMeta, generation: u32, next: u64) -> LogResult<()> {
        let old = self.names.stream(self.p(), self.meta.current_gen().0);
        let mut config = self
            .stream
            .info()
            .await
            .map_err(|e| LogError::Io(format!("stream {old}: {e}")))?
            .config
            .clone();
        if !config.sealed {
            config.sealed = true;
            if let Err(e) = self.js.update_stream(config).await {
                let e = LogError::Io(format!("seal stream {old}: {e}"));
                self.fail(e.to_string());
                return Err(e);
            }
        }
        let stream = match self.after_seal(&old, generation, next).await {
            Ok(stream) => stream,
            Err(e) => {
                self.fail(e.to_string());
                return Err(e);
            }
        };
        meta.writer = self.writer_id.to_string();
        let deadline = Instant::now() + self.retry_for;
        match self
            .store
            .update(self.p(), &meta, self.revision, deadline)
            .await
        {
            Ok(rev) => self.revision = rev,
            Err(e) => {
                self.fail(e.to_string());
                return Err(e);
            }
        }
        self.part.add_stream(generation, stream.clone());
        self.meta = meta.clone();
        self.part.switch(meta, Offset(next));
        self.stream = stream;
        self.next = next;
        Ok(())
    }

    /// The checks between sealing the old stream and switching: the old
    /// one ends where this writer believes (no stale writer appended after
    /// this writer's last record), and the new one starts at `next`, empty.
    async fn after_seal(
        &mut self,
        old: &str,
        generation: u32,
        next: u64,
    ) -> LogResult<stream::Stream> {
        let last = self
            .stream
            .info()
            .await
            .map_err(|e| LogError::Io(format!("stream {old}: {e}")))?
            .state
            .last_sequence;
        if last != self.next {
            return Err(LogError::Failed {
                partition: self.p(),
                reason: format!(
                    "stream {old} ends at offset {last}, this writer at {}: another writer appended (fenced)",
                    self.next
                ),
            });
        }
        let name = self.names.stream(self.p(), generation);
        let mut stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| LogError::Io(format!("stream {name}: {e}")))?;
        let state = stream
            .info()
            .await
            .map_err(|e| LogError::Io(format!("stream {name}: {e}")))?
            .state
            .clone();
        if state.messages != 0 || state.last_sequence != next {
            return Err(LogError::Failed {
                partition: self.p(),
                reason: format!(
                    "new stream {name} holds {} records up to {}, expected none before {next} (another writer?)",
                    state.messages, state.last_sequence
                ),
            });
        }
        Ok(stream)
    }
}
