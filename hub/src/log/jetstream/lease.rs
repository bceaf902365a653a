//! Leases on a shared log's partitions, in a JetStream key-value bucket
//! (`{prefix}_leases`): which hub of the region writes which partition.
//!
//! - `m.{hub}`: every hub puts its heartbeat here every few hundred ms. A hub
//!   counts as live while this key changes; liveness is judged by each
//!   observer's own clock (when *it* saw the key change), so hubs need no
//!   synchronized clocks.
//! - `p.{N}`: the holder of partition N's lease. Taken only by
//!   compare-and-set: created when absent, or replaced at the revision seen
//!   when its holder stopped beating. Released by a delete at the revision.
//!
//! A lease only says who *should* write. What keeps two writers from both
//! storing is the stream itself: every publish expects the stream's last
//! sequence, so a hub that still believes it holds a lease it lost fails its
//! next append instead of storing it (and nothing it stored is acknowledged
//! unless it was stored in order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use fleet_api::PartitionId;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::log::{LogError, LogResult};

/// One hub as this one has seen it.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// When this watch first saw it.
    first: Instant,
    /// When its heartbeat last changed.
    last: Instant,
    /// The heartbeat's revision then.
    revision: u64,
}

/// What this hub has seen of the bucket.
#[derive(Debug, Default)]
pub(super) struct View {
    members: HashMap<String, Member>,
    /// Per partition: the holder and the lease's revision.
    holders: HashMap<u32, (String, u64)>,
    /// Since when the current watch has been running.
    watching_since: Option<Instant>,
    /// Region-wide values (`s.…`): the region's role, fence answers.
    pub(super) shared: HashMap<String, (Bytes, u64)>,
}

/// The leases as seen now.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// Hubs whose heartbeat changed within the lease time (this one always).
    pub live: Vec<String>,
    /// Live hubs heard for at least the lease time (steady members).
    pub steady: Vec<String>,
    /// Per partition: the holder and the lease's revision.
    pub holders: HashMap<u32, (String, u64)>,
    /// The bucket has been watched for at least the lease time: a holder
    /// not heard from is dead, not merely not yet seen.
    pub settled: bool,
}

