//! The DNS front: authoritative for its zone only, it answers
//! `concierge.<zone>` A/AAAA with the healthy concierge replicas in priority
//! order. SOA and NS for the apex, NXDOMAIN (with the SOA) for other names in
//! the zone, REFUSED outside it; never recursive; UDP and TCP.
//!
//! A custom `RequestHandler` over shared state rather than a zone catalog:
//! answers change the moment replica health changes, with no serials or
//! locks held across an await, and the answer order is exactly ours.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

/// The healthy replicas, in priority order; updated by the health checker.
/// The generation changes with them (answers cached for the old ones are
/// stale).
#[derive(Clone, Debug, Default)]
pub struct Backends(Arc<(RwLock<Vec<IpAddr>>, std::sync::atomic::AtomicU64)>);

impl Backends {
    pub fn set(&self, healthy: Vec<IpAddr>) {
        let mut now = self.0.0.write().unwrap_or_else(|e| e.into_inner());
        if *now != healthy {
            *now = healthy;
            self.0.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub fn get(&self) -> Vec<IpAddr> {
        self.0.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes whenever the replicas do.
    pub fn generation(&self) -> u64 {
        self.0.1.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Answers queries for one zone.
#[derive(Debug)]
pub struct FrontHandler {
    zone: LowerName,
    host: LowerName,
    ns_host: LowerName,
    soa: Record,
    ns: Record,
    ttl: u32,
    backends: Backends,
}

impl FrontHandler {
    /// `zone` like `fleet.test.`; the served name is `concierge.<zone>`.
    ///
    /// # Errors
    /// When `zone` is not a domain name.
    pub fn new(zone: &str, ttl: u32, backends: Backends) -> anyhow::Result<FrontHandler> {
        let zone_name = Name::from_ascii(zone)?;
        let ns_name = Name::from_ascii(format!("ns.{zone}"))?;
        let soa = Record::from_rdata(
            zone_name.clone(),
            ttl,
            RData::SOA(SOA::new(
                ns_name.clone(),
                Name::from_ascii(format!("hostmaster.{zone}"))?,
                1,
                3600,
                600,
                86_400,
                ttl, // negative-caching TTL
            )),
        );
        let ns = Record::from_rdata(zone_name.clone(), ttl, RData::NS(NS(ns_name.clone())));
        Ok(FrontHandler {
            zone: LowerName::from(&zone_name),
            host: LowerName::from(Name::from_ascii(format!("concierge.{zone}"))?),
            ns_host: LowerName::from(&ns_name),
            soa,
            ns,
            ttl,
            backends,
        })
    }

    fn addresses(&self, owner: &Name, qtype: RecordType) -> Vec<Record> {
        self.backends
            .get()
            .into_iter()
            .filter_map(|ip| {
                let rdata = match (qtype, ip) {
                    (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => RData::A(A(v4)),
                    (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                    _ => return None,
                };
                Some(Record::from_rdata(owner.clone(), self.ttl, rdata))
            })
            .collect()
    }
}

fn count(rcode: ResponseCode) {
    let code = match rcode {
        ResponseCode::NoError => "noerror",
        ResponseCode::NXDomain => "nxdomain",
        ResponseCode::Refused => "refused",
        ResponseCode::FormErr => "formerr",
        _ => "other",
    };
    metrics::counter!("fleet_concierge_dns_queries_total", "rcode" => code).increment(1);
}

#[async_trait::async_trait]
impl RequestHandler for FrontHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        // Echo EDNS so that larger answers fit in UDP when the client allows it.
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns.as_ref() {
            builder.edns(e);
        }
        let query = match request.request_info() {
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                info.query
            }
            _ => {
                count(ResponseCode::FormErr);
                let resp = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response, resp, &request.metadata).await;
            }
        };
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.recursion_available = false;
        let qname = query.name();
        let qtype = query.query_type();
        let owner: Name = query.original().name().clone(); // keep the client's spelling (0x20)
        let mut answers: Vec<Record> = Vec::new();
        let mut soa: Vec<&Record> = Vec::new();
        if !self.zone.zone_of(qname) {
            meta.authoritative = false;
            meta.response_code = ResponseCode::Refused;
        } else if qname == &self.host || qname == &self.ns_host {
            answers = self.addresses(&owner, qtype);
            if answers.is_empty() {
                soa.push(&self.soa); // NODATA: no such type, or no healthy replica
            }
        } else if qname == &self.zone {
            match qtype {
                RecordType::SOA => answers.push(self.soa.clone()),
                RecordType::NS => answers.push(self.ns.clone()),
                _ => soa.push(&self.soa),
            }
        } else {
            meta.response_code = ResponseCode::NXDomain;
            soa.push(&self.soa);
        }
        count(meta.response_code);
        let resp = builder.build(
            meta,
            answers.iter(),
            std::iter::empty(),
            soa,
            std::iter::empty(),
        );
        send(&mut response, resp, &request.metadata).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    resp: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    req: &Metadata,
) -> ResponseInfo {
    match handle.send_response(resp).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "cannot send a DNS response");
            let mut m = Metadata::response_from_request(req);
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: m,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// Binds `sockets` UDP sockets on `addr`, all on one port, and TCP on the
/// same port (retrying when port 0 picks a UDP port whose TCP twin is
/// taken). The UDP sockets share the port with `SO_REUSEPORT`: the kernel
/// spreads queries over them by source, and each is served by its own task,
/// so one socket's task is not the bottleneck of a storm of devices
/// resolving the concierge after a failover. (Linux admits to the group only
/// sockets of the same user that also asked for it.)
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(
    addr: SocketAddr,
    sockets: usize,
) -> std::io::Result<(Vec<UdpSocket>, TcpListener)> {
    for _ in 0..20 {
        let first = reuse_port_udp(addr)?;
        let port = first.local_addr()?.port();
        let at = SocketAddr::new(addr.ip(), port);
        match TcpListener::bind(at).await {
            Ok(tcp) => {
                let mut udp = vec![first];
                for _ in 1..sockets.max(1) {
                    udp.push(reuse_port_udp(at)?);
                }
                return Ok((udp, tcp));
            }
            Err(_) if addr.port() == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no port free for both UDP and TCP"))
}

fn reuse_port_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Serves `handler` on the sockets. Dropping the server stops it.
pub fn serve(handler: FrontHandler, udp: Vec<UdpSocket>, tcp: TcpListener) -> Server<FrontHandler> {
    let mut server = Server::new(handler);
    for socket in udp {
        server.register_socket(socket);
    }
    // A slow or silent TCP client is dropped after 5 s; 32 queued answers per connection.
    server.register_listener(tcp, Duration::from_secs(5), 32);
    server
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_udp_sockets_share_one_port_with_the_tcp_listener() {
        let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap(), 3).await.unwrap();
        assert_eq!(udp.len(), 3);
        let port = tcp.local_addr().unwrap().port();
        for s in &udp {
            assert_eq!(s.local_addr().unwrap().port(), port);
        }
        // Every socket of the group receives: queries from many sources
        // land on all of them, not one.
        let mut got = [false; 3];
        for i in 0..200u16 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.send_to(&i.to_be_bytes(), ("127.0.0.1", port))
                .await
                .unwrap();
            let (mut b0, mut b1, mut b2) = ([0u8; 8], [0u8; 8], [0u8; 8]);
            let which = tokio::select! {
                r = udp[0].recv_from(&mut b0) => { r.unwrap(); 0 }
                r = udp[1].recv_from(&mut b1) => { r.unwrap(); 1 }
                r = udp[2].recv_from(&mut b2) => { r.unwrap(); 2 }
            };
            got[which] = true;
            if got.iter().all(|g| *g) {
                break;
            }
        }
        assert_eq!(got, [true; 3], "the kernel spreads sources over the group");
    }
}
