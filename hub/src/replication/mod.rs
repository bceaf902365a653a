//! Replication between the two regions, promotion with epochs, fencing and
//! failback.
//!
//! - **Data.** The secondary pulls each partition from the primary, from its
//!   own high watermark, and appends the records at the primary's offsets, so
//!   the replicated prefix is the same records at the same offsets in both
//!   regions. Its next pull (`from`) is its acknowledgement: the primary
//!   learns from it that everything below `from` is durable over there.
//! - **Promotion.** `POST /v1/promote` is a compare-and-set on the epoch
//!   (`expected_epoch` must not be below this hub's epoch; the new epoch is
//!   `expected_epoch + 1`), serialized by a lock, so two racing concierges
//!   get exactly one winner. Planned: fence the primary, catch up to its
//!   final high watermarks, switch, demote it: no loss. Forced: switch now,
//!   and report what was not replicated.
//! - **Fencing.** A hub that learns a higher epoch (from its peer, from a
//!   replication pull, or from a concierge) demotes itself at once: it
//!   persists the new role first, then closes every device connection.
//! - **Failback.** A hub that becomes secondary reconciles each partition
//!   before replicating: it asks the primary where the epoch of its own last
//!   record ends in the primary's history and which epoch that is, and moves
//!   anything past the common point into an archive file (never deleted),
//!   repeating until its log is a prefix of the primary's (`history`).
//!   Epochs never decrease along a partition's offsets, so binary searches
//!   answer the questions.
//!
//! Role and epoch change in one place, `Control::transition` (`role`),
//! under one lock: the epoch never decreases.
//!
//! - `role`: the role/epoch state machine.
//! - `promotion`: promotion (planned and forced) and fencing for it.
//! - `leader`: the primary's side: pulls it serves, `replicated`, lag and
//!   the throttle.
//! - `follower`: the secondary's side: the pull loop and reconciling.
//! - `history`: the epoch history and the divergence rule.
//! - `failback`: archiving a divergent tail and the failback report.
//! - `link`: detaching a lost peer (running alone) and taking it back.
//! - `peer`: the HTTP calls to the peer.
//! - `peer_watch`: watching the peer's role and epoch.
//! - `region`: role, epoch and detachment shared by the hubs of a region on
//!   one JetStream log; `fence`: their fence for a planned promotion.

mod failback;
mod fence;
mod follower;
mod history;
mod leader;
mod link;
mod peer;
mod peer_watch;
mod planned;
mod promotion;
mod region;
mod role;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_api::hub::{ArchivedRange, ReplicationStatus};
use fleet_api::{Epoch, Offset, PartitionId, Role, Secret};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::HubConfig;
use crate::ingest::{Ingest, Replication};
use crate::log::{EventLog, LogError};
use crate::sessions::Sessions;
use crate::state::HubState;

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("epoch mismatch: this hub is at epoch {current}, the request expected {expected}")]
    EpochMismatch { current: Epoch, expected: Epoch },
    #[error("{0}")]
    Conflict(String),
    #[error("not the primary")]
    NotPrimary,
    #[error("{0}")]
    Unavailable(String),
    #[error("partition {0} is written by another hub of this region; ask it")]
    NotOwner(PartitionId),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What this hub last heard from its peer.
#[derive(Clone, Debug, Default)]
struct PeerView {
    reachable: bool,
    /// Wall-clock ms since the peer stopped answering (None: it answers,
    /// or was never looked at).
    unreachable_since_ms: Option<u64>,
    role: Option<Role>,
    epoch: Option<Epoch>,
    /// Per partition, the primary's high watermark in the last pull answer.
    high_watermarks: Vec<Offset>,
}

