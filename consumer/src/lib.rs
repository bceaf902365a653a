//! Reliable consumers of the hub's event log: the pattern people otherwise
//! assemble by hand around a cloud event stream (checkpoints, retries, a
//! dead-letter stream, a circuit breaker), done so that nothing is skipped.
//!
//! - A *group* of instances shares the partitions through leases in a shared
//!   store ([`store`]); an instance that dies is replaced when its leases
//!   expire, and the survivors rebalance to a fair share.
//! - Records are handed to the [`Handler`] in order per partition. The
//!   checkpoint advances only after the handler succeeded (or the record was
//!   dead-lettered), so a crash or restart redelivers from the checkpoint:
//!   at-least-once. The built-in [`sink`] makes redeliveries harmless.
//! - A record the handler rejects is retried with backoff, then written to the
//!   dead-letter log with its reason and attempts, and processing continues.
//!   A downstream that is unavailable is never a reason to dead-letter: the
//!   batch waits.
//! - Every failure of every instance counts towards a circuit breaker kept in
//!   the store ([`breaker`]): when it opens, all instances stop fetching; after
//!   a cool-down one instance probes, and its success lets all resume.
//! - Consumers read through the hub's HTTP API from whichever hub is primary.
//!   Checkpoints live in the consumer's own store, not in a region, so a
//!   failover needs no checkpoint replication; a checkpoint that points past
//!   records the new primary replaced (a forced failover) is rewound to where
//!   the two regions' logs agree.

pub mod breaker;
pub mod cli;
pub mod sink;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fleet_api::hub::{PartitionStatus, WireRecord};
use fleet_api::{Epoch, ErrorCode, Offset, PartitionId, Role, Secret};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::{ClientError, HubClient};
use breaker::{BreakerPolicy, Gate, State};
use store::{Checkpoint, ConsumerStore, StoreError};

/// Why a handler could not process a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// Something about the records: retried per the [`RetryPolicy`], then
    /// each record that still fails is dead-lettered.
    #[error("record rejected: {0}")]
    Record(String),
    /// The downstream system is unavailable: the batch waits and is retried
    /// until it succeeds; nothing is dead-lettered for it.
    #[error("downstream unavailable: {0}")]
    Unavailable(String),
}

/// What a consumer does with records.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Processes `batch` (records of one partition, in log order). On error,
    /// the whole batch is retried: handlers must be idempotent (the
    /// checkpoint also lags after a crash), which [`sink::SqlSink`] is.
    async fn handle(&self, batch: &[WireRecord]) -> Result<(), HandlerError>;

    /// A cheap check that the downstream is back, used by the half-open probe
    /// before it retries a batch. The default trusts the batch itself.
    async fn check(&self) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Draws a delay in `[0, max]` (full jitter); injectable for tests.
pub type Jitter = Arc<dyn Fn(Duration) -> Duration + Send + Sync>;

/// Full jitter from the thread's RNG.
pub fn random_jitter() -> Jitter {
    Arc::new(|max: Duration| {
        let nanos = max.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 {
            0
        } else {
            rand::random_range(0..=nanos)
        })
    })
}

/// How often a rejected record is tried, and how long to wait in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per record before it is dead-lettered (at least 1).
    pub attempts: u32,
    /// The delay ceiling after the first failure; it doubles per failure.
    pub initial: Duration,
    /// The largest delay ceiling (also for an unavailable downstream).
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The delay ceiling after `failures` consecutive failures (≥ 1).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Where a new group starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    /// From the oldest retained record.
    Earliest,
    /// From the records written after the group first started.
    Latest,
}

