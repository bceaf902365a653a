//! Two regions under simulated load: registries for a pair, admin calls,
//! and `device-agent simulate` processes (shared by the replication and
//! detached-peer tests).

use std::path::Path;
use std::process::{Child, Stdio};

use fleet_api::hub::StatusResponse;

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
