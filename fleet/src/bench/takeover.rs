//! Part of `fleet bench ingest --log jetstream`: how long a dead hub's
//! devices are without service when one of a region's two hubs is killed
//! (SIGKILL), no regional failover. Each device publishes one message every
//! 100 ms through the concierge's answer, as a device would: on any
//! failure it asks the concierge again and retries every 50 ms. A device's
//! outage is from the kill to its first PUBACK after it (DESIGN: RTO);
//! devices of the surviving hub are not counted.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::Child;
use tokio::time::Instant;

use super::driver::{self, Client};
use super::ingest::{BENCH_TOKEN, addr_of, spawn_self};

/// Outage of the killed hub's devices, in ms.
#[derive(Debug, Serialize)]
pub struct Takeover {
    pub devices: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub lease_ttl_ms: u64,
}

/// Kills `victim` while the devices of every hub in `hubs` publish through
/// a concierge that knows all of them (`(http, mqtt)` per hub).
///
/// # Errors
/// When the concierge does not start or a device never gets through.
pub async fn measure(
    hubs: &[(SocketAddr, SocketAddr)],
    devices: Vec<(Client, usize)>,
    victim: &mut Child,
    victim_index: usize,
    lease_ttl_ms: u64,
) -> anyhow::Result<Takeover> {
    let mut args: Vec<String> = [
        "concierge",
        "--json",
        "run",
        "--http",
        "127.0.0.1:0",
        "--dns",
        "127.0.0.1:0",
        "--zone",
        "fleet.bench",
        "--admin-token",
        BENCH_TOKEN,
        "--poll-ms",
        "100",
        "--connect-rate",
        "100000",
        "--lookups-per-source",
        "100000",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    for (http, mqtt) in hubs {
        args.push("--hub".into());
        args.push(format!("bench=http://{http},mqtt://{mqtt}"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_concierge, ready) = spawn_self(&refs).await.context("start the concierge")?;
    let concierge = format!("http://{}", addr_of(&ready, "http")?);
    let http = reqwest::Client::new();
    // Until every device publishes through the concierge.
    let kill_at = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    let mut counted = 0;
    for (c, hub) in devices {
        let on_victim = hub == victim_index;
        counted += usize::from(on_victim);
        let (http, concierge) = (http.clone(), concierge.clone());
        tasks.push(tokio::spawn(async move {
            device(&http, &concierge, &c, kill_at)
                .await
                .map(|gap| on_victim.then_some(gap))
        }));
    }
    tokio::time::sleep_until(kill_at).await;
    victim.start_kill().context("kill the hub")?;
    let mut gaps = Vec::new();
    for t in tasks {
        if let Some(gap) = t.await.context("device task")?? {
            gaps.push(gap.as_secs_f64() * 1000.0);
        }
    }
    if gaps.len() != counted || gaps.is_empty() {
        bail!(
            "{} of {counted} devices of the killed hub measured",
            gaps.len()
        );
    }
    gaps.sort_by(f64::total_cmp);
    let q = |f: f64| gaps[((gaps.len() - 1) as f64 * f).round() as usize];
    Ok(Takeover {
        devices: gaps.len(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: gaps[gaps.len() - 1],
        lease_ttl_ms,
    })
}

/// Publishes every 100 ms until its first PUBACK after `kill_at`; returns
/// how long after `kill_at` that was.
async fn device(
    http: &reqwest::Client,
    concierge: &str,
    c: &Client,
    kill_at: Instant,
) -> anyhow::Result<Duration> {
    let give_up = kill_at + Duration::from_secs(30);
    loop {
        let before = Instant::now();
        let ok = match endpoint(http, concierge, &c.id).await {
            Some(addr) => driver::publish_once(addr, c, 100).await.is_ok(),
            None => false,
        };
        let now = Instant::now();
        if ok && before >= kill_at {
            return Ok(now - kill_at);
        }
        if now > give_up {
            bail!("{} got no PUBACK within 30 s of the kill", c.id);
        }
        let pause = if ok { 100 } else { 50 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// The device's hub as the concierge answers it.
async fn endpoint(http: &reqwest::Client, concierge: &str, id: &str) -> Option<SocketAddr> {
    let url = format!("{concierge}/v1/devices/{id}/endpoint");
    let body: serde_json::Value = http
        .get(&url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["mqtt_url"]
        .as_str()?
        .strip_prefix("mqtt://")?
        .parse()
        .ok()
}
