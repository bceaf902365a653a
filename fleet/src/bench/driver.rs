//! The MQTT load generator: many connections, each keeping a window of QoS 1
//! publishes in flight, measuring throughput (PUBACKs per second) and the
//! latency of every PUBACK. The same driver measures every target.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

/// One client identity.
#[derive(Clone, Debug)]
pub struct Client {
    pub id: String,
    pub password: Option<String>,
    /// The next mid; shared across phases so that the hub never sees a
    /// repeated mid (it would acknowledge without storing: a fake speedup).
    pub next_mid: Arc<AtomicU64>,
}

/// What a phase does.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub window: usize,
    pub payload: usize,
    pub duration: Duration,
    /// Messages per second over all connections; `None`: as fast as possible.
    pub rate: Option<f64>,
}

/// What a phase measured.
#[derive(Debug, Default)]
pub struct Measured {
    pub acked: u64,
    pub elapsed: Duration,
    pub latencies_us: Vec<u32>,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of PUBACK latency, in milliseconds.
    pub fn latency_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

/// Runs one phase against `addr` with one connection per client.
///
/// # Errors
/// When a connection is refused or breaks.
pub async fn run(addr: SocketAddr, clients: &[Client], load: Load) -> anyhow::Result<Measured> {
    let start = Instant::now() + Duration::from_millis(200);
    let deadline = start + load.duration;
    let per_conn_rate = load.rate.map(|r| r / clients.len() as f64);
    let mut tasks = Vec::new();
    for c in clients {
        let stream = connect(addr, c).await?;
        tasks.push(tokio::spawn(connection(
            stream,
            c.clone(),
            load,
            per_conn_rate,
            start,
            deadline,
        )));
    }
    let mut total = Measured {
        elapsed: load.duration,
        ..Measured::default()
    };
    for t in tasks {
        let (acked, lat) = t.await.context("driver task")??;
        total.acked += acked;
        total.latencies_us.extend(lat);
    }
    Ok(total)
}

/// Connects as `c`, publishes one QoS 1 message and waits for its PUBACK.
///
/// # Errors
/// When the connection is refused or closes before the PUBACK.
pub async fn publish_once(addr: SocketAddr, c: &Client, payload: usize) -> anyhow::Result<()> {
    let mut stream = connect(addr, c).await?;
    let mid = c.next_mid.fetch_add(1, Ordering::Relaxed);
    let topic = format!("devices/{}/messages/events/{mid}", c.id);
    let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![b'x'; payload]);
    p.pkid = 1;
    let mut out = BytesMut::new();
    p.write(&mut out)?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::PubAck(a)) if a.pkid == 1 => return Ok(()),
            Ok(_) | Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("{}: {e}", c.id),
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{}: closed before PUBACK", c.id);
        }
    }
}

async fn connect(addr: SocketAddr, c: &Client) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut connect = Connect::new(c.id.as_str());
    connect.keep_alive = 60;
    connect.login = c
        .password
        .as_ref()
        .map(|p| Login::new(c.id.as_str(), p.as_str()));
    let mut out = BytesMut::new();
    Packet::Connect(connect).write(&mut out, usize::MAX)?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => return Ok(stream),
            Ok(other) => bail!("{} refused: {other:?}", c.id),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("{}: {e}", c.id),
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{}: closed before CONNACK", c.id);
        }
    }
}

