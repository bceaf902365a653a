//! Two regions under simulated load: registries for a pair, admin calls,
//! and `device-agent simulate` processes (shared by the replication and
//! detached-peer tests).

use std::path::Path;
use std::process::{Child, Stdio};

use fleet_api::hub::{FailbackReport, StatusResponse};

use crate::{ADMIN_TOKEN, ConciergeNode, Harness, HubNode, Registry};

/// Registries `a` and `b` holding the same `devices`.
pub async fn registries<S: AsRef<str>>(h: &Harness, devices: &[S]) -> (Registry, Registry) {
    let refs: Vec<&str> = devices.iter().map(AsRef::as_ref).collect();
    let mut a = Registry::sqlite(h.dir(), "a").await;
    a.add(&refs).await;
    let mut b = Registry::sqlite(h.dir(), "b").await;
    a.mirror_into(&mut b).await;
    (a, b)
}

/// `GET /v1/status` of `hub`.
pub async fn status(hub: &HubNode) -> StatusResponse {
    hub.client().status().await.expect("status")
}

/// `GET /v1/failback` of `hub`.
pub async fn failback_report(hub: &HubNode) -> FailbackReport {
    reqwest::Client::new()
        .get(format!("{}/v1/failback", hub.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("failback report")
        .json()
        .await
        .expect("failback report JSON")
}

/// A stored record as a comparable row: offset, mid, payload, epoch.
pub type Row = (u64, Option<u64>, Vec<u8>, u64);

/// The records of `device` on `hub` (8 partitions) as [`Row`]s.
pub async fn rows(hub: &HubNode, device: &str) -> Vec<Row> {
    hub.records_of(device, 8)
        .await
        .into_iter()
        .map(|r| (r.offset.0, r.mid.map(|m| m.0), r.payload, r.epoch.0))
        .collect()
}

/// `POST url` with the admin token and a JSON body.
pub async fn admin_post(url: String, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("post")
}

impl Harness {
    /// Starts `device-agent simulate` of the devices in `keys` at `rate`
    /// msgs/s each for `secs` against concierge `c` (stdout piped: its
    /// summary); `extra` flags are appended.
    pub fn spawn_simulate(
        &self,
        c: &ConciergeNode,
        keys: &Path,
        report: &Path,
        rate: &str,
        secs: &str,
        extra: &[&str],
    ) -> Child {
        let args = self.simulate_args(c, keys, report, rate, secs, extra);
        self.command("simulate", &args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn simulate")
    }
}
