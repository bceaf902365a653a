//! A minimal MQTT 3.1.1 connection for the agent, on the rumqttc codec.
//!
//! Why not rumqttc's client: it reconnects without backoff and can drop
//! queued QoS 1 publishes on reconnect (guides/rumqtt.md §6). Here every
//! connection is fresh and holds nothing that is not also in the outbox.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use fleet_api::{DeviceId, DeviceKey};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish, Subscribe};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid MQTT URL {0:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")]
    BadUrl(String),
    #[error("{0}")]
    Io(String),
    #[error("timed out")]
    Timeout,
    #[error("refused: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(
        "refusing plaintext endpoint {0:?}: the hub must be mqtts:// (pass --allow-plaintext only on a trusted network)"
    )]
    Plaintext(String),
}

/// TCP or TLS.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Tcp(_) => "Stream::Tcp",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Splits `mqtt://host:port` into (tls, host, port).
///
/// # Errors
/// When the URL is not of that form.
pub fn parse_url(url: &str) -> Result<(bool, String, u16), ConnectError> {
    let bad = || ConnectError::BadUrl(url.to_string());
    let (tls, rest) = match url.split_once("://") {
        Some(("mqtt", r)) => (false, r),
        Some(("mqtts", r)) => (true, r),
        _ => return Err(bad()),
    };
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((tls, host.to_string(), port))
}

/// An open, accepted connection.
#[derive(Debug)]
pub struct Connection {
    pub stream: Stream,
    pub buf: BytesMut,
    pub out: BytesMut,
}

/// Connects, sends CONNECT and waits for a successful CONNACK.
///
/// # Errors
/// See [`ConnectError`]; a CONNACK refusal carries its code.
pub async fn connect(
    url: &str,
    device: &DeviceId,
    key: &DeviceKey,
    keep_alive: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
    allow_plaintext: bool,
) -> Result<Connection, ConnectError> {
    connect_from(None, url, device, key, keep_alive, tls, allow_plaintext).await
}

/// [`connect`] from the local address `from` (load generators spread
/// their connections over several loopback addresses to get past one
/// address's ephemeral ports).
///
/// # Errors
/// See [`connect`].
pub async fn connect_from(
    from: Option<std::net::IpAddr>,
    url: &str,
    device: &DeviceId,
    key: &DeviceKey,
    keep_alive: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
    allow_plaintext: bool,
) -> Result<Connection, ConnectError> {
    let (use_tls, host, port) = parse_url(url)?;
    // Whatever the concierge answers, it cannot talk this agent out of TLS.
    if !use_tls && !allow_plaintext {
        return Err(ConnectError::Plaintext(url.to_string()));
    }
    let attempt = async {
        let tcp = match from {
            None => TcpStream::connect((host.as_str(), port)).await,
            Some(local) => {
                let to = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .and_then(|mut a| a.next().ok_or_else(|| std::io::Error::other("no address")))
                    .map_err(|e| ConnectError::Io(e.to_string()))?;
                let socket = if to.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(|e| ConnectError::Io(e.to_string()))?;
                socket
                    .bind(std::net::SocketAddr::new(local, 0))
                    .map_err(|e| ConnectError::Io(e.to_string()))?;
                socket.connect(to).await
            }
        }
        .map_err(|e| ConnectError::Io(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream = if use_tls {
            let config = tls.cloned().ok_or_else(|| {
                ConnectError::Protocol("mqtts:// needs a TLS configuration".into())
            })?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| ConnectError::BadUrl(url.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Io(format!("tls: {e}")))?;
            Stream::Tls(Box::new(tls))
        } else {
            Stream::Tcp(tcp)
        };
        let mut c = Connection {
            stream,
            buf: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(4096),
        };
        let mut connect = Connect::new(device.as_str());
        connect.keep_alive = keep_alive.as_secs().clamp(1, u64::from(u16::MAX)) as u16;
        connect.clean_session = true;
        connect.login = Some(Login::new(device.as_str(), key.expose()));
        c.send(Packet::Connect(connect));
        c.flush().await?;
        match c.next_packet().await? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(c),
            Packet::ConnAck(a) => Err(ConnectError::Refused(a.code)),
            other => Err(ConnectError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

impl Connection {
    /// Queues a packet (sent by [`Connection::flush`]).
    pub fn send(&mut self, packet: Packet) {
        let _ = packet.write(&mut self.out, usize::MAX);
    }

    pub fn publish(&mut self, topic: String, pkid: u16, payload: bytes::Bytes) {
        let mut p = Publish::from_bytes(topic, QoS::AtLeastOnce, payload);
        p.pkid = pkid;
        self.send(Packet::Publish(p));
    }

    pub fn subscribe(&mut self, pkid: u16, filter: &str) {
        let mut s = Subscribe::new(filter, QoS::AtMostOnce);
        s.pkid = pkid;
        self.send(Packet::Subscribe(s));
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn flush(&mut self) -> Result<(), ConnectError> {
        if !self.out.is_empty() {
            self.stream
                .write_all(&self.out)
                .await
                .map_err(|e| ConnectError::Io(e.to_string()))?;
            self.out.clear();
        }
        Ok(())
    }

    /// A packet already buffered, if a whole one is.
    ///
    /// # Errors
    /// When the bytes are not MQTT.
    pub fn buffered_packet(&mut self) -> Result<Option<Packet>, ConnectError> {
        match Packet::read(&mut self.buf, 1 << 20) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(ConnectError::Protocol(e.to_string())),
        }
    }

    /// Reads more bytes (cancel-safe); `Ok(false)` when the peer closed.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn fill(&mut self) -> Result<bool, ConnectError> {
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(ConnectError::Io(e.to_string())),
        }
    }

    async fn next_packet(&mut self) -> Result<Packet, ConnectError> {
        loop {
            if let Some(p) = self.buffered_packet()? {
                return Ok(p);
            }
            if !self.fill().await? {
                return Err(ConnectError::Io("closed by the hub".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_url("mqtts://eu.example:8883/").unwrap(),
            (true, "eu.example".into(), 8883)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:9").unwrap(),
            (false, "::1".into(), 9)
        );
        for bad in ["http://x:1", "mqtt://x", "mqtt://:1", "mqtt://x:port"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
