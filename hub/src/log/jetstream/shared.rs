//! Region-wide values in the lease bucket (`s.…` keys): what every hub of a
//! region must agree on besides the leases, written by compare-and-set
//! (the region's role and epoch, and each hub's answer to a fence).

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::sync::watch;

use super::lease::{Leases, io};
use crate::log::LogResult;

/// A compare-and-set lost: someone changed the value first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed;

impl Leases {
    /// The value of region-wide `key` (`s.…`) and its revision, read from
    /// the bucket itself (not the watch, which may lag).
    ///
    /// # Errors
    /// When the bucket cannot be read.
    pub async fn read_shared(&self, key: &str) -> LogResult<Option<(Bytes, u64)>> {
        match self.kv.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some((e.value, e.revision))),
            Ok(_) => Ok(None),
            Err(e) => Err(io(&format!("read {key}"), e)),
        }
    }

    /// The value of `key` as the watch last saw it.
    pub fn seen_shared(&self, key: &str) -> Option<(Bytes, u64)> {
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shared
            .get(key)
            .cloned()
    }

    /// Writes `key` when it is still at `seen` (`None`: when it is absent).
    /// `Ok(Err(Changed))`: someone wrote it first.
    ///
    /// # Errors
    /// When the bucket cannot be reached.
    pub async fn swap_shared(
        &self,
        key: &str,
        value: Bytes,
        seen: Option<u64>,
    ) -> LogResult<Result<u64, Changed>> {
        match seen {
            None => match self.kv.create(key, value).await {
                Ok(rev) => Ok(Ok(rev)),
                Err(e) if created_elsewhere(&e) => Ok(Err(Changed)),
                Err(e) => Err(io(&format!("create {key}"), e)),
            },
            Some(rev) => match self.kv.update(key, value, rev).await {
                Ok(rev) => Ok(Ok(rev)),
                Err(e) if lost_race(&e) => Ok(Err(Changed)),
                Err(e) => Err(io(&format!("write {key}"), e)),
            },
        }
    }

    /// Writes `key` whatever it holds (a value only this hub writes).
    ///
    /// # Errors
    /// When the bucket cannot be reached.
    pub async fn put_shared(&self, key: &str, value: Bytes) -> LogResult<u64> {
        self.kv
            .put(key, value)
            .await
            .map_err(|e| io(&format!("write {key}"), e))
    }

    /// Changes whenever the watch sees a region-wide value change.
    pub fn shared_changes(&self) -> watch::Receiver<u64> {
        self.shared_changed.subscribe()
    }
}

/// A compare-and-set that lost: async-nats reports it as
/// `WrongLastRevision`, or (seen under a race of two writers) as another
/// kind carrying the server's "wrong last sequence" (JetStream error 10071).
pub(super) fn lost_race(e: &kv::UpdateError) -> bool {
    e.kind() == kv::UpdateErrorKind::WrongLastRevision
        || e.to_string().contains("wrong last sequence")
}

/// A create that found the key there (see [`lost_race`]).
pub(super) fn created_elsewhere(e: &kv::CreateError) -> bool {
    e.kind() == kv::CreateErrorKind::AlreadyExists || e.to_string().contains("wrong last sequence")
}
