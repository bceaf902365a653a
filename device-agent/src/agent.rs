//! One device's delivery loop: discover the active hub, connect, publish the
//! outbox in mid order with a window of QoS 1 publishes in flight, forget
//! messages only when the hub reports them `replicated`, and move when the
//! hub goes away, refuses the connection, reports a higher epoch, or the
//! endpoint's TTL brings a different answer. Retries back off exponentially
//! with full jitter; `Retry-After` from the concierge is honoured; when no
//! concierge answers, the last good endpoint is kept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_api::concierge::EndpointResponse;
use fleet_api::hub::AckMessage;
use fleet_api::{DeviceId, DeviceKey, Epoch, Mid, UnixMillis};
use rumqttc::mqttbytes::v4::Packet;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::{Backoff, Jitter, random_jitter};
use crate::discovery::{Ask, Discovery, Lookup, MAX_RETRY_AFTER_S};
use crate::mqtt::{self, ConnectError, Connection};
use crate::outbox::{Outbox, OutboxError};

/// Settings of one agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub device: DeviceId,
    pub key: DeviceKey,
    pub keep_alive: Duration,
    /// QoS 1 publishes in flight.
    pub window: usize,
    /// Resend what is not `replicated` after this long without progress.
    pub ack_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// For `mqtts://` endpoints.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Connect to `mqtt://` endpoints (loopback drills, trusted networks);
    /// off by default: a plaintext endpoint is refused.
    pub allow_plaintext: bool,
}

impl AgentConfig {
    pub fn new(device: DeviceId, key: DeviceKey) -> Self {
        Self {
            device,
            key,
            keep_alive: Duration::from_secs(30),
            window: 32,
            ack_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(30),
            tls: None,
            allow_plaintext: false,
        }
    }
}

/// The outbox shared by the agent and whatever feeds it.
#[derive(Debug)]
pub struct SharedOutbox {
    pub outbox: Mutex<Outbox>,
    /// Signalled when records become durable (ready to send).
    pub ready: Notify,
}

impl SharedOutbox {
    pub fn new(outbox: Outbox) -> Arc<SharedOutbox> {
        Arc::new(SharedOutbox {
            outbox: Mutex::new(outbox),
            ready: Notify::new(),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the outbox on a blocking thread: whoever holds the lock
    /// may be in an fsync (an append, an ack deleting a segment, the state
    /// file), and an async worker must never wait for that.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Outbox) -> T + Send + 'static,
    ) -> T {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(&mut me.lock())).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("outbox task cancelled: {e}"),
        }
    }

    /// Appends, and wakes the sender when the record is durable.
    ///
    /// # Errors
    /// See [`Outbox::append`].
    pub fn append(&self, payload: &[u8]) -> Result<Mid, OutboxError> {
        let mid = self.lock().append(payload)?;
        self.ready.notify_one();
        Ok(mid)
    }
}

/// What an agent has done, for stats and tests.
#[derive(Debug, Default)]
pub struct Progress {
    pub connected: AtomicBool,
    /// Successful CONNECTs.
    pub sessions: AtomicU64,
    /// PUBACKs received (durable in one region).
    pub pubacks: AtomicU64,
    /// The highest mid reported `committed`.
    pub committed: AtomicU64,
    /// The highest mid reported `replicated`.
    pub replicated: AtomicU64,
    /// Resends after an ack timeout.
    pub resends: AtomicU64,
    pub region: Mutex<String>,
    /// The latest sessions, oldest first (at most [`SESSIONS_KEPT`]): when
    /// each endpoint was given, connected and first acknowledged, for the
    /// drill's RTO by PUBACK and its breakdown.
    pub sessions_log: Mutex<VecDeque<SessionTimes>>,
}

/// Sessions kept in [`Progress::sessions_log`].
pub const SESSIONS_KEPT: usize = 8;

/// One session's timestamps (wall clock, ms since the Unix epoch: they are
/// compared with other processes' clocks on the same machine).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionTimes {
    pub region: String,
    pub epoch: u64,
    /// When the concierge's answer naming this hub arrived.
    pub endpoint_at_ms: u64,
    /// The start offset the concierge gave with it (admission).
    pub start_in_ms: u64,
    /// CONNACK accepted.
    pub connected_ms: u64,
    /// The session's first PUBLISH written (a device with nothing to send
    /// publishes when its next message comes).
    #[serde(default)]
    pub first_publish_ms: Option<u64>,
    /// The first PUBACK of the session.
    pub first_puback_ms: Option<u64>,
    /// When the session ended (the hub went away, closed it, or the device
    /// moved).
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

