//! What the concierge knows about the hubs: it polls every hub's status and
//! health and derives the active one (healthy, primary, highest epoch). It
//! keeps no state of its own beyond this cache, so any number of replicas can
//! run side by side and agree.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fleet_api::concierge::{FailoverEvent, RegionView};
use fleet_api::hub::StatusResponse;
use fleet_api::{DeviceId, Epoch, Region, Role, partition_for, rendezvous};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConciergeConfig, HubSpec};

/// The last known state of one hub.
#[derive(Clone, Debug)]
pub struct HubState {
    pub spec: HubSpec,
    pub status: Option<StatusResponse>,
    pub healthy: bool,
    pub failures: u32,
    pub last_ok: Option<Instant>,
    /// Since when the hub has been down (unhealthy), if it is.
    pub down_since: Option<Instant>,
    pub problem: Option<String>,
}

/// Where devices go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Active {
    pub region: Region,
    pub mqtt_url: String,
    pub epoch: Epoch,
}

/// Failovers kept for the timeline.
const TIMELINE: usize = 50;

/// The hubs as this replica sees them.
#[derive(Debug)]
pub struct Fleet {
    pub config: Arc<ConciergeConfig>,
    hubs: RwLock<Vec<HubState>>,
    timeline: Mutex<VecDeque<FailoverEvent>>,
    http: reqwest::Client,
    /// Bumped after every look at the hubs (long polls wait on it).
    looked: tokio::sync::watch::Sender<u64>,
}