/// A consumer instance's configuration.
#[derive(Clone)]
pub struct ConsumerConfig {
    pub group: String,
    /// Every hub (of both regions) the consumer may read from; it reads from
    /// whichever is primary.
    pub hubs: Vec<String>,
    /// Bearer token for the hubs' read API.
    pub hub_token: Option<Secret>,
    /// Extra roots trusted for hubs serving HTTPS with a private CA.
    pub hub_roots: Vec<reqwest::Certificate>,
    /// `sqlite://PATH` or `postgres://…`: leases, checkpoints, breaker, dead letters.
    pub store: String,
    /// This instance's name in the group (default: host and a random suffix).
    pub instance: Option<String>,
    /// Records per handler call at most.
    pub batch: usize,
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
    /// How long a lease lasts without renewal; renewed every third of it.
    pub lease_ttl: Duration,
    pub start: Start,
    /// How often each instance reads the shared breaker.
    pub breaker_poll: Duration,
    pub jitter: Jitter,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("group", &self.group)
            .field("hubs", &self.hubs)
            .field("store", &registry_sync::store::redact_url(&self.store))
            .field("instance", &self.instance)
            .field("batch", &self.batch)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("lease_ttl", &self.lease_ttl)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl ConsumerConfig {
    /// A configuration with the defaults (3 attempts, breaker 100 failures in
    /// 30 s with a 10 s cool-down, 10 s leases, batches of 500).
    pub fn new(group: &str, hubs: Vec<String>, store: &str) -> Self {
        Self {
            group: group.to_string(),
            hubs,
            hub_token: None,
            hub_roots: Vec::new(),
            store: store.to_string(),
            instance: None,
            batch: 500,
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            lease_ttl: Duration::from_secs(10),
            start: Start::Earliest,
            breaker_poll: Duration::from_millis(250),
            jitter: random_jitter(),
        }
    }
}

/// Errors of starting a consumer.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("invalid consumer configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an instance did so far (for status pages and tests).
#[derive(Debug, Default)]
pub struct Counters {
    pub processed: AtomicU64,
    pub failures: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub rewinds: AtomicU64,
}

/// A snapshot of an instance.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InstanceStatus {
    pub group: String,
    pub instance: String,
    pub partitions: Vec<PartitionId>,
    pub breaker: String,
    pub reading_from: Option<String>,
    pub processed: u64,
    pub failures: u64,
    pub dead_lettered: u64,
    /// Checkpoints rewound after a failover replaced records past them.
    pub rewinds: u64,
}

