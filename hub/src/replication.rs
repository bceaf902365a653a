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
//!   record ends in the primary's history, and moves anything past that
//!   point into an archive file (never deleted). Epochs never decrease along
//!   a partition's offsets, so a binary search answers the question.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_api::concierge::{FailoverResponse, Mode, PromoteRequest, UnreplicatedRange};
use fleet_api::hub::{
    ArchivedRange, EpochBody, EpochEnd, FailbackReport, FenceResponse, MissingRecord,
    RecordsResponse, ReplicationStatus, StatusResponse,
};
use fleet_api::{DeviceId, Epoch, ErrorBody, Mid, Offset, PartitionId, Role, Secret};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ingest, Replication};
use crate::log::{EventLog, LogError, ReadLimits, Record};
use crate::sessions::{Kick, Outbound, Sessions};
use crate::state::{HubState, RoleEpoch};

/// Records per replication pull.
const PULL_MAX: usize = 2000;
/// How long a pull waits for new records at the primary.
const PULL_WAIT: Duration = Duration::from_millis(1000);

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
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What this hub last heard from its peer.
#[derive(Clone, Debug, Default)]
struct PeerView {
    reachable: bool,
    role: Option<Role>,
    epoch: Option<Epoch>,
    /// Per partition, the primary's high watermark in the last pull answer.
    high_watermarks: Vec<Offset>,
}

