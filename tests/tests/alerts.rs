//! The Prometheus alerting rules and the Grafana dashboard in deploy/ are
//! valid and name only metrics that a running fleet exports: two hubs, a
//! concierge and a consumer runner as processes, with some traffic.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tests::load::registries;
use tests::mqtt::RawClient;
use tests::{ADMIN_TOKEN, harness, wait_for};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join(path)
}

/// Every `fleet_…` metric name in `text`, without the histogram suffixes.
fn fleet_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fleet_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary {
            let name = &text[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    names
}

/// Metric names with at least one sample in a `/metrics` text.
fn exported(text: &str) -> BTreeSet<String> {
    fleet_names(
        &text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

async fn scrape(url: String) -> String {
    reqwest::get(url)
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_name_metrics_a_running_fleet_exports() {
    let h = harness!("alert_rules_and_dashboard_name_metrics_a_running_fleet_exports");
    let rules = deploy("prometheus/fleet-alerts.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (scripts/services.sh installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool refuses the rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dashboard_text = std::fs::read_to_string(deploy("grafana/fleet-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10, "a dashboard of {} queries", exprs.len());
    let mut wanted = fleet_names(&std::fs::read_to_string(&rules).unwrap());
    let rule_count = wanted.len();
    wanted.extend(fleet_names(&exprs.join("\n")));
    assert!(rule_count >= 8, "rules name {rule_count} metrics");
    for name in [
        "fleet_hub_peer_detached",
        "fleet_hub_replication_lag_seconds",
        "fleet_consumer_breaker_state",
        "fleet_hub_fsync_seconds",
    ] {
        assert!(wanted.contains(name), "{name} not found in {wanted:?}");
    }
    assert!(
        exported("# HELP fleet_x_total y\nfleet_y_total{a=\"fleet_z\"} 1\n")
            == BTreeSet::from(["fleet_y_total".to_string(), "fleet_z".to_string()]),
        "the scan reads sample lines only"
    );

    // A fleet with some of everything: traffic, a refused connect, a refused
    // packet, an endpoint lookup, a consumer runner.
    let (ra, rb) = registries(&h, &["dev-0", "dev-1"]).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    let c = h.concierge("concierge", "127.0.0.1:0", &[("a", &a), ("b", &b)], &[]);
    let key = ra.key("dev-0");
    let (mut dev, code) = RawClient::connect(a.mqtt, "dev-0", Some(("dev-0", &key))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    dev.publish(
        "devices/dev-0/messages/events/1",
        QoS::AtLeastOnce,
        1,
        b"one",
    )
    .await;
    assert!(matches!(
        dev.recv(Duration::from_secs(10)).await,
        Ok(Packet::PubAck(_))
    ));
    dev.publish(
        &format!("devices/dev-0/messages/events/{}", u64::MAX),
        QoS::AtLeastOnce,
        2,
        b"implausible",
    )
    .await;
    assert!(dev.closed_within(Duration::from_secs(10)).await);
    let (_, code) = RawClient::connect(a.mqtt, "dev-1", Some(("dev-1", "not-the-key"))).await;
    assert_ne!(code, Some(ConnectReturnCode::Success));
    wait_for(20, "an endpoint from the concierge", || async {
        reqwest::get(format!("{}/v1/devices/dev-0/endpoint", c.url()))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let store = format!("sqlite://{}", h.dir().join("consumers.db").display());
    let sink = format!("sqlite://{}", h.dir().join("sink.db").display());
    let args: Vec<String> = [
        "consume",
        "--json",
        "run",
        "--group",
        "alerts",
        "--hub",
        &a.url(),
        "--hub",
        &b.url(),
        "--hub-token",
        ADMIN_TOKEN,
        "--store",
        &store,
        "--sink",
        &sink,
        "--http",
        "127.0.0.1:0",
        "--admin-token",
        ADMIN_TOKEN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let runner = h.spawn("consumer", &args);
    let runner_http = format!("http://{}", runner.addr("http"));

    let urls = [
        format!("{}/metrics", a.url()),
        format!("{}/metrics", b.url()),
        format!("{}/metrics", c.url()),
        format!("{runner_http}/metrics"),
    ];
    let mut missing = BTreeSet::new();
    for _ in 0..100 {
        let mut have = BTreeSet::new();
        for u in &urls {
            have.extend(exported(&scrape(u.clone()).await));
        }
        missing = wanted.difference(&have).cloned().collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        missing.is_empty(),
        "named in deploy/ but exported by no part of a running fleet: {missing:?}"
    );
}
