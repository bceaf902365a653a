//! One device connection: CONNECT, then publishes acknowledged in order as
//! they become durable, subscriptions to the device's own topics, commit
//! acks, keep-alive, and takeover or revocation from outside.
//!
//! Packets are handled synchronously in the order they were read, so a
//! device's publishes reach the log in that order; their completions are
//! awaited in the same order (`FuturesOrdered`), so PUBACKs go out in order
//! as MQTT requires, and only after the ingest pipeline says "durable".

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use fleet_api::hub::AckMessage;
use fleet_api::limit::Slot;
use fleet_api::{DeviceId, Epoch, Mid};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

use super::{Front, topic};
use crate::ingest::{IngestError, Replication, Stored};
use crate::sessions::{Kick, Outbound, Session};

/// A write that cannot complete in this long means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection ended: the `reason` label of `fleet_hub_disconnects_total`.
type Reason = &'static str;

fn count_disconnect(reason: Reason) {
    metrics::counter!("fleet_hub_disconnects_total", "reason" => reason).increment(1);
}

fn codec_reason(e: &CodecError) -> Reason {
    match e {
        CodecError::PayloadSizeLimitExceeded(_) => "too_large",
        _ => "malformed",
    }
}

/// Reads until one whole packet is buffered. Before CONNECT (`first`), a
/// first byte that is not CONNECT ends the connection at once instead of
/// waiting for whatever length the garbage claims.
async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
    first: bool,
) -> Result<Packet, Reason> {
    loop {
        if first && buf.first().is_some_and(|b| b >> 4 != 1) {
            return Err("protocol");
        }
        if first && connect_level(buf).is_some_and(|level| level != 4) {
            return Err("protocol_version");
        }
        match Packet::read(buf, max) {
            Ok(p) => return Ok(p),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(codec_reason(&e)),
        }
        buf.reserve(256);
        match stream.read_buf(buf).await {
            Ok(0) => return Err("closed"),
            Ok(_) => {}
            Err(_) => return Err("io_error"),
        }
    }
}

/// The protocol level of a CONNECT at the start of `buf`, once buffered
/// (4 is MQTT 3.1.1; 5 is MQTT 5, 3 is MQTT 3.1).
fn connect_level(buf: &[u8]) -> Option<u8> {
    // Fixed header: type byte, then a remaining length of 1 to 4 bytes.
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 || i > 4 {
            break;
        }
    }
    // Variable header: protocol name (length-prefixed), then the level.
    let len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    buf.get(i + 2 + len).copied()
}

/// The largest CONNECT read before a client has authenticated: an id, a
/// username, a key and a little slack (a device needs no will message).
const MAX_CONNECT: usize = 4096;

async fn flush<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> Result<(), Reason> {
    if out.is_empty() {
        return Ok(());
    }
    // Boxed: the write's state (a timer among it) lives only while a write
    // is under way, not in every idle connection's task.
    Box::pin(write_out(stream, out)).await
}

async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
) -> Result<(), Reason> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(out)).await {
        Ok(Ok(())) => {
            // Nothing kept between writes: an idle connection holds no
            // output buffer.
            *out = BytesMut::new();
            Ok(())
        }
        Ok(Err(_)) => Err("io_error"),
        Err(_) => Err("write_timeout"),
    }
}

/// What an idle connection reads into: a packet's first bytes arrive here,
/// so no buffer is held while a device says nothing.
const SMALL_READ: usize = 16;
/// The buffer a packet in progress is read into.
const READ_CHUNK: usize = 8 * 1024;

/// Reads more: into `small` when nothing is buffered (idle), else straight
/// into `inbuf`, grown for the rest of the packet (or a burst of them).
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    inbuf: &mut BytesMut,
    small: &mut [u8; SMALL_READ],
) -> std::io::Result<usize> {
    if inbuf.is_empty() {
        let n = stream.read(small).await?;
        if n == SMALL_READ {
            inbuf.reserve(READ_CHUNK);
        }
        inbuf.extend_from_slice(&small[..n]);
        Ok(n)
    } else {
        inbuf.reserve(READ_CHUNK);
        stream.read_buf(inbuf).await
    }
}

