//! The HTTP calls this hub makes to its peer hub.
//!
//! Everything but the status poll carries the peers' own `--peer-token`.

use std::future::Future;
use std::time::Duration;

use fleet_api::hub::{EpochBody, EpochEnd, StatusResponse};
use fleet_api::{Epoch, ErrorBody, Offset, PartitionId};

use super::Control;

/// Records per replication pull.
const PULL_MAX: usize = 2000;
/// How long a pull waits for new records at the primary.
const PULL_WAIT: Duration = Duration::from_millis(1000);

impl Control {
    /// The peer hub that partition `p`'s pulls go to now.
    pub(super) fn peer_for(&self, p: PartitionId) -> Option<String> {
        let at = self
            .pull_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(p.0 as usize)
            .copied()
            .unwrap_or(0);
        self.peers.get(at % self.peers.len().max(1)).cloned()
    }

    /// `peer` did not serve partition `p` (unreachable, or not the hub
    /// that writes it over there): the next pull asks the next peer hub.
    pub(super) fn next_peer_for(&self, p: PartitionId, peer: &str) {
        if self.peers.len() < 2 {
            return;
        }
        let mut at = self.pull_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = at.get_mut(p.0 as usize)
            && self.peers.get(*slot % self.peers.len()).map(String::as_str) == Some(peer)
        {
            *slot = (*slot + 1) % self.peers.len();
        }
    }

    /// The status of the first peer hub that answers (the one that
    /// answered last is asked first), with its URL.
    pub(super) async fn any_peer_status(&self) -> Option<(String, StatusResponse)> {
        let n = self.peers.len();
        let start = self.watch_peer.load(std::sync::atomic::Ordering::Relaxed);
        for i in 0..n {
            let at = (start + i) % n;
            let peer = &self.peers[at];
            if let Some(s) = self.peer_status(peer).await {
                self.watch_peer
                    .store(at, std::sync::atomic::Ordering::Relaxed);
                return Some((peer.clone(), s));
            }
        }
        None
    }

    /// POSTs `body` to `url` and reads the JSON answer; an error answer
    /// becomes `"{status}: {message}"`.
    pub(super) async fn call<T: serde::de::DeserializeOwned>(
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

    /// Tells `peer` that `epoch` exists, so that it demotes itself. Fire and
    /// forget: the peer learns the epoch anyway when it next looks.
    pub(super) fn tell_peer_to_demote(
        &self,
        peer: String,
        epoch: Epoch,
    ) -> impl Future<Output = ()> + Send + 'static {
        let http = self.http.clone();
        let token = self.peer_token.clone();
        async move {
            let _ = http
                .post(format!("{peer}/v1/demote"))
                .bearer_auth(token.expose())
                .timeout(Duration::from_secs(2))
                .json(&EpochBody { epoch: Some(epoch) })
                .send()
                .await;
        }
    }

    /// The peer's `GET /v1/status`, or `None` when it does not answer well.
    pub(super) async fn peer_status(&self, peer: &str) -> Option<StatusResponse> {
        let status = self
            .http
            .get(format!("{peer}/v1/status"))
            .timeout(Duration::from_millis(800))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        match status {
            Some(r) => r.json().await.ok(),
            None => None,
        }
    }

    /// A GET of `path` on the peer with the peer token, as JSON.
    async fn peer_get<T: serde::de::DeserializeOwned>(
        &self,
        peer: &str,
        path: &str,
    ) -> Result<T, String> {
        let resp = self
            .http
            .get(format!("{peer}{path}"))
            .bearer_auth(self.peer_token.expose())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{path} answered {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    /// Where `epoch` ends in the primary's history of partition `p`.
    pub(super) async fn peer_epoch_end(
        &self,
        peer: &str,
        p: PartitionId,
        epoch: Epoch,
    ) -> Result<EpochEnd, String> {
        let path = format!("/v1/partitions/{}/epoch_end?epoch={}", p.0, epoch.0);
        self.peer_get(peer, &path).await
    }

    /// The primary's epoch history of partition `p`.
    pub(super) async fn peer_epochs(
        &self,
        peer: &str,
        p: PartitionId,
    ) -> Result<fleet_api::hub::EpochHistory, String> {
        self.peer_get(peer, &format!("/v1/partitions/{}/epochs", p.0))
            .await
    }

    /// One replication pull of partition `p` from `from` (a long poll of
    /// [`PULL_WAIT`]), carrying this hub's region and epoch.
    pub(super) async fn pull(
        &self,
        peer: &str,
        p: PartitionId,
        from: Offset,
        epoch: Epoch,
    ) -> reqwest::Result<reqwest::Response> {
        let url = format!(
            "{peer}/v1/partitions/{}/records?from={}&max={PULL_MAX}&wait_ms={}&replica={}&epoch={}",
            p.0,
            from.0,
            PULL_WAIT.as_millis(),
            self.state.region(),
            epoch.0
        );
        self.http
            .get(&url)
            .bearer_auth(self.peer_token.expose())
            .timeout(PULL_WAIT + Duration::from_secs(5))
            .send()
            .await
    }
}
