//! The live stream's front door: stream clients may only watch.
//!
//! rumqttd has no ACLs: anyone with the stream password could publish
//! (forged, retained "telemetry" reached every watcher), and every new
//! subscription filter with traffic makes its router keep a log for that
//! filter, never freed. So rumqttd listens on loopback only, and this gate
//! serves the stream's address (with TLS when the hub's MQTT has it): it
//! reads each client packet with the MQTT 3.1.1 codec and forwards only
//! what a watcher needs (CONNECT once, SUBSCRIBE to a bounded set of
//! filters under `fleet/`, UNSUBSCRIBE, PINGREQ, DISCONNECT, and the
//! acknowledgements of what it was sent). Anything else closes the
//! connection and is counted in `fleet_hub_stream_refused_total{reason}`.
//! The bytes rumqttd sends back are copied through unchanged.
//!
//! The gate checks the stream credentials itself (constant time) and logs
//! in to rumqttd with a random secret of its own, so nobody on the hub's
//! machine can go around it through rumqttd's loopback port.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use fleet_api::Secret;
use fleet_api::limit::{KeyedBuckets, Slot, Slots, source_key};
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Login, Packet};
use rumqttc::mqttbytes::{Error as CodecError, PacketType, Protocol, check};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Largest packet a watcher may send (a SUBSCRIBE with a few filters).
const MAX_PACKET: usize = 8 * 1024;
/// Time from accept to a complete CONNECT (after TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_TIMEOUT: Duration = Duration::from_secs(5);
/// Filters one connection may hold.
const FILTERS_PER_CLIENT: usize = 16;
/// Connections per second one address may open (a failed login costs
/// [`crate::front::FAILED_LOGIN_COST`] more).
const RATE_PER_SOURCE: f64 = 20.0;
/// Connections one address may hold before they have logged in.
const PENDING_PER_SOURCE: usize = 16;

/// Settings of the gate.
#[derive(Clone, Debug)]
pub struct GateConfig {
    /// rumqttd's loopback address.
    pub upstream: SocketAddr,
    /// The stream credentials watchers present.
    pub user: String,
    pub password: Secret,
    /// What the gate presents to rumqttd instead.
    pub internal_user: String,
    pub internal_password: Secret,
    /// Distinct filters the stream ever serves (rumqttd keeps a log per
    /// filter for its lifetime, so this bounds its memory).
    pub max_filters: usize,
    /// Watchers connected at once; also the size of the pool of client ids
    /// the gate gives rumqttd (which remembers every client id it saw).
    pub max_watchers: usize,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The gate in front of one hub's live stream.
pub struct StreamGate {
    config: GateConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Every filter ever forwarded to rumqttd.
    filters: Mutex<HashSet<String>>,
    watchers: Arc<Semaphore>,
    /// Client ids (`fleet-watcher-N`) free for the next watcher.
    ids: Arc<Mutex<VecDeque<usize>>>,
    sources: KeyedBuckets<IpAddr>,
    pending: Slots<IpAddr>,
}

/// A client id of the pool, given back when the watcher leaves.
struct WatcherId {
    n: usize,
    pool: Arc<Mutex<VecDeque<usize>>>,
}

impl Drop for WatcherId {
    fn drop(&mut self) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            // At the back: reused last, so rumqttd has long finished with
            // the connection that had it (a quick reuse could let the old
            // link's disconnect remove the new watcher).
            .push_back(self.n);
    }
}

impl std::fmt::Debug for StreamGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGate")
            .field("upstream", &self.config.upstream)
            .field("max_filters", &self.config.max_filters)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn refuse(reason: &'static str) {
    metrics::counter!("fleet_hub_stream_refused_total", "reason" => reason).increment(1);
}

/// What a watcher's packet means to the gate.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    Refuse(&'static str),
}

impl StreamGate {
    pub fn new(config: GateConfig) -> Arc<StreamGate> {
        let watchers = config.max_watchers.max(1);
        Arc::new(StreamGate {
            tls: config.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            config,
            filters: Mutex::new(HashSet::new()),
            watchers: Arc::new(Semaphore::new(watchers)),
            ids: Arc::new(Mutex::new((0..watchers).collect())),
            sources: KeyedBuckets::new(RATE_PER_SOURCE, RATE_PER_SOURCE, 100_000),
            pending: Slots::new(PENDING_PER_SOURCE, watchers),
        })
    }

