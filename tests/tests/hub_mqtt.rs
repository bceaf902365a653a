//! The hub's device front against real clients: rumqttc, mosquitto's
//! command-line clients and a raw codec client for malformed input.

use std::time::Duration;

use fleet_api::{DeviceId, DeviceStatus, Offset, partition_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::mqtt::{RawClient, RecvError};
use tests::{HubNode, Registry, harness, wait_for};

const SECS: Duration = Duration::from_secs(10);

async fn hub_with(h: &tests::Harness, devices: &[&str], extra: &[&str]) -> (Registry, HubNode) {
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(devices).await;
    let hub = h.hub("hub-eu", "eu", &reg.url, extra);
    (reg, hub)
}

use tests::durability::connect as connected;

/// Publishes QoS 1 and waits for its PUBACK.
async fn publish_acked(c: &mut RawClient, topic: &str, pkid: u16, payload: &[u8]) {
    c.publish(topic, QoS::AtLeastOnce, pkid, payload).await;
    loop {
        match c.recv(SECS).await {
            Ok(Packet::PubAck(a)) if a.pkid == pkid => return,
            Ok(_) => {}
            Err(e) => panic!("no PUBACK for {topic}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_publishes_and_receives_commit_acks() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h = harness!("rumqttc_publishes_and_receives_commit_acks");
    let (reg, hub) = hub_with(&h, &["d1"], &[]).await;
    let mut opts = rumqttc::MqttOptions::new("d1", hub.mqtt.ip().to_string(), hub.mqtt.port());
    opts.set_credentials("d1", reg.key("d1"));
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
    client
        .subscribe("devices/d1/acks", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    for i in 1..=50u64 {
        client
            .publish(
                format!("devices/d1/messages/events/{i}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("m{i}"),
            )
            .await
            .unwrap();
    }
    let (mut pubacks, mut committed) = (0, 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while pubacks < 50 || committed < 50 {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("acks in time")
            .expect("connection");
        match ev {
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => pubacks += 1,
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                assert_eq!(p.topic, "devices/d1/acks");
                let ack: fleet_api::AckMessage = serde_json::from_slice(&p.payload).unwrap();
                assert!(ack.committed.0 >= committed, "acks never go back");
                assert_eq!(
                    ack.replicated, ack.committed,
                    "no secondary: replicated = committed"
                );
                assert_eq!(ack.region.as_str(), "eu");
                assert_eq!(ack.epoch.0, 1);
                committed = ack.committed.0;
            }
            _ => {}
        }
    }
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8);
    let got = hub
        .client()
        .records(p, Offset(0), 1000, Duration::ZERO)
        .await
        .unwrap();
    let mids: Vec<u64> = got.records.iter().map(|r| r.mid.unwrap().0).collect();
    assert_eq!(mids, (1..=50).collect::<Vec<_>>());
    assert_eq!(got.records[9].payload, b"m10");
    assert!(
        got.records
            .iter()
            .all(|r| r.device_id.as_str() == "d1" && r.region.as_str() == "eu")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_watch_acks_and_the_live_stream() {
    let h = harness!("mosquitto_clients_publish_watch_acks_and_the_live_stream");
    let (reg, hub) = hub_with(&h, &["sensor-7"], &["--stream-password", "watch-me-please"]).await;
    let key = reg.key("sensor-7");
    let port = hub.mqtt.port().to_string();
    let stream_port = hub.stream.expect("stream address").port().to_string();
    // A standard client watching the live stream.
    let mut live = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-p",
            &stream_port,
            "-u",
            "stream",
            "-P",
            "watch-me-please",
            "-t",
            "fleet/#",
            "-C",
            "1",
            "-v",
            "-W",
            "30",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    // Publish until the watcher has seen a record (it may subscribe after the first).
    let mut mid = 0;
    while live.try_wait().unwrap().is_none() {
        mid += 1;
        assert!(mid < 100, "the live stream delivered nothing");
        let status = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-p", &port, "-i", "sensor-7", "-u", "sensor-7", "-P", &key, "-q", "1",
            ])
            .args([
                "-t",
                &format!("devices/sensor-7/messages/events/{mid}"),
                "-m",
                &format!("reading {mid}"),
            ])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "mosquitto_pub failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = live.wait_with_output().await.unwrap();
    assert!(out.status.success(), "the live stream watcher failed");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with("fleet/eu/devices/sensor-7/events reading "),
        "{line}"
    );
    // A subscriber to the device's acks learns at once what is stored.
    let acks = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-p",
            &port,
            "-i",
            "sensor-7",
            "-u",
            "sensor-7",
            "-P",
            &key,
            "-t",
            "devices/sensor-7/acks",
            "-C",
            "1",
            "-W",
            "20",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        acks.status.success(),
        "no ack: {}",
        String::from_utf8_lossy(&acks.stderr)
    );
    let ack: serde_json::Value = serde_json::from_slice(&acks.stdout).unwrap();
    assert_eq!(ack["committed"], mid);
    assert_eq!(ack["replicated"], mid);
    assert_eq!(ack["region"], "eu");
    // A wrong password is refused with its code (mosquitto prints it).
    let bad = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-p",
            &port,
            "-i",
            "sensor-7",
            "-u",
            "sensor-7",
            "-P",
            "wrong",
            "-t",
            "devices/sensor-7/messages/events",
            "-m",
            "x",
        ])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bad user name or password"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_get_their_codes_and_are_counted() {
    let h = harness!("refused_connects_get_their_codes_and_are_counted");
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["ok", "off"]).await;
    reg.set_status("off", DeviceStatus::Disabled).await;
    let hub = h.hub("hub-eu", "eu", &reg.url, &[]);
    let key = reg.key("ok");
    let off_key = reg.key("off");
    type Login<'a> = Option<(&'a str, &'a str)>;
    let cases: Vec<(&str, Login, ConnectReturnCode)> = vec![
        (
            "ok",
            Some(("ok", "not-a-key")),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            "ok",
            Some(("ok", &off_key)),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            "ghost",
            Some(("ghost", &key)),
            ConnectReturnCode::BadUserNamePassword,
        ),
        ("ok", None, ConnectReturnCode::BadUserNamePassword),
        (
            "ok",
            Some(("someone-else", &key)),
            ConnectReturnCode::BadClientId,
        ),
        ("a/b", Some(("a/b", &key)), ConnectReturnCode::BadClientId),
        ("", Some(("", &key)), ConnectReturnCode::BadClientId),
        ("..", Some(("..", &key)), ConnectReturnCode::BadClientId),
        (".", Some((".", &key)), ConnectReturnCode::BadClientId),
        (
            "off",
            Some(("off", &off_key)),
            ConnectReturnCode::NotAuthorized,
        ),
    ];
    for (id, login, expected) in cases {
        let (mut c, code) = RawClient::connect(hub.mqtt, id, login).await;
        assert_eq!(code, Some(expected), "client {id:?} login {login:?}");
        assert!(c.closed_within(SECS).await, "refused connection stays open");
    }
    // MQTT 5 is refused with "unacceptable protocol version".
    let mut v5 = RawClient::tcp(hub.mqtt).await;
    v5.send_raw(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'x',
    ])
    .await;
    match v5.recv(SECS).await {
        Ok(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        hub.metric("fleet_hub_connects_total{result=\"bad_credentials\"}")
            .await,
        3.0
    );
    assert_eq!(
        hub.metric("fleet_hub_connects_total{result=\"no_credentials\"}")
            .await,
        1.0
    );
    assert_eq!(
        hub.metric("fleet_hub_connects_total{result=\"bad_client_id\"}")
            .await,
        4.0
    );
    assert!(
        hub.metric("fleet_hub_connects_total{result=\"disabled\"}")
            .await
            >= 1.0
    );
    // The right key still works after all that.
    connected(&hub, &reg, "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_device_is_disconnected_and_refused_within_seconds() {
    let h = harness!("a_disabled_device_is_disconnected_and_refused_within_seconds");
    let (reg, hub) = hub_with(&h, &["d"], &[]).await;
    let mut c = connected(&hub, &reg, "d").await;
    publish_acked(&mut c, "devices/d/messages/events/1", 1, b"x").await;
    reg.set_status("d", DeviceStatus::Disabled).await;
    assert!(
        c.closed_within(Duration::from_secs(5)).await,
        "still connected 5 s after being disabled"
    );
    let (_, code) = RawClient::connect(hub.mqtt, "d", Some(("d", &reg.key("d")))).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    reg.set_status("d", DeviceStatus::Enabled).await;
    wait_for(5, "re-enabled device to connect", || async {
        RawClient::connect(hub.mqtt, "d", Some(("d", &reg.key("d"))))
            .await
            .1
            == Some(ConnectReturnCode::Success)
    })
    .await;
}

/// Publishes continuously from a well-behaved device and counts PUBACKs.
async fn steady_publisher(
    hub: std::net::SocketAddr,
    key: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u16, u16) {
    let (mut c, code) = RawClient::connect(hub, "good", Some(("good", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let (mut sent, mut acked) = (0u16, 0u16);
    while !*stop.borrow() {
        sent += 1;
        c.publish(
            &format!("devices/good/messages/events/{sent}"),
            QoS::AtLeastOnce,
            sent,
            b"steady",
        )
        .await;
        match c.recv(SECS).await {
            Ok(Packet::PubAck(a)) if a.pkid == sent => acked += 1,
            other => panic!("the good device suffered: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sent, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_counted_while_others_keep_publishing() {
    let h = harness!("bad_input_is_refused_and_counted_while_others_keep_publishing");
    let (reg, hub) = hub_with(&h, &["good", "bad"], &["--payload-limit", "1024"]).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let good = tokio::spawn(steady_publisher(hub.mqtt, reg.key("good"), stop));

    type Abuse = (
        &'static str,
        Box<dyn Fn(&mut RawClient) -> futures::future::BoxFuture<'_, ()> + Send + Sync>,
    );
    let abuses: Vec<Abuse> = vec![
        (
            "foreign topic",
            Box::new(|c| {
                Box::pin(c.publish(
                    "devices/good/messages/events/9",
                    QoS::AtLeastOnce,
                    1,
                    b"spoof",
                ))
            }),
        ),
        (
            "outside namespace",
            Box::new(|c| Box::pin(c.publish("other/topic", QoS::AtMostOnce, 0, b"x"))),
        ),
        (
            "bad mid",
            Box::new(|c| {
                Box::pin(c.publish("devices/bad/messages/events/-1", QoS::AtLeastOnce, 2, b"x"))
            }),
        ),
        (
            "foreign subscription",
            Box::new(|c| Box::pin(c.subscribe(3, "devices/good/acks"))),
        ),
        (
            "wildcard subscription",
            Box::new(|c| Box::pin(c.subscribe(4, "#"))),
        ),
        (
            "oversized payload",
            Box::new(|c| {
                Box::pin(c.publish(
                    "devices/bad/messages/events/5",
                    QoS::AtLeastOnce,
                    5,
                    &[0u8; 2048],
                ))
            }),
        ),
        (
            "QoS 2",
            Box::new(|c| {
                Box::pin(c.publish("devices/bad/messages/events/6", QoS::ExactlyOnce, 6, b"x"))
            }),
        ),
        (
            "garbage bytes",
            Box::new(|c| Box::pin(c.send_raw(&[0xF0, 0x03, 1, 2, 3]))),
        ),
        (
            "second connect",
            Box::new(|c| {
                Box::pin(c.send(Packet::Connect(rumqttc::mqttbytes::v4::Connect::new("bad"))))
            }),
        ),
    ];
    for (what, abuse) in &abuses {
        let mut c = connected(&hub, &reg, "bad").await;
        abuse(&mut c).await;
        loop {
            match c.recv(SECS).await {
                Err(RecvError::Closed) => break,
                Ok(Packet::PubAck(_)) => panic!("{what}: acknowledged"),
                Ok(Packet::SubAck(_)) => panic!("{what}: subscription granted"),
                Ok(_) => {}
                Err(RecvError::Timeout) => panic!("{what}: connection left open"),
            }
        }
    }
    // Garbage before any CONNECT, too.
    let mut raw = RawClient::tcp(hub.mqtt).await;
    raw.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        raw.closed_within(Duration::from_secs(2)).await,
        "not closed before the CONNECT timeout"
    );

    stop_tx.send(true).unwrap();
    let (sent, acked) = good.await.unwrap();
    assert_eq!(sent, acked);
    assert!(sent > 0);
    assert!(
        hub.metric("fleet_hub_acl_violations_total{kind=\"publish\"}")
            .await
            >= 3.0
    );
    assert!(
        hub.metric("fleet_hub_acl_violations_total{kind=\"subscribe\"}")
            .await
            >= 2.0
    );
    assert!(
        hub.metric("fleet_hub_refused_total{reason=\"too_large\"}")
            .await
            >= 1.0
    );
    assert!(hub.metric("fleet_hub_refused_total{reason=\"qos2\"}").await >= 1.0);
    assert!(
        hub.metric("fleet_hub_refused_total{reason=\"malformed\"}")
            .await
            >= 1.0
    );
    // Nothing from the bad device reached the log.
    let p = partition_for(&DeviceId::new("bad").unwrap(), 8);
    let got = hub
        .client()
        .records(p, Offset(0), 1000, Duration::ZERO)
        .await
        .unwrap();
    assert!(got.records.iter().all(|r| r.device_id.as_str() != "bad"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_closed_and_do_not_block_others() {
    let h = harness!("slow_loris_connections_are_closed_and_do_not_block_others");
    let (reg, hub) = hub_with(&h, &["d"], &["--connect-timeout-ms", "700"]).await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(RawClient::tcp(hub.mqtt).await);
    }
    let mut dribbler = RawClient::tcp(hub.mqtt).await;
    dribbler.send_raw(&[0x10, 40, 0, 4]).await; // a CONNECT that never completes
    // Others are served meanwhile.
    let mut c = connected(&hub, &reg, "d").await;
    publish_acked(&mut c, "devices/d/messages/events/1", 1, b"x").await;
    assert!(
        dribbler.closed_within(SECS).await,
        "half a CONNECT kept the socket"
    );
    for mut s in idle {
        assert!(s.closed_within(SECS).await, "an idle socket was kept");
    }
    assert!(
        hub.metric("fleet_hub_disconnects_total{reason=\"connect_timeout\"}")
            .await
            >= 51.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_id_takes_over() {
    let h = harness!("a_second_connection_with_the_same_id_takes_over");
    let (reg, hub) = hub_with(&h, &["d"], &[]).await;
    let mut first = connected(&hub, &reg, "d").await;
    let mut second = connected(&hub, &reg, "d").await;
    assert!(
        first.closed_within(SECS).await,
        "the old connection survived the takeover"
    );
    publish_acked(&mut second, "devices/d/messages/events/1", 1, b"x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_rate_is_limited() {
    let h = harness!("the_connect_rate_is_limited");
    let (reg, hub) = hub_with(&h, &["d"], &["--connect-rate", "5"]).await;
    let key = reg.key("d");
    // Thirty at once: far more than a 5/s budget has, however fast or slow
    // this machine is.
    let codes = futures::future::join_all(
        (0..30).map(|_| RawClient::connect(hub.mqtt, "d", Some(("d", &key)))),
    )
    .await;
    let (mut ok, mut limited) = (0, 0);
    for (_, code) in codes {
        match code {
            Some(ConnectReturnCode::Success) => ok += 1,
            Some(ConnectReturnCode::ServiceUnavailable) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(ok >= 1 && limited > 0, "ok {ok}, limited {limited}");
    assert!(
        hub.metric("fleet_hub_connects_total{result=\"rate_limited\"}")
            .await
            >= f64::from(limited)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_enforced_and_pings_keep_a_connection_open() {
    let h = harness!("keep_alive_is_enforced_and_pings_keep_a_connection_open");
    let (reg, hub) = hub_with(&h, &["d"], &[]).await;
    let key = reg.key("d");
    // Pinging every half second keeps a 2 s keep-alive connection open for
    // 3 s (with room for a slow scheduler: the limit is 3 s of silence).
    let (mut c, code) = RawClient::connect_with(hub.mqtt, "d", Some(("d", &key)), 2).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.send(Packet::PingReq).await;
        assert!(
            matches!(c.recv(SECS).await, Ok(Packet::PingResp)),
            "no PINGRESP"
        );
    }
    // Silence beyond 1.5 × keep-alive closes it.
    assert!(
        c.closed_within(Duration::from_secs(8)).await,
        "a silent connection stayed open"
    );
    assert!(
        hub.metric("fleet_hub_disconnects_total{reason=\"keepalive\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_implausible_mid_is_refused_and_cannot_swallow_later_publishes() {
    let h = harness!("an_implausible_mid_is_refused_and_cannot_swallow_later_publishes");
    let (reg, hub) = hub_with(&h, &["d1"], &[]).await;
    let mut c = connected(&hub, &reg, "d1").await;
    // Without the bound, this one publish made every later mid a
    // "duplicate": acknowledged and never stored.
    c.publish(
        &format!("devices/d1/messages/events/{}", u64::MAX),
        QoS::AtLeastOnce,
        1,
        b"poison",
    )
    .await;
    assert!(c.closed_within(SECS).await, "the connection is closed");
    let mut c = connected(&hub, &reg, "d1").await;
    for (pkid, mid) in [(1u16, 1u64), (2, 2), (3, 1 << 32)] {
        c.publish(
            &format!("devices/d1/messages/events/{mid}"),
            QoS::AtLeastOnce,
            pkid,
            format!("m{mid}").as_bytes(),
        )
        .await;
        assert!(
            matches!(c.recv(SECS).await, Ok(Packet::PubAck(a)) if a.pkid == pkid),
            "mid {mid} acknowledged"
        );
    }
    let p = partition_for(&DeviceId::new("d1").unwrap(), 8);
    let got = hub
        .client()
        .records(p, Offset(0), 100, Duration::ZERO)
        .await
        .unwrap();
    let stored: Vec<(u64, Vec<u8>)> = got
        .records
        .iter()
        .map(|r| (r.mid.unwrap().0, r.payload.clone()))
        .collect();
    assert_eq!(
        stored,
        vec![
            (1, b"m1".to_vec()),
            (2, b"m2".to_vec()),
            (1 << 32, format!("m{}", 1u64 << 32).into_bytes())
        ]
    );
    assert!(
        hub.metrics()
            .await
            .contains("fleet_hub_refused_total{reason=\"mid_jump\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_gets_connack_1_and_an_oversized_connect_is_cut_before_authentication() {
    let h = harness!("mqtt5_gets_connack_1_and_an_oversized_connect_is_cut_before_authentication");
    let (reg, hub) = hub_with(&h, &["d1"], &[]).await;
    // An MQTT 5 CONNECT (level 5, empty properties, client id "d1").
    let mut v5 = RawClient::tcp(hub.mqtt).await;
    v5.send_raw(&[
        0x10, 0x0f, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x02,
        b'd', b'1',
    ])
    .await;
    match v5.recv(SECS).await {
        Ok(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("expected CONNACK 1, got {other:?}"),
    }
    assert!(v5.closed_within(SECS).await);
    // A CONNECT of 8 KiB (a huge password) is refused before any key check.
    let big = "x".repeat(8 * 1024);
    let (mut c, code) = RawClient::connect(hub.mqtt, "d1", Some(("d1", &big))).await;
    assert_eq!(code, None, "no CONNACK for an oversized CONNECT");
    assert!(c.closed_within(SECS).await);
    let m = hub.metrics().await;
    assert!(
        m.contains("fleet_hub_connects_total{result=\"protocol_version\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("fleet_hub_disconnects_total{reason=\"too_large\"}"),
        "{m}"
    );
    // A real device is unaffected.
    connected(&hub, &reg, "d1").await;
}

/// Agents number their messages densely; a hole in a device's mids is what
/// a full outbox dropped, and the hub counts it (the outbox-drop alert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_in_a_devices_mids_are_counted_as_outbox_drops() {
    let h = harness!("holes_in_a_devices_mids_are_counted_as_outbox_drops");
    let (reg, hub) = hub_with(&h, &["d1"], &[]).await;
    assert_eq!(hub.metric("fleet_hub_mids_skipped_total").await, 0.0);
    let mut c = connected(&hub, &reg, "d1").await;
    publish_acked(&mut c, "devices/d1/messages/events/1", 1, b"one").await;
    publish_acked(&mut c, "devices/d1/messages/events/2", 2, b"two").await;
    // A resend is no hole.
    publish_acked(&mut c, "devices/d1/messages/events/2", 3, b"two").await;
    assert_eq!(hub.metric("fleet_hub_mids_skipped_total").await, 0.0);
    // 3, 4 and 5 were dropped by the device.
    publish_acked(&mut c, "devices/d1/messages/events/6", 4, b"six").await;
    assert_eq!(hub.metric("fleet_hub_mids_skipped_total").await, 3.0);
}
