//! `fleet drill`: a whole fleet, simulated devices sending steady telemetry,
//! the loss of the primary region (kill -9, or a planned promotion), its
//! return and failback, and a report that counts every message: what was
//! sent, acknowledged, stored in each region's log, and lost (acknowledged
//! but not stored: must be 0), with per-device reconnect times (the RTO) and
//! a timeline picture.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_api::concierge::{FailoverResponse, Mode, RegionsResponse};
use fleet_api::hub::StatusResponse;
use fleet_api::{DeviceId, DeviceStatus, Role, Tags};
use registry_sync::store::NewDevice;
use serde::Serialize;
use tokio::time::Instant;

use crate::up::{Fleet, Launcher, Proc, UpOptions};

mod read;
mod report;
use read::{every, read_log};
pub mod rto;
pub use report::{Divergence, DrillReport, Percentiles, Steps, summary};

/// How to drill.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    pub dir: PathBuf,
    pub devices: usize,
    pub mode: Mode,
    /// `async` or `sync`.
    pub replication: String,
    /// Messages per second per device.
    pub rate: f64,
    /// Seconds of telemetry generation.
    pub duration_s: u64,
    /// Forced mode: the concierge promotes by itself (else the drill asks it to).
    pub auto_promotion: bool,
    /// Seconds after the devices start when the region is lost.
    pub kill_at_s: u64,
    /// Seconds the lost region stays away, from its loss (the kill, or the
    /// planned promotion) to its return (failback).
    pub outage_s: u64,
    /// Which region is lost: the primary (failover, failback) or the
    /// secondary (the primary detaches it and runs alone).
    pub lose: Lose,
    /// Each simulated device's outbox limit (`--max-outbox-bytes`).
    pub max_outbox_bytes: Option<u64>,
    /// Payload bytes per message.
    pub payload_bytes: usize,
    /// Each region's log on its own R3 JetStream cluster.
    pub jetstream: bool,
    /// Hubs per region (several share the region's JetStream log).
    pub hubs_per_region: usize,
}

/// Which region a drill loses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lose {
    #[default]
    Primary,
    Secondary,
}

impl DrillOptions {
    pub fn new(dir: PathBuf) -> DrillOptions {
        DrillOptions {
            dir,
            devices: 200,
            mode: Mode::Forced,
            replication: "async".into(),
            rate: 5.0,
            duration_s: 30,
            auto_promotion: true,
            kill_at_s: 8,
            outage_s: 10,
            lose: Lose::Primary,
            max_outbox_bytes: None,
            payload_bytes: 100,
            jetstream: false,
            hubs_per_region: 1,
        }
    }
}

/// One look at a hub.
#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    region: usize,
    accepted: u64,
    /// Up and primary: accepting from devices (a secondary's growth is replication).
    serving: bool,
}

#[derive(Clone, Debug)]
struct Event {
    t: f64,
    label: String,
}

fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

