//! The hub's HTTP API (device administration, the log read API, status and
//! health) and MQTT over TLS.

use std::time::Duration;

use fleet_api::hub::{DeviceResponse, StatusResponse};
use fleet_api::{DeviceId, Offset, PartitionId, Role, partition_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::mqtt::RawClient;
use tests::{ADMIN_TOKEN, Registry, harness};

const SECS: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_creates_changes_and_removes_devices() {
    let h = harness!("the_admin_api_creates_changes_and_removes_devices");
    let reg = Registry::sqlite(h.dir(), "eu").await;
    let hub = h.hub("hub-eu", "eu", &reg.url, &[]);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/devices/pump-1", hub.url());

    let anon = http.put(&url).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(anon.headers()["www-authenticate"], "Bearer");
    let wrong = http
        .put(&url)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    let created = http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"tags": {"site": "north"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: DeviceResponse = created.json().await.unwrap();
    let key = created.key.expect("the key is returned once");
    assert_eq!(created.device.tags.to_map()["site"], "north");
    let (_, code) = RawClient::connect(hub.mqtt, "pump-1", Some(("pump-1", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));

    let got: DeviceResponse = http
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got.key, None, "the key is never shown again");
    assert_eq!(got.device, created.device);

    let rotated: DeviceResponse = http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"rotate_key": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_key = rotated.key.expect("a rotated key");
    assert_ne!(new_key, key);
    tests::wait_for(5, "the old key to stop working", || async {
        RawClient::connect(hub.mqtt, "pump-1", Some(("pump-1", &key)))
            .await
            .1
            == Some(ConnectReturnCode::BadUserNamePassword)
    })
    .await;
    let (mut c, code) = RawClient::connect(hub.mqtt, "pump-1", Some(("pump-1", &new_key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));

    let removed = http
        .delete(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    assert!(
        c.closed_within(SECS).await,
        "a removed device stays connected"
    );
    assert_eq!(
        http.get(&url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "tombstones are readable"
    );
    assert_eq!(
        http.delete(&url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // Path components are never device ids. Written on the socket: URL
    // libraries fold `%2E` segments away before a request is sent.
    for dots in ["%2E", "%2E%2E", ".%2E", "%2e%2e"] {
        for method in ["PUT", "GET", "DELETE"] {
            let status = tests::raw_status(
                hub.http,
                &format!(
                    "{method} /v1/devices/{dots} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                ),
            )
            .await;
            assert_eq!(status, 400, "{method} {dots}");
        }
    }
    let bad = http
        .put(format!("{}/v1/devices/no%20spaces", hub.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: serde_json::Value = bad.json().await.unwrap();
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("device_id contains ' '"),
        "{bad}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_api_long_polls_and_validates() {
    let h = harness!("the_read_api_long_polls_and_validates");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d"]).await;
    let hub = h.hub(
        "hub-eu",
        "eu",
        &reg.url,
        &["--read-token", "reader-token-123456"],
    );
    let p = partition_for(&DeviceId::new("d").unwrap(), 8);
    let reader = fleet_api::client::HubClient::new(
        hub.url(),
        Some(fleet_api::Secret::new("reader-token-123456")),
    );

    // A long poll waiting for the first record.
    let poll = {
        let reader = reader.clone();
        tokio::spawn(async move {
            reader
                .records(p, Offset(0), 100, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = reg.key("d");
    let (mut c, _) = RawClient::connect(hub.mqtt, "d", Some(("d", &key))).await;
    c.publish(
        "devices/d/messages/events/1",
        QoS::AtLeastOnce,
        1,
        b"{\"t\":21.5}",
    )
    .await;
    assert!(matches!(c.recv(SECS).await, Ok(Packet::PubAck(_))));
    let got = poll.await.unwrap().unwrap();
    assert_eq!(
        got.records.len(),
        1,
        "the long poll returned without the record"
    );
    assert_eq!(got.records[0].payload, b"{\"t\":21.5}");
    assert_eq!(got.high_watermark, Offset(1));

    // An empty poll returns after its wait, with nothing.
    let empty = reader
        .records(p, Offset(1), 100, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(empty.records.is_empty());

    let http = reqwest::Client::new();
    let base = format!("{}/v1/partitions", hub.url());
    assert_eq!(
        http.get(format!("{base}/0/records"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let nope = http
        .get(format!("{base}/99/records"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(nope.status(), 404);
    let bad = http
        .get(format!("{base}/0/records?from=-1"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let status: StatusResponse = hub.client().status().await.unwrap();
    assert_eq!(status.region.as_str(), "eu");
    assert_eq!(status.role, Role::Primary);
    assert_eq!(status.epoch.0, 1);
    assert_eq!(status.partitions.len(), 8);
    assert_eq!(status.partitions[p.0 as usize].high_watermark, Offset(1));
    assert_eq!(status.connected_devices, 1);
    assert_eq!(
        status.mqtt_url.as_deref(),
        Some(format!("mqtt://{}", hub.mqtt).as_str())
    );
    assert!(tests::http_get(&format!("{}/healthz", hub.url())).contains("\"ok\""));
    let metrics = hub.metrics().await;
    for name in [
        "fleet_hub_connections",
        "fleet_hub_publishes_total",
        "fleet_hub_publish_bytes_total",
        "fleet_hub_fsync_seconds_bucket",
        "fleet_hub_partition_high_watermark",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let _ = PartitionId(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_connect_while_idle_handshakes_block_nobody() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h = harness!("tls_clients_connect_while_idle_handshakes_block_nobody");
    let cert = h.self_signed();
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["secure"]).await;
    let hub = h.hub(
        "hub-eu",
        "eu",
        &reg.url,
        &["--tls-cert", &cert.cert, "--tls-key", &cert.key],
    );
    // Sockets that never start a handshake (rumqttd would stall on these).
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(tokio::net::TcpStream::connect(hub.mqtt).await.unwrap());
    }
    let mut opts = rumqttc::MqttOptions::new("secure", "127.0.0.1", hub.mqtt.port());
    opts.set_credentials("secure", reg.key("secure"));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: cert.pem.clone().into_bytes(),
            alpn: None,
            client_auth: None,
        },
    ));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(
            "devices/secure/messages/events/1",
            rumqttc::QoS::AtLeastOnce,
            false,
            "over tls",
        )
        .await
        .unwrap();
    let acked = tokio::time::timeout(SECS, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                events.poll().await.expect("tls connection")
            {
                return;
            }
        }
    })
    .await;
    assert!(
        acked.is_ok(),
        "no PUBACK over TLS while idle sockets were open"
    );
    // Plain MQTT on the TLS port gets nowhere.
    let (_, code) =
        RawClient::connect(hub.mqtt, "secure", Some(("secure", &reg.key("secure")))).await;
    assert_eq!(code, None);
    assert_eq!(
        hub.client().status().await.unwrap().mqtt_url.unwrap(),
        format!("mqtts://{}", hub.mqtt)
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_serves_https_and_idle_handshakes_block_nobody() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h = harness!("the_http_api_serves_https_and_idle_handshakes_block_nobody");
    let cert = h.self_signed();
    let reg = Registry::sqlite(h.dir(), "eu").await;
    let hub = h.hub(
        "hub-eu",
        "eu",
        &reg.url,
        &["--http-tls-cert", &cert.cert, "--http-tls-key", &cert.key],
    );
    // Sockets that never start a handshake must not hold up anyone else.
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(tokio::net::TcpStream::connect(hub.http).await.unwrap());
    }
    let https = cert.https_client();
    let base = format!("https://localhost:{}", hub.http.port());
    let health = https.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Admin calls work over TLS with the token, and not without it.
    let status: StatusResponse = https
        .get(format!("{base}/v1/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status.region.as_str(), "eu");
    let refused = https
        .get(format!("{base}/v1/partitions/0/records?from=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // Plain HTTP on the HTTPS port gets no answer, and a client that does
    // not trust the certificate is refused at the handshake.
    let plain = reqwest::Client::builder().timeout(SECS).build().unwrap();
    assert!(
        plain
            .get(format!("http://{}/healthz", hub.http))
            .send()
            .await
            .is_err()
    );
    assert!(plain.get(format!("{base}/healthz")).send().await.is_err());
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_request_headers_are_cut_and_cannot_exhaust_the_api() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = tests::harness!("half_sent_request_headers_are_cut_and_cannot_exhaust_the_api");
    let reg = tests::Registry::sqlite(h.dir(), "eu").await;
    let hub = h.hub(
        "hub-eu",
        "eu",
        &reg.url,
        &[
            "--http-header-timeout-ms",
            "500",
            "--http-max-connections",
            "20",
        ],
    );
    // More half-sent requests than the API serves at once (a slow loris).
    let mut lorises = Vec::new();
    for _ in 0..25 {
        let mut s = tokio::net::TcpStream::connect(hub.http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n")
            .await
            .unwrap();
        lorises.push(s);
    }
    // The server cuts every one of them (the last five once slots free up)…
    for (i, s) in lorises.iter_mut().enumerate() {
        let mut buf = [0u8; 512];
        let cut = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(cut.is_ok(), "half-sent request {i} was never cut");
    }
    // …and answers a real request.
    let r = reqwest::Client::new()
        .get(format!("http://{}/healthz", hub.http))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .expect("the API still answers");
    assert_eq!(r.status(), 200);
    // A kept-alive connection that goes quiet after a request is cut too:
    // the header timeout is armed again for the next request.
    let mut idle = tokio::net::TcpStream::connect(hub.http).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut buf = [0u8; 512];
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert!(
        closed.is_ok(),
        "an idle kept-alive connection was never cut"
    );
}