    /// Accepts watchers on `listener` until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "live stream accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(permit) = self.watchers.clone().try_acquire_owned() else {
                refuse("too_many_watchers");
                continue;
            };
            let source = source_key(peer.ip());
            if self.sources.try_take(&source).is_err() {
                refuse("source_rate");
                continue;
            }
            let pending = match self.pending.take(&source) {
                Ok(slot) => slot,
                Err(full) => {
                    refuse(full.reason());
                    continue;
                }
            };
            let gate = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    reason = gate.handle(tcp, source, pending) => {
                        if let Err(reason) = reason {
                            tracing::debug!(%peer, reason, "live stream watcher refused");
                        }
                    }
                    () = stop.cancelled() => {}
                }
                drop(permit);
            });
        }
    }

    async fn handle(
        &self,
        tcp: TcpStream,
        source: IpAddr,
        pending: Slot<IpAddr>,
    ) -> Result<(), &'static str> {
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.watch(tcp, source, pending).await,
            Some(acceptor) => match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => self.watch(tls, source, pending).await,
                Ok(Err(_)) => {
                    refuse("tls_handshake");
                    Err("tls_handshake")
                }
                Err(_) => {
                    refuse("tls_timeout");
                    Err("tls_timeout")
                }
            },
        }
    }

    /// One watcher; a refusal is counted before its connection is closed.
    async fn watch<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: S,
        source: IpAddr,
        pending: Slot<IpAddr>,
    ) -> Result<(), &'static str> {
        let (mut from_client, mut to_client) = tokio::io::split(client);
        let result = self
            .session(&mut from_client, &mut to_client, source, pending)
            .await;
        if let Err(reason) = result {
            refuse(reason);
        }
        result
    }

    /// Its CONNECT, then its packets checked one by one while rumqttd's
    /// answers flow back unchanged.
    async fn session<R, W>(
        &self,
        from_client: &mut R,
        to_client: &mut W,
        source: IpAddr,
        pending: Slot<IpAddr>,
    ) -> Result<(), &'static str>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(1024);
        let first = tokio::time::timeout(CONNECT_TIMEOUT, next_frame(from_client, &mut buf))
            .await
            .map_err(|_| "connect_timeout")??;
        if first.0 != PacketType::Connect {
            return Err("protocol");
        }
        let mut connect = match Packet::read(&mut BytesMut::from(&first.1[..]), MAX_PACKET) {
            Ok(Packet::Connect(c)) if c.protocol == Protocol::V4 => c,
            Ok(Packet::Connect(_))
            | Err(CodecError::InvalidProtocolLevel(_) | CodecError::InvalidProtocol) => {
                let out = connack(ConnectReturnCode::RefusedProtocolVersion);
                let _ = to_client.write_all(&out).await;
                return Err("protocol_version");
            }
            _ => return Err("malformed"),
        };
        let authorised = connect.login.as_ref().is_some_and(|l| {
            let user = l.username.as_bytes().ct_eq(self.config.user.as_bytes());
            let pass = l
                .password
                .as_bytes()
                .ct_eq(self.config.password.expose().as_bytes());
            bool::from(user & pass)
        });
        if !authorised {
            // The offender pays for guessing, not the other watchers.
            self.sources
                .charge(&source, crate::front::FAILED_LOGIN_COST);
            let out = connack(ConnectReturnCode::BadUserNamePassword);
            let _ = to_client.write_all(&out).await;
            return Err("bad_credentials");
        }
        drop(pending);
        // A will is a publish rumqttd would make on the watcher's behalf
        // when it leaves: refused like any publish.
        if connect.last_will.is_some() {
            let out = connack(ConnectReturnCode::NotAuthorized);
            let _ = to_client.write_all(&out).await;
            return Err("will");
        }
        // rumqttd remembers every client id (and persistent session) it ever
        // saw: it only ever sees a clean session under one of the pool's ids.
        let id = {
            let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            ids.pop_front().map(|n| WatcherId {
                n,
                pool: self.ids.clone(),
            })
        };
        let Some(id) = id else {
            return Err("too_many_watchers");
        };
        connect.client_id = format!("fleet-watcher-{}", id.n);
        connect.clean_session = true;
        connect.login = Some(Login::new(
            self.config.internal_user.as_str(),
            self.config.internal_password.expose(),
        ));
        let mut login = BytesMut::new();
        connect.write(&mut login).map_err(|_| "malformed")?;
        let upstream = TcpStream::connect(self.config.upstream)
            .await
            .map_err(|_| "upstream")?;
        let _ = upstream.set_nodelay(true);
        let (mut up_read, mut up_write) = upstream.into_split();
        up_write.write_all(&login).await.map_err(|_| "upstream")?;
        let back = async {
            let _ = tokio::io::copy(&mut up_read, to_client).await;
            let _ = to_client.shutdown().await;
        };
        let mut held: HashSet<String> = HashSet::new();
        let forth = async {
            loop {
                let (kind, frame) = next_frame(from_client, &mut buf).await?;
                match self.judge(kind, &frame, &mut held) {
                    Verdict::Forward => {
                        up_write.write_all(&frame).await.map_err(|_| "upstream")?;
                        if kind == PacketType::Disconnect {
                            return Ok(());
                        }
                    }
                    Verdict::Refuse(reason) => return Err(reason),
                }
            }
        };
        tokio::select! {
            () = back => Ok(()),
            r = forth => r.or_else(|reason| if reason == "closed" { Ok(()) } else { Err(reason) }),
        }
    }

    fn judge(&self, kind: PacketType, frame: &[u8], held: &mut HashSet<String>) -> Verdict {
        match kind {
            // Acknowledgements of what the stream sent, keep-alive, leaving.
            PacketType::PubAck
            | PacketType::PubRec
            | PacketType::PubComp
            | PacketType::PingReq
            | PacketType::Unsubscribe
            | PacketType::Disconnect => Verdict::Forward,
            PacketType::Publish | PacketType::PubRel => Verdict::Refuse("publish"),
            PacketType::Subscribe => match Packet::read(&mut BytesMut::from(frame), MAX_PACKET) {
                Ok(Packet::Subscribe(s)) => {
                    let wanted: Vec<String> = s.filters.into_iter().map(|f| f.path).collect();
                    self.admit_filters(&wanted, held)
                }
                _ => Verdict::Refuse("malformed"),
            },
            _ => Verdict::Refuse("protocol"),
        }
    }

    /// Filters must be under `fleet/`; a connection holds at most
    /// [`FILTERS_PER_CLIENT`], and the stream serves at most `max_filters`
    /// distinct ones over its life.
    fn admit_filters(&self, wanted: &[String], held: &mut HashSet<String>) -> Verdict {
        if wanted
            .iter()
            .any(|f| !(f.starts_with("fleet/") || f == "#" || f == "fleet/#"))
        {
            return Verdict::Refuse("foreign_filter");
        }
        let new_here = wanted.iter().filter(|f| !held.contains(*f)).count();
        if held.len() + new_here > FILTERS_PER_CLIENT {
            return Verdict::Refuse("filters_per_client");
        }
        let mut all = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        let unseen = wanted.iter().filter(|f| !all.contains(*f)).count();
        if all.len() + unseen > self.config.max_filters {
            return Verdict::Refuse("filters_total");
        }
        for f in wanted {
            all.insert(f.clone());
            held.insert(f.clone());
        }
        Verdict::Forward
    }
}

