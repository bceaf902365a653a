//! Each partition's metadata in a JetStream key-value bucket, changed only
//! by compare-and-set: which streams (generations) hold which offsets, the
//! epoch history, and where the retained log starts.
//!
//! A partition is a chain of streams. Offset `o` is sequence `o + 1` of the
//! newest generation whose first offset is `<= o`. A failback cut or a skip
//! starts a new generation (a stream created with `first_sequence`), since
//! JetStream cannot take back the tail of a stream and reuse its sequences.

use async_nats::jetstream::kv;
use bytes::Bytes;
use fleet_api::{Epoch, Offset, PartitionId};
use serde::{Deserialize, Serialize};

use crate::log::{LogError, LogResult};

/// What the bucket holds for one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PartMeta {
    /// `(generation, first offset)`, oldest first.
    pub gens: Vec<(u32, u64)>,
    /// `(epoch, start offset)`, oldest first, epochs strictly increasing.
    pub epochs: Vec<(u64, u64)>,
    /// The first retained offset.
    pub start: u64,
    /// The highest generation ever claimed (its stream may exist before
    /// it joins `gens`): a writer creates or deletes only a stream it
    /// claimed here by compare-and-set.
    #[serde(default)]
    pub claimed: u32,
    /// A nonce of the writer that stored this entry: an unanswered update
    /// is recognised as one's own only by it (two writers can compute
    /// identical metadata).
    #[serde(default)]
    pub writer: String,
}

impl PartMeta {
    pub fn current_gen(&self) -> (u32, u64) {
        *self.gens.last().expect("a partition has a generation")
    }

    pub fn history(&self) -> Vec<(Epoch, Offset)> {
        self.epochs
            .iter()
            .map(|&(e, o)| (Epoch(e), Offset(o)))
            .collect()
    }

    /// The generation holding `offset`.
    pub fn gen_of(&self, offset: u64) -> (u32, u64) {
        *self
            .gens
            .iter()
            .rev()
            .find(|(_, first)| *first <= offset)
            .unwrap_or(&self.gens[0])
    }
}

/// The bucket, keyed `p{N}`.
#[derive(Clone)]
pub(super) struct MetaStore {
    kv: kv::Store,
}

fn key(p: PartitionId) -> String {
    format!("p{}", p.0)
}

fn io(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Io(format!("jetstream metadata: {what}: {e}"))
}

impl MetaStore {
    pub fn new(kv: kv::Store) -> MetaStore {
        MetaStore { kv }
    }

    /// The partition's metadata and its revision, if any, read from the
    /// bucket's leader (a replica answering a direct get may lag).
    pub async fn load(&self, p: PartitionId) -> LogResult<Option<(PartMeta, u64)>> {
        let Some(m) = leader_entry(&self.kv, &key(p))
            .await
            .map_err(|e| io("read", e))?
        else {
            return Ok(None);
        };
        let meta: PartMeta =
            serde_json::from_slice(&m.payload).map_err(|err| LogError::Corrupt {
                partition: p,
                offset: Offset(0),
                detail: format!("metadata p{} is not valid: {err}", p.0),
            })?;
        Ok(Some((meta, m.sequence)))
    }

    /// Creates the partition's entry; fails if it exists.
    pub async fn create(&self, p: PartitionId, meta: &PartMeta) -> LogResult<u64> {
        self.kv
            .create(key(p), encode(meta))
            .await
            .map_err(|e| io("create", e))
    }

    /// Replaces the entry if it is still at `revision`; returns the new one.
    /// Transient errors are retried until `deadline`; after an ambiguous
    /// one (a timeout), an entry holding exactly `meta` is our own write.
    /// A mismatch means another writer changed the partition: fatal for
    /// this writer (it no longer knows the truth).
    pub async fn update(
        &self,
        p: PartitionId,
        meta: &PartMeta,
        revision: u64,
        deadline: tokio::time::Instant,
    ) -> LogResult<u64> {
        let fenced = |detail: String| LogError::Failed {
            partition: p,
            reason: format!("metadata changed by another writer (fenced): {detail}"),
        };
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            let err = match self.kv.update(key(p), encode(meta), revision).await {
                Ok(rev) => return Ok(rev),
                Err(e) => e,
            };
            if super::shared::lost_race(&err) {
                // Our earlier, unanswered attempt may be what moved it: then
                // the entry is ours, nonce included.
                match self.load(p).await {
                    Ok(Some((now, rev))) if &now == meta && !meta.writer.is_empty() => {
                        return Ok(rev);
                    }
                    Ok(_) => return Err(fenced(err.to_string())),
                    Err(e) if tokio::time::Instant::now() + pause <= deadline => {
                        tracing::warn!(partition = %p, error = %e, "jetstream metadata read failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(1));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(io("update", err));
            }
            tracing::warn!(partition = %p, error = %err, "jetstream metadata update failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    }
}

fn encode(meta: &PartMeta) -> Bytes {
    Bytes::from(serde_json::to_vec(meta).expect("metadata serializes"))
}

/// The key-value bucket `name` (`replicas` replicas on file storage, one
/// value per key), created when missing; one found with other settings is
/// refused.
pub(super) async fn open_bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    replicas: usize,
    deadline: tokio::time::Instant,
) -> LogResult<kv::Store> {
    use async_nats::jetstream::stream::StorageType;
    let config = kv::Config {
        bucket: name.to_string(),
        history: 1,
        num_replicas: replicas,
        storage: StorageType::File,
        ..Default::default()
    };
    let kv = super::retrying(name, deadline, || async {
        match js.get_key_value(name).await {
            Ok(kv) => Ok(kv),
            Err(_) => match js.create_key_value(config.clone()).await {
                Ok(kv) => Ok(kv),
                // Created meanwhile by another hub.
                Err(e) => js
                    .get_key_value(name)
                    .await
                    .map_err(|_| LogError::Io(format!("create bucket {name}: {e}"))),
            },
        }
    })
    .await?;
    let found = &kv.stream.cached_info().config;
    if found.storage != StorageType::File || found.num_replicas != replicas {
        return Err(LogError::Io(format!(
            "bucket {name}: {} replica(s) on {:?} storage; the log wants {replicas} on file storage",
            found.num_replicas, found.storage
        )));
    }
    Ok(kv)
}

/// The last message of `key` in bucket `kv`, read from the bucket's leader
/// (a replica answering a direct get may lag behind a write just made).
/// Bounded: async-nats waits without bound to hand a request to a client
/// that is reconnecting with its queue full, and a partition's writer (an
/// epoch noted before an append) waits on this.
pub(super) async fn leader_entry(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{key}", kv.prefix);
    let read = kv.stream.get_last_raw_message_by_subject(&subject);
    match tokio::time::timeout(super::NATS_WAIT, read).await {
        Ok(Ok(m)) => Ok(Some(m)),
        Ok(Err(e)) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", super::NATS_WAIT)),
    }
}
