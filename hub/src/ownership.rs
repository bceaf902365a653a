//! Which hub of a region writes which partition, when several hubs share
//! one JetStream log. One task per hub changes this hub's ownership, here
//! and nowhere else:
//!
//! - The partitions are divided among the live hubs by rendezvous hashing
//!   (`fleet_api::rendezvous`, the same choice the concierge makes), so a
//!   hub joining moves about 1/N partitions and a hub dying moves its own.
//! - A partition whose lease is free, or whose holder stopped beating, is
//!   taken by compare-and-set by the hub it now belongs to, which reloads
//!   it from the servers and looks each device's last mid up in the log
//!   before taking a publish of that device.
//! - A hub that holds a partition another steady hub now wins gives it up
//!   (nothing more is decided for it, what was decided is flushed, its
//!   devices are told to go) and then releases the lease.
//! - A hub that finds its lease taken stops writing at once; if it stored
//!   anything meanwhile, the stream's expected-sequence check already made
//!   one of the two writers fail rather than both store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_api::{PartitionId, partition_for, rendezvous};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ingest::Ingest;
use crate::log::jetstream::{Leases, Placement};
use crate::sessions::{Kick, Sessions};

/// How often a partition this hub only reads is reloaded (records other
/// hubs wrote become readable here).
const REFRESH: Duration = Duration::from_secs(1);

/// How soon a partition that failed to be taken over is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Drives this hub's share of the region's partitions.
#[derive(Debug)]
pub struct Ownership {
    leases: Arc<Leases>,
    ingest: Arc<Ingest>,
    sessions: Arc<Sessions>,
    ttl: Duration,
    /// Per partition: no attempt (takeover, refresh) before this.
    not_before: HashMap<u32, Instant>,
    /// True once a round ran on a settled view (every live hub heard).
    ready: watch::Sender<bool>,
}

impl Ownership {
    pub fn new(
        leases: Arc<Leases>,
        ingest: Arc<Ingest>,
        sessions: Arc<Sessions>,
        ttl: Duration,
    ) -> Ownership {
        Ownership {
            leases,
            ingest,
            sessions,
            ttl,
            not_before: HashMap::new(),
            ready: watch::Sender::new(false),
        }
    }

    /// Resolves `true` once this hub took what it should after start.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown`, then leaves (releases its leases at once).
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Heartbeats in a task of their own: a takeover or a flush waiting
        // on servers in trouble must not make this hub look dead to the
        // others.
        let beats = tokio::spawn(beat_loop(self.leases.clone(), self.ttl / 6));
        let mut tick = tokio::time::interval(self.ttl / 6);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let placement = self.leases.placement(self.ttl);
            self.round(&placement).await;
            if placement.settled {
                self.ready.send_replace(true);
            }
        }
        beats.abort();
        for p in 0..self.ingest.log().partitions() {
            self.ingest.give_up(PartitionId(p)).await;
        }
        self.leases.leave().await;
    }

    fn due(&self, p: PartitionId) -> bool {
        self.not_before
            .get(&p.0)
            .is_none_or(|t| Instant::now() >= *t)
    }

    fn later(&mut self, p: PartitionId, after: Duration) {
        self.not_before.insert(p.0, Instant::now() + after);
    }

    async fn round(&mut self, placement: &Placement) {
        let me = self.leases.me().to_string();
        for p in 0..self.ingest.log().partitions() {
            let p = PartitionId(p);
            let key = rendezvous::partition_key(p);
            let wanted = rendezvous::pick(&key, placement.live.iter().map(String::as_str))
                .is_some_and(|h| h == me);
            let held = placement.holders.get(&p.0).cloned();
            let owned = self.ingest.owns(p);
            tracing::trace!(partition = %p, wanted, ?held, owned, live = ?placement.live, settled = placement.settled, "ownership round");
            match held {
                Some((holder, rev)) if holder == me => {
                    let failed = self.ingest.log().partition_failure(p).is_some();
                    let steady_winner =
                        rendezvous::pick(&key, placement.live.iter().map(String::as_str))
                            .filter(|w| *w != me && placement.steady.iter().any(|s| s == w));
                    if steady_winner.is_some() {
                        self.hand_over(p, rev).await;
                    } else if (!owned || failed) && self.due(p) {
                        self.take(p).await;
                    }
                }
                other => {
                    if owned {
                        tracing::warn!(partition = %p, holder = ?other.as_ref().map(|h| &h.0), "partition lease lost; stopping writes");
                        self.drop_partition(p).await;
                    }
                    if wanted {
                        let seen = match &other {
                            None => Some(None),
                            Some((holder, rev))
                                if placement.settled
                                    && !placement.live.contains(holder)
                                    && self.leases.silent(holder).await =>
                            {
                                Some(Some(*rev))
                            }
                            Some(_) => None,
                        };
                        if let Some(seen) = seen {
                            match self.leases.acquire(p, seen).await {
                                Ok(true) => {
                                    tracing::info!(partition = %p, from = ?other.map(|h| h.0), "partition lease taken");
                                    self.take(p).await;
                                    continue;
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    tracing::warn!(partition = %p, error = %e, "cannot take a partition lease")
                                }
                            }
                        }
                    }
                    if !self.ingest.owns(p) && self.due(p) {
                        // Keeps what other hubs wrote readable here; not
                        // waited for long (servers in trouble must not
                        // stall the decisions on other partitions; the
                        // writer takes later commands in order).
                        let _ = tokio::time::timeout(REFRESH, self.ingest.refresh(p)).await;
                        self.later(p, REFRESH);
                    }
                }
            }
        }
    }

    async fn take(&mut self, p: PartitionId) {
        // Devices of the partition connected meanwhile saw refusals only.
        match self.ingest.take_over(p).await {
            Ok(()) => {
                self.not_before.remove(&p.0);
            }
            Err(e) => {
                tracing::error!(partition = %p, error = %e, "cannot take a partition over; trying again");
                self.later(p, RETRY);
            }
        }
    }

    async fn drop_partition(&mut self, p: PartitionId) {
        self.ingest.give_up(p).await;
        let n = self.ingest.log().partitions();
        self.sessions
            .kick_where(|d| partition_for(d, n) == p, Kick::PartitionMoved);
    }

    async fn hand_over(&mut self, p: PartitionId, rev: u64) {
        tracing::info!(partition = %p, "handing a partition to the hub it now belongs to");
        self.drop_partition(p).await;
        if let Err(e) = self.leases.release(p, rev).await {
            tracing::warn!(partition = %p, error = %e, "cannot release a partition lease; it is taken over when this hub stops beating");
        }
    }
}

/// Says every `every` that this hub is alive.
async fn beat_loop(leases: Arc<Leases>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = leases.beat().await {
            tracing::warn!(error = %e, "cannot send this hub's heartbeat");
        }
    }
}
