//! A minimal MQTT 3.1.1 client on the rumqttc codec, for tests that need
//! exact control over packet ids, timing and malformed input.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why no packet came.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    Closed,
    Timeout,
}

/// A raw MQTT connection.
#[derive(Debug)]
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    /// Opens TCP only (for sending garbage or nothing at all).
    pub async fn tcp(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
        }
    }

    /// Opens TCP only, from `local` (another loopback address, say
    /// 127.0.0.2, to play a second client machine).
    pub async fn tcp_from(addr: SocketAddr, local: std::net::IpAddr) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(local, 0))
            .expect("bind the local address");
        RawClient {
            stream: socket.connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
        }
    }

    /// [`RawClient::connect`] from `local`.
    pub async fn connect_from(
        addr: SocketAddr,
        local: std::net::IpAddr,
        id: &str,
        login: Option<(&str, &str)>,
    ) -> (RawClient, Option<ConnectReturnCode>) {
        let c = RawClient::tcp_from(addr, local).await;
        c.handshake(id, login, 30).await
    }

    async fn handshake(
        mut self,
        id: &str,
        login: Option<(&str, &str)>,
        keep_alive: u16,
    ) -> (RawClient, Option<ConnectReturnCode>) {
        let mut connect = Connect::new(id);
        connect.keep_alive = keep_alive;
        connect.login = login.map(|(u, p)| Login::new(u, p));
        self.send(Packet::Connect(connect)).await;
        let code = match self.recv(Duration::from_secs(10)).await {
            Ok(Packet::ConnAck(ack)) => Some(ack.code),
            _ => None,
        };
        (self, code)
    }

    /// Connects and returns the CONNACK code (`None` if closed without one).
    pub async fn connect(
        addr: SocketAddr,
        id: &str,
        login: Option<(&str, &str)>,
    ) -> (RawClient, Option<ConnectReturnCode>) {
        Self::connect_with(addr, id, login, 30).await
    }

    /// [`RawClient::connect`] with a keep-alive in seconds.
    pub async fn connect_with(
        addr: SocketAddr,
        id: &str,
        login: Option<(&str, &str)>,
        keep_alive: u16,
    ) -> (RawClient, Option<ConnectReturnCode>) {
        RawClient::tcp(addr)
            .await
            .handshake(id, login, keep_alive)
            .await
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).expect("encode");
        let _ = self.stream.write_all(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    pub async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
    }

    pub async fn subscribe(&mut self, pkid: u16, filter: &str) {
        let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
        s.pkid = pkid;
        self.send(Packet::Subscribe(s)).await;
    }

    /// The next packet, or why none came within `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Result<Packet, RecvError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Packet::read(&mut self.buf, 64 << 20) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return Err(RecvError::Closed),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(RecvError::Timeout),
                Ok(Ok(0) | Err(_)) => return Err(RecvError::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Waits until the server closes the connection (ignoring packets).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Err(RecvError::Closed) => return true,
                Err(RecvError::Timeout) => return false,
                Ok(_) => {}
            }
        }
    }
}