/// Reads the CONNECT and checks it: the device and its keep-alive (s), or
/// `None` once the client was answered with a refusal (or is gone).
async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    front: &Front,
    peer: SocketAddr,
    pending: Slot<IpAddr>,
    inbuf: &mut BytesMut,
    out: &mut BytesMut,
    max_packet: usize,
) -> Option<(DeviceId, u16)> {
    let connect = match tokio::time::timeout(
        front.config.connect_timeout,
        read_packet(stream, inbuf, MAX_CONNECT.min(max_packet), true),
    )
    .await
    {
        Err(_) => {
            count_disconnect("connect_timeout");
            return None;
        }
        Ok(Err("protocol_version")) => {
            // MQTT 5 or 3.1: say so with CONNACK 1, as 3.1.1 prescribes.
            let _ = ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false).write(out);
            let _ = flush(stream, out).await;
            let _ = stream.shutdown().await;
            metrics::counter!("fleet_hub_connects_total", "result" => "protocol_version")
                .increment(1);
            count_disconnect("protocol_version");
            return None;
        }
        Ok(Err(reason)) => {
            count_disconnect(reason);
            return None;
        }
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(_)) => {
            count_disconnect("protocol");
            return None;
        }
    };
    let admitted = front.admit(&connect, peer).await;
    // Authenticated or refused: no longer a pending connection.
    drop(pending);
    match admitted {
        Ok(device) => {
            metrics::counter!("fleet_hub_connects_total", "result" => "accepted").increment(1);
            Some((device, connect.keep_alive))
        }
        Err(refusal) => {
            metrics::counter!("fleet_hub_connects_total", "result" => refusal.1).increment(1);
            tracing::debug!(%peer, client_id = %connect.client_id, reason = refusal.1, "connect refused");
            let _ = ConnAck::new(refusal.0, false).write(out);
            let _ = flush(stream, out).await;
            let _ = stream.shutdown().await;
            None
        }
    }
}

/// Waits for `need` of the hub-wide budget, only while `blocked` (else
/// never). The waiting is boxed: an idle connection's task does not carry
/// room for a wait it is not in.
async fn acquire(
    budget: std::sync::Arc<tokio::sync::Semaphore>,
    need: u32,
    blocked: bool,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    if !blocked {
        return std::future::pending().await;
    }
    Box::pin(budget.acquire_many_owned(need)).await
}

/// Waits for the throttle to change, only while `throttled` (boxed, as
/// [`acquire`]).
async fn throttle_changed(throttle: &mut tokio::sync::watch::Receiver<bool>, throttled: bool) {
    if !throttled {
        return std::future::pending().await;
    }
    let _ = Box::pin(throttle.changed()).await;
}

type Completed = (u16, QoS, Result<Stored, IngestError>);
type Completion = BoxFuture<'static, Completed>;

/// Publishes awaiting durability, in read order. The queue exists only
/// while something is in it: an empty `FuturesOrdered` still holds two
/// allocations, which every idle connection would carry.
#[derive(Default)]
struct Inflight(Option<Box<FuturesOrdered<Completion>>>);

impl Inflight {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, c: Completion) {
        self.0.get_or_insert_with(Box::default).push_back(c);
    }

    /// The next completion, in order (pending forever when empty).
    async fn next(&mut self) -> Option<Completed> {
        match &mut self.0 {
            Some(q) => q.next().await,
            None => std::future::pending().await,
        }
    }

    /// The next completion if it is ready now.
    fn next_ready(&mut self) -> Option<Completed> {
        self.0.as_mut()?.next().now_or_never().flatten()
    }

    fn release_if_empty(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }
}

/// Runs one connection to its end.
pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    front: &Front,
    peer: SocketAddr,
    pending: Slot<IpAddr>,
) {
    // Remaining length = topic (a device topic is < 200 bytes) + pkid + payload;
    // anything larger is refused before its body is buffered.
    let max_packet = front.config.payload_limit + 512;
    // Both start empty and are let go of when drained: an idle device
    // costs the hub a few hundred bytes, not preallocated kilobytes.
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();

    // The login is boxed: its state (the CONNECT, the key check) is freed
    // once it is done instead of being carried by every idle connection.
    let login = Box::pin(login(
        &mut stream,
        front,
        peer,
        pending,
        &mut inbuf,
        &mut out,
        max_packet,
    ));
    let Some((device, keep_alive_s)) = login.await else {
        return;
    };
    // No span per connection: it would cost memory every idle device
    // carries; the events name the device themselves.
    tracing::debug!(device_id = %device, %peer, keep_alive = keep_alive_s, "connected");
    let mut session = front.sessions.register(&device);
    let _ = ConnAck::new(ConnectReturnCode::Success, false).write(&mut out);
    if let Err(reason) = flush(&mut stream, &mut out).await {
        return count_disconnect(reason);
    }
    let keep_alive =
        (keep_alive_s > 0).then(|| Duration::from_millis(u64::from(keep_alive_s) * 1500));
    let mut conn = Conn {
        device,
        front,
        max_packet,
        keep_alive,
        throttle: front.throttle.clone(),
        pending: Inflight::default(),
        blocked: None,
        filters: Vec::new(),
        wants_acks: false,
        committed: Mid(0),
        known: false,
        replicated: None,
        last_ack: None,
    };
    let reason = conn
        .serve(&mut stream, &mut inbuf, &mut out, &mut session)
        .await;
    let _ = flush(&mut stream, &mut out).await;
    tracing::debug!(device_id = %conn.device, reason, unacknowledged = conn.pending.len(), "disconnected");
    count_disconnect(reason);
    let _ = stream.shutdown().await;
}

