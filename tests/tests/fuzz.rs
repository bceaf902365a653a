//! Parsers of outside input, fuzzed against live processes: random and
//! mutated MQTT packet streams into a hub, DNS queries into a concierge,
//! JSON bodies into the hub's and the concierge's APIs, and mutated TOML
//! configs. Each must refuse garbage without a panic, acknowledge nothing
//! it should not, count what it refused, and keep serving a real device.
//!
//! `FLEET_FUZZ_CASES` sets the number of inputs per target (default 300),
//! `FLEET_FUZZ_SEED` the seed (default fixed; printed, so a failure can be
//! replayed). Crashing inputs found become regression tests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Disconnect, Login, Packet, PingReq, Publish, Subscribe,
};
use tests::mqtt::RawClient;
use tests::{ADMIN_TOKEN, HubNode, Registry, harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cases() -> usize {
    std::env::var("FLEET_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(300)
}

fn rng(target: &str) -> StdRng {
    let seed = std::env::var("FLEET_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f1ee7);
    eprintln!(
        "fuzz {target}: FLEET_FUZZ_SEED={seed} FLEET_FUZZ_CASES={}",
        cases()
    );
    StdRng::seed_from_u64(seed)
}

/// One to four random edits of `input`.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = b.len().max(1);
        match rng.random_range(0..7) {
            0 if !b.is_empty() => {
                let i = rng.random_range(0..len);
                b[i] ^= rng.random_range(1..=255u8);
            }
            1 => {
                let i = rng.random_range(0..=b.len());
                b.insert(i, rng.random());
            }
            2 if !b.is_empty() => {
                b.remove(rng.random_range(0..len));
            }
            3 => b.truncate(rng.random_range(0..len)),
            4 if !b.is_empty() => {
                // Repeat a chunk.
                let s = rng.random_range(0..len);
                let e = (s + rng.random_range(1..32)).min(b.len());
                let chunk = b[s..e].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
            5 if !b.is_empty() => {
                // An extreme byte where lengths and flags live.
                let i = rng.random_range(0..len.min(8));
                b[i] = [0x00, 0x7f, 0x80, 0xff][rng.random_range(0..4)];
            }
            _ => {
                let n = rng.random_range(1..16);
                b.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    b
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..max);
    (0..n).map(|_| rng.random()).collect()
}

fn log_has_no_panic(h: &tests::Harness, label: &str) {
    let log = std::fs::read_to_string(h.logs().join(format!("{label}.log"))).unwrap_or_default();
    assert!(!log.contains("panicked"), "{label} panicked:\n{log}");
}

// ---------------------------------------------------------------- MQTT

fn packet(p: Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    match p {
        Packet::Connect(c) => c.write(&mut b),
        Packet::Publish(x) => x.write(&mut b),
        Packet::Subscribe(x) => x.write(&mut b),
        Packet::PingReq => PingReq.write(&mut b),
        Packet::Disconnect => Disconnect.write(&mut b),
        other => panic!("{other:?}"),
    }
    .unwrap();
    b.to_vec()
}

/// Valid streams a device might send, to mutate.
fn mqtt_corpus(key: &str) -> Vec<Vec<u8>> {
    let mut connect = Connect::new("d");
    connect.login = Some(Login::new("d", key));
    let connect = packet(Packet::Connect(connect));
    let publish = |topic: &str, pkid: u16| {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, b"fuzz".to_vec());
        p.pkid = pkid;
        packet(Packet::Publish(p))
    };
    let subscribe = packet(Packet::Subscribe(Subscribe::new(
        "devices/d/acks",
        QoS::AtLeastOnce,
    )));
    vec![
        connect.clone(),
        [connect.clone(), publish("devices/d/messages/events/1", 1)].concat(),
        [
            connect.clone(),
            subscribe,
            publish("devices/d/messages/events/2", 2),
            packet(Packet::PingReq),
            packet(Packet::Disconnect),
        ]
        .concat(),
        [
            connect.clone(),
            publish("devices/other/messages/events/3", 3),
        ]
        .concat(),
        [connect, publish("devices/d/messages/events", 4)].concat(),
    ]
}

/// Sends `input` on a fresh connection, closes the sending side, and reads
/// every packet the hub answers until it closes (at most 5 s).
async fn exchange(addr: SocketAddr, input: &[u8]) -> Vec<Packet> {
    exchange_from(addr, std::net::IpAddr::from([127, 0, 0, 1]), input).await
}

/// [`exchange`] from another loopback address.
async fn exchange_from(addr: SocketAddr, from: std::net::IpAddr, input: &[u8]) -> Vec<Packet> {
    let mut c = RawClient::tcp_from(addr, from).await;
    let _ = c.stream.write_all(input).await;
    let _ = c.stream.shutdown().await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.stream.read_to_end(&mut raw)).await;
    let mut buf = BytesMut::from(&raw[..]);
    let mut out = Vec::new();
    while !buf.is_empty() {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(p) => out.push(p),
            Err(e) => panic!("the hub wrote something that is not MQTT ({e:?}): {raw:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_front_survives_random_and_mutated_packet_streams() {
    let h = harness!("the_mqtt_front_survives_random_and_mutated_packet_streams");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d"]).await;
    // The per-source limits would turn most of this away unread; the
    // point here is the parser.
    let hub = h.hub(
        "hub-eu",
        "eu",
        &reg.url,
        &[
            "--connect-rate-per-source",
            "100000",
            "--connect-rate",
            "100000",
        ],
    );
    let key = reg.key("d");
    let corpus = mqtt_corpus(&key);
    let mut rng = rng("mqtt");
    let inputs: Vec<Vec<u8>> = (0..cases())
        .map(|i| {
            if i % 4 == 0 {
                random_bytes(&mut rng, 300)
            } else {
                let seed = &corpus[rng.random_range(0..corpus.len())];
                mutate(&mut rng, seed)
            }
        })
        .collect();
    for batch in inputs.chunks(8) {
        let answers = futures::future::join_all(batch.iter().map(|i| exchange(hub.mqtt, i))).await;
        for (input, answer) in batch.iter().zip(answers) {
            // Nothing is acknowledged before a successful CONNACK.
            let accepted = answer.iter().position(
                |p| matches!(p, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success),
            );
            for (i, p) in answer.iter().enumerate() {
                if matches!(p, Packet::PubAck(_) | Packet::SubAck(_)) {
                    assert!(
                        accepted.is_some_and(|a| a < i),
                        "acknowledged without a session: {input:?} -> {answer:?}"
                    );
                }
            }
        }
    }
    // Still serving a real device; nothing stored but its own records.
    let (mut c, code) = RawClient::connect(hub.mqtt, "d", Some(("d", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    c.publish("devices/d/messages/events", QoS::AtLeastOnce, 9, b"after")
        .await;
    assert!(matches!(
        c.recv(Duration::from_secs(10)).await,
        Ok(Packet::PubAck(_))
    ));
    let stored = hub.records_of("d", 8).await;
    assert!(stored.iter().any(|r| r.payload == b"after"));
    assert!(stored.iter().all(|r| r.device_id.as_str() == "d"));
    // The mutated streams got past CONNECT often enough to reach the session.
    assert!(
        hub.metric("fleet_hub_connects_total{result=\"accepted\"}")
            .await
            > (cases() / 10) as f64,
        "too few fuzzed streams reached a session"
    );
    let refused = hub.metrics().await;
    assert!(
        refused.contains("fleet_hub_disconnects_total{reason=\"malformed\"}")
            || refused.contains("fleet_hub_disconnects_total{reason=\"protocol\"}"),
        "no refusal was counted"
    );
    log_has_no_panic(&h, "hub-eu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_gate_survives_random_and_mutated_packet_streams() {
    let h = harness!("the_stream_gate_survives_random_and_mutated_packet_streams");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d"]).await;
    let hub = h.hub(
        "hub-eu",
        "eu",
        &reg.url,
        &["--stream-password", "watch-me-please"],
    );
    let stream = hub.stream.expect("stream");
    let mut connect = Connect::new("w");
    connect.login = Some(Login::new("stream", "watch-me-please"));
    let connect = packet(Packet::Connect(connect));
    let subscribe = packet(Packet::Subscribe(Subscribe::new(
        "fleet/#",
        QoS::AtLeastOnce,
    )));
    let mut forged = Publish::new(
        "fleet/eu/devices/d/events",
        QoS::AtLeastOnce,
        b"forged".to_vec(),
    );
    forged.pkid = 1;
    forged.retain = true;
    let corpus = [
        [
            connect.clone(),
            subscribe.clone(),
            packet(Packet::PingReq),
            packet(Packet::Disconnect),
        ]
        .concat(),
        [connect.clone(), packet(Packet::Publish(forged))].concat(),
        [connect, subscribe].concat(),
    ];
    let mut rng = rng("stream");
    let inputs: Vec<Vec<u8>> = (0..cases())
        .map(|i| {
            if i % 4 == 0 {
                random_bytes(&mut rng, 300)
            } else {
                let seed = rng.random_range(0..corpus.len());
                mutate(&mut rng, &corpus[seed])
            }
        })
        .collect();
    // Spread over many addresses: the gate's per-address rate is not the
    // subject here.
    for (b, batch) in inputs.chunks(8).enumerate() {
        let from = std::net::IpAddr::from([127, 0, 1, u8::try_from(b % 250).unwrap() + 1]);
        futures::future::join_all(batch.iter().map(|i| exchange_from(stream, from, i))).await;
    }
    // Still a working, read-only view: a watcher sees the device's record
    // and nothing forged.
    let (mut watcher, code) =
        RawClient::connect(stream, "w", Some(("stream", "watch-me-please"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    watcher.subscribe(1, "fleet/#").await;
    assert!(matches!(
        watcher.recv(Duration::from_secs(10)).await,
        Ok(Packet::SubAck(_))
    ));
    let key = reg.key("d");
    let (mut device, code) = RawClient::connect(hub.mqtt, "d", Some(("d", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    device
        .publish("devices/d/messages/events/1", QoS::AtLeastOnce, 1, b"real")
        .await;
    loop {
        match watcher.recv(Duration::from_secs(10)).await {
            Ok(Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], b"real", "the view carried something forged");
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("the watcher saw nothing: {e:?}"),
        }
    }
    log_has_no_panic(&h, "hub-eu");
}

// ---------------------------------------------------------------- DNS

/// Asks `name` A over UDP; the response code, if an answer came.
async fn ask(socket: &tokio::net::UdpSocket, dns: SocketAddr, name: &str, id: u16) -> Option<u8> {
    socket
        .send_to(&tests::dns::query(name, id, 1), dns)
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n >= 4 && buf[..2] == id.to_be_bytes() {
            return Some(buf[3] & 0x0f);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_front_survives_random_and_mutated_queries() {
    let h = harness!("the_dns_front_survives_random_and_mutated_queries");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d"]).await;
    let hub = h.hub("hub-eu", "eu", &reg.url, &[]);
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let corpus = [
        tests::dns::query("concierge.fleet.test", 1, 1),
        tests::dns::query("concierge.fleet.test", 2, 28),
        tests::dns::query("fleet.test", 3, 6),
        tests::dns::query("example.com", 4, 1),
        tests::dns::query("a.b.c.d.concierge.fleet.test", 5, 255),
    ];
    let mut rng = rng("dns");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..cases() * 4 {
        let input = if i % 4 == 0 {
            random_bytes(&mut rng, 600)
        } else {
            let seed = rng.random_range(0..corpus.len());
            mutate(&mut rng, &corpus[seed])
        };
        if i % 10 == 0 {
            // Over TCP: a length prefix, then the message (both mutated at times).
            if let Ok(mut tcp) = tokio::net::TcpStream::connect(c.dns).await {
                let mut framed = u16::try_from(input.len())
                    .unwrap_or(u16::MAX)
                    .to_be_bytes()
                    .to_vec();
                framed.extend_from_slice(&input);
                if rng.random_bool(0.3) {
                    framed = mutate(&mut rng, &framed);
                }
                let _ = tcp.write_all(&framed).await;
                let _ = tcp.shutdown().await;
                let mut sink = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
            }
        } else {
            let _ = udp.send_to(&input, c.dns).await;
        }
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Still answering, in its zone and (REFUSED) outside it.
    let fresh = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(
        ask(&fresh, c.dns, "concierge.fleet.test", 4242).await,
        Some(0)
    );
    assert_eq!(ask(&fresh, c.dns, "example.com", 4243).await, Some(5));
    log_has_no_panic(&h, "concierge");
}

// ---------------------------------------------------------------- HTTP

/// Sends `body` with the admin token; the status.
async fn send(http: &reqwest::Client, method: reqwest::Method, url: &str, body: Vec<u8>) -> u16 {
    http.request(method, url)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn fuzz_json(
    rng: &mut StdRng,
    http: &reqwest::Client,
    targets: &[(reqwest::Method, String, &str)],
) {
    for i in 0..cases() {
        let (method, url, valid) = &targets[i % targets.len()];
        let body = if i % 5 == 0 {
            random_bytes(rng, 200)
        } else {
            mutate(rng, valid.as_bytes())
        };
        let status = send(http, method.clone(), url, body.clone()).await;
        assert!(
            status != 0 && status != 500,
            "{method} {url} with {:?} answered {status}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_are_refused_with_a_client_error_never_a_crash() {
    let h = harness!("json_bodies_are_refused_with_a_client_error_never_a_crash");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d"]).await;
    let hub: HubNode = h.hub("hub-eu", "eu", &reg.url, &[]);
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let http = reqwest::Client::new();
    let mut rng = rng("http");
    use reqwest::Method;
    let hub_url = hub.url();
    fuzz_json(
        &mut rng,
        &http,
        &[
            (
                Method::POST,
                format!("{hub_url}/v1/promote"),
                r#"{"expected_epoch":1,"mode":"planned"}"#,
            ),
            (
                Method::PUT,
                format!("{hub_url}/v1/devices/fuzzed-1"),
                r#"{"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","status":"enabled","tags":{"a":"b"}}"#,
            ),
            (
                Method::POST,
                format!("{}/v1/failover", c.url()),
                r#"{"to":"eu","mode":"planned"}"#,
            ),
            (
                Method::POST,
                format!("{hub_url}/v1/demote"),
                r#"{"epoch":2}"#,
            ),
            (
                Method::POST,
                format!("{hub_url}/v1/fence"),
                r#"{"epoch":2}"#,
            ),
            (
                Method::POST,
                format!("{hub_url}/v1/unfence"),
                r#"{"epoch":2}"#,
            ),
            (Method::POST, format!("{hub_url}/v1/peer/detach"), r#"{}"#),
            (Method::POST, format!("{hub_url}/v1/peer/attach"), r#"{}"#),
        ],
    )
    .await;
    // Query strings of the read API.
    for i in 0..cases() {
        let q = String::from_utf8_lossy(&mutate(&mut rng, b"from=0&max=10&wait_ms=0")).into_owned();
        let url = format!(
            "{hub_url}/v1/partitions/{}/records?{}",
            i % 10,
            q.replace(['#', ' '], "")
        );
        let status = http
            .get(&url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        assert!(status != 0 && status != 500, "{url} answered {status}");
    }
    assert_eq!(
        reqwest::get(format!("{hub_url}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    log_has_no_panic(&h, "hub-eu");
    log_has_no_panic(&h, "concierge");
}

// ---------------------------------------------------------------- TOML

const HUB_TOML: &str = r#"region = "eu"
data = "/tmp/fleet-fuzz-hub"
registry = "sqlite:///tmp/fleet-fuzz-hub.db"
mqtt = "127.0.0.1:0"
http = "127.0.0.1:0"
admin_token = "0123456789abcdef0123"
replication = "async"
max_lag_ms = 5000
partitions = 8
payload_limit = 262144
"#;

const CONCIERGE_TOML: &str = r#"http = "127.0.0.1:0"
dns = "127.0.0.1:0"
zone = "fleet.test"
admin_token = "0123456789abcdef0123"
hubs = ["eu=http://127.0.0.1:1,mqtt://127.0.0.1:2"]
ttl_s = 5
poll_ms = 500
"#;

const AGENT_TOML: &str = r#"concierge = "https://concierge.fleet.test:7070"
dns = ["127.0.0.1:5353"]
outbox = "/tmp/fleet-fuzz-outbox"
max_outbox_bytes = 1048576
fsync = "always"
keep_alive_s = 30
ack_timeout_s = 30
"#;

const CONSUMER_TOML: &str = r#"group = "fuzz"
hub = ["http://127.0.0.1:1"]
token = "0123456789abcdef0123"
sink = "noop"
"#;

/// Every error names the file, whatever the mutation.
fn names_the_file(result: anyhow::Result<()>, path: &std::path::Path) {
    if let Err(e) = result {
        let text = format!("{e:#}");
        assert!(
            text.contains(&path.display().to_string()),
            "an error without the file's name: {text}"
        );
    }
}

#[test]
fn mutated_agent_and_consumer_configs_are_refused_with_their_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.toml");
    let mut rng = rng("toml-clients");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    for i in 0..cases() {
        let valid = if i % 2 == 0 {
            AGENT_TOML
        } else {
            CONSUMER_TOML
        };
        std::fs::write(&path, mutate(&mut rng, valid.as_bytes())).unwrap();
        let result = if i % 2 == 0 {
            device_agent::cli::check_config(&path)
        } else {
            let args = consumer::cli::ConsumeRunArgs {
                config: Some(path.clone()),
                ..Default::default()
            };
            args.with_file().and_then(|a| a.validate().map(|_| ()))
        };
        names_the_file(result, &path);
    }
}

#[test]
fn mutated_configs_are_refused_with_their_file_named_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.toml");
    let mut rng = rng("toml");
    for i in 0..cases() {
        let valid = if i % 2 == 0 { HUB_TOML } else { CONCIERGE_TOML };
        let text = mutate(&mut rng, valid.as_bytes());
        std::fs::write(&path, &text).unwrap();
        let shown = path.display().to_string();
        let result = if i % 2 == 0 {
            let args = hub::config::RunArgs {
                config: Some(path.clone()),
                ..Default::default()
            };
            args.with_file().map(|a| a.validate().map(|_| ()))
        } else {
            let args = concierge::config::RunArgs {
                config: Some(path.clone()),
                ..Default::default()
            };
            args.with_file().map(|a| a.validate().map(|_| ()))
        };
        if let Err(e) = result {
            let text = format!("{e:#}");
            assert!(
                text.contains(&shown),
                "an error without the file's name: {text}"
            );
        }
    }
}
