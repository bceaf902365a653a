//! The DNS front's UDP fast path. After a failover a fleet resolves the
//! concierge's name all at once, and nearly every query is the same few
//! questions (`concierge.<zone>` A or AAAA, the apex's SOA or NS), asked
//! without EDNS. The answer to such a question depends only on the name,
//! the type and the healthy replicas, so it is served from a cache of the
//! answer the full handler gave, with the client's id, its RD bit and the
//! spelling of its question (0x20) copied in: no parsing into messages,
//! no task per query.
//!
//! Everything else (EDNS, other names, malformed packets, other classes or
//! opcodes) is relayed to the full handler, which serves on an internal
//! loopback socket, and its answer relayed back: both paths answer alike
//! because the cache holds only what the full handler said. Written here
//! because hickory-server has no hook for a pre-encoded answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::dns::Backends;

/// Cached answers at most (the served names × a few types).
const MAX_CACHED: usize = 64;
/// Queries relayed to the full handler at once; beyond, dropped (UDP
/// clients ask again), so junk cannot take this process's descriptors.
const MAX_RELAYED: usize = 256;
/// How long a relayed query waits for the full handler (on loopback it
/// answers in microseconds; what it does not answer must not hold a slot).
const RELAY_TIMEOUT: Duration = Duration::from_millis(250);
/// The types cached (with the served names: at most a few dozen keys).
const CACHED_TYPES: [u16; 4] = [1, 2, 6, 28];
/// Datagrams read (and answers sent) per system call.
const BATCH: usize = 32;
/// The largest packet read.
const MAX_PACKET: usize = 4096;

/// A cacheable question's key (its lowercase name in wire form, then its
/// type), written into `key`; and where the name's bytes are in the packet.
fn question_key(packet: &[u8], key: &mut Vec<u8>) -> Option<std::ops::Range<usize>> {
    key.clear();
    if packet.len() < 12 + 5 {
        return None;
    }
    // QR=0, opcode QUERY, AA=0, TC=0 (RD either way); RA, Z, AD, CD, RCODE 0.
    if packet[2] & 0b1111_1110 != 0 || packet[3] != 0 {
        return None;
    }
    // One question, and nothing else but perhaps a bare EDNS OPT record.
    let edns = match packet[4..12] {
        [0, 1, 0, 0, 0, 0, 0, 0] => false,
        [0, 1, 0, 0, 0, 0, 0, 1] => true,
        _ => return None,
    };
    let mut i = 12;
    loop {
        let len = usize::from(*packet.get(i)?);
        if len == 0 {
            key.push(0);
            i += 1;
            break;
        }
        // No compression in a question; labels of at most 63.
        if len > 63 || key.len() + len + 1 > 255 {
            return None;
        }
        key.push(len as u8);
        key.extend(
            packet
                .get(i + 1..i + 1 + len)?
                .iter()
                .map(u8::to_ascii_lowercase),
        );
        i += 1 + len;
    }
    let rest = packet.get(i..)?;
    // QTYPE, QCLASS IN, then (with EDNS) an OPT record of the root with no
    // options (its payload size, extended rcode, version and flags are in
    // the key: the answer's OPT echoes them), and the packet ends there.
    let (question, opt) = rest.split_at_checked(4)?;
    if question[2..4] != [0, 1]
        || !CACHED_TYPES.contains(&u16::from_be_bytes([question[0], question[1]]))
    {
        return None;
    }
    key.extend_from_slice(&question[0..2]);
    match (edns, opt) {
        (false, []) => key.push(0),
        (true, [0, 0, 41, payload @ .., 0, 0]) if payload.len() == 6 => {
            key.push(1);
            key.extend_from_slice(payload);
        }
        _ => return None,
    }
    Some(12..i)
}

/// A cacheable question: `(lowercase name in wire form, type)`, and where
/// the name's bytes are in the packet.
#[cfg(test)]
fn question(packet: &[u8]) -> Option<(Vec<u8>, u16, std::ops::Range<usize>)> {
    let mut key = Vec::new();
    let at = question_key(packet, &mut key)?;
    let name_len = at.end - at.start;
    let qtype = u16::from_be_bytes([key[name_len], key[name_len + 1]]);
    key.truncate(name_len);
    Some((key, qtype, at))
}