fn connack(code: ConnectReturnCode) -> BytesMut {
    let mut out = BytesMut::new();
    let _ = ConnAck::new(code, false).write(&mut out);
    out
}

/// Reads one whole packet: its type and its bytes (fixed header included).
async fn next_frame<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
) -> Result<(PacketType, BytesMut), &'static str> {
    loop {
        match check(buf.iter(), MAX_PACKET) {
            Ok(header) => {
                let kind = header.packet_type().map_err(|_| "malformed")?;
                let frame = buf.split_to(header.frame_length());
                return Ok((kind, frame));
            }
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(CodecError::PayloadSizeLimitExceeded(_)) => return Err("too_large"),
            Err(_) => return Err("malformed"),
        }
        match from.read_buf(buf).await {
            Ok(0) => return Err("closed"),
            Ok(_) => {}
            Err(_) => return Err("io_error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_filters: usize) -> Arc<StreamGate> {
        StreamGate::new(GateConfig {
            upstream: SocketAddr::from(([127, 0, 0, 1], 9)),
            user: "stream".into(),
            password: Secret::new("watch-0123456789"),
            internal_user: "gate".into(),
            internal_password: Secret::new("internal-0123456789"),
            max_filters,
            max_watchers: 16,
            tls: None,
        })
    }

    #[test]
    fn watchers_may_not_publish() {
        let g = gate(8);
        let mut held = HashSet::new();
        assert_eq!(
            g.judge(PacketType::Publish, &[], &mut held),
            Verdict::Refuse("publish")
        );
        assert_eq!(
            g.judge(PacketType::Connect, &[], &mut held),
            Verdict::Refuse("protocol")
        );
        assert_eq!(
            g.judge(PacketType::PingReq, &[], &mut held),
            Verdict::Forward
        );
    }

    #[test]
    fn filters_are_bounded_per_client_and_in_all() {
        let g = gate(20);
        let mut a = HashSet::new();
        let many: Vec<String> = (0..17)
            .map(|i| format!("fleet/eu/devices/d{i}/events"))
            .collect();
        assert_eq!(
            g.admit_filters(&many, &mut a),
            Verdict::Refuse("filters_per_client")
        );
        assert!(a.is_empty(), "nothing of a refused SUBSCRIBE is kept");
        assert_eq!(g.admit_filters(&many[..16], &mut a), Verdict::Forward);
        // The same filters again cost nothing.
        assert_eq!(g.admit_filters(&many[..16], &mut a), Verdict::Forward);
        let mut b = HashSet::new();
        assert_eq!(g.admit_filters(&many[..4], &mut b), Verdict::Forward);
        let others: Vec<String> = (0..5).map(|i| format!("fleet/eu/x{i}")).collect();
        assert_eq!(
            g.admit_filters(&others, &mut b),
            Verdict::Refuse("filters_total")
        );
        assert_eq!(
            g.admit_filters(&["$SYS/#".to_string()], &mut b),
            Verdict::Refuse("foreign_filter")
        );
    }
}
