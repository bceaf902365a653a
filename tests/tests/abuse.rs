//! Floods and abuse from one address (127.0.0.2, a second "machine" on
//! loopback) while a real device on 127.0.0.1 connects, looks up its
//! endpoint and publishes; and the live stream's read-only gate.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::mqtt::{RawClient, RecvError};
use tests::{HubNode, Registry, harness, wait_for};

const SECS: Duration = Duration::from_secs(10);
const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const DEVICE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

async fn hub_with(h: &tests::Harness, devices: &[&str], extra: &[&str]) -> (Registry, HubNode) {
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(devices).await;
    let hub = h.hub("hub-eu", "eu", &reg.url, extra);
    (reg, hub)
}

/// What a real device does, from 127.0.0.1: looks up its endpoint at the
/// concierge on `port`, connects there and publishes `mid`, acknowledged.
/// `Err` says which step failed.
async fn device_round(port: u16, key: &str, mid: u64) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .local_address(DEVICE)
        .build()
        .unwrap();
    let resp = http
        .get(format!("http://127.0.0.1:{port}/v1/devices/d/endpoint"))
        .send()
        .await
        .map_err(|e| format!("lookup: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("lookup: {}", resp.status()));
    }
    let endpoint: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    // Scheduled far out is turned away too.
    let start_in = endpoint["start_in_ms"].as_u64().unwrap_or(0);
    if start_in > 1_000 {
        return Err(format!("lookup: told to wait {start_in} ms"));
    }
    let url = endpoint["mqtt_url"].as_str().unwrap_or_default();
    let addr: std::net::SocketAddr = url
        .trim_start_matches("mqtt://")
        .parse()
        .map_err(|_| format!("endpoint {url}"))?;
    let (mut c, code) = RawClient::connect_from(addr, DEVICE, "d", Some(("d", key))).await;
    if code != Some(ConnectReturnCode::Success) {
        return Err(format!("connect: {code:?}"));
    }
    c.publish(
        &format!("devices/d/messages/events/{mid}"),
        QoS::AtLeastOnce,
        1,
        b"x",
    )
    .await;
    match c.recv(SECS).await {
        Ok(Packet::PubAck(_)) => Ok(()),
        other => Err(format!("publish: {other:?}")),
    }
}