/// The full handler's answer to a cacheable question, reused for the same
/// question from anyone while the replicas are unchanged.
#[derive(Debug)]
struct Cached {
    generation: u64,
    answer: Vec<u8>,
    /// The query counter of the answer's rcode (looked up once).
    counter: metrics::Counter,
}

/// The answers of the served names, and the full handler to ask.
#[derive(Debug)]
pub struct FastPath {
    names: Vec<Vec<u8>>,
    backends: Backends,
    full: SocketAddr,
    /// By [`question_key`].
    cache: RwLock<HashMap<Vec<u8>, Arc<Cached>>>,
    relays: Arc<Semaphore>,
}

fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    out.push(0);
    out
}

fn rcode_name(answer: &[u8]) -> &'static str {
    match answer.get(3).map(|b| b & 0x0f) {
        Some(0) => "noerror",
        Some(1) => "formerr",
        Some(3) => "nxdomain",
        Some(5) => "refused",
        _ => "other",
    }
}

impl FastPath {
    /// Caches answers for `names` (e.g. `concierge.fleet.test.`), asking
    /// the full handler at `full`.
    pub fn new(names: &[String], backends: Backends, full: SocketAddr) -> FastPath {
        FastPath {
            names: names.iter().map(|n| wire_name(n)).collect(),
            backends,
            full,
            cache: RwLock::default(),
            relays: Arc::new(Semaphore::new(MAX_RELAYED)),
        }
    }

    /// The answer to `query` from the cache, written into `answer`.
    fn cached(&self, query: &[u8], key: &mut Vec<u8>, answer: &mut Vec<u8>) -> bool {
        let Some(at) = question_key(query, key) else {
            return false;
        };
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let Some(hit) = cache.get(key.as_slice()) else {
            return false;
        };
        if hit.generation != self.backends.generation() {
            return false;
        }
        answer.clear();
        answer.extend_from_slice(&hit.answer);
        hit.counter.increment(1);
        drop(cache);
        // The client's id, RD bit and spelling of the name (the answer's
        // question has the same length: the same name, another case).
        answer[0..2].copy_from_slice(&query[0..2]);
        answer[2] = (answer[2] & !1) | (query[2] & 1);
        match answer.get_mut(at.clone()) {
            Some(name) => {
                name.copy_from_slice(&query[at]);
                true
            }
            None => false,
        }
    }