/// The replication and role controller of one hub.
pub struct Control {
    /// The other region's hubs (empty: no peer region).
    peers: Vec<String>,
    /// Per partition, the index in `peers` its pulls go to (the hub that
    /// writes it over there answers; others send this hub on).
    pull_peer: Mutex<Vec<usize>>,
    /// The index in `peers` the peer watch looks at first.
    watch_peer: std::sync::atomic::AtomicUsize,
    /// The region's lease bucket when several hubs share this log: role,
    /// epoch, fence and detachment are the region's (see `region`).
    region: Option<Arc<crate::log::jetstream::Leases>>,
    /// How long a silent hub of the region still counts as live.
    lease_ttl: Duration,
    /// The region's detachment this hub last followed or wrote (its
    /// `since_ms`): a detachment is followed once, so a hub that took the
    /// peer back is not detached again by the value it is about to clear.
    region_detached_seen: Mutex<Option<u64>>,
    /// The region's fence this hub last wrote or stopped for: its id and
    /// the revision of the region's value that carried it.
    fence_seen: Mutex<Option<(u64, u64)>>,
    /// The epoch at which an operator stepped this hub down: under it, the
    /// region's `primary` is not followed back.
    stepped_down: Mutex<Option<Epoch>>,
    peer_token: Secret,
    max_lag: Option<Duration>,
    peer_detach_after: Option<Duration>,
    state: Arc<HubState>,
    ingest: Arc<Ingest>,
    sessions: Arc<Sessions>,
    archive_dir: PathBuf,
    http: reqwest::Client,
    /// Serializes promotions (held across the catch-up of a planned one).
    promotion: tokio::sync::Mutex<()>,
    /// Held by `transition`, the one place role and epoch change.
    role_change: Mutex<()>,
    view: Mutex<PeerView>,
    archived: Mutex<Vec<ArchivedRange>>,
    reconciling: AtomicBool,
    /// The epoch of the peer's planned promotion this hub fenced for.
    fenced_for: Mutex<Option<Epoch>>,
    /// Fenced for a planned promotion (`POST /v1/fence`): only an unfence
    /// or a new role lifts it, never the restart check's first look.
    fence_planned: AtomicBool,
    /// The peer's partition count, when it differs from this hub's: the
    /// pair refuses to replicate (records and de-dup state would land in
    /// the wrong partitions).
    mismatch: Mutex<Option<usize>>,
    throttle: watch::Sender<bool>,
    /// Set once the peer watch has looked at the peer (or failed to) once.
    looked: watch::Sender<bool>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

fn log_of(ingest: &Ingest) -> &Arc<dyn EventLog> {
    ingest.log()
}

impl Control {
    /// The controller for the hub configured by `config` (peer, token, lag
    /// limit, detach timeout, data directory, trusted roots).
    ///
    /// # Errors
    /// When the peer HTTP client cannot be built.
    pub fn new(
        config: &HubConfig,
        ingest: Arc<Ingest>,
        sessions: Arc<Sessions>,
        region: Option<Arc<crate::log::jetstream::Leases>>,
    ) -> anyhow::Result<Arc<Control>> {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30));
        let http = fleet_api::client::trusting(builder, &config.peer_roots).build()?;
        let peers = config.peers.clone();
        let peer_token = config.peer_token.clone().unwrap_or_else(|| Secret::new(""));
        let max_lag = config.max_lag;
        let peer_detach_after = config.peer_detach_after;
        let data_dir = config.data.as_path();
        let partitions = ingest.log().partitions() as usize;
        Ok(Arc::new(Control {
            pull_peer: Mutex::new(vec![0; partitions]),
            watch_peer: std::sync::atomic::AtomicUsize::new(0),
            peers,
            region,
            lease_ttl: config.lease_ttl,
            region_detached_seen: Mutex::new(None),
            fence_seen: Mutex::new(None),
            stepped_down: Mutex::new(None),
            peer_token,
            max_lag,
            peer_detach_after,
            state: ingest.state().clone(),
            ingest,
            sessions,
            archive_dir: data_dir.join("archive"),
            http,
            promotion: tokio::sync::Mutex::new(()),
            role_change: Mutex::new(()),
            view: Mutex::new(PeerView {
                high_watermarks: vec![Offset(0); partitions],
                ..PeerView::default()
            }),
            archived: Mutex::new(Vec::new()),
            reconciling: AtomicBool::new(false),
            fenced_for: Mutex::new(None),
            fence_planned: AtomicBool::new(false),
            mismatch: Mutex::new(None),
            throttle: watch::Sender::new(false),
            looked: watch::Sender::new(false),
        }))
    }

    fn view(&self) -> std::sync::MutexGuard<'_, PeerView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn partitions(&self) -> u32 {
        log_of(&self.ingest).partitions()
    }

    /// Starts the background work: pulls while secondary, the peer watch,
    /// lag metrics and the throttle.
    pub fn spawn(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        shutdown: &CancellationToken,
    ) {
        if let Some(kv) = self.region.clone() {
            let me = self.clone();
            let token = shutdown.clone();
            tasks.spawn(async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = me.follow_region(kv) => {}
                }
            });
        }
        if !self.peers.is_empty() {
            for p in 0..self.partitions() {
                let me = self.clone();
                let token = shutdown.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        () = me.pull_loop(PartitionId(p)) => {}
                    }
                });
            }
            let me = self.clone();
            let token = shutdown.clone();
            tasks.spawn(async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = me.peer_watch() => {}
                }
            });
        }
        let me = self.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = me.lag_monitor() => {}
            }
        });
    }

    /// The peer's partition count when it differs from this hub's.
    pub(super) fn partition_mismatch(&self) -> Option<usize> {
        *self.mismatch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what the peer's status says about its partition count.
    pub(super) fn check_partitions(&self, theirs: usize) {
        let mine = self.partitions() as usize;
        let next = (theirs != mine).then_some(theirs);
        let mut m = self.mismatch.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_some() && *m != next {
            tracing::error!(
                mine,
                theirs,
                "the peer has a different partition count: refusing to replicate (create both logs with the same --partitions)"
            );
        }
        *m = next;
    }

    /// The replication part of `GET /v1/status`, and the overall lag in ms.
    pub fn status(&self) -> (Option<ReplicationStatus>, bool, u64) {
        let view = self.view().clone();
        let mode = self.ingest.mode();
        let re = self.state.get();
        let mut lag_records = 0;
        let mut lag = Duration::ZERO;
        for p in 0..self.partitions() {
            let p = PartitionId(p);
            let (records, age) = if re.role == Role::Primary {
                self.ingest.lag(p)
            } else if self.in_region() && !self.ingest.owns(p) {
                // Pulled by another hub of the region: its lag.
                (0, Duration::ZERO)
            } else {
                let theirs = view
                    .high_watermarks
                    .get(p.0 as usize)
                    .copied()
                    .unwrap_or(Offset(0));
                (
                    theirs
                        .0
                        .saturating_sub(log_of(&self.ingest).high_watermark(p).0),
                    Duration::ZERO,
                )
            };
            lag_records += records;
            lag = lag.max(age);
        }
        if self.peers.is_empty() {
            return (None, false, 0);
        }
        let peer = self.peers.join(",");
        let state = if self.partition_mismatch().is_some() {
            "partition_mismatch"
        } else if self.reconciling.load(Ordering::Acquire) {
            "reconciling"
        } else if self.state.detached().is_some() {
            "detached"
        } else if *self.throttle.borrow() {
            "throttled"
        } else if re.role == Role::Primary
            && mode == Replication::Sync
            && lag > Duration::from_secs(1)
        {
            "stalled"
        } else if lag_records == 0 {
            "streaming"
        } else {
            "catching_up"
        };
        let mode_name = match mode {
            Replication::Off => "off",
            Replication::Async => "async",
            Replication::Sync => "sync",
        };
        (
            Some(ReplicationStatus {
                mode: mode_name.into(),
                peer: Some(peer),
                state: state.into(),
                lag_records,
                lag_ms: lag.as_millis() as u64,
            }),
            view.reachable,
            lag.as_millis() as u64,
        )
    }
}
