//! What retention purged, per device: before the oldest records of a
//! partition go, each device that has records among them gets its highest
//! mid there written into the bucket `{prefix}_purged` (key
//! `p{N}.{device}`). A hub that takes a partition over learns a device's
//! last mid from its last record ([`super::Part::last_of`]); a device
//! silent since its records were purged has none, and without this a
//! resend of an old mid would be stored twice.
//!
//! An entry is `{mid, offset, epoch}` of the device's last record in the
//! purged range. It only counts while that record is still in the
//! partition's history (`offset` below the high watermark, in `epoch`'s
//! span): a failback that cut the tail it came from makes it void, with
//! nothing to delete.

use async_nats::jetstream::kv;
use bytes::Bytes;
use fleet_api::{Mid, Offset, PartitionId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use super::meta::{MetaStore, leader_entry};
use super::shared::{created_elsewhere, lost_race};
use crate::log::{LogError, LogResult};

/// How many devices' entries are written at once.
const CONCURRENCY: usize = 64;

/// A device's last record in a purged range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Purged {
    pub mid: u64,
    pub offset: u64,
    pub epoch: u64,
}

impl Purged {
    /// `(mid, offset)` when the record is still in the history `epochs`
    /// of a partition whose log ends at `hw`.
    pub fn valid(&self, epochs: &[(u64, u64)], hw: u64) -> Option<(Mid, Offset)> {
        let in_force = epochs
            .iter()
            .rev()
            .find(|(_, start)| *start <= self.offset)
            .map(|(e, _)| *e);
        (self.offset < hw && in_force == Some(self.epoch))
            .then_some((Mid(self.mid), Offset(self.offset)))
    }
}

/// The bucket of purged devices' last mids.
#[derive(Clone)]
pub(super) struct PurgedStore {
    kv: kv::Store,
}

/// `p{N}.{device}`, the device id's `.` and `:` written `=2E` and `=3A`
/// (a key token holds neither).
fn key(p: PartitionId, device: &str) -> String {
    let mut k = format!("p{}.", p.0);
    for c in device.chars() {
        match c {
            '.' => k.push_str("=2E"),
            ':' => k.push_str("=3A"),
            c => k.push(c),
        }
    }
    k
}

fn io(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Io(format!("jetstream purged mids: {what}: {e}"))
}

impl PurgedStore {
    pub fn new(kv: kv::Store) -> PurgedStore {
        PurgedStore { kv }
    }

    /// The entry of `device` in `p` and its revision, read from the
    /// bucket's leader (a replica answering a direct get may lag behind
    /// a write that preceded a purge).
    pub async fn get(&self, p: PartitionId, device: &str) -> LogResult<Option<(Purged, u64)>> {
        let Some(m) = leader_entry(&self.kv, &key(p, device))
            .await
            .map_err(|e| io("read", e))?
        else {
            return Ok(None);
        };
        // A delete or purge marker (an operator's `nats kv del`): no entry.
        if m.payload.is_empty() {
            tracing::warn!(partition = %p, device, "a purged device's kept mid was deleted from the bucket");
            return Ok(None);
        }
        let entry = serde_json::from_slice(&m.payload).map_err(|e| LogError::Corrupt {
            partition: p,
            offset: Offset(0),
            detail: format!("purged mid of {device} is not valid: {e}"),
        })?;
        Ok(Some((entry, m.sequence)))
    }