/// Six clients on 127.0.0.2 looping on a wrong password until `stop`.
fn wrong_password_flood(hub: &HubNode, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..6)
        .map(|_| {
            let (addr, stop) = (hub.mqtt, stop.clone());
            tokio::spawn(async move {
                let mut tries = 0;
                while !stop.load(Ordering::Relaxed) {
                    let _ = RawClient::connect_from(
                        addr,
                        ATTACKER,
                        "d",
                        Some(("d", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
                    )
                    .await;
                    tries += 1;
                }
                tries
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_from_one_address_cost_only_that_address() {
    let h = harness!("wrong_passwords_from_one_address_cost_only_that_address");
    // A small fleet-wide rate, so that spending it on failed logins (as it
    // once was) would lock the real device out.
    let (reg, hub) = hub_with(&h, &["d"], &["--connect-rate", "20"]).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let key = reg.key("d");
    let stop = Arc::new(AtomicBool::new(false));
    let flood = wrong_password_flood(&hub, stop.clone());
    wait_for(10, "the flood to be refused", || async {
        hub.metric("fleet_hub_connects_total{result=\"bad_credentials\"}")
            .await
            >= 20.0
    })
    .await;
    let mut refused = Vec::new();
    for i in 0..30 {
        if let Err(why) = device_round(c.http.port(), &key, i + 1).await {
            refused.push((i, why));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut tries = 0;
    for f in flood {
        tries += f.await.unwrap();
    }
    assert!(
        refused.is_empty(),
        "the real device was refused: {refused:?}"
    );
    // The offender paid: most of its attempts never reached a password check.
    let source = hub
        .metric("fleet_hub_connects_total{result=\"source_rate\"}")
        .await;
    assert!(
        source > 0.0,
        "no attempt was refused by the per-source rate ({tries} tries)"
    );
    assert_eq!(
        hub.metric("fleet_hub_connects_total{result=\"rate_limited\"}")
            .await,
        0.0,
        "failed logins spent the fleet-wide rate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_capped_per_address_and_in_all() {
    let h = harness!("silent_connections_are_capped_per_address_and_in_all");
    let (reg, hub) = hub_with(
        &h,
        &["d"],
        &[
            "--max-pending-per-source",
            "8",
            "--max-pending-connects",
            "20",
            "--connect-timeout-ms",
            "60000",
        ],
    )
    .await;
    let key = reg.key("d");
    // 40 connections from one address that never send CONNECT.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(RawClient::tcp_from(hub.mqtt, ATTACKER).await);
    }
    wait_for(10, "32 refusals for the one address", || async {
        hub.metric("fleet_hub_connects_total{result=\"pending_per_source\"}")
            .await
            == 32.0
    })
    .await;
    // The real device is not affected: it looks up, connects and publishes.
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    device_round(c.http.port(), &key, 1).await.unwrap();
    // Twelve more addresses, two silent connections each: 8 + 12 fill the 20
    // places in all; the rest are refused.
    for i in 3..15u8 {
        for _ in 0..2 {
            silent.push(RawClient::tcp_from(hub.mqtt, IpAddr::from([127, 0, 0, i])).await);
        }
    }
    wait_for(10, "refusals once all places are taken", || async {
        hub.metric("fleet_hub_connects_total{result=\"pending_total\"}")
            .await
            == 12.0
    })
    .await;
    // Closing them frees the places.
    drop(silent);
    wait_for(10, "the device to get in again", || async {
        RawClient::connect_from(hub.mqtt, DEVICE, "d", Some(("d", &key)))
            .await
            .1
            == Some(ConnectReturnCode::Success)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_connection_cap_refuses_before_reading() {
    let h = harness!("the_total_connection_cap_refuses_before_reading");
    let (reg, hub) = hub_with(&h, &["d"], &["--max-connections", "5"]).await;
    let key = reg.key("d");
    // Five silent connections from five addresses take every place.
    let mut silent = Vec::new();
    for i in 3..8u8 {
        silent.push(RawClient::tcp_from(hub.mqtt, IpAddr::from([127, 0, 0, i])).await);
    }
    let mut sixth = RawClient::tcp_from(hub.mqtt, IpAddr::from([127, 0, 0, 9])).await;
    assert!(
        sixth.closed_within(SECS).await,
        "a connection beyond the cap stayed open"
    );
    assert_eq!(
        hub.metric("fleet_hub_connects_total{result=\"connections_total\"}")
            .await,
        1.0
    );
    drop(silent);
    wait_for(10, "the device to get in once places are free", || async {
        RawClient::connect(hub.mqtt, "d", Some(("d", &key))).await.1
            == Some(ConnectReturnCode::Success)
    })
    .await;
}

/// A stream client with a client id of its own (rumqttd takes a session
/// over when an id comes back).
async fn stream_client(hub: &HubNode, password: &str) -> (RawClient, Option<ConnectReturnCode>) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = format!("watcher-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    RawClient::connect(
        hub.stream.expect("stream address"),
        &id,
        Some(("stream", password)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_is_read_only_and_its_filters_are_bounded() {
    let h = harness!("the_live_stream_is_read_only_and_its_filters_are_bounded");
    let (reg, hub) = hub_with(
        &h,
        &["d"],
        &[
            "--stream-password",
            "watch-me-please",
            "--stream-max-filters",
            "4",
        ],
    )
    .await;
    let key = reg.key("d");
    let (_, code) = stream_client(&hub, "not-the-password").await;
    assert_eq!(code, Some(ConnectReturnCode::BadUserNamePassword));

    // A watcher of everything.
    let (mut watcher, code) = stream_client(&hub, "watch-me-please").await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    watcher.subscribe(1, "fleet/#").await;
    assert!(matches!(watcher.recv(SECS).await, Ok(Packet::SubAck(_))));

    // A stream client that publishes forged telemetry is cut off.
    let (mut forger, code) = RawClient::connect(
        hub.stream.unwrap(),
        "forger",
        Some(("stream", "watch-me-please")),
    )
    .await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    forger
        .publish("fleet/eu/devices/d/events", QoS::AtLeastOnce, 1, b"forged")
        .await;
    assert!(forger.closed_within(SECS).await, "a publish was accepted");
    assert_eq!(
        hub.metric("fleet_hub_stream_refused_total{reason=\"publish\"}")
            .await,
        1.0
    );

    // A will is a publish made on the watcher's behalf: refused too.
    let mut will = rumqttc::mqttbytes::v4::Connect::new("willing");
    will.login = Some(rumqttc::mqttbytes::v4::Login::new(
        "stream",
        "watch-me-please",
    ));
    will.last_will = Some(rumqttc::mqttbytes::v4::LastWill::new(
        "fleet/eu/devices/d/events",
        "forged by a will",
        QoS::AtLeastOnce,
        true,
    ));
    let mut willing = RawClient::tcp(hub.stream.unwrap()).await;
    willing.send(Packet::Connect(will)).await;
    match willing.recv(SECS).await {
        Ok(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
        other => panic!("a CONNECT with a will got {other:?}"),
    }
    assert!(willing.closed_within(SECS).await);

    // What the watcher sees is the device's real record, not the forgery.
    let (mut device, code) = RawClient::connect(hub.mqtt, "d", Some(("d", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    device
        .publish("devices/d/messages/events/1", QoS::AtLeastOnce, 1, b"real")
        .await;
    let first = loop {
        match watcher.recv(SECS).await {
            Ok(Packet::Publish(p)) => break p,
            Ok(_) => {}
            Err(e) => panic!("the watcher saw nothing: {e:?}"),
        }
    };
    assert_eq!(&first.payload[..], b"real");

    // Filters: "fleet/#" is one of 4; three more distinct ones fit, the
    // fifth is refused (and closes that client), already-known ones are fine.
    for (i, filter) in [
        "fleet/eu/devices/a/events",
        "fleet/eu/devices/b/events",
        "fleet/eu/devices/c/events",
    ]
    .iter()
    .enumerate()
    {
        let (mut c, _) = stream_client(&hub, "watch-me-please").await;
        c.subscribe(u16::try_from(i + 1).unwrap(), filter).await;
        assert!(
            matches!(c.recv(SECS).await, Ok(Packet::SubAck(_))),
            "{filter}"
        );
    }
    let (mut c, _) = stream_client(&hub, "watch-me-please").await;
    c.subscribe(1, "fleet/eu/devices/e/events").await;
    assert_eq!(c.recv(SECS).await.unwrap_err(), RecvError::Closed);
    let (mut c, _) = stream_client(&hub, "watch-me-please").await;
    c.subscribe(1, "fleet/#").await;
    assert!(matches!(c.recv(SECS).await, Ok(Packet::SubAck(_))));
    assert_eq!(
        hub.metric("fleet_hub_stream_refused_total{reason=\"filters_total\"}")
            .await,
        1.0
    );
    // A topic outside the stream's namespace is refused too.
    let (mut c, _) = stream_client(&hub, "watch-me-please").await;
    c.subscribe(1, "$SYS/#").await;
    assert_eq!(c.recv(SECS).await.unwrap_err(), RecvError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_looping_on_lookups_cannot_starve_a_device() {
    let h = harness!("one_address_looping_on_lookups_cannot_starve_a_device");
    let (reg, hub) = hub_with(&h, &["d"], &[]).await;
    let c = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("eu", &hub)],
        &["--connect-rate", "10", "--lookups-per-source", "4"],
    );
    let port = c.http.port();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..4)
        .map(|t| {
            let (stop, sent) = (stop.clone(), sent.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .local_address(ATTACKER)
                    .build()
                    .unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let _ = http
                        .get(format!(
                            "http://127.0.0.1:{port}/v1/devices/x{t}-{i}/endpoint"
                        ))
                        .send()
                        .await;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    wait_for(10, "the flood to be under way", || async {
        sent.load(Ordering::Relaxed) > 200
    })
    .await;
    let key = reg.key("d");
    let mut refused = Vec::new();
    for i in 0..12 {
        if let Err(why) = device_round(port, &key, i + 1).await {
            refused.push((i, why));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    assert!(
        refused.is_empty(),
        "the device was turned away: {refused:?}"
    );
    let metrics = tests::http_get(&format!("http://127.0.0.1:{port}/metrics"));
    let paced = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("fleet_concierge_endpoint_requests_total{result=\"source_paced\"}")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    assert!(paced > 100.0, "the flood was not paced per source: {paced}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_junk_is_counted_not_logged() {
    let h = harness!("dns_junk_is_counted_not_logged").with_default_logs();
    let (reg, hub) = hub_with(&h, &["d"], &[]).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let socket = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    // Valid queries in and out of the zone, and garbage.
    let query = |name: &str, id: u16| tests::dns::query(name, id, 1);
    let dns = c.dns;
    let flood = tokio::spawn(async move {
        for i in 0..3000u16 {
            let packet = match i % 3 {
                0 => query("concierge.fleet.test", i),
                1 => query("example.com", i),
                _ => vec![
                    0xde,
                    0xad,
                    0xbe,
                    0xef,
                    u8::try_from(i % 251).unwrap(),
                    0,
                    0,
                    1,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0xff,
                ],
            };
            socket.send_to(&packet, dns).await.unwrap();
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    // A real device looks up, connects and publishes meanwhile.
    device_round(c.http.port(), &reg.key("d"), 1).await.unwrap();
    flood.await.unwrap();
    let url = format!("http://{}/metrics", c.http);
    wait_for(10, "the queries to be counted", || {
        let url = url.clone();
        async move {
            let m = tokio::task::spawn_blocking(move || tests::http_get(&url))
                .await
                .unwrap();
            let answered: f64 = m
                .lines()
                .filter(|l| l.starts_with("fleet_concierge_dns_queries_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            answered >= 1000.0
        }
    })
    .await;
    let log = std::fs::read_to_string(h.logs().join("concierge.log")).unwrap();
    assert!(
        log.len() < 16 * 1024,
        "3000 DNS packets wrote {} bytes of log:\n{}",
        log.len(),
        &log[..log.len().min(2000)]
    );
}

/// Whether the concierge at `port` calls region `eu` healthy.
async fn eu_healthy(port: u16) -> bool {
    let regions: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/v1/regions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["region"] == "eu" && r["healthy"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_cannot_accept_is_reported_unhealthy() {
    // 128 file descriptors: a few hundred silent connections use them up,
    // when the connection cap is set above the limit (by default the caps
    // are sized under it; see below).
    let h = harness!("a_hub_that_cannot_accept_is_reported_unhealthy").with_open_files(128);
    let (reg, hub) = hub_with(
        &h,
        &["d"],
        &[
            "--max-connections",
            "1000",
            "--max-pending-connects",
            "1000",
        ],
    )
    .await;
    let key = reg.key("d");
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let port = c.http.port();
    wait_for(10, "eu to be healthy", || eu_healthy(port)).await;
    // A health checker whose connection to the hub is already open (as the
    // concierge's pooled one is): it still gets answers once the hub is out
    // of file descriptors.
    let pooled = reqwest::Client::new();
    let healthz = format!("{}/healthz", hub.url());
    assert_eq!(pooled.get(&healthz).send().await.unwrap().status(), 200);
    let mut silent = Vec::new();
    for i in 3..40u8 {
        for _ in 0..8 {
            silent.push(RawClient::tcp_from(hub.mqtt, IpAddr::from([127, 0, 0, i])).await);
        }
    }
    wait_for(20, "the hub to say it cannot accept", || async {
        let Ok(resp) = pooled.get(&healthz).send().await else {
            return false;
        };
        resp.status() == 503
            && resp
                .text()
                .await
                .unwrap_or_default()
                .contains("cannot accept")
    })
    .await;
    wait_for(20, "the concierge to take eu for down", || async {
        !eu_healthy(port).await
    })
    .await;
    // Freed descriptors: healthy again, and the device gets in.
    drop(silent);
    wait_for(30, "eu to be healthy again", || eu_healthy(port)).await;
    let (_c, code) = RawClient::connect(hub.mqtt, "d", Some(("d", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_sized_under_the_descriptor_limit_keep_a_flooded_hub_healthy() {
    let h = harness!("caps_sized_under_the_descriptor_limit_keep_a_flooded_hub_healthy")
        .with_open_files(128);
    let (reg, hub) = hub_with(&h, &["d"], &[]).await;
    let key = reg.key("d");
    let mut silent = Vec::new();
    for i in 3..40u8 {
        for _ in 0..8 {
            silent.push(RawClient::tcp_from(hub.mqtt, IpAddr::from([127, 0, 0, i])).await);
        }
    }
    wait_for(10, "connections beyond the cap to be refused", || async {
        hub.metric("fleet_hub_connects_total{result=\"connections_total\"}")
            .await
            + hub
                .metric("fleet_hub_connects_total{result=\"pending_total\"}")
                .await
            > 100.0
    })
    .await;
    // The hub never ran out of descriptors: healthy, and it can open new
    // connections (an HTTP one here).
    let resp = reqwest::get(format!("{}/healthz", hub.url()))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(hub.metric("fleet_hub_accept_errors_total").await, 0.0);
    drop(silent);
    wait_for(20, "the device to get in", || async {
        RawClient::connect(hub.mqtt, "d", Some(("d", &key))).await.1
            == Some(ConnectReturnCode::Success)
    })
    .await;
}

/// Connections from `from` to `to` that send nothing; how many of them the
/// server closed within a second of the last one opening.
async fn silent_from(
    from: IpAddr,
    to: std::net::SocketAddr,
    n: usize,
) -> (Vec<tokio::net::TcpStream>, usize) {
    use tokio::io::AsyncReadExt;
    let mut held = Vec::new();
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(std::net::SocketAddr::new(from, 0)).unwrap();
        held.push(s.connect(to).await.unwrap());
    }
    let mut closed = 0;
    for s in &mut held {
        let mut b = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(
            Duration::from_millis(1000 / n.max(1) as u64 + 5),
            s.read(&mut b),
        )
        .await
        {
            closed += 1;
        }
    }
    (held, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_http_and_tls_handshakes() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h = harness!("one_address_holds_at_most_its_share_of_http_and_tls_handshakes");
    let cert = h.self_signed();
    let (_reg, hub) = hub_with(
        &h,
        &["d"],
        &[
            "--http-max-connections",
            "400",
            "--http-tls-cert",
            &cert.cert,
            "--http-tls-key",
            &cert.key,
        ],
    )
    .await;
    // 64 silent sockets from one address: its 32 handshakes run (until
    // their timeout), the rest are closed at once.
    let (silent, closed) = silent_from(ATTACKER, hub.http, 64).await;
    assert!(
        (30..=34).contains(&closed),
        "{closed} of 64 silent handshakes were closed at once (32 allowed)"
    );
    // Meanwhile a client from another address is served over HTTPS.
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap())
        .local_address(DEVICE)
        .build()
        .unwrap();
    let ok = http
        .get(format!("https://localhost:{}/healthz", hub.http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    drop(silent);
    // Plain HTTP (the concierge): an address holds at most 256 connections
    // (here half-sent requests, cut only by the header timeout); the rest
    // it opens are closed at once, and another address is still served.
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let mut lorises = Vec::new();
    for _ in 0..300 {
        use tokio::io::AsyncWriteExt;
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(std::net::SocketAddr::new(ATTACKER, 0)).unwrap();
        let mut s = s.connect(c.http).await.unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: c\r\n").await;
        lorises.push(s);
    }
    let mut closed = 0;
    for s in &mut lorises {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert!(
        (40..=48).contains(&closed),
        "{closed} of 300 connections from one address were closed at once (256 allowed)"
    );
    let ok = reqwest::Client::builder()
        .local_address(DEVICE)
        .build()
        .unwrap()
        .get(format!("{}/healthz", c.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "another address was not served");
    drop(lorises);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_watchers_from_one_address_cannot_keep_others_off_the_stream() {
    let h = harness!("silent_watchers_from_one_address_cannot_keep_others_off_the_stream");
    let (_reg, hub) = hub_with(&h, &["d"], &["--stream-password", "watch-me-please"]).await;
    // 40 silent sockets at once from one address: 16 may wait to log in,
    // then its rate (20 a second) turns the rest away before reading.
    let (silent, closed) = silent_from(ATTACKER, hub.stream.unwrap(), 40).await;
    assert!(
        (20..=24).contains(&closed),
        "{closed} of 40 silent watchers were closed at once (16 may wait)"
    );
    assert!(
        hub.metric("fleet_hub_stream_refused_total{reason=\"pending_per_source\"}")
            .await
            >= 1.0
    );
    assert!(
        hub.metric("fleet_hub_stream_refused_total{reason=\"source_rate\"}")
            .await
            >= 1.0
    );
    // A watcher from another address logs in and subscribes meanwhile.
    let (mut watcher, code) = RawClient::connect_from(
        hub.stream.unwrap(),
        DEVICE,
        "watcher",
        Some(("stream", "watch-me-please")),
    )
    .await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    watcher.subscribe(1, "fleet/#").await;
    assert!(matches!(watcher.recv(SECS).await, Ok(Packet::SubAck(_))));
    drop(silent);
}