async fn connection(
    stream: TcpStream,
    c: Client,
    load: Load,
    rate: Option<f64>,
    start: Instant,
    deadline: Instant,
) -> anyhow::Result<(u64, Vec<u32>)> {
    let (mut rd, mut wr) = stream.into_split();
    let window = Arc::new(Semaphore::new(load.window));
    let sent: Arc<Mutex<VecDeque<(u16, Instant)>>> = Arc::default();
    let payload = vec![b'x'; load.payload];
    let writer = {
        let (window, sent, c) = (window.clone(), sent.clone(), c.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            let mut pkid: u16 = 0;
            let mut out = BytesMut::new();
            let mut interval = rate.map(|r| {
                let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(0.001)));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            while Instant::now() < deadline {
                if let Some(i) = interval.as_mut() {
                    tokio::select! {
                        _ = i.tick() => {}
                        () = tokio::time::sleep_until(deadline) => break,
                    }
                }
                let permit = tokio::select! {
                    p = window.acquire() => p?,
                    () = tokio::time::sleep_until(deadline) => break,
                };
                permit.forget();
                // Paced: one at a time; flat out: fill the free window in one write.
                let mut n = 1;
                if rate.is_none() {
                    while let Ok(p) = window.try_acquire() {
                        p.forget();
                        n += 1;
                    }
                }
                out.clear();
                let now = Instant::now();
                let mut q = sent.lock().await;
                for _ in 0..n {
                    pkid = pkid % 65_000 + 1;
                    let mid = c.next_mid.fetch_add(1, Ordering::Relaxed);
                    let topic = format!("devices/{}/messages/events/{mid}", c.id);
                    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.clone());
                    p.pkid = pkid;
                    p.write(&mut out)?;
                    q.push_back((pkid, now));
                }
                drop(q);
                wr.write_all(&out).await?;
            }
            anyhow::Ok(wr)
        })
    };
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut acked = 0u64;
    let mut lat = Vec::new();
    let grace = deadline + Duration::from_secs(10);
    loop {
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::PubAck(a)) => {
                    let (pkid, at) = sent
                        .lock()
                        .await
                        .pop_front()
                        .context("PUBACK for nothing sent")?;
                    if pkid != a.pkid {
                        bail!("{}: PUBACK {} out of order (expected {pkid})", c.id, a.pkid);
                    }
                    let now = Instant::now();
                    if now <= deadline {
                        acked += 1;
                    }
                    lat.push(now.duration_since(at).as_micros().min(u128::from(u32::MAX)) as u32);
                    window.add_permits(1);
                }
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => bail!("{}: {e}", c.id),
            }
        }
        let done = Instant::now() > deadline && sent.lock().await.is_empty();
        if done || Instant::now() > grace {
            break;
        }
        // Wake at the deadline too: with nothing in flight no data comes.
        let wake = if Instant::now() < deadline {
            deadline
        } else {
            grace
        };
        match tokio::time::timeout_at(wake, rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) => bail!("{}: the server closed the connection", c.id),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
    }
    let mut wr = writer.await??;
    let mut out = BytesMut::new();
    Packet::Disconnect.write(&mut out, usize::MAX)?;
    let _ = wr.write_all(&out).await;
    Ok((acked, lat))
}

/// A subscriber that receives everything under `filter` (QoS 0) and counts
/// it: what makes a broker baseline deliver messages instead of acknowledging
/// and discarding them.
pub struct Drain {
    pub received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("received", &self.received)
            .finish()
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drain {
    /// Connects, subscribes and starts counting.
    ///
    /// # Errors
    /// When the subscription is not granted.
    pub async fn start(addr: SocketAddr, filter: &str) -> anyhow::Result<Drain> {
        let client = Client {
            id: "bench-drain".into(),
            password: None,
            next_mid: Arc::default(),
        };
        let mut stream = connect(addr, &client).await?;
        let mut out = BytesMut::new();
        let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(filter, QoS::AtMostOnce);
        sub.pkid = 1;
        Packet::Subscribe(sub).write(&mut out, usize::MAX)?;
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(1 << 20);
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::SubAck(_)) => break,
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        bail!("subscriber closed before SUBACK");
                    }
                }
                Err(e) => bail!("subscriber: {e}"),
            }
        }
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        let task = tokio::spawn(async move {
            loop {
                loop {
                    match Packet::read(&mut buf, 1 << 20) {
                        Ok(Packet::Publish(_)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        Ok(Drain { received, task })
    }
}
