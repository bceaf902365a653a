//! `device-agent simulate`: many virtual devices in one process, each a full
//! agent with its own outbox, on the same code path as a real device (for
//! drills and load). Generation stops after the duration; delivery goes on
//! until every outbox is empty or the drain timeout passes.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_api::{DeviceId, DeviceKey, Mid};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::agent::{Agent, AgentConfig, Progress, SessionTimes, SharedOutbox};
use crate::discovery::Discovery;
use crate::outbox::{Fsync, Outbox};

/// How to simulate.
#[derive(Clone, Debug)]
pub struct SimulateOptions {
    pub devices: Vec<(DeviceId, DeviceKey)>,
    /// Messages per second per device.
    pub rate: f64,
    pub duration: Duration,
    pub drain_timeout: Duration,
    pub outbox_dir: PathBuf,
    pub max_outbox_bytes: u64,
    pub fsync: Fsync,
    pub payload_bytes: usize,
    pub agent: AgentTuning,
}

/// Agent settings shared by every simulated device.
#[derive(Clone, Debug)]
pub struct AgentTuning {
    pub keep_alive: Duration,
    pub ack_timeout: Duration,
    pub window: usize,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub allow_plaintext: bool,
}

/// The `--json` summary of DESIGN.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub devices: u64,
    pub generated: u64,
    /// Confirmed replicated (deleted from the outboxes).
    pub acknowledged: u64,
    pub in_outbox: u64,
    pub dropped: u64,
}

/// One device's outcome, for `--report` (the drill checks every mid).
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub device_id: DeviceId,
    /// Mids this run generated: `first_mid..=last_mid`.
    pub first_mid: Mid,
    pub last_mid: Mid,
    /// Every mid up to here is confirmed replicated.
    pub acked: Mid,
    pub dropped: u64,
    pub sessions: u64,
    pub resends: u64,
    /// The latest sessions' timestamps (the drill's RTO by PUBACK).
    pub timeline: Vec<SessionTimes>,
}

struct Device {
    id: DeviceId,
    outbox: Arc<SharedOutbox>,
    progress: Arc<Progress>,
    start: (Mid, u64, Mid),
}