impl Progress {
    fn log_session(&self, t: SessionTimes) {
        let mut log = self.sessions_log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= SESSIONS_KEPT {
            log.pop_front();
        }
        log.push_back(t);
    }

    /// Marks the latest session's end (its hub stopped serving it); the
    /// first mark stands.
    fn end_session(&self) {
        let mut log = self.sessions_log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = log.back_mut()
            && t.ended_ms.is_none()
        {
            t.ended_ms = Some(UnixMillis::now().0);
        }
    }

    fn first_publish(&self) {
        let mut log = self.sessions_log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = log.back_mut()
            && t.first_publish_ms.is_none()
        {
            t.first_publish_ms = Some(UnixMillis::now().0);
        }
    }

    fn first_puback(&self) {
        let mut log = self.sessions_log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = log.back_mut()
            && t.first_puback_ms.is_none()
        {
            t.first_puback_ms = Some(UnixMillis::now().0);
        }
    }
}

/// Why a session ended.
#[derive(Debug)]
enum Leave {
    Stop,
    /// Ask the concierge again before reconnecting.
    Lost(String),
    /// The concierge points elsewhere now: connect there at once.
    Moved(EndpointResponse),
    /// The hub said another takes over at this epoch, and the concierge did
    /// not name it yet: wait for a hub at it (long poll).
    Hinted(Epoch),
}

/// One device.
pub struct Agent {
    config: AgentConfig,
    discovery: Discovery,
    outbox: Arc<SharedOutbox>,
    progress: Arc<Progress>,
    jitter: Option<Jitter>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("device", &self.config.device)
            .finish_non_exhaustive()
    }
}

/// What an ack's `replicated` acknowledges in this outbox (whose mid `m`
/// went out as `base + m`): the outbox mid through which messages are
/// stored in both regions, 0 for one below `base`. `None` for an ack that
/// claims more than this device has durably written (a confused or hostile
/// hub): it must not delete messages nobody received.
pub(crate) fn acked_through(replicated: Mid, base: u64, durable: Mid) -> Option<Mid> {
    let here = replicated.0.saturating_sub(base);
    (here <= durable.0).then_some(Mid(here))
}

fn same_hub(a: &EndpointResponse, b: &EndpointResponse) -> bool {
    a.mqtt_url == b.mqtt_url && a.region == b.region
}

impl Agent {
    pub fn new(config: AgentConfig, discovery: Discovery, outbox: Arc<SharedOutbox>) -> Agent {
        Agent {
            config,
            discovery,
            outbox,
            progress: Arc::default(),
            jitter: None,
        }
    }