async fn status(http: &reqwest::Client, url: &str) -> Option<StatusResponse> {
    let r = http
        .get(format!("{url}/v1/status"))
        .timeout(Duration::from_millis(400))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// Creates a device through region a's hub and measures how long until
/// region b's hub holds it: its registry has the record and the hub's
/// mirror has applied that version (it would accept the device's CONNECT).
async fn identity_rpo(
    http: &reqwest::Client,
    fleet: &Fleet,
    urls: &[String],
) -> anyhow::Result<u64> {
    let id = "drill-identity-rpo";
    let created: fleet_api::hub::DeviceResponse = http
        .put(format!("{}/v1/devices/{id}", urls[0]))
        .bearer_auth(fleet.admin_token.expose())
        .json(&serde_json::json!({}))
        .send()
        .await
        .context("create a device in region a")?
        .error_for_status()
        .context("create a device in region a")?
        .json()
        .await
        .context("the created device")?;
    let t0 = Instant::now();
    let version = created.device.version;
    wait_until(
        Duration::from_secs(60),
        "region b's hub to hold the device created in a",
        || async {
            let mirrored = status(http, &urls[1])
                .await
                .and_then(|s| s.registry)
                .is_some_and(|r| r.max_version >= version);
            let stored = match http
                .get(format!("{}/v1/devices/{id}", urls[1]))
                .bearer_auth(fleet.admin_token.expose())
                .timeout(Duration::from_millis(400))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => r
                    .json::<fleet_api::hub::DeviceResponse>()
                    .await
                    .is_ok_and(|d| d.device.version >= version),
                _ => false,
            };
            mirrored && stored
        },
    )
    .await?;
    Ok(t0.elapsed().as_millis() as u64)
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn wall_ms() -> u64 {
    registry_sync::hlc::wall_ms()
}

/// Runs a drill; `say` receives progress lines.
///
/// # Errors
/// When the fleet cannot be started or the scenario cannot be carried out
/// (a lost message is not an error: it is in the report, `passed` false).
pub async fn run(
    launcher: Launcher,
    opts: DrillOptions,
    say: impl Fn(&str),
) -> anyhow::Result<DrillReport> {
    let start = Instant::now();
    let auto = opts.mode == Mode::Forced && opts.auto_promotion;
    let mut up = UpOptions::new(opts.dir.clone());
    up.replication = opts.replication.clone();
    // Three failed checks 200 ms apart and the secondary's own loss of
    // its primary, then promote: never on one missed check.
    up.auto_failover_after_s = auto.then_some(0.0);
    // As deploy/ configures hubs; losing the secondary needs the primary to
    // detach it on its own.
    up.max_lag_ms = Some(5000);
    up.jetstream = opts.jetstream;
    up.hubs_per_region = opts.hubs_per_region;
    if opts.lose == Lose::Secondary {
        up.peer_detach_after_s = Some(2);
    }
    say(&format!(
        "starting a two-region fleet in {}",
        opts.dir.display()
    ));
    let mut fleet = Fleet::up(launcher, up).await?;
    let http = reqwest::Client::new();
    let urls: Vec<String> = fleet.regions.iter().map(|r| r.http_url()).collect();
    // Every hub of each region (several with --hubs-per-region).
    let hubs: Vec<Vec<String>> = fleet.regions.iter().map(|r| r.http_urls()).collect();
    let concierge = format!("http://{}", fleet.concierge_http[0]);

    // Devices, registered in region a and copied to b.
    let ids: Vec<String> = (0..opts.devices).map(|i| format!("drill-{i:04}")).collect();
    let keys_path = fleet.dir.join("keys.ndjson");
    {
        let a = registry_sync::open(&fleet.regions[0].registry).await?;
        let b = registry_sync::open(&fleet.regions[1].registry).await?;
        let mut lines = String::new();
        let mut new = Vec::new();
        for id in &ids {
            let key = registry_sync::keys::generate();
            lines += &format!("{{\"device_id\":\"{id}\",\"key\":\"{}\"}}\n", key.expose());
            new.push(NewDevice {
                device_id: DeviceId::new(id)?,
                key_sha256: key.hash(),
                status: DeviceStatus::Enabled,
                tags: Tags::default(),
            });
        }
        a.create(new).await?;
        std::fs::write(&keys_path, lines)?;
        let hidden = indicatif::ProgressBar::hidden();
        registry_sync::ops::merge(&*a, &*b, false, &hidden).await?;
        a.close().await;
        b.close().await;
    }
    // Hubs load their registries at start; new devices arrive within a refresh.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The timeline: accepted records per region, sampled.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let mark = |label: &str| {
        events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Event {
                t: secs(start),
                label: label.to_string(),
            });
    };
    let sampler = {
        let (samples, urls, http) = (samples.clone(), urls.clone(), http.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                for (i, url) in urls.iter().enumerate() {
                    let s = status(&http, url).await;
                    let accepted = s
                        .as_ref()
                        .map_or(0, |s| s.partitions.iter().map(|p| p.high_watermark.0).sum());
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Sample {
                            t: secs(start),
                            region: i,
                            accepted,
                            serving: s
                                .as_ref()
                                .is_some_and(|s| s.role == Role::Primary && !s.fenced),
                        });
                }
            }
        })
    };

    let report_path = fleet.dir.join("devices.ndjson");
    let sim_args: Vec<String> = [
        "device-agent",
        "simulate",
        "--keys",
        &keys_path.display().to_string(),
        "--rate",
        &opts.rate.to_string(),
        "--duration-s",
        &opts.duration_s.to_string(),
        "--drain-timeout-s",
        "120",
        "--ack-timeout-s",
        "5",
        "--concierge",
        &fleet.concierge_url,
        // The drill's fleet is plain HTTP and MQTT on loopback.
        "--allow-plaintext",
        "--dns",
        &format!("{},{}", fleet.dns[0], fleet.dns[1]),
        "--outbox",
        &fleet.dir.join("outboxes").display().to_string(),
        "--report",
        &report_path.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sim_args = sim_args;
    if let Some(b) = opts.max_outbox_bytes {
        sim_args.extend(["--max-outbox-bytes".into(), b.to_string()]);
    }
    sim_args.extend(["--payload-bytes".into(), opts.payload_bytes.to_string()]);
    let mut sim = Proc::start(&fleet.launcher, &fleet.dir, "simulate", sim_args, false).await?;
    // The schedule counts from here, not from the drill's start: starting
    // the fleet takes seconds (more on a loaded machine, or on JetStream),
    // and a kill scheduled from before it came too early, with the outage
    // then cut short (a failback 130 ms after the promotion, before some
    // devices had published in the new region).
    let devices_started = Instant::now();
    mark("devices start");
    say(&format!(
        "{} devices publish {} msg/s each for {} s",
        opts.devices, opts.rate, opts.duration_s
    ));

    let identity_rpo_ms = identity_rpo(&http, &fleet, &urls).await?;
    say(&format!(
        "identity RPO: a device created in region a reached region b's hub in {identity_rpo_ms} ms"
    ));
    tokio::time::sleep_until(devices_started + Duration::from_secs(opts.kill_at_s)).await;
    let kill_wall = wall_ms();
    let mut steps = Steps {
        identity_rpo_ms,
        ..Steps::default()
    };
    let mut unreplicated = 0;
    let t0 = Instant::now();
    let divergence_before;
    let divergence_after;
    if opts.lose == Lose::Secondary {
        say("kill -9: region b, the secondary (its hub and its registry follower)");
        fleet.kill_region(1).await;
        mark("secondary killed");
        wait_until(Duration::from_secs(30), "region a to detach b", || async {
            every(&http, &hubs[0], |s| {
                s.peer
                    .is_some_and(|p| p.state == fleet_api::hub::PeerState::Detached)
            })
            .await
        })
        .await?;
        steps.detect_ms = t0.elapsed().as_millis() as u64;
        mark("a runs alone");
        say(&format!(
            "region a detached b after {} ms and acknowledges alone",
            steps.detect_ms
        ));
        // The lost region stays away for the whole outage, however long
        // detection and promotion took.
        tokio::time::sleep_until(t0 + Duration::from_secs(opts.outage_s)).await;
        divergence_before = divergence(&fleet).await?;
        steps.written_while_detached = written_while_detached(&http, &urls[0]).await;
        steps.away_ms = t0.elapsed().as_millis() as u64;
        say("region b returns");
        fleet.restart_region(1).await?;
        mark("b returns");
        let back = Instant::now();
        wait_until(
            Duration::from_secs(120),
            "b to catch up (lag 0)",
            || async { every(&http, &hubs[0], caught_up).await },
        )
        .await?;
        steps.catch_up_ms = back.elapsed().as_millis() as u64;
        mark("b caught up");
        say(&format!(
            "a wrote {} records alone; b caught up in {} ms",
            steps.written_while_detached, steps.catch_up_ms
        ));
        divergence_after = converged(&fleet).await?;
    } else {
        match opts.mode {
            Mode::Forced => {
                say("kill -9: region a (its hub and its registry follower)");
                fleet.kill_region(0).await;
                mark("primary killed");
                wait_until(
                    Duration::from_secs(30),
                    "the concierge to notice",
                    || async {
                        regions(&http, &concierge)
                            .await
                            .is_some_and(|r| r.regions.first().is_some_and(|a| !a.healthy))
                    },
                )
                .await?;
                steps.detect_ms = t0.elapsed().as_millis() as u64;
                if !auto {
                    let done = failover(&http, &concierge, &fleet, "b", Mode::Forced).await?;
                    unreplicated = done.unreplicated.iter().map(|u| u.to.0 - u.from.0).sum();
                }
                wait_until(
                    Duration::from_secs(30),
                    "region b to be promoted",
                    || async { every(&http, &hubs[1], |s| s.role == Role::Primary).await },
                )
                .await?;
                steps.promote_ms = t0.elapsed().as_millis() as u64;
                mark("b promoted");
                say(&format!(
                    "region a down after {} ms; b promoted after {} ms",
                    steps.detect_ms, steps.promote_ms
                ));
            }
            Mode::Planned => {
                say("planned promotion of region b");
                mark("planned promotion");
                let done = failover(&http, &concierge, &fleet, "b", Mode::Planned).await?;
                steps.promote_ms = t0.elapsed().as_millis() as u64;
                say(&format!(
                    "b promoted (epoch {}) after {} ms; writes paused {} ms",
                    done.epoch, steps.promote_ms, done.took_ms
                ));
                mark("b promoted");
            }
        }
        let base = status(&http, &urls[1]).await.map_or(0, |s| {
            s.partitions.iter().map(|p| p.high_watermark.0).sum::<u64>()
        });
        wait_until(
            Duration::from_secs(30),
            "the first publish in region b",
            || async {
                status(&http, &urls[1]).await.is_some_and(|s| {
                    s.partitions.iter().map(|p| p.high_watermark.0).sum::<u64>() > base
                })
            },
        )
        .await?;
        steps.first_publish_ms = t0.elapsed().as_millis() as u64;

        // While a is away, the registry changes in b: a device added there.
        let _ = http
            .put(format!("{}/v1/devices/drill-added-during-outage", urls[1]))
            .bearer_auth(fleet.admin_token.expose())
            .json(&serde_json::json!({}))
            .send()
            .await;
        // The lost region stays away for the whole outage, however long
        // detection and promotion took.
        tokio::time::sleep_until(t0 + Duration::from_secs(opts.outage_s)).await;
        divergence_before = divergence(&fleet).await?;
        if opts.mode == Mode::Forced {
            steps.written_while_detached = written_while_detached(&http, &urls[1]).await;
            steps.away_ms = t0.elapsed().as_millis() as u64;
            say("region a returns");
            fleet.restart_region(0).await?;
            mark("a returns");
            let back = Instant::now();
            wait_until(Duration::from_secs(60), "region a to follow b", || async {
                every(&http, &hubs[0], |s| {
                    s.role == Role::Secondary && s.replication.is_some_and(|r| r.lag_records == 0)
                })
                .await
            })
            .await?;
            // b ran alone since the forced promotion; a planned promotion back
            // is refused until b counts on a again (a holds everything).
            wait_until(Duration::from_secs(60), "a to catch up (lag 0)", || async {
                every(&http, &hubs[1], caught_up).await
            })
            .await?;
            steps.catch_up_ms = back.elapsed().as_millis() as u64;
            say(&format!(
                "b wrote {} records alone; a caught up in {} ms",
                steps.written_while_detached, steps.catch_up_ms
            ));
        }
        let fb0 = Instant::now();
        if opts.mode == Mode::Planned {
            steps.away_ms = t0.elapsed().as_millis() as u64;
        }
        say("failback: planned promotion of region a");
        failover(&http, &concierge, &fleet, "a", Mode::Planned).await?;
        steps.failback_ms = fb0.elapsed().as_millis() as u64;
        mark("failback");
        divergence_after = converged(&fleet).await?;
    }

    say("waiting for every device to deliver its outbox");
    let sim_ok = tokio::time::timeout(Duration::from_secs(opts.duration_s + 180), async {
        while sim.is_running() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if sim_ok.is_err() {
        bail!("the simulated devices did not finish");
    }
    mark("devices done");
    sampler.abort();

    // Count everything.
    let mut report = DrillReport {
        mode: opts.mode,
        lose: opts.lose,
        outage_s: opts.outage_s,
        replication: opts.replication.clone(),
        devices: opts.devices,
        steps,
        unreplicated_at_promotion: unreplicated,
        registry_divergence: Divergence {
            before_failback: divergence_before,
            after_failback: divergence_after,
        },
        ..DrillReport::default()
    };
    let mut stored: Vec<HashMap<String, Vec<u64>>> = Vec::new();
    for (i, region) in hubs.iter().enumerate() {
        let by_device = read_log(region, &fleet.admin_token).await?;
        report.stored_by_region.insert(
            fleet.regions[i].name.to_string(),
            by_device.values().map(|m| m.len() as u64).sum(),
        );
        stored.push(by_device);
    }
    let final_log = &stored[0];
    let mut timelines: Vec<Vec<device_agent::agent::SessionTimes>> = Vec::new();
    for line in std::fs::read_to_string(&report_path)
        .context("read the devices' report")?
        .lines()
    {
        let d: serde_json::Value = serde_json::from_str(line)?;
        let id = d["device_id"].as_str().unwrap_or_default().to_string();
        let (first, last, acked, dropped) = (
            d["first_mid"].as_u64().unwrap_or(1),
            d["last_mid"].as_u64().unwrap_or(0),
            d["acked"].as_u64().unwrap_or(0),
            d["dropped"].as_u64().unwrap_or(0),
        );
        report.sent += last + 1 - first;
        report.dropped += dropped;
        let mids = final_log.get(&id).cloned().unwrap_or_default();
        let set: HashSet<u64> = mids.iter().copied().collect();
        report.duplicate_records += (mids.len() - set.len()) as u64;
        let acked_here = (first..=acked.min(last)).count() as u64;
        report.acknowledged += acked_here.saturating_sub(dropped);
        // Mids up to the acknowledged one that are not stored: the ones a
        // full outbox dropped (never sent; counted apart) and the lost.
        let missing = (first..=acked.min(last))
            .filter(|m| !set.contains(m))
            .count() as u64;
        report.lost += missing.saturating_sub(dropped);
        report.stored += set.len() as u64;
        timelines.push(serde_json::from_value(d["timeline"].clone()).unwrap_or_default());
    }
    if report.lose == Lose::Primary {
        let failover = rto::Failover {
            new_region: fleet.regions[1].name.as_str(),
            started: kill_wall,
            detected: (opts.mode == Mode::Forced).then(|| kill_wall + report.steps.detect_ms),
            promoted: kill_wall + report.steps.promote_ms,
        };
        report.rto = rto::fleet(timelines.iter().map(Vec::as_slice), &failover);
        report.rto_ms = report.rto.rto_ms;
        report.devices_moved = report.rto.devices_moved;
    }
    for url in hubs.iter().flatten() {
        report.duplicates_suppressed += metric(&http, url, "fleet_hub_duplicates_total").await;
    }
    // Region a was the old primary: its hubs' failback reports say what
    // they archived. Never assumed: a report that cannot be read fails the
    // drill.
    for url in &hubs[0] {
        let fb: fleet_api::hub::FailbackReport = http
            .get(format!("{url}/v1/failback"))
            .bearer_auth(fleet.admin_token.expose())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("ask the old primary for its failback report")?
            .json()
            .await
            .context("read the old primary's failback report")?;
        report.archived_records += fb.archived_records;
        report.archive_missing += fb.missing_count;
    }
    report.peak_in_outbox = peak_in_outbox(&fleet.dir.join("simulate.log"));
    report.duration_s = secs(start);
    // Every generated message acknowledged and stored once, none dropped.
    report.waiting = report
        .sent
        .saturating_sub(report.acknowledged)
        .saturating_sub(report.dropped);
    if report.lose == Lose::Primary {
        report.devices_not_moved = report.devices.saturating_sub(report.devices_moved);
    }
    report.passed = report::verdict(&report);
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let events = events.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let svg = fleet.dir.join("timeline.svg");
    crate::picture::timeline(
        &svg,
        &samples_per_second(&samples),
        &events
            .iter()
            .map(|e| (e.t, e.label.clone()))
            .collect::<Vec<_>>(),
    )?;
    report.timeline = svg.display().to_string();
    let html = fleet.dir.join("report.html");
    std::fs::write(&html, crate::picture::html(&report, &svg)?)?;
    report.html = html.display().to_string();
    std::fs::write(
        fleet.dir.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    fleet.down().await;
    Ok(report)
}

/// Registry divergence once `follow` has had up to 10 s to converge.
async fn converged(fleet: &Fleet) -> anyhow::Result<u64> {
    let mut left = u64::MAX;
    for _ in 0..100 {
        left = divergence(fleet).await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(left)
}

/// The primary counts on its peer again and the peer holds everything.
fn caught_up(s: StatusResponse) -> bool {
    s.peer
        .is_some_and(|p| p.state == fleet_api::hub::PeerState::Attached)
        && s.replication.is_some_and(|r| r.lag_records == 0)
}

/// Records the hub at `url` wrote while its peer was detached (0 when attached).
async fn written_while_detached(http: &reqwest::Client, url: &str) -> u64 {
    status(http, url)
        .await
        .and_then(|s| s.peer)
        .and_then(|p| p.written_since)
        .unwrap_or(0)
}

async fn regions(http: &reqwest::Client, concierge: &str) -> Option<RegionsResponse> {
    http.get(format!("{concierge}/v1/regions"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn failover(
    http: &reqwest::Client,
    concierge: &str,
    fleet: &Fleet,
    to: &str,
    mode: Mode,
) -> anyhow::Result<FailoverResponse> {
    let resp = http
        .post(format!("{concierge}/v1/failover"))
        .bearer_auth(fleet.admin_token.expose())
        .json(&serde_json::json!({"to": to, "mode": mode}))
        .timeout(Duration::from_secs(120))
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!(
            "failover to {to} ({}) failed: {status} {text}",
            mode.as_str()
        );
    }
    Ok(serde_json::from_str(&text)?)
}

/// Devices the two registries disagree on (what `diff` would change, both ways).
async fn divergence(fleet: &Fleet) -> anyhow::Result<u64> {
    let a = registry_sync::open(&fleet.regions[0].registry).await?;
    let b = registry_sync::open(&fleet.regions[1].registry).await?;
    let hidden = indicatif::ProgressBar::hidden();
    let ab = registry_sync::ops::merge(&*a, &*b, true, &hidden)
        .await?
        .summary
        .changed();
    let ba = registry_sync::ops::merge(&*b, &*a, true, &hidden)
        .await?
        .summary
        .changed();
    a.close().await;
    b.close().await;
    Ok(ab + ba)
}

/// Every record of a hub's log: mids per device (with repeats), and per
/// device the time of its first record written after `since_ms` in a later
/// epoch than the first (the new primary's).
async fn metric(http: &reqwest::Client, url: &str, name: &str) -> u64 {
    let Ok(r) = http.get(format!("{url}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The largest "in outbox" the simulation printed.
fn peak_in_outbox(log: &std::path::Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split("in outbox ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Accepted messages per second per region, from the samples.
fn samples_per_second(samples: &[Sample]) -> Vec<(usize, Vec<(f64, f64)>)> {
    (0..2)
        .map(|region| {
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.region == region).collect();
            let mut points = Vec::new();
            let mut prev: Option<&Sample> = None;
            for s in mine {
                if let Some(p) = prev
                    && s.serving
                    && p.serving
                    && s.t > p.t
                {
                    let rate = s.accepted.saturating_sub(p.accepted) as f64 / (s.t - p.t);
                    points.push((s.t, rate));
                } else {
                    points.push((s.t, 0.0));
                }
                prev = Some(s);
            }
            (region, points)
        })
        .collect()
}