fn payload(device: &DeviceId, seq: u64, size: usize) -> Vec<u8> {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut p = format!(r#"{{"device":"{device}","seq":{seq},"t":{t}"#).into_bytes();
    if p.len() + 1 < size {
        p.extend_from_slice(br#","pad":""#);
        p.resize(size.saturating_sub(2).max(p.len()), b'x');
        p.push(b'"');
    }
    p.push(b'}');
    p
}

/// Descriptors a process needs besides its devices' (runtime, logs, the
/// concierge's pooled connections, an outbox segment being appended).
const RESERVE_FILES: u64 = 128;

/// Each device holds one connection (MQTT, or a long poll while it waits
/// for a hub) and opens its outbox only while appending: refuse a run the
/// open-files limit cannot hold, saying so, instead of failing devices at
/// random when `connect` gets EMFILE.
///
/// # Errors
/// When `devices` do not fit under `limit`.
pub fn check_open_files(devices: usize, limit: Option<u64>) -> anyhow::Result<()> {
    let need = devices as u64 + RESERVE_FILES;
    match limit {
        Some(limit) if need > limit => anyhow::bail!(
            "{devices} devices need about {need} open files (one connection each, plus {RESERVE_FILES}); this process may open {limit} (ulimit -n): raise the limit or run at most {} devices per process",
            limit.saturating_sub(RESERVE_FILES)
        ),
        _ => Ok(()),
    }
}

/// Runs the simulation; `report` gets one line per device at the end.
///
/// # Errors
/// When an outbox cannot be opened.
pub async fn run(
    discovery: Discovery,
    opts: SimulateOptions,
    report: Option<PathBuf>,
    mut on_tick: impl FnMut(&Summary),
) -> anyhow::Result<Summary> {
    check_open_files(opts.devices.len(), fleet_api::process::open_files_limit())?;
    let (stop_tx, stop) = watch::channel(false);
    let (gen_stop_tx, gen_stop) = watch::channel(false);
    let mut devices = Vec::new();
    let mut tasks = Vec::new();
    for (id, key) in &opts.devices {
        let outbox = Outbox::open(
            &opts.outbox_dir.join(id.as_str()),
            opts.max_outbox_bytes,
            opts.fsync,
        )?;
        let s = outbox.stats();
        let shared = SharedOutbox::new(outbox);
        let mut config = AgentConfig::new(id.clone(), key.clone());
        config.keep_alive = opts.agent.keep_alive;
        config.ack_timeout = opts.agent.ack_timeout;
        config.window = opts.agent.window;
        config.tls = opts.agent.tls.clone();
        config.allow_plaintext = opts.agent.allow_plaintext;
        let agent = Agent::new(config, discovery.clone(), shared.clone());
        let progress = agent.progress();
        tasks.push(tokio::spawn(agent.run(stop.clone())));
        if opts.fsync == Fsync::Periodic {
            tasks.push(tokio::spawn(crate::source::sync_every(
                shared.clone(),
                Duration::from_millis(200),
            )));
        }
        let (gen_outbox, mut gen_stop, id2) = (shared.clone(), gen_stop.clone(), id.clone());
        let (rate, size) = (opts.rate, opts.payload_bytes);
        tasks.push(tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
            // Spread the devices over one period instead of all at once.
            let offset = period.mul_f64(rand::random::<f64>());
            let mut tick = tokio::time::interval_at(Instant::now() + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = gen_stop.changed() => return,
                }
                seq += 1;
                let body = payload(&id2, seq, size);
                let o = gen_outbox.clone();
                // An append may fsync: on a blocking thread.
                let appended = tokio::task::spawn_blocking(move || o.append(&body)).await;
                if let Ok(Err(e)) = appended {
                    tracing::error!(device_id = %id2, error = %e, "cannot append");
                }
            }
        }));
        devices.push(Device {
            id: id.clone(),
            outbox: shared,
            progress,
            start: (s.last_mid, s.dropped, s.acked),
        });
    }
    let summary = |devices: &[Device]| {
        let mut s = Summary {
            devices: devices.len() as u64,
            ..Summary::default()
        };
        for d in devices {
            let o = d.outbox.lock().stats();
            let dropped = o.dropped - d.start.1;
            s.generated += o.last_mid.0 - d.start.0.0;
            s.dropped += dropped;
            s.acknowledged += (o.acked.0 - d.start.2.0).saturating_sub(dropped);
            s.in_outbox += o.in_outbox;
        }
        s
    };
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut generating = true;
    loop {
        tick.tick().await;
        let s = summary(&devices);
        on_tick(&s);
        if generating && started.elapsed() >= opts.duration {
            generating = false;
            let _ = gen_stop_tx.send(true);
            // `s` was taken before the generators stopped: one of them may
            // still append. Judge the outboxes from the next look on.
            continue;
        }
        if !generating
            && (s.in_outbox == 0 || started.elapsed() >= opts.duration + opts.drain_timeout)
        {
            break;
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }
    let final_summary = summary(&devices);
    if let Some(path) = report {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for d in &devices {
            let o = d.outbox.lock().stats();
            let line = DeviceReport {
                device_id: d.id.clone(),
                // On the wire: outbox mids plus the base learned from the hub.
                first_mid: Mid(d.start.0.next().0 + o.base),
                last_mid: Mid(o.last_mid.0 + o.base),
                acked: Mid(o.acked.0 + o.base),
                dropped: o.dropped - d.start.1,
                sessions: d.progress.sessions.load(Ordering::Relaxed),
                resends: d.progress.resends.load(Ordering::Relaxed),
                timeline: d
                    .progress
                    .sessions_log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned()
                    .collect(),
            };
            writeln!(f, "{}", serde_json::to_string(&line)?)?;
        }
        f.flush()?;
    }
    for d in devices {
        if let Ok(o) = Arc::try_unwrap(d.outbox) {
            let _ = o.outbox.into_inner().map(Outbox::close);
        }
    }
    Ok(final_summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_the_open_files_limit_cannot_hold_is_refused_with_the_numbers() {
        assert!(check_open_files(10_000, Some(20_000)).is_ok());
        assert!(check_open_files(10_000, None).is_ok());
        let e = check_open_files(19_950, Some(20_000))
            .unwrap_err()
            .to_string();
        assert!(e.contains("19950 devices"), "{e}");
        assert!(e.contains("may open 20000"), "{e}");
        assert!(e.contains("at most 19872 devices"), "{e}");
    }
}
