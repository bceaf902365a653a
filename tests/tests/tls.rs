//! TLS without downgrade, with a private CA: agent → concierge over HTTPS →
//! hub over mqtts, and plaintext refused unless the agent is told
//! `--allow-plaintext`.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use tests::mqtt::RawClient;
use tests::{ConciergeNode, HubNode, PrivateCa, Registry, harness};

async fn tls_hub(h: &tests::Harness, ca: &PrivateCa) -> (Registry, HubNode) {
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(&["d1"]).await;
    let hub = h.hub(
        "hub-eu",
        "eu",
        &reg.url,
        &[
            "--tls-cert",
            &ca.cert,
            "--tls-key",
            &ca.key,
            "--stream-password",
            "watch-me-please",
        ],
    );
    (reg, hub)
}

fn tls_concierge(
    h: &tests::Harness,
    ca: &PrivateCa,
    hub: &HubNode,
    mqtt_url: &str,
) -> ConciergeNode {
    h.concierge_specs(
        "concierge",
        "127.0.0.1:0",
        &[format!("eu={},{mqtt_url}", hub.url())],
        &[
            "--tls-cert",
            &ca.cert,
            "--tls-key",
            &ca.key,
            "--hub-ca",
            &ca.ca,
        ],
    )
}

/// Runs an agent for d1 with `flags` and one line on stdin.
fn agent(
    h: &tests::Harness,
    reg: &Registry,
    c: &ConciergeNode,
    concierge_url: &str,
    flags: &[&str],
) -> std::process::Child {
    let mut args: Vec<String> = [
        "device-agent",
        "run",
        "--device-id",
        "d1",
        "--exit-when-drained",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--key={}", reg.key("d1")));
    args.push(format!("--outbox={}", h.dir().join("outbox").display()));
    args.push(format!("--concierge={concierge_url}"));
    args.push(format!("--dns={}", c.dns));
    args.extend(flags.iter().map(|s| s.to_string()));
    let mut child = h
        .command("agent", &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "over tls").unwrap();
    child
}

/// Reads `child`'s stderr until a line contains `needle` (at most 30 s),
/// then kills it; returns what it wrote.
async fn stderr_until(child: &mut std::process::Child, needle: &str) -> String {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = rx.recv().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(needle) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        found,
        "the agent never said what was expected; it said:\n{seen}"
    );
    seen
}

async fn finished(child: std::process::Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_the_concierge_over_https_and_the_hub_over_mqtts() {
    let h = harness!("an_agent_reaches_the_concierge_over_https_and_the_hub_over_mqtts");
    let ca = h.private_ca(&["concierge.fleet.test", "localhost"]);
    let (reg, hub) = tls_hub(&h, &ca).await;
    let c = tls_concierge(
        &h,
        &ca,
        &hub,
        &format!("mqtts://localhost:{}", hub.mqtt.port()),
    );
    let url = format!("https://concierge.fleet.test:{}", c.http.port());
    // A watcher of the live stream over TLS, verified with the private CA,
    // before the device publishes.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut opts =
        rumqttc::MqttOptions::new("tls-watcher", "localhost", hub.stream.unwrap().port());
    opts.set_credentials("stream", "watch-me-please");
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: std::fs::read(&ca.ca).unwrap(),
            alpn: None,
            client_auth: None,
        },
    ));
    let (watcher, mut events) = rumqttc::AsyncClient::new(opts, 10);
    watcher
        .subscribe("fleet/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) =
                events.poll().await.expect("the TLS stream connection")
            {
                return;
            }
        }
    })
    .await;
    assert!(subscribed.is_ok(), "no SUBACK from the TLS live stream");
    let watched = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    return (p.topic, p.payload.to_vec());
                }
                Ok(_) => {}
                Err(e) => panic!("the TLS stream connection failed: {e}"),
            }
        }
    });
    let out = finished(agent(&h, &reg, &c, &url, &["--ca", &ca.ca])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = hub.records_of("d1", 8).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].payload, b"over tls");
    let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), watched)
        .await
        .expect("the watcher saw nothing over TLS")
        .unwrap();
    assert_eq!(topic, "fleet/eu/devices/d1/events");
    assert_eq!(payload, b"over tls");
    // The concierge speaks only TLS on its port.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/healthz", c.http.port())).await;
    assert!(plain.is_err(), "the concierge answered plain HTTP");
    // The live stream serves TLS too (a plain CONNECT gets no CONNACK).
    let (_, code) = RawClient::connect(
        hub.stream.unwrap(),
        "w",
        Some(("stream", "watch-me-please")),
    )
    .await;
    assert_eq!(code, None, "the TLS live stream answered plain MQTT");
    // The same agent without the private CA does not trust the concierge.
    let mut child = agent(&h, &reg, &c, &url, &[]);
    let err = stderr_until(&mut child, "no endpoint yet").await;
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{err}"
    );
    assert_eq!(hub.records_of("d1", 8).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_unless_the_agent_is_told_so() {
    let h = harness!("plaintext_is_refused_unless_the_agent_is_told_so");
    let ca = h.private_ca(&["concierge.fleet.test", "localhost"]);
    let (reg, hub) = tls_hub(&h, &ca).await;

    // 1. An http:// concierge is refused at start, with a clear error.
    let c = tls_concierge(
        &h,
        &ca,
        &hub,
        &format!("mqtts://localhost:{}", hub.mqtt.port()),
    );
    let out = finished(agent(
        &h,
        &reg,
        &c,
        &format!("http://concierge.fleet.test:{}", c.http.port()),
        &["--ca", &ca.ca],
    ))
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing plaintext concierge") && err.contains("--allow-plaintext"),
        "{err}"
    );

    // 2. A concierge (HTTPS, trusted) that hands out a plain mqtt:// endpoint
    //    cannot downgrade the agent: it never connects.
    let downgrade = h.concierge_specs(
        "concierge-downgrade",
        "127.0.0.1:0",
        &[format!(
            "eu={},mqtt://localhost:{}",
            hub.url(),
            hub.mqtt.port()
        )],
        &[
            "--tls-cert",
            &ca.cert,
            "--tls-key",
            &ca.key,
            "--hub-ca",
            &ca.ca,
        ],
    );
    let url = format!("https://concierge.fleet.test:{}", downgrade.http.port());
    let mut child = agent(&h, &reg, &downgrade, &url, &["--ca", &ca.ca]);
    let err = stderr_until(&mut child, "refusing plaintext endpoint").await;
    assert!(err.contains("mqtt://localhost"), "{err}");
    assert_eq!(
        hub.metric("fleet_hub_connects_total{result=\"accepted\"}")
            .await,
        0.0,
        "the agent connected in plaintext"
    );
    assert!(hub.records_of("d1", 8).await.is_empty());
}
