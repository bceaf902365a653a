//! Reloading a partition from the servers: on a log shared by several hubs
//! of a region, another hub may have written it since this writer last
//! looked. A takeover reloads with `own`; a hub that gives a partition up
//! (or only reads it) reloads without.

use fleet_api::Offset;
use tokio::time::Instant;

use super::Writer;
use crate::log::{LogError, LogResult};

impl Writer {
    pub(in crate::log::jetstream) async fn reload(&mut self, own: bool) -> LogResult<()> {
        if !self.inflight.is_empty() {
            // Decided by this hub before the partition changed hands: none
            // of it is acknowledged; the devices send it again.
            self.fail("the partition changed hands".to_string());
        }
        if self.sticky {
            self.owned = own;
            return Err(self.refuse());
        }
        self.owned = false;
        let p = self.p();
        let deadline = Instant::now() + self.retry_for;
        let (meta, revision) = super::super::retrying("partition metadata", deadline, || async {
            match self.store.load(p).await? {
                Some(found) => Ok(found),
                None => Err(LogError::Io(format!("partition {p} has no metadata"))),
            }
        })
        .await?;
        for &(generation, _) in &meta.gens {
            if self.part.stream(generation).is_none() {
                let name = self.names.stream(p, generation);
                let s = super::super::retrying(&name, deadline, || async {
                    self.js
                        .get_stream(&name)
                        .await
                        .map_err(|e| LogError::Io(format!("stream {name}: {e}")))
                })
                .await?;
                self.part.add_stream(generation, s);
            }
        }
        let (current, _) = meta.current_gen();
        let mut stream = self
            .part
            .stream(current)
            .ok_or_else(|| LogError::Io(format!("generation {current} has no stream")))?;
        let name = self.names.stream(p, current);
        let info = super::super::retrying(&name, deadline, || {
            let mut stream = stream.clone();
            let name = name.clone();
            async move {
                stream
                    .info()
                    .await
                    .cloned()
                    .map_err(|e| LogError::Io(format!("stream {name}: {e}")))
            }
        })
        .await?;
        stream = self.part.stream(current).unwrap_or(stream);
        // A stream's state may be answered by a server that lags (seen
        // under load after a takeover): within the same generations the
        // view never goes back (a cut starts a new generation).
        let (seen_meta, seen_hw) = self.part.snapshot();
        let hw = if seen_meta.gens == meta.gens {
            info.state.last_sequence.max(seen_hw.0)
        } else {
            info.state.last_sequence
        };
        self.meta = meta.clone();
        self.revision = revision;
        self.stream = stream;
        self.next = hw;
        // Ids of this writer's publishes must not repeat ones it sent
        // under an earlier view.
        self.writer_id = super::WriterId::new();
        // The view is the servers' now: a failure of the earlier one (a
        // stream moved by another writer) is over. Nothing acknowledges on
        // this writer's flushes while the partition is not owned (the
        // ingest checks ownership under its lock, and a takeover empties
        // the ledger before this reload).
        self.failed = None;
        *self.part.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.part.switch(meta.clone(), Offset(hw));
        if own {
            // The metadata is written under this writer's id: a hub that
            // wrote the partition before and does not know it lost it (a
            // paused process) can no longer move its start, cut it or
            // note an epoch, all of which compare against the revision.
            self.set_meta(meta).await?;
        }
        self.owned = own;
        if own && info.config.sealed {
            self.roll().await?;
        }
        Ok(())
    }
}