    /// Remembers the full handler's `answer` to `query` when the question
    /// is one of the served names' and the answer is what it should be.
    fn remember(&self, query: &[u8], answer: &[u8], generation: u64) {
        let mut key = Vec::new();
        let Some(at) = question_key(query, &mut key) else {
            return;
        };
        let name = &key[..at.end - at.start];
        let plausible = answer.len() >= at.end + 4
            && answer[0..2] == query[0..2]
            && answer[2] & 0x80 != 0
            && answer[4..6] == [0, 1]
            && answer[at.clone()].eq_ignore_ascii_case(&query[at.clone()])
            // The same type and class were answered, and nothing truncated.
            && answer[at.end..at.end + 4] == query[at.end..at.end + 4]
            && answer[2] & 0b10 == 0;
        if !plausible || !self.names.iter().any(|n| n.as_slice() == name) {
            return;
        }
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let current = self.backends.generation();
        if generation != current {
            return; // answered for replicas that changed meanwhile
        }
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.generation == current);
        }
        if cache.len() >= MAX_CACHED && !cache.contains_key(&key) {
            return;
        }
        let counter = metrics::counter!(
            "fleet_concierge_dns_queries_total",
            "rcode" => rcode_name(answer)
        );
        cache.insert(
            key,
            Arc::new(Cached {
                generation,
                answer: answer.to_vec(),
                counter,
            }),
        );
    }

    /// Serves `socket` until `stop`: cached answers at once, the rest
    /// relayed to the full handler. Datagrams are read and answered in
    /// batches (`recvmmsg`/`sendmmsg`): under a storm the syscalls, not the
    /// answers, are what costs, and NSD batches the same way.
    pub async fn serve(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut bufs = vec![vec![0u8; MAX_PACKET]; BATCH];
        let mut received: Vec<(usize, usize, SocketAddr)> = Vec::with_capacity(BATCH);
        let mut answers: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(512)).collect();
        let mut to: Vec<SocketAddr> = Vec::with_capacity(BATCH);
        let mut key = Vec::with_capacity(260);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                ready = socket.readable() => if ready.is_err() { return },
            }
            let fd = socket.as_raw_fd();
            match socket.try_io(Interest::READABLE, || {
                recv_batch(fd, &mut bufs, &mut received)
            }) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // ICMP errors surface here on Linux: keep serving.
                    tracing::debug!(error = %e, "dns receive failed");
                    tokio::task::consume_budget().await;
                    continue;
                }
            }
            to.clear();
            for &(i, n, from) in &received {
                let query = &bufs[i][..n];
                // What the full handler would drop unanswered (too short
                // for a header, a response, not a query) is dropped here,
                // before it holds a relay slot.
                if n < 12 || query[2] & 0x80 != 0 || query[2] & 0x78 != 0 {
                    metrics::counter!("fleet_concierge_dns_queries_total", "rcode" => "dropped")
                        .increment(1);
                    continue;
                }
                if self.cached(query, &mut key, &mut answers[to.len()]) {
                    to.push(from);
                    continue;
                }
                self.spawn_relay(&socket, query, from);
            }
            if to.is_empty() {
                continue;
            }
            let sent = socket
                .try_io(Interest::WRITABLE, || {
                    send_batch(fd, &answers[..to.len()], &to)
                })
                .unwrap_or(0);
            // What the socket's buffer did not take waits for room.
            for (answer, dest) in answers.iter().zip(&to).skip(sent) {
                let _ = socket.send_to(answer, *dest).await;
            }
            // Readiness and `try_io` take nothing from tokio's budget: under
            // a steady flood this loop would never yield its worker (the
            // HTTP API and the relays' tasks would wait).
            tokio::task::consume_budget().await;
        }
    }

    /// Relays `query` to the full handler on a task of its own, unless as
    /// many are in flight as allowed (then it is dropped: UDP clients ask
    /// again).
    fn spawn_relay(self: &Arc<Self>, socket: &Arc<UdpSocket>, query: &[u8], from: SocketAddr) {
        let Ok(permit) = self.relays.clone().try_acquire_owned() else {
            metrics::counter!("fleet_concierge_dns_queries_total", "rcode" => "dropped")
                .increment(1);
            return;
        };
        let (me, socket, query) = (self.clone(), socket.clone(), query.to_vec());
        tokio::spawn(async move {
            let _permit = permit;
            let generation = me.backends.generation();
            if let Some(answer) = me.relay(&query).await {
                me.remember(&query, &answer, generation);
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }

    /// Asks the full handler.
    async fn relay(&self, query: &[u8]) -> Option<Vec<u8>> {
        let local: SocketAddr = if self.full.is_ipv4() {
            ([127, 0, 0, 1], 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let socket = UdpSocket::bind(local).await.ok()?;
        socket.send_to(query, self.full).await.ok()?;
        let mut buf = vec![0u8; MAX_PACKET];
        let deadline = tokio::time::Instant::now() + RELAY_TIMEOUT;
        loop {
            let (n, from) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            // Only the full handler's answer counts (another local process
            // could aim datagrams at this port).
            if from == self.full {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
}

/// Reads the datagrams waiting on `fd` (at most one per buffer, without
/// waiting) into `bufs`: their buffers, lengths and senders into `got`.
fn recv_batch(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<(usize, usize, SocketAddr)>,
) -> std::io::Result<()> {
    got.clear();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
        bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
    let results = recvmmsg(
        fd,
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    for (i, m) in results.enumerate() {
        // A sender that is not an IP socket address cannot be answered.
        if let Some(from) = m.address.as_ref().and_then(std_addr) {
            got.push((i, m.bytes, from));
        }
    }
    Ok(())
}

/// Sends `answers[i]` to `to[i]` without waiting: how many the socket took.
fn send_batch(fd: RawFd, answers: &[Vec<u8>], to: &[SocketAddr]) -> std::io::Result<usize> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(to.len(), None);
    let iovs: Vec<[IoSlice<'_>; 1]> = answers.iter().map(|a| [IoSlice::new(a)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> =
        to.iter().map(|a| Some(SockaddrStorage::from(*a))).collect();
    let none: [ControlMessage<'_>; 0] = [];
    Ok(sendmmsg(
        fd,
        &mut headers,
        &iovs,
        &addrs,
        none,
        MsgFlags::MSG_DONTWAIT,
    )?
    .count())
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16, rd: bool) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[u8::from(rd), 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0]);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn only_plain_single_questions_are_cacheable() {
        let q = query(7, "Concierge.Fleet.Test", 1, true);
        let (name, qtype, at) = question(&q).unwrap();
        assert_eq!(name, wire_name("concierge.fleet.test."));
        assert_eq!((qtype, at), (1, 12..34));
        let mut edns = q.clone();
        edns[11] = 1; // an additional record (OPT)
        assert!(question(&edns).is_none());
        let mut response = q.clone();
        response[2] |= 0x80;
        assert!(question(&response).is_none());
        let mut chaos = q.clone();
        let len = chaos.len();
        chaos[len - 1] = 3;
        assert!(question(&chaos).is_none());
        let mut trailing = q.clone();
        trailing.push(0);
        assert!(question(&trailing).is_none());
        let mut pointer = q.clone();
        pointer[12] = 0xc0;
        assert!(question(&pointer).is_none());
        // A bare EDNS OPT (as stub resolvers send): cacheable, keyed apart
        // from the same question without it; with an option: not.
        let mut opt = q.clone();
        opt[11] = 1;
        opt.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        let (mut plain_key, mut opt_key) = (Vec::new(), Vec::new());
        assert!(question_key(&q, &mut plain_key).is_some());
        assert_eq!(question_key(&opt, &mut opt_key), Some(12..34));
        assert_ne!(plain_key, opt_key);
        let mut cookie = opt.clone();
        let len = cookie.len();
        cookie[len - 1] = 4;
        assert!(question(&cookie).is_none());
        // Types other than A, AAAA, SOA and NS are not cached.
        let txt = query(7, "concierge.fleet.test", 16, true);
        assert!(question(&txt).is_none());
    }

    #[test]
    fn a_cached_answer_takes_the_clients_id_rd_and_spelling() {
        let backends = Backends::default();
        let fast = FastPath::new(
            &["concierge.fleet.test.".into()],
            backends.clone(),
            "127.0.0.1:9".parse().unwrap(),
        );
        let first = query(1, "concierge.fleet.test", 1, false);
        let mut answer = first.clone();
        answer[2] = 0x84; // QR, AA
        answer[3] = 0;
        answer[6..8].copy_from_slice(&[0, 1]);
        answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
        fast.remember(&first, &answer, backends.generation());
        let again = query(0xbeef, "CONCIERGE.fleet.TEST", 1, true);
        let (mut key, mut got) = (Vec::new(), Vec::new());
        assert!(fast.cached(&again, &mut key, &mut got));
        assert_eq!(&got[0..2], &[0xbe, 0xef]);
        assert_eq!(got[2], 0x85);
        assert_eq!(&got[12..34], &again[12..34]);
        assert_eq!(&got[34..], &answer[34..]);
        // Another name or type is not served from it; nor after the
        // replicas change.
        let mut hit = |q: &[u8]| fast.cached(q, &mut key, &mut got);
        assert!(!hit(&query(2, "concierge.fleet.test", 28, true)));
        assert!(!hit(&query(2, "other.fleet.test", 1, true)));
        backends.set(vec!["127.0.0.2".parse().unwrap()]);
        assert!(!hit(&again));
        // Names not served are never cached.
        let other = query(3, "nope.fleet.test", 1, true);
        let mut nx = other.clone();
        nx[2] = 0x84;
        nx[3] = 3;
        fast.remember(&other, &nx, backends.generation());
        assert!(!hit(&other));
    }
}