struct Conn<'a> {
    device: DeviceId,
    front: &'a Front,
    max_packet: usize,
    keep_alive: Option<Duration>,
    throttle: tokio::sync::watch::Receiver<bool>,
    /// Publishes submitted and not yet acknowledged, in read order.
    pending: Inflight,
    /// A publish read while the hub-wide budget was exhausted.
    blocked: Option<Box<(Publish, Option<Mid>)>>,
    filters: Vec<String>,
    /// Whether a filter covers the device's acks topic.
    wants_acks: bool,
    /// The highest durable mid of this device known to this connection.
    committed: Mid,
    /// Whether `committed` has been learned (the device may have published
    /// before, through another connection).
    known: bool,
    replicated: Option<Mid>,
    last_ack: Option<(Mid, Mid)>,
}

fn cost(p: &Publish) -> u32 {
    p.payload.len().clamp(1, 1 << 30) as u32
}

impl Conn<'_> {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        inbuf: &mut BytesMut,
        out: &mut BytesMut,
        session: &mut Session<'_>,
    ) -> Reason {
        session.set_keep_alive(self.keep_alive);
        let mut small = [0u8; SMALL_READ];
        loop {
            if inbuf.is_empty() && inbuf.capacity() > 0 {
                // Drained: let the buffer go (publishes still in the
                // pipeline keep their own slices of it).
                *inbuf = BytesMut::new();
            }
            // Replication lag over its limit: read nothing until it shrinks
            // (devices keep their messages meanwhile), and do not count the
            // pause against the client's keep-alive.
            let throttled = *self.throttle.borrow_and_update();
            if throttled {
                session.heard();
            }
            // Handle what is buffered, as far as the inflight limit and the budget allow.
            while !throttled
                && self.blocked.is_none()
                && self.pending.len() < self.front.config.max_inflight
            {
                match Packet::read(inbuf, self.max_packet) {
                    Ok(packet) => {
                        session.heard();
                        if let Err(reason) = self.handle(packet, out, &session.cell) {
                            return reason;
                        }
                    }
                    Err(CodecError::InsufficientBytes(_)) => break,
                    Err(e) => {
                        let reason = codec_reason(&e);
                        metrics::counter!("fleet_hub_refused_total", "reason" => reason)
                            .increment(1);
                        tracing::info!(device_id = %self.device, error = %e, "refusing a packet");
                        return reason;
                    }
                }
            }
            self.ack(out);
            if let Err(reason) = flush(stream, out).await {
                return reason;
            }
            let reading = !throttled
                && self.blocked.is_none()
                && self.pending.len() < self.front.config.max_inflight;
            session.reading(reading);
            let need = self.blocked.as_ref().map_or(0, |b| cost(&b.0));
            let budget = self.front.ingest.budget().clone();
            tokio::select! {
                biased;
                signals = session.changed() => {
                    if let Some(kick) = signals.kick {
                        if let Kick::Moving(epoch) = kick {
                            // The hint a device moves on without asking
                            // around: the epoch of the hub taking over.
                            self.moving(out, epoch);
                            let _ = flush(stream, out).await;
                        }
                        return kick.as_str();
                    }
                    if signals.replicated > Mid(0) {
                        self.outbound(Outbound::Replicated(signals.replicated));
                    }
                    if let Some((committed, replicated)) = signals.acked {
                        self.outbound(Outbound::Acked { committed, replicated });
                    }
                }
                Some((pkid, qos, result)) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(reason) = self.completed(pkid, qos, result, out) {
                        return reason;
                    }
                    // A group commit completes many at once: answer them in one write.
                    while let Some((pkid, qos, result)) = self.pending.next_ready() {
                        if let Err(reason) = self.completed(pkid, qos, result, out) {
                            return reason;
                        }
                    }
                    self.pending.release_if_empty();
                }
                permit = acquire(budget, need, self.blocked.is_some()) => {
                    if let Some((p, mid)) = self.blocked.take().map(|b| *b)
                        && let Err(reason) = self.submit(p, mid, permit.ok())
                    {
                        return reason;
                    }
                }
                () = throttle_changed(&mut self.throttle, throttled) => {}
                read = read_some(stream, inbuf, &mut small), if reading => match read {
                    Ok(0) => return "closed",
                    Ok(_) => {}
                    Err(_) => return "io_error",
                },
            }
        }
    }

    fn handle(
        &mut self,
        packet: Packet,
        out: &mut BytesMut,
        me: &std::sync::Arc<crate::sessions::Cell>,
    ) -> Result<(), Reason> {
        match packet {
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    metrics::counter!("fleet_hub_refused_total", "reason" => "qos2").increment(1);
                    tracing::info!(device_id = %self.device, topic = %p.topic, "refusing a QoS 2 publish");
                    return Err("qos2");
                }
                if p.payload.len() > self.front.config.payload_limit {
                    metrics::counter!("fleet_hub_refused_total", "reason" => "too_large")
                        .increment(1);
                    tracing::info!(device_id = %self.device, bytes = p.payload.len(), "refusing an oversized publish");
                    return Err("too_large");
                }
                let mid = match topic::parse_publish(&p.topic, &self.device) {
                    Ok(mid) => mid,
                    Err(e) => {
                        metrics::counter!("fleet_hub_acl_violations_total", "kind" => "publish")
                            .increment(1);
                        tracing::warn!(device_id = %self.device, error = %e, "topic violation, closing");
                        return Err("acl_publish");
                    }
                };
                let m = &self.front.metrics;
                let count = if p.qos == QoS::AtLeastOnce {
                    &m.publishes_qos1
                } else {
                    &m.publishes_qos0
                };
                count.increment(1);
                m.publish_bytes.increment(p.payload.len() as u64);
                match self
                    .front
                    .ingest
                    .budget()
                    .clone()
                    .try_acquire_many_owned(cost(&p))
                {
                    Ok(permit) => self.submit(p, mid, Some(permit)),
                    Err(_) => {
                        self.blocked = Some(Box::new((p, mid)));
                        Ok(())
                    }
                }
            }
            Packet::Subscribe(s) => {
                for f in &s.filters {
                    if let Err(e) = topic::check_filter(&f.path, &self.device) {
                        metrics::counter!("fleet_hub_acl_violations_total", "kind" => "subscribe")
                            .increment(1);
                        tracing::warn!(device_id = %self.device, error = %e, "subscription violation, closing");
                        return Err("acl_subscribe");
                    }
                }
                // Everything the hub sends is QoS 0: acks are idempotent high-water marks.
                let codes = vec![SubscribeReasonCode::Success(QoS::AtMostOnce); s.filters.len()];
                let _ = SubAck::new(s.pkid, codes).write(out);
                let mut wants_acks = false;
                for f in s.filters {
                    wants_acks |= topic::matches(&topic::acks_topic(&self.device), &f.path);
                    if !self.filters.contains(&f.path) {
                        self.filters.push(f.path);
                    }
                }
                self.wants_acks |= wants_acks;
                if wants_acks {
                    // Tell the device at once what is already stored, so that
                    // it does not resend what survived a reconnect.
                    let ingest = self.front.ingest.clone();
                    let device = self.device.clone();
                    let me = me.clone();
                    self.last_ack = None;
                    tokio::spawn(async move {
                        if let Ok((committed, replicated)) = ingest.acked(&device).await {
                            crate::sessions::deliver(
                                &me,
                                Outbound::Acked {
                                    committed,
                                    replicated,
                                },
                            );
                        }
                    });
                }
                Ok(())
            }
            Packet::Unsubscribe(u) => {
                self.filters.retain(|f| !u.topics.contains(f));
                let acks = topic::acks_topic(&self.device);
                self.wants_acks = self.filters.iter().any(|f| topic::matches(&acks, f));
                let _ = UnsubAck::new(u.pkid).write(out);
                Ok(())
            }
            Packet::PingReq => {
                let _ = PingResp.write(out);
                Ok(())
            }
            Packet::Disconnect => Err("client_disconnect"),
            // The hub publishes at QoS 0; a PUBACK from the device is harmless.
            Packet::PubAck(_) => Ok(()),
            _ => {
                metrics::counter!("fleet_hub_refused_total", "reason" => "protocol").increment(1);
                Err("protocol")
            }
        }
    }

    fn submit(
        &mut self,
        p: Publish,
        mid: Option<Mid>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), Reason> {
        let (pkid, qos) = (p.pkid, p.qos);
        match self
            .front
            .ingest
            .submit(&self.device, mid, p.payload, permit)
        {
            Ok(done) => {
                self.pending.push(done.map(move |r| (pkid, qos, r)).boxed());
                Ok(())
            }
            Err(IngestError::NotPrimary) => Err("not_primary"),
            Err(IngestError::NotOwner(_) | IngestError::NotLearned(_)) => Err("partition_moved"),
            Err(e @ IngestError::MidJump { .. }) => {
                metrics::counter!("fleet_hub_refused_total", "reason" => "mid_jump").increment(1);
                tracing::info!(device_id = %self.device, error = %e, "refusing an implausible mid");
                Err("mid_jump")
            }
            Err(e) => {
                tracing::warn!(device_id = %self.device, error = %e, "cannot store, closing without acknowledging");
                Err("store_failed")
            }
        }
    }

    fn completed(
        &mut self,
        pkid: u16,
        qos: QoS,
        result: Result<Stored, IngestError>,
        out: &mut BytesMut,
    ) -> Result<(), Reason> {
        match result {
            Ok(stored) => {
                if qos == QoS::AtLeastOnce {
                    let _ = PubAck::new(pkid).write(out);
                }
                if let Some(m) = stored.mid() {
                    self.committed = self.committed.max(m);
                    self.known = true;
                }
                Ok(())
            }
            Err(IngestError::NotPrimary) => Err("not_primary"),
            Err(IngestError::NotOwner(_)) => Err("partition_moved"),
            Err(e) => {
                // No PUBACK: the device keeps the message and sends it again.
                tracing::warn!(device_id = %self.device, error = %e, "store failed, closing without acknowledging");
                Err("store_failed")
            }
        }
    }

    fn outbound(&mut self, msg: Outbound) {
        match msg {
            Outbound::Acked {
                committed,
                replicated,
            } => {
                if let Some(m) = committed {
                    self.committed = self.committed.max(m);
                }
                if let Some(r) = replicated {
                    self.replicated = Some(self.replicated.map_or(r, |x| x.max(r)));
                }
                self.known = true;
            }
            Outbound::Replicated(m) => {
                self.replicated = Some(self.replicated.map_or(m, |r| r.max(m)));
            }
        }
    }

    /// Tells the device that the hub of `epoch` takes over: an ack that
    /// repeats what this connection last acknowledged (nothing more) under
    /// the new epoch.
    fn moving(&mut self, out: &mut BytesMut, epoch: Epoch) {
        // Not before this device's committed mid is known: a device without
        // numbering state takes the first ack's `committed` as its base.
        if !self.known || !self.wants_acks {
            return;
        }
        let replicated = self.last_ack.map_or(Mid(0), |(_, r)| r);
        let ack = AckMessage {
            committed: self.committed,
            replicated,
            epoch,
            region: self.front.state.region().clone(),
            detached: false,
        };
        let payload = serde_json::to_vec(&ack).unwrap_or_default();
        let _ = Publish::new(topic::acks_topic(&self.device), QoS::AtMostOnce, payload).write(out);
    }

    /// Publishes a commit ack when the device listens and something changed.
    fn ack(&mut self, out: &mut BytesMut) {
        if !self.known || !self.wants_acks {
            return;
        }
        // Without a secondary, or with the peer detached, durable here is
        // all there is to wait for.
        let detached = self.front.ingest.mode() != Replication::Off
            && !self
                .front
                .ingest
                .linked(self.front.ingest.partition_of(&self.device));
        let replicated = match self.front.ingest.mode() {
            Replication::Off => self.committed,
            _ if detached => self.committed,
            _ => self.replicated.unwrap_or(Mid(0)).min(self.committed),
        };
        if self.last_ack == Some((self.committed, replicated)) {
            return;
        }
        let state = self.front.state.get();
        let ack = AckMessage {
            committed: self.committed,
            replicated,
            epoch: state.epoch,
            region: self.front.state.region().clone(),
            detached,
        };
        let payload = serde_json::to_vec(&ack).unwrap_or_default();
        let _ = Publish::new(topic::acks_topic(&self.device), QoS::AtMostOnce, payload).write(out);
        self.last_ack = Some((self.committed, replicated));
    }
}