/// A running consumer instance.
pub struct Consumer {
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    /// Taken by the first [`Consumer::shutdown`]; shared owners (an HTTP
    /// server's state) may still hold the consumer then.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group", &self.ctx.store.group())
            .field("instance", &self.ctx.instance)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Connects to the store and starts the instance: it joins the group,
    /// takes its share of partitions and processes them until
    /// [`Consumer::shutdown`].
    ///
    /// # Errors
    /// Invalid configuration or an unreachable store.
    pub async fn start(
        config: ConsumerConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Consumer, ConsumerError> {
        if config.group.is_empty() || config.group.len() > 128 {
            return Err(ConsumerError::Config(
                "group: must be 1 to 128 characters".into(),
            ));
        }
        if config.hubs.is_empty() {
            return Err(ConsumerError::Config("hubs: name at least one hub".into()));
        }
        if config.batch == 0 || config.retry.attempts == 0 {
            return Err(ConsumerError::Config(
                "batch and retry attempts must be at least 1".into(),
            ));
        }
        if config.lease_ttl < Duration::from_millis(300) {
            return Err(ConsumerError::Config("lease_ttl: at least 300 ms".into()));
        }
        let store = ConsumerStore::open(&config.store, &config.group).await?;
        let instance = config.instance.clone().unwrap_or_else(default_instance);
        let clients = config
            .hubs
            .iter()
            .map(|u| HubClient::trusting(u.clone(), config.hub_token.clone(), &config.hub_roots))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConsumerError::Config(format!("hub HTTP client: {e}")))?;
        let initial = store.breaker().await?;
        let ctx = Arc::new(Ctx {
            hubs: Hubs {
                urls: config.hubs.clone(),
                clients,
                primary: watch::channel(None).0,
                nudge: Notify::new(),
            },
            store,
            handler,
            breaker: watch::channel(initial).0,
            instance,
            held: watch::channel(Vec::new()).0,
            counters: Counters::default(),
            config,
        });
        let shutdown = CancellationToken::new();
        let span =
            tracing::info_span!("consumer", group = %ctx.store.group(), instance = %ctx.instance);
        let tasks = vec![
            tokio::spawn(
                ctx.clone()
                    .track_hubs(shutdown.clone())
                    .instrument(span.clone()),
            ),
            tokio::spawn(
                ctx.clone()
                    .watch_breaker(shutdown.clone())
                    .instrument(span.clone()),
            ),
            tokio::spawn(ctx.clone().coordinate(shutdown.clone()).instrument(span)),
        ];
        tracing::info!(group = %ctx.store.group(), instance = %ctx.instance, "consumer started");
        Ok(Consumer {
            ctx,
            shutdown,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// This instance's name in its group.
    pub fn instance(&self) -> &str {
        &self.ctx.instance
    }

    /// The shared store (for operator actions in the same process).
    pub fn store(&self) -> &ConsumerStore {
        &self.ctx.store
    }

    /// What this instance holds and did so far.
    pub fn status(&self) -> InstanceStatus {
        let c = &self.ctx.counters;
        InstanceStatus {
            group: self.ctx.store.group().to_string(),
            instance: self.ctx.instance.clone(),
            partitions: self.ctx.held.borrow().clone(),
            breaker: self.ctx.breaker.borrow().state.name().to_string(),
            reading_from: self
                .ctx
                .hubs
                .primary
                .borrow()
                .as_ref()
                .map(|p| self.ctx.hubs.urls[p.idx].clone()),
            processed: c.processed.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            rewinds: c.rewinds.load(Ordering::Relaxed),
        }
    }

    /// Finishes the batches in hand, gives the partitions back and stops.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn default_instance() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "consumer".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// The primary the consumer reads from now.
#[derive(Clone, Debug)]
struct Primary {
    idx: usize,
    epoch: Epoch,
    partitions: Vec<PartitionStatus>,
}

struct Hubs {
    urls: Vec<String>,
    clients: Vec<HubClient>,
    primary: watch::Sender<Option<Primary>>,
    nudge: Notify,
}

struct Ctx {
    config: ConsumerConfig,
    store: ConsumerStore,
    handler: Arc<dyn Handler>,
    hubs: Hubs,
    breaker: watch::Sender<store::StoredBreaker>,
    instance: String,
    held: watch::Sender<Vec<PartitionId>>,
    counters: Counters,
}

/// How processing a batch ended.
enum Outcome {
    /// Every record is done (handled or dead-lettered).
    Done,
    /// The first `done` records are; the rest wait (downstream unavailable
    /// or the breaker opened).
    Stalled { done: usize },
}

impl Ctx {
    fn group(&self) -> String {
        self.store.group().to_string()
    }

    async fn sleep_or(&self, d: Duration, cancel: &CancellationToken) -> bool {
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(d) => true,
        }
    }

    // ------------------------------------------------------------- hubs

    /// Keeps `primary` on the hub that is primary and unfenced with the
    /// highest epoch.
    async fn track_hubs(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let mut best: Option<Primary> = None;
            for (idx, c) in self.hubs.clients.iter().enumerate() {
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
                else {
                    continue;
                };
                if s.role == Role::Primary
                    && !s.fenced
                    && best.as_ref().is_none_or(|b| s.epoch > b.epoch)
                {
                    best = Some(Primary {
                        idx,
                        epoch: s.epoch,
                        partitions: s.partitions,
                    });
                }
            }
            let before = self
                .hubs
                .primary
                .borrow()
                .as_ref()
                .map(|p| (p.idx, p.epoch));
            let now = best.as_ref().map(|p| (p.idx, p.epoch));
            if before != now {
                match &best {
                    Some(p) => {
                        tracing::info!(hub = %self.hubs.urls[p.idx], epoch = %p.epoch, "reading from primary")
                    }
                    None => tracing::warn!("no primary hub reachable; waiting"),
                }
            }
            if let Some(p) = &best {
                for s in &p.partitions {
                    metrics::gauge!("fleet_consumer_high_watermark", "group" => self.group(), "partition" => s.id.0.to_string())
                        .set(s.high_watermark.0 as f64);
                }
            }
            self.hubs.primary.send_replace(best);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.hubs.nudge.notified() => {}
            }
        }
    }

    // ---------------------------------------------------------- breaker

    /// Re-reads the shared breaker; every instance logs and counts the
    /// transitions it sees.
    async fn watch_breaker(self: Arc<Self>, cancel: CancellationToken) {
        let group = self.group();
        set_breaker_gauge(&group, &self.breaker.borrow().state);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.config.breaker_poll) => {}
            }
            match self.store.breaker().await {
                Ok(now) => self.observe_breaker(now),
                Err(e) => tracing::warn!(error = %e, "cannot read the circuit breaker"),
            }
        }
    }

    fn observe_breaker(&self, now: store::StoredBreaker) {
        let before = self.breaker.borrow().clone();
        if now.generation == before.generation {
            return;
        }
        if now.state.name() != before.state.name() {
            let group = self.group();
            tracing::warn!(group = %group, from = before.state.name(), to = now.state.name(), "circuit breaker transition");
            metrics::counter!("fleet_consumer_breaker_transitions_total", "group" => group.clone(), "to" => now.state.name())
                .increment(1);
            set_breaker_gauge(&group, &now.state);
        }
        self.breaker.send_replace(now);
    }

    /// Counts one failure and opens the breaker when the group had too many.
    async fn failure(&self, error: &HandlerError) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let kind = match error {
            HandlerError::Record(_) => "record",
            HandlerError::Unavailable(_) => "unavailable",
        };
        metrics::counter!("fleet_consumer_failures_total", "group" => self.group(), "kind" => kind)
            .increment(1);
        let policy = self.config.breaker;
        let counted = match self
            .store
            .record_failure(&self.instance, policy.window)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a failure in the store");
                return;
            }
        };
        let Ok(current) = self.store.breaker().await else {
            return;
        };
        let now = registry_sync::hlc::wall_ms();
        if let Some(next) = breaker::after_failure(&current.state, counted, now, &policy) {
            if let Ok(true) = self.store.transition(current.generation, &next).await {
                tracing::warn!(failures_in_window = counted, window_s = policy.window.as_secs(), last_error = %error, "circuit breaker opened");
            }
            if let Ok(b) = self.store.breaker().await {
                self.observe_breaker(b);
            }
        }
    }

    /// What a worker may do now; `me` names it (instance and partition) so
    /// that one worker of the group probes.
    async fn gate(&self, me: &str) -> Gate {
        let current = self.breaker.borrow().clone();
        let now = registry_sync::hlc::wall_ms();
        match breaker::gate(&current.state, me, now, &self.config.breaker) {
            Gate::Probe if !matches!(&current.state, State::HalfOpen { prober, .. } if prober == me) =>
            {
                let next = State::HalfOpen {
                    prober: me.to_string(),
                    since_ms: now,
                };
                match self.store.transition(current.generation, &next).await {
                    Ok(true) => {
                        tracing::info!(prober = me, "circuit breaker half-open; probing");
                        if let Ok(b) = self.store.breaker().await {
                            self.observe_breaker(b);
                        }
                        Gate::Probe
                    }
                    _ => {
                        if let Ok(b) = self.store.breaker().await {
                            self.observe_breaker(b);
                        }
                        Gate::Wait(Duration::from_millis(100))
                    }
                }
            }
            g => g,
        }
    }

    /// After the probe's outcome: success closes the breaker for everyone.
    async fn probe_succeeded(&self, me: &str) {
        let Ok(current) = self.store.breaker().await else {
            return;
        };
        if let Some(next) = breaker::after_success(&current.state, me)
            && let Ok(true) = self.store.transition(current.generation, &next).await
        {
            tracing::info!(prober = me, "probe succeeded; circuit breaker closed");
        }
        if let Ok(b) = self.store.breaker().await {
            self.observe_breaker(b);
        }
    }

    fn breaker_closed(&self) -> bool {
        matches!(self.breaker.borrow().state, State::Closed)
    }

    // ----------------------------------------------------------- leases

    /// Keeps this instance's fair share of partitions and a worker on each.
    async fn coordinate(self: Arc<Self>, cancel: CancellationToken) {
        let ttl = self.config.lease_ttl;
        let every = ttl / 3;
        let mut workers: BTreeMap<PartitionId, (CancellationToken, JoinHandle<()>)> =
            BTreeMap::new();
        let mut ensured = false;
        // The partition count comes from the first hub that answers.
        let mut primary = self.hubs.primary.subscribe();
        tokio::select! {
            () = cancel.cancelled() => {}
            _ = primary.wait_for(Option::is_some) => {}
        }
        loop {
            if !ensured {
                ensured = self.ensure_partitions().await;
            }
            if ensured && let Err(e) = self.rebalance(&mut workers, &cancel).await {
                tracing::warn!(error = %e, "lease round failed; retrying");
            }
            self.held.send_replace(workers.keys().copied().collect());
            metrics::gauge!("fleet_consumer_partitions_held", "group" => self.group())
                .set(workers.len() as f64);
            if !self.sleep_or(every, &cancel).await {
                break;
            }
        }
        for (stop, _) in workers.values() {
            stop.cancel();
        }
        for (_, (_, handle)) in std::mem::take(&mut workers) {
            let _ = handle.await;
        }
        if let Err(e) = self.store.leave(&self.instance).await {
            tracing::warn!(error = %e, "cannot release leases; they expire by themselves");
        }
        self.held.send_replace(Vec::new());
        tracing::info!("consumer stopped");
    }

    /// Creates the lease and checkpoint rows once the partitions are known.
    async fn ensure_partitions(&self) -> bool {
        let Some(primary) = self.hubs.primary.borrow().clone() else {
            return false;
        };
        let starts: Vec<Offset> = primary
            .partitions
            .iter()
            .map(|s| match self.config.start {
                Start::Earliest => Offset::ZERO,
                Start::Latest => s.high_watermark,
            })
            .collect();
        match self.store.ensure_partitions(&starts).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot prepare partitions in the store");
                false
            }
        }
    }

    async fn rebalance(
        self: &Arc<Self>,
        workers: &mut BTreeMap<PartitionId, (CancellationToken, JoinHandle<()>)>,
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        let ttl = self.config.lease_ttl;
        let alive = self.store.heartbeat(&self.instance, ttl).await?;
        let held = self.store.renew(&self.instance, ttl).await?;
        // Workers whose lease is gone (expired and taken) or who stopped.
        workers.retain(|p, (stop, handle)| {
            let keep = held.contains(p) && !handle.is_finished();
            if !keep {
                if !held.contains(p) {
                    tracing::warn!(partition = %p, "lease lost; stopping its worker");
                }
                stop.cancel();
            }
            keep
        });
        for p in &held {
            if !workers.contains_key(p) {
                workers.insert(*p, self.spawn_worker(*p, cancel));
            }
        }
        let total = self
            .hubs
            .primary
            .borrow()
            .as_ref()
            .map_or(0, |p| p.partitions.len());
        let share = total.div_ceil(alive.max(1) as usize);
        if workers.len() < share {
            for p in self.store.claimable().await? {
                if workers.len() >= share || (p.0 as usize) >= total {
                    break;
                }
                if self.store.try_claim(p, &self.instance, ttl).await? {
                    tracing::info!(partition = %p, "partition taken");
                    workers.insert(p, self.spawn_worker(p, cancel));
                }
            }
        } else if workers.len() > share {
            let extra: Vec<PartitionId> = workers
                .keys()
                .rev()
                .take(workers.len() - share)
                .copied()
                .collect();
            for p in extra {
                if let Some((stop, handle)) = workers.remove(&p) {
                    stop.cancel();
                    let _ = handle.await;
                    self.store.release(p, &self.instance).await?;
                    tracing::info!(partition = %p, "partition handed over for balance");
                }
            }
        }
        Ok(())
    }

    fn spawn_worker(
        self: &Arc<Self>,
        p: PartitionId,
        parent: &CancellationToken,
    ) -> (CancellationToken, JoinHandle<()>) {
        let stop = parent.child_token();
        let span = tracing::info_span!("partition", partition = %p);
        let handle = tokio::spawn(self.clone().work(p, stop.clone()).instrument(span));
        (stop, handle)
    }

    // ----------------------------------------------------------- worker

    /// Processes partition `p` from its checkpoint until stopped or the
    /// lease is lost.
    async fn work(self: Arc<Self>, p: PartitionId, stop: CancellationToken) {
        let me = format!("{}/{}", self.instance, p.0);
        let group = self.group();
        let partition_label = p.0.to_string();
        let mut cp = loop {
            match self.store.checkpoint(p).await {
                Ok(Some(cp)) => break cp,
                Ok(None) => {
                    tracing::warn!("no checkpoint row for this partition; stopping");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read checkpoint");
                    if !self.sleep_or(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        };
        // The hub whose log the checkpoint was checked against, and that
        // hub's epoch then (a change of either means: check again).
        let mut verified: Option<(usize, Option<Epoch>)> = None;
        let mut pending: Vec<WireRecord> = Vec::new();
        let mut unavailable = 0u32;
        let mut read_errors = 0u32;
        while !stop.is_cancelled() {
            let probing = match self.gate(&me).await {
                Gate::Proceed => false,
                Gate::Probe => true,
                Gate::Wait(d) => {
                    self.sleep_or(d, &stop).await;
                    continue;
                }
            };
            let Some(primary) = self.hubs.primary.borrow().clone() else {
                self.sleep_or(Duration::from_millis(200), &stop).await;
                continue;
            };
            let client = &self.hubs.clients[primary.idx];
            if verified.map(|v| v.0) != Some(primary.idx) {
                // Records in hand came from another log: fetch them again.
                pending.clear();
                match self.verify(client, p, cp).await {
                    Verify::Same(epoch) => verified = Some((primary.idx, epoch)),
                    Verify::Rewound(rewound, epoch) => {
                        cp = rewound;
                        verified = Some((primary.idx, epoch));
                    }
                    Verify::Unknown => {
                        // Processing on an unverified checkpoint could skip
                        // records; look again shortly.
                        self.sleep_or(Duration::from_millis(200), &stop).await;
                        continue;
                    }
                    Verify::Stop => return,
                }
            }
            if pending.is_empty() {
                let wait = if probing {
                    Duration::ZERO
                } else {
                    Duration::from_secs(1)
                };
                let fetched = tokio::select! {
                    () = stop.cancelled() => return,
                    r = client.records(p, cp.next, self.config.batch, wait) => r,
                };
                match fetched {
                    Ok(resp) => {
                        read_errors = 0;
                        let seen = verified.and_then(|v| v.1);
                        match (seen, resp.epoch) {
                            (Some(seen), Some(now)) if now != seen => {
                                // The hub changed epoch (promoted, or stepped
                                // down and reconciled): its log may differ.
                                tracing::info!(from = %seen, to = %now, "the hub's epoch changed; checking the checkpoint again");
                                verified = None;
                                self.hubs.nudge.notify_one();
                                continue;
                            }
                            (None, Some(now)) => {
                                if let Some(v) = verified.as_mut() {
                                    v.1 = Some(now);
                                }
                            }
                            _ => {}
                        }
                        metrics::gauge!("fleet_consumer_lag_records", "group" => group.clone(), "partition" => partition_label.clone())
                            .set(resp.high_watermark.0.saturating_sub(cp.next.0) as f64);
                        pending = resp.records;
                    }
                    Err(ClientError::Api {
                        code: Some(ErrorCode::OffsetGone),
                        message,
                        ..
                    }) => {
                        match self.skip_to_log_start(client, p, cp, &message).await {
                            Some(next) => cp = next,
                            None => {
                                self.sleep_or(Duration::from_secs(1), &stop).await;
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        read_errors += 1;
                        tracing::warn!(error = %e, "cannot read the log; looking for the primary again");
                        self.hubs.nudge.notify_one();
                        let d = (self.config.jitter)(self.config.retry.ceiling(read_errors));
                        self.sleep_or(d.max(Duration::from_millis(50)), &stop).await;
                        continue;
                    }
                }
            }
            if probing {
                if let Err(e) = self.handler.check().await {
                    tracing::warn!(error = %e, "probe: downstream still unavailable");
                    self.failure(&e).await;
                    continue;
                }
                if pending.is_empty() {
                    self.probe_succeeded(&me).await;
                    continue;
                }
            }
            if pending.is_empty() || (!probing && !self.breaker_closed()) {
                // Nothing to do, or the breaker opened during the fetch: the
                // batch waits in hand.
                continue;
            }
            let outcome = self.process(&pending, probing, &me, &stop).await;
            let done = match outcome {
                Outcome::Done => {
                    unavailable = 0;
                    pending.len()
                }
                Outcome::Stalled { done } => done,
            };
            if done > 0 {
                let last = &pending[done - 1];
                let next = Checkpoint {
                    next: last.offset.next(),
                    last_epoch: last.epoch,
                };
                match self.commit(p, next, &stop).await {
                    Ok(()) => {
                        cp = next;
                        pending.drain(..done);
                        metrics::gauge!("fleet_consumer_checkpoint", "group" => group.clone(), "partition" => partition_label.clone())
                            .set(cp.next.0 as f64);
                    }
                    Err(Stop) => return,
                }
            }
            if let Outcome::Stalled { .. } = outcome {
                unavailable += 1;
                let d = (self.config.jitter)(self.config.retry.ceiling(unavailable));
                self.sleep_or(d, &stop).await;
            }
        }
    }

    /// Writes the checkpoint, retrying store errors; `Err(Stop)` when the
    /// lease is gone or the worker is stopped.
    async fn commit(
        &self,
        p: PartitionId,
        to: Checkpoint,
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        loop {
            match self.store.commit(p, to, &self.instance).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::warn!("lease lost before the checkpoint; another instance redelivers");
                    return Err(Stop);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write checkpoint; retrying");
                    if !self.sleep_or(Duration::from_millis(500), stop).await {
                        return Err(Stop);
                    }
                }
            }
        }
    }

    /// Hands `batch` to the handler: as a whole first; after a record
    /// rejection, one record at a time with retries, dead-lettering records
    /// that exhaust them.
    async fn process(
        &self,
        batch: &[WireRecord],
        probing: bool,
        me: &str,
        stop: &CancellationToken,
    ) -> Outcome {
        let group = self.group();
        match self.handler.handle(batch).await {
            Ok(()) => {
                self.processed(batch.len());
                if probing {
                    self.probe_succeeded(me).await;
                }
                return Outcome::Done;
            }
            Err(e) => {
                self.failure(&e).await;
                if let HandlerError::Unavailable(reason) = &e {
                    tracing::warn!(reason = %reason, records = batch.len(), "downstream unavailable; the batch waits");
                    return Outcome::Stalled { done: 0 };
                }
                if probing {
                    // The downstream answered: the records are the problem.
                    self.probe_succeeded(me).await;
                }
            }
        }
        for (i, record) in batch.iter().enumerate() {
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let result = self.handler.handle(std::slice::from_ref(record)).await;
                match result {
                    Ok(()) => {
                        self.processed(1);
                        break;
                    }
                    Err(e) => {
                        self.failure(&e).await;
                        let HandlerError::Record(reason) = e else {
                            return Outcome::Stalled { done: i };
                        };
                        if attempts >= self.config.retry.attempts {
                            match self.store.dead_letter(record, &reason, attempts).await {
                                Ok(()) => {
                                    tracing::warn!(offset = %record.offset, device_id = %record.device_id, attempts, reason = %reason, "record dead-lettered");
                                    self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                                    metrics::counter!("fleet_consumer_dead_letters_total", "group" => group.clone())
                                        .increment(1);
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot write the dead letter; the record waits");
                                    return Outcome::Stalled { done: i };
                                }
                            }
                        }
                        metrics::counter!("fleet_consumer_retries_total", "group" => group.clone())
                            .increment(1);
                        let d = (self.config.jitter)(self.config.retry.ceiling(attempts));
                        if !self.sleep_or(d, stop).await || !self.breaker_closed() {
                            // Stopped, or the breaker opened meanwhile: the
                            // record starts over later with fresh attempts.
                            return Outcome::Stalled { done: i };
                        }
                    }
                }
            }
        }
        Outcome::Done
    }

    fn processed(&self, n: usize) {
        self.counters
            .processed
            .fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!("fleet_consumer_records_total", "group" => self.group())
            .increment(n as u64);
    }

    /// Checks that the record before the checkpoint is the one this primary
    /// holds there; after a forced failover the new primary may have written
    /// other records at those offsets, and the checkpoint is rewound to where
    /// both logs agree.
    async fn verify(&self, client: &HubClient, p: PartitionId, cp: Checkpoint) -> Verify {
        if cp.next == Offset::ZERO {
            return Verify::Same(None);
        }
        let before = Offset(cp.next.0 - 1);
        let mut hub_epoch = None;
        let same = match client.records(p, before, 1, Duration::ZERO).await {
            Ok(resp) => {
                hub_epoch = resp.epoch;
                match resp.records.first() {
                    Some(r) if r.offset == before => r.epoch == cp.last_epoch,
                    _ => false,
                }
            }
            // Retention passed it: nothing to compare, nothing to re-read.
            Err(ClientError::Api {
                code: Some(ErrorCode::OffsetGone),
                ..
            }) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot verify the checkpoint yet");
                return Verify::Unknown;
            }
        };
        if same {
            return Verify::Same(hub_epoch);
        }
        let end = match client.epoch_end(p, cp.last_epoch).await {
            Ok(end) => end,
            Err(e) => {
                tracing::warn!(error = %e, "cannot find where the logs agree yet");
                return Verify::Unknown;
            }
        };
        let to = end.min(cp.next);
        let last_epoch = if to == Offset::ZERO {
            Epoch(0)
        } else {
            match client.records(p, Offset(to.0 - 1), 1, Duration::ZERO).await {
                Ok(resp) => resp.records.first().map_or(Epoch(0), |r| r.epoch),
                Err(_) => Epoch(0),
            }
        };
        let rewound = Checkpoint {
            next: to,
            last_epoch,
        };
        match self.store.rewind(p, rewound, &self.instance).await {
            Ok(true) => {
                tracing::warn!(from = %cp.next, to = %to, "records past the checkpoint were replaced by a failover; re-reading from where the regions agree");
                self.counters.rewinds.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleet_consumer_rewinds_total", "group" => self.group())
                    .increment(1);
                Verify::Rewound(rewound, hub_epoch)
            }
            Ok(false) => Verify::Stop,
            Err(e) => {
                tracing::warn!(error = %e, "cannot rewind the checkpoint");
                Verify::Unknown
            }
        }
    }

    /// Retention removed records the group had not read: they cannot be
    /// delivered; say so loudly and continue from the oldest retained.
    async fn skip_to_log_start(
        &self,
        client: &HubClient,
        p: PartitionId,
        cp: Checkpoint,
        message: &str,
    ) -> Option<Checkpoint> {
        let status = client.status().await.ok()?;
        let start = status.partitions.get(p.0 as usize)?.log_start;
        if start <= cp.next {
            return None;
        }
        tracing::error!(from = %cp.next, to = %start, hub = %message, "records expired by retention before this group read them; skipping to the oldest retained");
        metrics::counter!("fleet_consumer_expired_records_total", "group" => self.group())
            .increment(start.0 - cp.next.0);
        let next = Checkpoint {
            next: start,
            last_epoch: Epoch(0),
        };
        match self.store.commit(p, next, &self.instance).await {
            Ok(true) => Some(next),
            _ => None,
        }
    }
}

/// The worker must stop (lease lost or shutdown).
struct Stop;

/// Whether a checkpoint holds on the hub being read.
enum Verify {
    /// With the hub's epoch when known.
    Same(Option<Epoch>),
    Rewound(Checkpoint, Option<Epoch>),
    /// Could not tell (the hub did not answer): do not process yet.
    Unknown,
    Stop,
}

fn set_breaker_gauge(group: &str, state: &State) {
    let v = match state {
        State::Closed => 0.0,
        State::HalfOpen { .. } => 1.0,
        State::Open { .. } => 2.0,
    };
    metrics::gauge!("fleet_consumer_breaker_state", "group" => group.to_string()).set(v);
}