    /// Replaces the jitter source (deterministic tests).
    #[must_use]
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = Some(jitter);
        self
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Delivers until `stop` turns true.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        // Instrumented, never entered across an await: a span held entered
        // while the task sleeps leaks into other tasks on the same thread.
        let span = tracing::info_span!("agent", device_id = %self.config.device);
        self.deliver(stop).instrument(span).await;
    }

    async fn deliver(mut self, mut stop: watch::Receiver<bool>) {
        let device = self.config.device.clone();
        let jitter = self.jitter.take().unwrap_or_else(random_jitter);
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_cap, jitter);
        let mut endpoint: Option<(EndpointResponse, Instant)> = None;
        // Whether the current endpoint failed and must be asked for again.
        let mut stale = true;
        // The hub of this epoch went away: the next lookup long-polls for a
        // hub above it (answered the moment one is active) instead of
        // sleeping in backoff while no hub is there.
        let mut above: Option<Epoch> = None;
        // When the endpoint was given, and the start it came with.
        let mut given = (UnixMillis::now().0, Duration::ZERO);
        while !*stop.borrow() {
            let expired = endpoint
                .as_ref()
                .is_none_or(|(e, at)| at.elapsed() >= Duration::from_secs(e.ttl_s.into()));
            if stale || expired {
                let asked = Instant::now();
                let ask = Ask {
                    above,
                    connected_to: None,
                };
                match self.discovery.lookup(&device, &ask).await {
                    Ok(Lookup::Endpoint(e)) => {
                        tracing::debug!(region = %e.region, url = %e.mqtt_url, epoch = %e.epoch, start_in_ms = e.start_in_ms, "endpoint");
                        if above.is_some_and(|a| e.epoch <= a) {
                            // A concierge that does not long-poll answered
                            // with the hub that just failed: back off.
                            let wait = backoff.next_delay();
                            if sleep_or_stop(wait, &mut stop).await {
                                break;
                            }
                        }
                        above = None;
                        given = (
                            UnixMillis::now().0,
                            Duration::from_millis(e.start_in_ms.min(MAX_RETRY_AFTER_S * 1000)),
                        );
                        endpoint = Some((e, Instant::now()));
                        stale = false;
                    }
                    Ok(Lookup::NoHub(_, why)) if above.is_none() => {
                        // Wait for the next primary, answered the moment
                        // the concierge sees one.
                        let last = endpoint.as_ref().map_or(Epoch(0), |(e, _)| e.epoch);
                        tracing::info!(%why, above = %last, "no active hub: waiting for the next one");
                        above = Some(last);
                        continue;
                    }
                    Ok(Lookup::NoHub(_, why)) => {
                        // The long poll ran out (or the concierge could not
                        // hold it): the old hub may be back at its epoch,
                        // so ask plainly next, after a backoff if the
                        // answer was immediate.
                        above = None;
                        if asked.elapsed() < Duration::from_secs(1) {
                            let wait = backoff.next_delay();
                            tracing::info!(%why, retry_ms = wait.as_millis() as u64, "no active hub yet");
                            if sleep_or_stop(wait, &mut stop).await {
                                break;
                            }
                        }
                        continue;
                    }
                    Ok(Lookup::RetryAfter(wait, why)) => {
                        // The concierge asks us to wait: do, plus jitter on top.
                        let extra = backoff.next_delay().min(wait);
                        tracing::info!(wait_ms = (wait + extra).as_millis() as u64, %why, "concierge asks to come back later");
                        if sleep_or_stop(wait + extra, &mut stop).await {
                            break;
                        }
                        continue;
                    }
                    Err(e) if endpoint.is_some() && !stale => {
                        tracing::warn!(error = %e, "no concierge answer; keeping the last endpoint");
                        if let Some((_, at)) = endpoint.as_mut() {
                            *at = Instant::now();
                        }
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "no endpoint yet");
                        if sleep_or_stop(wait, &mut stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let Some((ep, _)) = endpoint.clone() else {
                continue;
            };
            // The concierge's admission: this device's slot of the rate at
            // which hubs take CONNECTs.
            let start_in = std::mem::take(&mut given.1);
            if !start_in.is_zero() {
                if sleep_or_stop(start_in, &mut stop).await {
                    break;
                }
                // The answer's TTL counts from the connect it scheduled.
                if let Some((_, at)) = endpoint.as_mut() {
                    *at = Instant::now();
                }
            }
            let conn = match mqtt::connect(
                &ep.mqtt_url,
                &device,
                &self.config.key,
                self.config.keep_alive,
                self.config.tls.as_ref(),
                self.config.allow_plaintext,
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    stale = true;
                    match &e {
                        ConnectError::Io(_) | ConnectError::Timeout => {
                            // The hub is gone: long-poll for its successor
                            // (an old hub that comes back at its epoch is
                            // found when the long poll runs out).
                            tracing::info!(error = %e, url = %ep.mqtt_url, epoch = %ep.epoch, "cannot connect; waiting for a hub above this epoch");
                            above = Some(ep.epoch);
                            continue;
                        }
                        _ => {}
                    }
                    let wait = backoff.next_delay();
                    let retry_ms = wait.as_millis() as u64;
                    match &e {
                        ConnectError::Refused(code) => {
                            tracing::warn!(?code, url = %ep.mqtt_url, retry_ms, "connect refused")
                        }
                        ConnectError::Plaintext(_) => {
                            tracing::error!(error = %e, retry_ms, "endpoint refused")
                        }
                        other => {
                            tracing::info!(error = %other, url = %ep.mqtt_url, retry_ms, "cannot connect")
                        }
                    }
                    if sleep_or_stop(wait, &mut stop).await {
                        break;
                    }
                    continue;
                }
            };
            self.progress.sessions.fetch_add(1, Ordering::Relaxed);
            self.progress.connected.store(true, Ordering::Relaxed);
            self.progress.log_session(SessionTimes {
                region: ep.region.to_string(),
                epoch: ep.epoch.0,
                endpoint_at_ms: given.0,
                start_in_ms: start_in.as_millis() as u64,
                connected_ms: UnixMillis::now().0,
                first_publish_ms: None,
                first_puback_ms: None,
                ended_ms: None,
            });
            *self
                .progress
                .region
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = ep.region.to_string();
            tracing::info!(region = %ep.region, url = %ep.mqtt_url, "connected");
            let mut current = ep;
            let fetched = endpoint.as_ref().map_or_else(Instant::now, |(_, at)| *at);
            let (leave, useful) = self.session(conn, &mut current, fetched, &mut stop).await;
            self.progress.connected.store(false, Ordering::Relaxed);
            self.progress.end_session();
            if useful {
                backoff.reset();
            }
            match leave {
                Leave::Stop => break,
                Leave::Hinted(epoch) => {
                    endpoint = Some((current, Instant::now()));
                    stale = true;
                    above = epoch.0.checked_sub(1).map(Epoch);
                }
                Leave::Moved(e) => {
                    tracing::info!(region = %e.region, url = %e.mqtt_url, start_in_ms = e.start_in_ms, "moving to another hub");
                    given = (
                        UnixMillis::now().0,
                        Duration::from_millis(e.start_in_ms.min(MAX_RETRY_AFTER_S * 1000)),
                    );
                    endpoint = Some((e, Instant::now()));
                    stale = false;
                    above = None;
                }
                Leave::Lost(why) => {
                    let wait = backoff.next_delay();
                    tracing::info!(%why, retry_ms = wait.as_millis() as u64, "disconnected");
                    endpoint = Some((current, Instant::now()));
                    stale = true;
                    if sleep_or_stop(wait, &mut stop).await {
                        break;
                    }
                }
            }
        }
        let _ = self.outbox.run(|o| o.sync()).await;
    }

    /// One connection. Returns why it ended and whether it made progress.
    /// An outbox without numbering state (new volume, reflashed,
    /// `--reset-state`) learns the hub's `committed` for this device before
    /// anything is published, and numbers what it holds above it: a
    /// device's mids never go backwards, so nothing new is taken for a
    /// duplicate of what an earlier life of the device sent.
    async fn learn_base(
        &mut self,
        conn: &mut Connection,
        acks_topic: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Leave> {
        if let Err(e) = conn.flush().await {
            return Err(Leave::Lost(e.to_string()));
        }
        let deadline = Instant::now() + self.config.keep_alive * 3 / 2;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => return Err(Leave::Stop),
                filled = conn.fill() => match filled {
                    Ok(true) => {}
                    Ok(false) => return Err(Leave::Lost("closed by the hub".into())),
                    Err(e) => return Err(Leave::Lost(e.to_string())),
                },
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("the hub did not answer with this device's committed mid; nothing is published until it does");
                    return Err(Leave::Lost("the hub did not say where this device's mids stand".into()));
                }
            }
            loop {
                match conn.buffered_packet() {
                    Ok(Some(Packet::Publish(p))) if p.topic == acks_topic => {
                        let Ok(ack) = serde_json::from_slice::<AckMessage>(&p.payload) else {
                            continue;
                        };
                        let committed = ack.committed;
                        if let Err(e) = self.outbox.run(move |o| o.set_base(committed)).await {
                            tracing::error!(error = %e, "cannot record the numbering base");
                            return Err(Leave::Lost(e.to_string()));
                        }
                        tracing::info!(committed = %ack.committed, "no numbering state: numbering above the hub's committed mid");
                        return Ok(());
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return Err(Leave::Lost(e.to_string())),
                }
            }
        }
    }

    async fn session(
        &mut self,
        mut conn: Connection,
        endpoint: &mut EndpointResponse,
        fetched: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> (Leave, bool) {
        let device = self.config.device.clone();
        let acks_topic = format!("devices/{device}/acks");
        let topic_prefix = format!("devices/{device}/messages/events/");
        conn.subscribe(1, &acks_topic);
        if self.outbox.run(|o| o.base()).await.is_none()
            && let Err(leave) = self.learn_base(&mut conn, &acks_topic, stop).await
        {
            return (leave, false);
        }
        // Outbox mid `m` is `base + m` on the wire.
        let base = self.outbox.run(|o| o.base()).await.unwrap_or(0);
        let wire = |m: Mid| Mid(m.0.saturating_add(base));
        let mut pkid: u16 = 1;
        let mut inflight: VecDeque<(u16, Mid)> = VecDeque::new();
        let acked = self.outbox.run(|o| o.acked()).await;
        let (mut replicated, mut next_send) = (acked, acked.next());
        let mut useful = false;
        let mut pubacked = false;
        let mut published = false;
        let mut last_progress = Instant::now();
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        let mut ttl_at = fetched + Duration::from_secs(endpoint.ttl_s.max(1).into());
        let keep_alive = self.config.keep_alive;
        loop {
            // Fill the window from the outbox (durable records only).
            if inflight.len() < self.config.window {
                let want = self.config.window - inflight.len();
                let records = match self.outbox.run(move |o| o.read_from(next_send, want)).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the outbox");
                        Vec::new()
                    }
                };
                for r in records {
                    pkid = if pkid >= u16::MAX - 1 { 1 } else { pkid + 1 };
                    conn.publish(format!("{topic_prefix}{}", wire(r.mid)), pkid, r.payload);
                    inflight.push_back((pkid, r.mid));
                    next_send = r.mid.next();
                }
            }
            if !conn.out.is_empty() {
                if let Err(e) = conn.flush().await {
                    return (Leave::Lost(e.to_string()), useful);
                }
                last_tx = Instant::now();
                if !published && !inflight.is_empty() {
                    published = true;
                    self.progress.first_publish();
                }
            }
            let outstanding = next_send.0.saturating_sub(1) > replicated.0;
            let resend_at = last_progress + self.config.ack_timeout;
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    conn.send(Packet::Disconnect);
                    let _ = conn.flush().await;
                    return (Leave::Stop, useful);
                }
                filled = conn.fill() => {
                    match filled {
                        Ok(true) => last_rx = Instant::now(),
                        Ok(false) => return (Leave::Lost("closed by the hub".into()), useful),
                        Err(e) => return (Leave::Lost(e.to_string()), useful),
                    }
                    loop {
                        let packet = match conn.buffered_packet() {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(e) => return (Leave::Lost(e.to_string()), useful),
                        };
                        match packet {
                            Packet::PubAck(a) => {
                                if let Some(i) = inflight.iter().position(|(p, _)| *p == a.pkid) {
                                    inflight.remove(i);
                                }
                                self.progress.pubacks.fetch_add(1, Ordering::Relaxed);
                                if !pubacked {
                                    pubacked = true;
                                    self.progress.first_puback();
                                }
                                useful = true;
                            }
                            Packet::Publish(p) if p.topic == acks_topic => {
                                let Ok(ack) = serde_json::from_slice::<AckMessage>(&p.payload) else {
                                    tracing::warn!("ignoring an ack that is not JSON");
                                    continue;
                                };
                                let durable = self.outbox.run(|o| o.durable()).await;
                                match acked_through(ack.replicated, base, durable) {
                                    None => {
                                        // Deletes nothing; its epoch is still looked at.
                                        tracing::warn!(replicated = %ack.replicated, "ignoring an ack for more than this device has written");
                                    }
                                    Some(acked_here) => {
                                        self.progress.committed.fetch_max(ack.committed.0, Ordering::Relaxed);
                                        if acked_here > replicated {
                                            replicated = acked_here;
                                            last_progress = Instant::now();
                                            useful = true;
                                            self.progress.replicated.fetch_max(ack.replicated.0, Ordering::Relaxed);
                                            let upto = replicated;
                                            if let Err(e) = self.outbox.run(move |o| o.ack(upto)).await {
                                                tracing::error!(error = %e, "cannot record an acknowledgement");
                                            }
                                        }
                                    }
                                }
                                if ack.epoch > endpoint.epoch {
                                    // The fleet changed under us (a planned
                                    // promotion tells its devices so before
                                    // closing): this hub stops serving us.
                                    // Ask for the hub of that epoch,
                                    // answered the moment the concierge
                                    // sees it; a long poll that does not
                                    // end in an answer goes on outside.
                                    self.progress.end_session();
                                    let ask = Ask {
                                        above: ack.epoch.0.checked_sub(1).map(Epoch),
                                        connected_to: None,
                                    };
                                    let answer = tokio::select! {
                                        biased;
                                        _ = stop.changed() => return (Leave::Stop, useful),
                                        a = self.discovery.lookup(&device, &ask) => a,
                                    };
                                    match answer {
                                        Ok(Lookup::Endpoint(e)) if !same_hub(&e, endpoint) => return (Leave::Moved(e), useful),
                                        Ok(Lookup::Endpoint(e)) => *endpoint = e,
                                        _ => return (Leave::Hinted(ack.epoch), useful),
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                () = self.outbox.ready.notified() => {}
                () = tokio::time::sleep_until(last_tx + keep_alive / 2) => {
                    conn.send(Packet::PingReq);
                }
                () = tokio::time::sleep_until(last_rx + keep_alive * 3 / 2) => {
                    return (Leave::Lost("the hub stopped answering (keep-alive)".into()), useful);
                }
                () = tokio::time::sleep_until(ttl_at) => {
                    let ask = Ask {
                        above: None,
                        connected_to: Some(endpoint.region.clone()),
                    };
                    match self.discovery.lookup(&device, &ask).await {
                        Ok(Lookup::Endpoint(e)) if !same_hub(&e, endpoint) => return (Leave::Moved(e), useful),
                        Ok(Lookup::Endpoint(e)) => *endpoint = e,
                        // Pacing or no concierge: the current hub still works.
                        _ => {}
                    }
                    ttl_at = Instant::now() + Duration::from_secs(endpoint.ttl_s.max(1).into());
                }
                () = tokio::time::sleep_until(resend_at), if outstanding => {
                    tracing::info!(from = %replicated.next(), "no acknowledgement progress; resending");
                    self.progress.resends.fetch_add(1, Ordering::Relaxed);
                    next_send = replicated.next();
                    last_progress = Instant::now();
                }
            }
        }
    }
}

/// Sleeps; true when `stop` turned true meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any ack a hub (or anyone who can publish to the acks topic)
        /// sends, parsed as the agent parses it, acknowledges at most what
        /// this device has written.
        #[test]
        fn an_ack_never_acknowledges_more_than_was_written(
            committed in any::<u64>(),
            replicated in any::<u64>(),
            epoch in any::<u64>(),
            region in "[a-z]{0,8}",
            extra in prop::option::of(any::<bool>()),
            base in 0..=crate::outbox::MAX_BASE,
            durable in any::<u64>(),
        ) {
            let mut text = format!(
                r#"{{"committed":{committed},"replicated":{replicated},"epoch":{epoch},"region":"{region}""#
            );
            if let Some(d) = extra {
                text += &format!(r#","detached":{d}"#);
            }
            text.push('}');
            if let Ok(ack) = serde_json::from_str::<AckMessage>(&text)
                && let Some(m) = acked_through(ack.replicated, base, Mid(durable))
            {
                prop_assert!(m.0 <= durable);
                prop_assert!(ack.replicated.0 >= base || m == Mid(0));
            }
        }

        /// Random bytes on the acks topic: no panic.
        #[test]
        fn garbage_acks_are_ignored(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(ack) = serde_json::from_slice::<AckMessage>(&bytes) {
                let _ = acked_through(ack.replicated, 0, Mid(0));
            }
        }
    }

    #[test]
    fn an_ack_beyond_what_was_written_deletes_nothing() {
        assert_eq!(acked_through(Mid(u64::MAX), 0, Mid(10)), None);
        assert_eq!(acked_through(Mid(15), 5, Mid(10)), Some(Mid(10)));
        assert_eq!(acked_through(Mid(3), 5, Mid(10)), Some(Mid(0)));
    }
}