/// The lease bucket of one shared log, as one hub uses it.
#[derive(Debug)]
pub struct Leases {
    pub(super) kv: kv::Store,
    me: String,
    /// Written into every heartbeat: a second process beating under the
    /// same hub id is noticed.
    nonce: String,
    pub(super) view: Arc<Mutex<View>>,
    /// Bumped whenever a region-wide value (`s.…`) changes.
    pub(super) shared_changed: watch::Sender<u64>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Leases {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

pub(super) fn io(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Io(format!("jetstream leases: {what}: {e}"))
}

fn lease_key(p: PartitionId) -> String {
    format!("p.{}", p.0)
}

/// A hub id: 1–64 of `[A-Za-z0-9_-]` (it is a key token in the bucket).
pub fn valid_hub_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Leases {
    /// Opens (or creates) the bucket and starts watching it.
    pub(super) async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        me: &str,
        ttl: Duration,
        deadline: Instant,
    ) -> LogResult<Leases> {
        if !valid_hub_id(me) {
            return Err(LogError::Io(format!(
                "hub id {me:?}: expected 1-64 of A-Z a-z 0-9 _ -"
            )));
        }
        let config = kv::Config {
            bucket: bucket.to_string(),
            history: 1,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let kv = super::retrying(bucket, deadline, || async {
            match js.get_key_value(bucket).await {
                Ok(kv) => Ok(kv),
                Err(_) => match js.create_key_value(config.clone()).await {
                    Ok(kv) => Ok(kv),
                    Err(e) => js
                        .get_key_value(bucket)
                        .await
                        .map_err(|_| io(&format!("create bucket {bucket}"), e)),
                },
            }
        })
        .await?;
        // A hub id another live process beats under would make both
        // hubs take each other's partitions for their own.
        let beat_key = format!("m.{me}");
        if let Ok(Some(before)) = kv.entry(&beat_key).await
            && before.operation == kv::Operation::Put
        {
            tokio::time::sleep(ttl).await;
            if let Ok(Some(after)) = kv.entry(&beat_key).await
                && after.revision != before.revision
            {
                return Err(LogError::Io(format!(
                    "hub id {me:?} is in use by another live hub of the region; give each hub its own --hub-id"
                )));
            }
        }
        let nonce = format!("{:016x}", rand::random::<u64>());
        let view = Arc::new(Mutex::new(View::default()));
        let shared_changed = watch::Sender::new(0);
        let watcher = tokio::spawn(follow(
            kv.clone(),
            view.clone(),
            shared_changed.clone(),
            me.to_string(),
            nonce.clone(),
        ));
        let leases = Leases {
            kv,
            me: me.to_string(),
            nonce,
            view,
            shared_changed,
            watcher,
        };
        leases.beat().await?;
        Ok(leases)
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Says this hub is alive.
    ///
    /// # Errors
    /// When the bucket cannot be written.
    pub async fn beat(&self) -> LogResult<()> {
        let value = format!("{} {}", self.nonce, registry_sync::hlc::wall_ms());
        self.kv
            .put(format!("m.{}", self.me), Bytes::from(value))
            .await
            .map(|_| ())
            .map_err(|e| io("heartbeat", e))
    }

    /// The leases and members as seen now; `ttl`: how long a silent hub
    /// still counts as live.
    pub fn placement(&self, ttl: Duration) -> Placement {
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut live: Vec<String> = view
            .members
            .iter()
            .filter(|(_, m)| now.duration_since(m.last) < ttl)
            .map(|(id, _)| id.clone())
            .collect();
        let mut steady: Vec<String> = view
            .members
            .iter()
            .filter(|(_, m)| now.duration_since(m.last) < ttl && now.duration_since(m.first) >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        // This hub's own heartbeats coming back through the watch prove the
        // view current; without them, silence of others proves nothing.
        let current = view
            .members
            .get(&self.me)
            .is_some_and(|m| now.duration_since(m.last) < ttl);
        if !live.contains(&self.me) {
            live.push(self.me.clone());
        }
        live.sort();
        steady.sort();
        Placement {
            live,
            steady,
            holders: view.holders.clone(),
            settled: current
                && view
                    .watching_since
                    .is_some_and(|since| now.duration_since(since) >= ttl),
        }
    }

    /// Whether `hub` has not beaten since this view last saw it, read from
    /// the bucket itself (not the watch, which may lag): a lease is taken
    /// from a hub only when this says so. `false` when it cannot be read.
    pub async fn silent(&self, hub: &str) -> bool {
        let seen = self
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .members
            .get(hub)
            .map(|m| m.revision);
        match self.kv.entry(format!("m.{hub}")).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Some(e.revision) == seen,
            // Gone (it left) or never there: nobody beats for it.
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(hub, error = %e, "cannot read a hub's heartbeat; not taking its partitions");
                false
            }
        }
    }

    /// Partition `p`'s lease holder, read from the bucket itself (not the
    /// watch, which may lag).
    ///
    /// # Errors
    /// When the bucket cannot be read.
    pub async fn holder_now(&self, p: PartitionId) -> LogResult<Option<String>> {
        match self.kv.entry(lease_key(p)).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                Ok(Some(String::from_utf8_lossy(&e.value).into_owned()))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(io("read lease", e)),
        }
    }

    /// Takes partition `p`'s lease: creates it when `seen` is `None`, else
    /// replaces the lease at revision `seen`. `Ok(false)`: someone else
    /// changed it first.
    ///
    /// # Errors
    /// When the bucket cannot be reached.
    pub async fn acquire(&self, p: PartitionId, seen: Option<u64>) -> LogResult<bool> {
        let value = Bytes::from(self.me.clone());
        let done = match seen {
            None => match self.kv.create(lease_key(p), value).await {
                Ok(rev) => Ok(rev),
                Err(e) if super::shared::created_elsewhere(&e) => return Ok(false),
                Err(e) => Err(io("create lease", e)),
            },
            Some(rev) => match self.kv.update(lease_key(p), value, rev).await {
                Ok(rev) => Ok(rev),
                Err(e) if super::shared::lost_race(&e) => {
                    return Ok(false);
                }
                Err(e) => Err(io("take lease", e)),
            },
        }?;
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holders
            .insert(p.0, (self.me.clone(), done));
        Ok(true)
    }

    /// Gives partition `p`'s lease back, if it is still at `rev`.
    ///
    /// # Errors
    /// When the bucket cannot be reached.
    pub async fn release(&self, p: PartitionId, rev: u64) -> LogResult<()> {
        self.kv
            .delete_expect_revision(lease_key(p), Some(rev))
            .await
            .map_err(|e| io("release lease", e))?;
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        if view.holders.get(&p.0).is_some_and(|(_, r)| *r == rev) {
            view.holders.remove(&p.0);
        }
        Ok(())
    }

    /// Leaves the region's hubs: releases every lease held and removes the
    /// heartbeat, so others take over at once (a clean shutdown).
    pub async fn leave(&self) {
        let held: Vec<(u32, u64)> = self
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holders
            .iter()
            .filter(|(_, (h, _))| *h == self.me)
            .map(|(p, (_, rev))| (*p, *rev))
            .collect();
        for (p, rev) in held {
            if let Err(e) = self.release(PartitionId(p), rev).await {
                tracing::warn!(partition = p, error = %e, "cannot release a lease at shutdown; it expires");
            }
        }
        if let Err(e) = self.kv.delete(format!("m.{}", self.me)).await {
            tracing::warn!(error = %e, "cannot remove this hub's heartbeat at shutdown; it expires");
        }
    }
}

/// Follows the bucket into `view`, watching again after any break.
async fn follow(
    kv: kv::Store,
    view: Arc<Mutex<View>>,
    shared_changed: watch::Sender<u64>,
    me: String,
    nonce: String,
) {
    loop {
        match kv.watch_with_history(">").await {
            Ok(mut w) => {
                {
                    // Heard-from times start again: a hub seen only in the
                    // history is neither proven live nor steady.
                    let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
                    v.watching_since = Some(Instant::now());
                    v.members.clear();
                }
                while let Some(entry) = w.next().await {
                    match entry {
                        Ok(entry) => {
                            if entry.key.strip_prefix("m.") == Some(me.as_str())
                                && entry.operation == kv::Operation::Put
                                && entry.delta == 0
                                && !entry.value.starts_with(nonce.as_bytes())
                            {
                                tracing::error!(hub_id = %me, "another process beats under this hub id; give each hub its own --hub-id");
                            }
                            if apply(&view, entry) {
                                shared_changed.send_modify(|n| *n = n.wrapping_add(1));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "lease watch broke; watching again");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the leases; retrying"),
        }
        view.lock()
            .unwrap_or_else(|e| e.into_inner())
            .watching_since = None;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies one entry; true when a region-wide value changed.
fn apply(view: &Mutex<View>, entry: kv::Entry) -> bool {
    tracing::debug!(key = %entry.key, revision = entry.revision, operation = ?entry.operation, "lease bucket entry");
    let mut view = view.lock().unwrap_or_else(|e| e.into_inner());
    let put = entry.operation == kv::Operation::Put;
    if entry.key.starts_with("s.") {
        let newer = view
            .shared
            .get(&entry.key)
            .is_none_or(|(_, rev)| *rev <= entry.revision);
        if newer {
            if put {
                view.shared
                    .insert(entry.key.clone(), (entry.value.clone(), entry.revision));
            } else {
                view.shared.remove(&entry.key);
            }
        }
        return newer;
    }
    if let Some(hub) = entry.key.strip_prefix("m.") {
        if put {
            let now = Instant::now();
            let revision = entry.revision;
            view.members
                .entry(hub.to_string())
                .and_modify(|m| {
                    m.last = now;
                    m.revision = revision;
                })
                .or_insert(Member {
                    first: now,
                    last: now,
                    revision,
                });
        } else {
            view.members.remove(hub);
        }
    } else if let Some(p) = entry.key.strip_prefix("p.").and_then(|n| n.parse().ok()) {
        if put {
            let holder = String::from_utf8_lossy(&entry.value).into_owned();
            // Never let an older entry (a re-watch's history) replace a newer.
            let newer = view
                .holders
                .get(&p)
                .is_none_or(|(_, rev)| *rev <= entry.revision);
            if newer {
                view.holders.insert(p, (holder, entry.revision));
            }
        } else {
            view.holders.remove(&p);
        }
    }
    false
}
