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

pub mod api;
pub mod breaker;
pub mod cli;
mod deliver;
mod gate;
mod hubs;
mod leases;
pub mod prom;
pub mod sink;
pub mod store;
mod verify;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fleet_api::hub::WireRecord;
use fleet_api::{PartitionId, Secret};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use breaker::BreakerPolicy;
pub(crate) use deliver::Outcome;
use fleet_api::client::HubClient;
use hubs::Hubs;
use store::{ConsumerStore, StoreError};

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
    /// How far reads go: the replicated prefix (default) or the committed.
    pub upto: fleet_api::hub::ReadUpto,
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
            .field("store", &fleet_api::secret::redact_url(&self.store))
            .field("instance", &self.instance)
            .field("batch", &self.batch)
            .field("upto", &self.upto)
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
            upto: fleet_api::hub::ReadUpto::Replicated,
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
        prom::register(ctx.store.group());
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
}