impl Fleet {
    pub fn new(config: Arc<ConciergeConfig>) -> Arc<Fleet> {
        let hubs = config
            .hubs
            .iter()
            .map(|spec| HubState {
                spec: spec.clone(),
                status: None,
                healthy: false,
                failures: 0,
                last_ok: None,
                down_since: Some(Instant::now()),
                problem: Some("not checked yet".into()),
            })
            .collect();
        let timeout = config
            .poll
            .clamp(Duration::from_millis(200), Duration::from_secs(2));
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(5));
        for root in &config.hub_roots {
            builder = builder.add_root_certificate(root.clone());
        }
        let http = builder.build().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the hub HTTP client could not be set up; using defaults");
            reqwest::Client::new()
        });
        Arc::new(Fleet {
            config,
            hubs: RwLock::new(hubs),
            timeline: Mutex::new(VecDeque::new()),
            http,
            looked: tokio::sync::watch::channel(0).0,
        })
    }

    /// Changes after every look at the hubs.
    pub fn looks(&self) -> tokio::sync::watch::Receiver<u64> {
        self.looked.subscribe()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn hubs(&self) -> Vec<HubState> {
        self.hubs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where `device` goes in the active region: with several hubs there,
    /// the hub that writes the device's partition now, else the healthy
    /// hub the partition belongs to by rendezvous hashing (the choice the
    /// hubs make among themselves), so a dead hub's devices move to the
    /// others as soon as this replica sees it down. One hub: `active`'s.
    pub fn hub_for(&self, active: &Active, device: &DeviceId) -> String {
        let hubs = self.hubs.read().unwrap_or_else(|e| e.into_inner());
        let candidates: Vec<(&HubState, &StatusResponse)> = hubs
            .iter()
            .filter(|h| h.healthy && h.spec.region == active.region)
            .filter_map(|h| {
                let s = h.status.as_ref()?;
                (s.role == Role::Primary && s.epoch == active.epoch).then_some((h, s))
            })
            .collect();
        if candidates.len() < 2 {
            return active.mqtt_url.clone();
        }
        let partitions = candidates
            .iter()
            .map(|(_, s)| s.partitions.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let p = partition_for(device, u32::try_from(partitions).unwrap_or(u32::MAX));
        if let Some((h, _)) = candidates
            .iter()
            .find(|(_, s)| s.owned.as_ref().is_some_and(|o| o.contains(&p)))
        {
            return h.spec.mqtt_url.clone();
        }
        let name = |h: &HubState, s: &StatusResponse| -> String {
            s.hub_id.clone().unwrap_or_else(|| h.spec.http_url.clone())
        };
        let names: Vec<String> = candidates.iter().map(|(h, s)| name(h, s)).collect();
        let winner = rendezvous::pick(
            &rendezvous::partition_key(p),
            names.iter().map(String::as_str),
        );
        candidates
            .iter()
            .zip(&names)
            .find(|(_, n)| Some(n.as_str()) == winner)
            .map_or_else(
                || active.mqtt_url.clone(),
                |((h, _), _)| h.spec.mqtt_url.clone(),
            )
    }

    /// The active hub: healthy, primary, highest epoch.
    pub fn active(&self) -> Option<Active> {
        self.hubs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|h| h.healthy)
            .filter_map(|h| {
                let s = h.status.as_ref()?;
                (s.role == Role::Primary).then(|| Active {
                    region: h.spec.region.clone(),
                    mqtt_url: h.spec.mqtt_url.clone(),
                    epoch: s.epoch,
                })
            })
            .max_by_key(|a| a.epoch)
    }

    /// The active hub once its epoch is above `epoch`, waiting at most
    /// `wait` for one (a device that saw its hub go away asks for the next
    /// primary and is answered the moment this replica sees it).
    pub async fn active_above(&self, epoch: Epoch, wait: Duration) -> Option<Active> {
        let mut looked = self.looked.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(a) = self.active().filter(|a| a.epoch > epoch) {
                return Some(a);
            }
            match tokio::time::timeout_at(deadline, looked.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// The highest epoch any hub has reported.
    pub fn max_epoch(&self) -> Epoch {
        self.hubs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|h| h.status.as_ref().map(|s| s.epoch))
            .max()
            .unwrap_or(Epoch(0))
    }

    /// The hub of `region` to talk to for the region (a promotion, its
    /// checks): the first healthy one, else the first configured. With
    /// several hubs, any hub speaks for its region (they share role and
    /// epoch).
    pub fn spec(&self, region: &Region) -> Option<HubSpec> {
        let healthy = self
            .hubs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|h| &h.spec.region == region && h.healthy)
            .map(|h| h.spec.clone());
        healthy.or_else(|| {
            self.config
                .hubs
                .iter()
                .find(|h| &h.region == region)
                .cloned()
        })
    }

    /// The regions for `GET /v1/regions` and the status page.
    pub fn views(&self) -> Vec<RegionView> {
        let active = self.active();
        let now = Instant::now();
        self.hubs()
            .into_iter()
            .map(|h| RegionView {
                active: active.as_ref().is_some_and(|a| a.region == h.spec.region),
                role: h.status.as_ref().map(|s| s.role),
                epoch: h.status.as_ref().map(|s| s.epoch),
                healthy: h.healthy,
                replication_lag_ms: h.status.as_ref().map(|s| s.replication_lag_ms),
                connected_devices: h.status.as_ref().map(|s| s.connected_devices),
                mqtt_url: h.spec.mqtt_url.clone(),
                last_seen_ms_ago: h.last_ok.map(|t| now.duration_since(t).as_millis() as u64),
                problem: h.problem.clone(),
                detached_since_ms: detached(&h).and_then(|p| p.since_ms),
                written_while_detached: detached(&h).and_then(|p| p.written_since),
                region: h.spec.region,
            })
            .collect()
    }

    pub fn record_failover(&self, event: FailoverEvent) {
        let mut t = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
        t.push_front(event);
        t.truncate(TIMELINE);
    }

    pub fn timeline(&self) -> Vec<FailoverEvent> {
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Checks every hub once, concurrently.
    pub async fn poll_once(&self) {
        let specs = self.config.hubs.clone();
        let results = futures::future::join_all(specs.iter().map(|s| self.check(s))).await;
        self.apply(results);
        self.looked.send_modify(|n| *n = n.wrapping_add(1));
        if let Some(a) = self.active() {
            metrics::gauge!("fleet_concierge_active_epoch").set(a.epoch.0 as f64);
        }
        self.fence_stale_primaries().await;
    }

    fn apply(&self, results: Vec<Result<StatusResponse, String>>) {
        let mut hubs = self.hubs.write().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for (h, result) in hubs.iter_mut().zip(results) {
            match result {
                Ok(status) => {
                    if !h.healthy {
                        tracing::info!(region = %h.spec.region, role = %status.role, epoch = %status.epoch, "hub is up");
                    }
                    h.status = Some(status);
                    h.healthy = true;
                    h.failures = 0;
                    h.last_ok = Some(now);
                    h.down_since = None;
                    h.problem = None;
                }
                Err(problem) => {
                    h.failures += 1;
                    // A hub that answers but reports itself unhealthy is down at once.
                    let answered = problem.starts_with("unhealthy");
                    if (answered || h.failures >= self.config.failures) && h.healthy {
                        tracing::warn!(region = %h.spec.region, %problem, "hub is down");
                        h.healthy = false;
                        h.down_since = Some(now);
                    }
                    h.problem = Some(problem);
                }
            }
            metrics::gauge!("fleet_concierge_region_healthy", "region" => h.spec.region.to_string())
                .set(if h.healthy { 1.0 } else { 0.0 });
        }
    }

    /// Asks one hub for its status and health now (not from the cache).
    ///
    /// # Errors
    /// Why the hub does not count as healthy.
    pub async fn check(&self, spec: &HubSpec) -> Result<StatusResponse, String> {
        let status: StatusResponse = match self
            .http
            .get(format!("{}/v1/status", spec.http_url))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r
                .json()
                .await
                .map_err(|e| format!("bad status body: {e}"))?,
            Ok(r) => return Err(format!("status answered {}", r.status())),
            Err(e) => return Err(format!("unreachable: {e}")),
        };
        match self
            .http
            .get(format!("{}/healthz", spec.http_url))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(status),
            Ok(r) => Err(format!("unhealthy: {}", r.text().await.unwrap_or_default())),
            Err(e) => Err(format!("unreachable: {e}")),
        }
    }

    /// Two primaries (an old one came back after a forced failover): tell the
    /// one with the lower epoch about the higher one, so it demotes itself.
    async fn fence_stale_primaries(&self) {
        let hubs = self.hubs();
        let Some(top) = self.active() else { return };
        for h in hubs {
            let Some(s) = &h.status else { continue };
            if h.healthy && s.role == Role::Primary && s.epoch < top.epoch {
                tracing::warn!(region = %h.spec.region, stale = %s.epoch, current = %top.epoch, "telling a stale primary to demote");
                let _ = self
                    .http
                    .post(format!("{}/v1/demote", h.spec.http_url))
                    .bearer_auth(self.config.hub_token.expose())
                    .json(&serde_json::json!({"epoch": top.epoch}))
                    .send()
                    .await;
            }
        }
    }

    /// Polls until `shutdown`.
    pub async fn poll_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => self.poll_once().await,
            }
        }
    }
}

/// The hub's peer link when it runs alone (its peer detached).
fn detached(h: &HubState) -> Option<&fleet_api::hub::PeerLink> {
    h.status
        .as_ref()
        .and_then(|s| s.peer.as_ref())
        .filter(|p| p.state == fleet_api::hub::PeerState::Detached)
}