    /// Raises `device`'s entry to `entry`, a record of the history
    /// `epochs` ending at `hw`: an entry of a later offset in that history
    /// stays (a writer that lost its partition may still be purging an
    /// older range); one the history no longer holds (cut by a failback)
    /// is replaced.
    async fn raise(
        &self,
        p: PartitionId,
        device: &str,
        entry: Purged,
        epochs: &[(u64, u64)],
        hw: u64,
    ) -> LogResult<()> {
        let value = Bytes::from(serde_json::to_vec(&entry).expect("an entry serializes"));
        let k = key(p, device);
        loop {
            let now = self.get(p, device).await?;
            let written = match now {
                Some((old, _)) if old.offset >= entry.offset && old.valid(epochs, hw).is_some() => {
                    return Ok(());
                }
                Some((_, rev)) => match self.kv.update(&k, value.clone(), rev).await {
                    Ok(_) => true,
                    Err(e) if lost_race(&e) => false,
                    Err(e) => return Err(io("write", e)),
                },
                None => match self.kv.create(&k, value.clone()).await {
                    Ok(_) => true,
                    Err(e) if created_elsewhere(&e) => false,
                    Err(e) => return Err(io("create", e)),
                },
            };
            if written {
                return Ok(());
            }
        }
    }
}

impl super::Part {
    /// Writes the entry of every device with a numbered record in offsets
    /// `from..upto`, before they are purged. Nothing may be purged when
    /// this fails. Refused when the partition's metadata in the bucket is
    /// not this hub's view of it (another hub took the partition over, or
    /// cut it): entries are judged against that view.
    pub(super) async fn note_purged(
        &self,
        metas: &MetaStore,
        store: &PurgedStore,
        from: u64,
        upto: u64,
    ) -> LogResult<usize> {
        let (meta, hw) = self.snapshot();
        if metas.load(self.id).await?.map(|(m, _)| m) != Some(meta.clone()) {
            return Err(LogError::Io(format!(
                "partition {}: its metadata moved since this hub read it; nothing purged",
                self.id
            )));
        }
        let mut last: HashMap<String, Purged> = HashMap::new();
        let reached = self
            .each_record(from, upto, |r| {
                if let Some(mid) = r.record.mid {
                    let entry = Purged {
                        mid: mid.0,
                        offset: r.offset.0,
                        epoch: r.record.epoch.0,
                    };
                    last.insert(r.record.device_id.into_string(), entry);
                }
            })
            .await?;
        if reached < upto {
            return Err(LogError::Io(format!(
                "partition {}: nothing to read at offset {reached}, below {upto}",
                self.id
            )));
        }
        // A record a cut took meanwhile is nobody's last.
        last.retain(|_, e| e.valid(&meta.epochs, hw.0).is_some());
        let n = last.len();
        let p = self.id;
        let (epochs, hw) = (&meta.epochs, hw.0);
        let written: Vec<LogResult<()>> = futures::stream::iter(last)
            .map(|(device, entry)| async move { store.raise(p, &device, entry, epochs, hw).await })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        written.into_iter().collect::<LogResult<Vec<()>>>()?;
        Ok(n)
    }

    /// The purged last mid of `device`, when its record is still in this
    /// partition's history.
    pub(super) async fn purged_last(
        &self,
        store: &PurgedStore,
        device: &str,
    ) -> LogResult<Option<(Mid, Offset)>> {
        let Some((entry, _)) = store.get(self.id, device).await? else {
            return Ok(None);
        };
        let (meta, hw) = self.snapshot();
        Ok(entry.valid(&meta.epochs, hw.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_counts_only_while_its_record_is_in_the_history() {
        let e = Purged {
            mid: 7,
            offset: 100,
            epoch: 2,
        };
        let history = [(1, 0), (2, 50)];
        assert_eq!(e.valid(&history, 500), Some((Mid(7), Offset(100))));
        // Cut back below it (a failback): the log now ends before it.
        assert_eq!(e.valid(&[(1, 0), (2, 50)], 80), None);
        // ... and continued by the new primary's epoch from the cut on.
        assert_eq!(e.valid(&[(1, 0), (2, 50), (3, 80)], 500), None);
        // A history that never had epoch 2 there.
        assert_eq!(e.valid(&[(1, 0), (3, 90)], 500), None);
    }

    #[test]
    fn keys_hold_every_device_id() {
        assert_eq!(key(PartitionId(3), "a.b:c-d_E9"), "p3.a=2Eb=3Ac-d_E9");
    }
}