/// The replication and role controller of one hub.
pub struct Control {
    peer: Option<String>,
    peer_token: Secret,
    max_lag: Option<Duration>,
    state: Arc<HubState>,
    ingest: Arc<Ingest>,
    sessions: Arc<Sessions>,
    archive_dir: PathBuf,
    http: reqwest::Client,
    promotion: tokio::sync::Mutex<()>,
    view: Mutex<PeerView>,
    archived: Mutex<Vec<ArchivedRange>>,
    reconciling: AtomicBool,
    throttle: watch::Sender<bool>,
    /// Set once the peer watch has looked at the peer (or failed to) once.
    looked: watch::Sender<bool>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

fn log_of(ingest: &Ingest) -> &Arc<dyn EventLog> {
    ingest.log()
}

impl Control {
    pub fn new(
        peer: Option<String>,
        peer_token: Secret,
        max_lag: Option<Duration>,
        ingest: Arc<Ingest>,
        sessions: Arc<Sessions>,
        data_dir: &std::path::Path,
        peer_roots: &[reqwest::Certificate],
    ) -> anyhow::Result<Arc<Control>> {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30));
        let http = crate::https::trusting(builder, peer_roots).build()?;
        let partitions = ingest.log().partitions() as usize;
        Ok(Arc::new(Control {
            peer,
            peer_token,
            max_lag,
            state: ingest.state().clone(),
            ingest,
            sessions,
            archive_dir: data_dir.join("archive"),
            http,
            promotion: tokio::sync::Mutex::new(()),
            view: Mutex::new(PeerView {
                high_watermarks: vec![Offset(0); partitions],
                ..PeerView::default()
            }),
            archived: Mutex::new(Vec::new()),
            reconciling: AtomicBool::new(false),
            throttle: watch::Sender::new(false),
            looked: watch::Sender::new(false),
        }))
    }

    /// Follows the throttle (true while async lag is over `--max-lag-ms`).
    pub fn throttle(&self) -> watch::Receiver<bool> {
        self.throttle.subscribe()
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
        if self.peer.is_some() {
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

    // ----------------------------------------------------------------- roles

    /// Learns a higher epoch: persists the secondary role, then closes every
    /// device connection. Nothing is acknowledged after this.
    pub fn learn(&self, epoch: Epoch, why: &str) {
        let now = self.state.get();
        if epoch <= now.epoch {
            return;
        }
        self.step_down(epoch, why);
    }

    fn step_down(&self, epoch: Epoch, why: &str) {
        let now = self.state.get();
        let next = RoleEpoch {
            role: Role::Secondary,
            epoch,
        };
        if let Err(e) = self.state.set(next) {
            // Cannot persist: stop accepting anyway, the safe direction.
            tracing::error!(error = %e, "cannot persist the demotion; fencing");
            self.state.set_fenced(true);
        } else {
            self.state.set_fenced(false);
        }
        if now.role == Role::Primary {
            tracing::warn!(old = %now.epoch, new = %epoch, why, "demoted: no longer the primary");
            metrics::counter!("fleet_hub_demotions_total").increment(1);
            self.sessions.kick_all(Kick::Demoted);
        } else {
            tracing::info!(epoch = %epoch, why, "following a higher epoch");
        }
        self.set_role_metrics();
    }

    fn set_role_metrics(&self) {
        let re = self.state.get();
        metrics::gauge!("fleet_hub_epoch").set(re.epoch.0 as f64);
        metrics::gauge!("fleet_hub_is_primary").set(if re.role == Role::Primary {
            1.0
        } else {
            0.0
        });
    }

    /// `POST /v1/demote`: learn a higher epoch, or (without one, as an
    /// operator) step down under the current epoch.
    pub fn demote(&self, body: EpochBody) {
        let now = self.state.get();
        match body.epoch {
            Some(e) => self.learn(e, "asked to demote"),
            None if now.role == Role::Primary => self.step_down(now.epoch, "asked to step down"),
            None => {}
        }
    }

    /// `POST /v1/fence`: stop accepting writes, flush, report the final high
    /// watermarks (the first step of a planned promotion of the peer).
    ///
    /// # Errors
    /// When this hub is not the primary, or a partition cannot be flushed.
    pub async fn fence(&self, body: EpochBody) -> Result<FenceResponse, ControlError> {
        let now = self.state.get();
        if now.role != Role::Primary {
            return Err(ControlError::NotPrimary);
        }
        if body.epoch.is_some_and(|e| e <= now.epoch) {
            return Err(ControlError::EpochMismatch {
                current: now.epoch,
                expected: body.epoch.unwrap_or(now.epoch),
            });
        }
        self.state.set_fenced(true);
        self.sessions.kick_all(Kick::Demoted);
        tracing::warn!("fenced: no more writes while the peer takes over");
        let log = log_of(&self.ingest);
        let mut high_watermarks = Vec::new();
        for p in 0..log.partitions() {
            log.flush(PartitionId(p)).await?;
            high_watermarks.push(log.high_watermark(PartitionId(p)));
        }
        Ok(FenceResponse { high_watermarks })
    }

    /// `POST /v1/unfence`: a planned promotion was abandoned.
    pub fn unfence(&self) {
        if self.state.fenced() {
            tracing::warn!("unfenced: accepting writes again");
            self.state.set_fenced(false);
        }
    }

    /// `POST /v1/promote`.
    ///
    /// # Errors
    /// An epoch mismatch (another promotion won), an unreachable primary for
    /// a planned promotion, or a hub that is already primary.
    pub async fn promote(&self, req: PromoteRequest) -> Result<FailoverResponse, ControlError> {
        let _one_at_a_time = self.promotion.lock().await;
        let started = Instant::now();
        let now = self.state.get();
        if req.expected_epoch < now.epoch {
            return Err(ControlError::EpochMismatch {
                current: now.epoch,
                expected: req.expected_epoch,
            });
        }
        if now.role == Role::Primary {
            return Err(ControlError::Conflict(format!(
                "this hub is already the primary at epoch {}",
                now.epoch
            )));
        }
        let next = Epoch(req.expected_epoch.0 + 1);
        let mut unreplicated = Vec::new();
        match req.mode {
            Mode::Planned => {
                let peer = self
                    .peer
                    .clone()
                    .ok_or_else(|| ControlError::Unavailable("no peer to take over from".into()))?;
                let fenced: FenceResponse = self
                    .call(&format!("{peer}/v1/fence"), &EpochBody { epoch: Some(next) }, Duration::from_secs(30))
                    .await
                    .map_err(|e| ControlError::Unavailable(format!("planned promotion needs the primary, which did not fence: {e}; use forced")))?;
                // Catch up to exactly what the primary holds.
                let log = log_of(&self.ingest).clone();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let behind = fenced
                        .high_watermarks
                        .iter()
                        .enumerate()
                        .any(|(p, hw)| log.high_watermark(PartitionId(p as u32)) < *hw);
                    if !behind {
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = self
                            .call::<serde_json::Value>(
                                &format!("{peer}/v1/unfence"),
                                &EpochBody::default(),
                                Duration::from_secs(5),
                            )
                            .await;
                        return Err(ControlError::Unavailable(
                            "the secondary did not catch up within 60 s; the primary was unfenced"
                                .into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                self.become_primary(next)?;
                if let Err(e) = self
                    .call::<serde_json::Value>(
                        &format!("{peer}/v1/demote"),
                        &EpochBody { epoch: Some(next) },
                        Duration::from_secs(5),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "the old primary did not confirm its demotion; it will learn the epoch");
                }
            }
            Mode::Forced => {
                let view = self.view().clone();
                let log = log_of(&self.ingest);
                for (p, theirs) in view.high_watermarks.iter().enumerate() {
                    let mine = log.high_watermark(PartitionId(p as u32));
                    if *theirs > mine {
                        unreplicated.push(UnreplicatedRange {
                            partition: PartitionId(p as u32),
                            from: mine,
                            to: *theirs,
                        });
                    }
                }
                self.become_primary(next)?;
                if let Some(peer) = self.peer.clone() {
                    let me = self.http.clone();
                    let token = self.peer_token.clone();
                    tokio::spawn(async move {
                        let _ = me
                            .post(format!("{peer}/v1/demote"))
                            .bearer_auth(token.expose())
                            .timeout(Duration::from_secs(2))
                            .json(&EpochBody { epoch: Some(next) })
                            .send()
                            .await;
                    });
                }
            }
        }
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::warn!(epoch = %next, mode = req.mode.as_str(), took_ms, "promoted to primary");
        metrics::counter!("fleet_hub_promotions_total", "mode" => req.mode.as_str()).increment(1);
        Ok(FailoverResponse {
            region: self.state.region().clone(),
            epoch: next,
            mode: req.mode,
            took_ms,
            unreplicated,
        })
    }

    fn become_primary(&self, epoch: Epoch) -> Result<(), ControlError> {
        self.state
            .set(RoleEpoch {
                role: Role::Primary,
                epoch,
            })
            .map_err(|e| ControlError::Unavailable(format!("cannot persist the new role: {e}")))?;
        self.state.set_fenced(false);
        // What the old primary sent was acknowledged by this hub's pulls;
        // from now on the old primary is the one pulling.
        self.set_role_metrics();
        Ok(())
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &EpochBody,
        timeout: Duration,
    ) -> Result<T, String> {
        let resp = self
            .http
            .post(url)
            .bearer_auth(self.peer_token.expose())
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let msg = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.error.message);
            return Err(format!("{status}: {msg}"));
        }
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }

    // -------------------------------------------------------- primary side

    /// A replication pull arrived for `p` from `from`: everything below is
    /// durable at the secondary. Returns the epoch to report back.
    ///
    /// # Errors
    /// When this hub is not the primary, or the secondary is ahead of it.
    pub fn on_pull(
        &self,
        p: PartitionId,
        from: Offset,
        their_epoch: Option<Epoch>,
    ) -> Result<Epoch, ControlError> {
        if let Some(e) = their_epoch
            && e > self.state.get().epoch
        {
            self.learn(e, "a replication pull carried a higher epoch");
        }
        let now = self.state.get();
        if now.role != Role::Primary {
            return Err(ControlError::NotPrimary);
        }
        let hw = log_of(&self.ingest).high_watermark(p);
        if from > hw {
            return Err(ControlError::Conflict(format!(
                "diverged: the replica asks from offset {from} but this log ends at {hw}; reconcile first"
            )));
        }
        for (device, mid) in self.ingest.advance_replicated(p, from) {
            self.sessions.send(&device, Outbound::Replicated(mid));
        }
        Ok(now.epoch)
    }

    /// `GET /v1/partitions/{p}/epoch_end?epoch=E`: the first offset written
    /// in an epoch later than `E` (the high watermark when there is none).
    ///
    /// # Errors
    /// When the log cannot be read.
    pub async fn epoch_end(&self, p: PartitionId, epoch: Epoch) -> Result<EpochEnd, ControlError> {
        let log = log_of(&self.ingest);
        let (mut lo, mut hi) = (log.log_start(p).0, log.high_watermark(p).0);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let later = epoch_at(log.as_ref(), p, Offset(mid))
                .await?
                .is_some_and(|e| e > epoch);
            if later {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(EpochEnd { offset: Offset(lo) })
    }

    // ------------------------------------------------------ secondary side

    async fn pull_loop(self: Arc<Self>, p: PartitionId) {
        let Some(peer) = self.peer.clone() else {
            return;
        };
        let mut roles = self.state.subscribe();
        let log = log_of(&self.ingest).clone();
        let mut reconciled = false;
        loop {
            if roles.borrow_and_update().role != Role::Secondary {
                reconciled = false;
                let _ = roles.changed().await;
                continue;
            }
            if !reconciled {
                match self.reconcile(&peer, p).await {
                    Ok(()) => reconciled = true,
                    Err(e) => {
                        tracing::info!(partition = %p, error = %e, "cannot reconcile with the primary yet");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                }
            }
            let from = log.high_watermark(p);
            let epoch = self.state.get().epoch;
            let url = format!(
                "{peer}/v1/partitions/{}/records?from={}&max={PULL_MAX}&wait_ms={}&replica={}&epoch={}",
                p.0,
                from.0,
                PULL_WAIT.as_millis(),
                self.state.region(),
                epoch.0
            );
            let resp = self
                .http
                .get(&url)
                .bearer_auth(self.peer_token.expose())
                .timeout(PULL_WAIT + Duration::from_secs(5))
                .send()
                .await;
            let page: RecordsResponse = match resp {
                Ok(r) if r.status().is_success() => match r.json().await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(partition = %p, error = %e, "unreadable replication answer");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    if status == reqwest::StatusCode::CONFLICT && text.contains("diverged") {
                        tracing::warn!(partition = %p, "this log is ahead of the primary's; reconciling");
                        reconciled = false;
                    } else {
                        tracing::debug!(partition = %p, %status, "the peer does not serve replication now");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(partition = %p, error = %e, "cannot reach the primary");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if let Some(e) = page.epoch
                && e > self.state.get().epoch
            {
                self.learn(e, "the primary's epoch");
            }
            {
                let mut view = self.view();
                view.reachable = true;
                if let Some(slot) = view.high_watermarks.get_mut(p.0 as usize) {
                    *slot = page.high_watermark;
                }
            }
            if self.state.get().role != Role::Secondary {
                continue;
            }
            let mut pending = Vec::with_capacity(page.records.len());
            let mut failed = false;
            for w in page.records {
                let record = Record {
                    partition: w.partition,
                    offset: w.offset,
                    record: crate::log::NewRecord {
                        device_id: w.device_id,
                        mid: w.mid,
                        enqueued_at: w.enqueued_at,
                        region: w.region,
                        epoch: w.epoch,
                        payload: w.payload.into(),
                    },
                };
                match self.ingest.replicate(record) {
                    Ok(done) => pending.push(done),
                    Err(e) => {
                        tracing::warn!(partition = %p, error = %e, "replication out of step; reconciling");
                        reconciled = false;
                        failed = true;
                        break;
                    }
                }
            }
            // Durable here before the next pull acknowledges them.
            for done in pending {
                if let Err(e) = done.await {
                    tracing::error!(partition = %p, error = %e, "cannot store replicated records");
                    failed = true;
                }
            }
            if failed {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    /// Cuts partition `p` back to the part of its history the primary
    /// shares, archiving the rest.
    async fn reconcile(&self, peer: &str, p: PartitionId) -> Result<(), String> {
        let log = log_of(&self.ingest).clone();
        loop {
            let hw = log.high_watermark(p);
            if hw == Offset(0) || hw <= log.log_start(p) {
                return Ok(());
            }
            let last = epoch_at(log.as_ref(), p, Offset(hw.0 - 1))
                .await
                .map_err(|e| e.to_string())?;
            let Some(last_epoch) = last else {
                return Ok(());
            };
            let url = format!(
                "{peer}/v1/partitions/{}/epoch_end?epoch={}",
                p.0, last_epoch.0
            );
            let resp = self
                .http
                .get(&url)
                .bearer_auth(self.peer_token.expose())
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("epoch_end answered {}", resp.status()));
            }
            let end: EpochEnd = resp.json().await.map_err(|e| e.to_string())?;
            if end.offset >= hw {
                return Ok(());
            }
            self.reconciling.store(true, Ordering::Release);
            let file = self.archive_dir.join(format!(
                "p{}-epoch{}-{}-{}.log",
                p.0, last_epoch.0, end.offset.0, hw.0
            ));
            let moved = log
                .truncate(p, end.offset, file.clone())
                .await
                .map_err(|e| e.to_string())?;
            self.ingest.rebuild(p).await.map_err(|e| e.to_string())?;
            self.archived
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ArchivedRange {
                    partition: p,
                    from: end.offset,
                    to: hw,
                    epoch: last_epoch,
                    file: file.display().to_string(),
                });
            metrics::counter!("fleet_hub_archived_records_total").increment(moved);
            self.reconciling.store(false, Ordering::Release);
        }
    }

    /// `GET /v1/failback`: the archived ranges, and which archived
    /// `(device, mid)` this hub's history (the new primary's) lacks.
    ///
    /// # Errors
    /// When an archive or the log cannot be read.
    pub async fn failback_report(&self) -> Result<FailbackReport, ControlError> {
        let archived = self
            .archived
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut report = FailbackReport {
            archived: archived.clone(),
            ..FailbackReport::default()
        };
        let log = log_of(&self.ingest).clone();
        for range in archived {
            let bytes = tokio::fs::read(&range.file)
                .await
                .map_err(|e| LogError::Io(format!("{}: {e}", range.file)))?;
            let mut wanted: Vec<(DeviceId, Option<Mid>)> = Vec::new();
            let mut at = 0;
            while let crate::log::frame::Decoded::Frame { record, len, .. } =
                crate::log::frame::decode(&bytes[at..])
            {
                wanted.push((record.device_id, record.mid));
                at += len;
            }
            report.archived_records += wanted.len() as u64;
            // Everything in the new history of this partition from the cut on.
            let mut have: std::collections::HashSet<(DeviceId, Mid)> =
                std::collections::HashSet::new();
            let mut from = range.from;
            loop {
                let batch = log
                    .read(
                        range.partition,
                        from,
                        ReadLimits {
                            max_records: 10_000,
                            max_bytes: 64 << 20,
                        },
                    )
                    .await?;
                let Some(last) = batch.last() else { break };
                from = last.offset.next();
                for r in batch {
                    if let Some(m) = r.record.mid {
                        have.insert((r.record.device_id, m));
                    }
                }
            }
            // Devices resend what was never `replicated`: it lands after the cut.
            for (device, mid) in wanted {
                let present = mid.is_some_and(|m| have.contains(&(device.clone(), m)));
                if !present {
                    report.missing_count += 1;
                    if report.missing.len() < 1000 {
                        report.missing.push(MissingRecord {
                            device_id: device,
                            mid,
                        });
                    }
                }
            }
        }
        Ok(report)
    }

    // ---------------------------------------------------------- both sides

    /// Watches the peer: learns a higher epoch, fences a stale primary.
    async fn peer_watch(self: Arc<Self>) {
        let Some(peer) = self.peer.clone() else {
            return;
        };
        let mut first = true;
        loop {
            let status = self
                .http
                .get(format!("{peer}/v1/status"))
                .timeout(Duration::from_millis(800))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            let status: Option<StatusResponse> = match status {
                Some(r) => r.json().await.ok(),
                None => None,
            };
            {
                let mut view = self.view();
                view.reachable = status.is_some();
                view.role = status.as_ref().map(|s| s.role);
                view.epoch = status.as_ref().map(|s| s.epoch);
            }
            if let Some(s) = &status {
                let me = self.state.get();
                if s.epoch > me.epoch {
                    self.learn(s.epoch, "the peer holds a higher epoch");
                } else if me.role == Role::Primary && s.role == Role::Primary && s.epoch < me.epoch
                {
                    tracing::warn!(peer_epoch = %s.epoch, "the peer is a stale primary; telling it to demote");
                    let _ = self
                        .http
                        .post(format!("{peer}/v1/demote"))
                        .bearer_auth(self.peer_token.expose())
                        .timeout(Duration::from_secs(2))
                        .json(&EpochBody {
                            epoch: Some(me.epoch),
                        })
                        .send()
                        .await;
                }
            }
            if first {
                // A restarted primary waited for this first look (see `fence_until_checked`).
                first = false;
                self.state.set_fenced(false);
                self.looked.send_replace(true);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A hub that restarts as primary with a peer waits for one look at the
    /// peer before accepting writes: someone may have taken over meanwhile.
    pub fn fence_until_checked(&self) {
        if self.peer.is_some() && self.state.get().role == Role::Primary {
            self.state.set_fenced(true);
        }
    }

    /// Waits (at most `limit`) for the first look at the peer.
    pub async fn first_look(&self, limit: Duration) {
        if self.peer.is_none() {
            return;
        }
        let mut rx = self.looked.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|l| *l)).await;
    }

    async fn lag_monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            let primary = self.state.get().role == Role::Primary;
            let mut worst = Duration::ZERO;
            for p in 0..self.partitions() {
                let (records, age) = if primary {
                    self.ingest.lag(PartitionId(p))
                } else {
                    (0, Duration::ZERO)
                };
                worst = worst.max(age);
                if n.is_multiple_of(10) {
                    metrics::gauge!("fleet_hub_replication_lag_records", "partition" => p.to_string()).set(records as f64);
                }
            }
            if n.is_multiple_of(10) {
                metrics::gauge!("fleet_hub_replication_lag_seconds").set(worst.as_secs_f64());
                self.set_role_metrics();
            }
            if let Some(max) = self.max_lag {
                let on = *self.throttle.borrow();
                // Hysteresis: pause above the limit, resume below half of it.
                let next = if on { worst > max / 2 } else { worst > max };
                if next != on {
                    if next {
                        tracing::warn!(
                            lag_ms = worst.as_millis() as u64,
                            "replication lag over the limit: pausing ingest"
                        );
                    } else {
                        tracing::info!("replication caught up: resuming ingest");
                    }
                    self.throttle.send_replace(next);
                }
            }
        }
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
        let Some(peer) = self.peer.clone() else {
            return (None, false, 0);
        };
        let state = if self.reconciling.load(Ordering::Acquire) {
            "reconciling"
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

/// The epoch of the record at `offset`, if it is there.
async fn epoch_at(
    log: &dyn EventLog,
    p: PartitionId,
    offset: Offset,
) -> Result<Option<Epoch>, LogError> {
    let one = ReadLimits {
        max_records: 1,
        max_bytes: 1,
    };
    Ok(log
        .read(p, offset, one)
        .await?
        .first()
        .filter(|r| r.offset == offset)
        .map(|r| r.record.epoch))
}
