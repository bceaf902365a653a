//! The device agent as a process: discovery through the concierge's DNS
//! front, delivery through hub restarts and its own kill -9, backoff and
//! Retry-After, and `simulate`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use fleet_api::partition_for;
use tests::{ConciergeNode, HubNode, Registry, harness, wait_for};

async fn fleet(h: &tests::Harness, devices: &[&str]) -> (Registry, HubNode, ConciergeNode) {
    let mut reg = Registry::sqlite(h.dir(), "eu").await;
    reg.add(devices).await;
    let hub = h.hub("hub-eu", "eu", &reg.url, &[]);
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    (reg, hub, c)
}

/// The payloads of `device` stored in the hub, in mid order.
async fn stored_payloads(hub: &HubNode, device: &str) -> Vec<String> {
    let mut records = hub.records_of(device, 8).await;
    records.sort_by_key(|r| r.mid.map(|m| m.0));
    records
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

/// The mids of `device` stored in the hub, checking each appears once.
async fn stored_once(hub: &HubNode, device: &str) -> Vec<u64> {
    let mids: Vec<u64> = hub
        .records_of(device, 8)
        .await
        .iter()
        .filter_map(|r| r.mid.map(|m| m.0))
        .collect();
    let mut seen = HashMap::new();
    for m in &mids {
        *seen.entry(*m).or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "{device}: a message was stored twice"
    );
    mids
}

/// `device-agent run` as d1 with `lines` on its stdin (then closed), exiting
/// once its outbox is empty.
fn agent_with_lines(
    h: &tests::Harness,
    c: &ConciergeNode,
    reg: &Registry,
    lines: impl Iterator<Item = String>,
) -> std::process::Child {
    let outbox = h.dir().join("outbox");
    let args = h.agent_args(
        c,
        "d1",
        &reg.key("d1"),
        outbox.to_str().unwrap(),
        &["--exit-when-drained"],
    );
    let mut child = h
        .command("agent", &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in lines {
        writeln!(stdin, "{line}").unwrap();
    }
    child
}

async fn finished(child: std::process::Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("agent output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_delivers_stdin_through_the_dns_front_and_the_concierge() {
    let h = harness!("an_agent_delivers_stdin_through_the_dns_front_and_the_concierge");
    let (reg, hub, c) = fleet(&h, &["d1"]).await;
    let child = agent_with_lines(
        &h,
        &c,
        &reg,
        (1..=300).map(|i| format!("{{\"reading\":{i}}}")),
    );
    let out = finished(child).await;
    assert!(out.status.success(), "agent failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["accepted"], 300);
    assert_eq!(summary["in_outbox"], 0);
    assert_eq!(summary["acknowledged_up_to"], 300);
    assert_eq!(stored_once(&hub, "d1").await, (1..=300).collect::<Vec<_>>());
    assert_eq!(
        stored_payloads(&hub, "d1").await,
        (1..=300)
            .map(|i| format!("{{\"reading\":{i}}}"))
            .collect::<Vec<_>>(),
        "every payload, byte for byte"
    );
    let first = hub.records_of("d1", 8).await.remove(0);
    assert_eq!(first.payload, b"{\"reading\":1}");
}

/// Feeds `n` messages through the agent's socket; returns the confirmed mids.
fn feed(socket: &std::path::Path, n: usize, pace: Duration) -> Vec<u64> {
    let mut s = UnixStream::connect(socket).expect("agent socket");
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut confirmed = Vec::new();
    for i in 0..n {
        if writeln!(s, "message {i}").is_err() {
            break;
        }
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(mid) = line.strip_prefix("ok ") {
            confirmed.push(mid.trim().parse().unwrap());
        }
        std::thread::park_timeout(pace);
    }
    confirmed
}

async fn wait_socket(path: &std::path::Path) {
    wait_for(10, "the agent's socket", || async {
        UnixStream::connect(path).is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_mid_stream_loses_nothing() {
    let h = harness!("a_hub_killed_mid_stream_loses_nothing");
    let (reg, mut hub, c) = fleet(&h, &["d1"]).await;
    let socket = h.dir().join("agent.sock");
    let outbox = h.dir().join("outbox");
    let args = h.agent_args(
        &c,
        "d1",
        &reg.key("d1"),
        outbox.to_str().unwrap(),
        &["--no-stdin", "--socket", socket.to_str().unwrap()],
    );
    let _agent = tests::ChildGuard(
        h.command("agent", &args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_socket(&socket).await;
    let feeder = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || feed(&socket, 600, Duration::from_millis(5)))
    };
    wait_for(20, "some messages stored", || async {
        !hub.records_of("d1", 8).await.is_empty()
    })
    .await;
    hub.restart(&h); // kill -9, same ports
    let confirmed = feeder.await.unwrap();
    assert_eq!(confirmed.len(), 600);
    wait_for(60, "every message stored", || async {
        hub.records_of("d1", 8).await.len() >= 600
    })
    .await;
    assert_eq!(stored_once(&hub, "d1").await, (1..=600).collect::<Vec<_>>());
    assert_eq!(
        stored_payloads(&hub, "d1").await,
        (0..600).map(|i| format!("message {i}")).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_loses_no_confirmed_message() {
    let h = harness!("killing_the_agent_loses_no_confirmed_message");
    let (reg, hub, c) = fleet(&h, &["d1"]).await;
    let socket = h.dir().join("agent.sock");
    let outbox = h.dir().join("outbox");
    let args = h.agent_args(
        &c,
        "d1",
        &reg.key("d1"),
        outbox.to_str().unwrap(),
        &["--no-stdin", "--socket", socket.to_str().unwrap()],
    );
    let mut confirmed = Vec::new();
    for round in 0..3 {
        let mut agent = h
            .command(&format!("agent-{round}"), &args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_socket(&socket).await;
        let feeder = {
            let socket = socket.clone();
            tokio::task::spawn_blocking(move || feed(&socket, 100_000, Duration::ZERO))
        };
        tokio::time::sleep(Duration::from_millis(300 + 200 * round)).await;
        agent.kill().unwrap(); // SIGKILL in the middle of writes
        agent.wait().unwrap();
        confirmed.extend(feeder.await.unwrap());
    }
    assert!(confirmed.len() > 100, "only {} confirmed", confirmed.len());
    assert!(
        confirmed.windows(2).all(|w| w[0] < w[1]),
        "mids repeated after a restart"
    );
    // A last run delivers whatever the killed agents still held.
    let _agent = tests::ChildGuard(
        h.command("agent-last", &args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let last = *confirmed.last().unwrap();
    wait_for(60, "every confirmed message stored", || async {
        stored_once(&hub, "d1").await.last().copied().unwrap_or(0) >= last
    })
    .await;
    let stored = stored_once(&hub, "d1").await;
    let missing: Vec<u64> = confirmed
        .iter()
        .filter(|m| stored.binary_search(m).is_err())
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "confirmed but never delivered: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_active_hub_the_agent_long_polls_for_one_and_keeps_buffering() {
    let h = harness!("with_no_active_hub_the_agent_long_polls_for_one_and_keeps_buffering");
    let (reg, mut hub, c) = fleet(&h, &["d1"]).await;
    hub.node.kill9();
    wait_for(10, "no active hub", || async {
        reqwest::get(format!("{}/v1/devices/d1/endpoint", c.url()))
            .await
            .unwrap()
            .status()
            == 503
    })
    .await;
    let refusals = || {
        tests::http_get(&format!("{}/metrics", c.url()))
            .lines()
            .find_map(|l| {
                l.strip_prefix("fleet_concierge_endpoint_requests_total{result=\"no_active_hub\"} ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let before = refusals();
    let child = agent_with_lines(&h, &c, &reg, (1..=50).map(|i| format!("buffered {i}")));
    // Told there is no active hub, the agent long-polls for one (the
    // concierge answers the moment a hub is active) instead of sleeping
    // and asking again: each of its waits is a long poll that runs out.
    let log = h.logs().join("agent.log");
    let waits = || -> usize {
        strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default())
            .lines()
            .filter(|l| l.contains("no active hub: waiting for the next one"))
            .count()
    };
    wait_for(60, "the agent to wait for a hub twice", || async {
        waits() >= 2
    })
    .await;
    // Asked at most twice per wait (the answer that sent it waiting and the
    // long poll that ran out): no polling in between. Counted, not timed.
    let asked = refusals() - before;
    let waited = waits();
    assert!(
        asked <= 2.0 * waited as f64 + 1.0,
        "asked {asked} times for {waited} long polls"
    );
    hub.restart(&h);
    let out = finished(child).await;
    assert!(out.status.success());
    // The long poll in progress was answered: no "no active hub" answer
    // after the hub came back and before it connected.
    let text = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
    let connected = text.lines().position(|l| l.contains("connected")).unwrap();
    assert!(
        !text
            .lines()
            .skip(connected)
            .any(|l| l.contains("no active hub yet")),
        "{text}"
    );
    assert_eq!(stored_once(&hub, "d1").await, (1..=50).collect::<Vec<_>>());
    assert_eq!(
        stored_payloads(&hub, "d1").await,
        (1..=50)
            .map(|i| format!("buffered {i}"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_agent_backs_off_instead_of_storming() {
    let h = harness!("a_refused_agent_backs_off_instead_of_storming");
    let (_reg, hub, c) = fleet(&h, &["d1"]).await;
    let wrong = registry_sync::keys::generate().expose();
    let outbox = h.dir().join("outbox");
    let args = h.agent_args(&c, "d1", &wrong, outbox.to_str().unwrap(), &["--no-stdin"]);
    let _agent = tests::ChildGuard(
        h.command("agent", &args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Each refusal is followed by a wait under a ceiling that doubles from
    // 100 ms (full jitter: anywhere below it), as the agent logs it; and
    // the hub saw no attempt that did not wait. Counted, not timed.
    let log = h.logs().join("agent.log");
    let delays = || -> Vec<u64> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let plain = strip_ansi(&text);
        plain
            .lines()
            .filter(|l| l.contains("connect refused"))
            .filter_map(|l| {
                let v = l.split("retry_ms=").nth(1)?;
                v.split_whitespace().next()?.parse().ok()
            })
            .collect()
    };
    wait_for(60, "six refused connects", || async { delays().len() >= 6 }).await;
    let refused = hub
        .metric("fleet_hub_connects_total{result=\"bad_credentials\"}")
        .await as usize;
    let waits = delays();
    for (k, d) in waits.iter().enumerate() {
        let ceiling = (100u64 << k.min(20)).min(30_000);
        assert!(
            *d <= ceiling,
            "wait {k} was {d} ms, over its ceiling {ceiling}: {waits:?}"
        );
    }
    assert!(
        refused <= waits.len() + 1,
        "{refused} refused connects but only {} logged waits: retries without backing off",
        waits.len()
    );
}

/// Text without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_delivers_everything_and_reports_each_device() {
    let h = harness!("simulate_delivers_everything_and_reports_each_device");
    let ids: Vec<String> = (0..20).map(|i| format!("sim-{i:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (reg, hub, c) = fleet(&h, &refs).await;
    let keys = h.keys_file(&reg, &ids);
    let report = h.dir().join("report.ndjson");
    let summary = simulate_once(&h, &c, &keys, &report, "3").await;
    assert_eq!(summary["devices"], 20);
    let generated = summary["generated"].as_u64().unwrap();
    // 20 devices at 20 msg/s for 3 s generate about 1,200 messages; how many
    // exactly depends on the machine, what was generated is what counts.
    assert!(generated >= 20, "{summary}");
    assert_eq!(summary["acknowledged"], generated);
    assert_eq!(summary["in_outbox"], 0);
    assert_eq!(summary["dropped"], 0);
    let reports: Vec<serde_json::Value> = std::fs::read_to_string(&report)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 20);
    for r in &reports {
        let id = r["device_id"].as_str().unwrap();
        assert_eq!(r["acked"], r["last_mid"], "{r}");
        let stored = stored_once(&hub, id).await;
        assert_eq!(
            stored,
            (1..=r["last_mid"].as_u64().unwrap()).collect::<Vec<_>>(),
            "{id}"
        );
        let _ = partition_for(&fleet_api::DeviceId::new(id).unwrap(), 8);
    }
}

/// Runs `device-agent simulate` of `keys` at 20 msg/s for `secs` into
/// `report`, with the outboxes in the harness's `sim` directory.
async fn simulate_once(
    h: &tests::Harness,
    c: &ConciergeNode,
    keys: &std::path::Path,
    report: &std::path::Path,
    secs: &str,
) -> serde_json::Value {
    let args = h.simulate_args(c, keys, report, "20", secs, &[]);
    let out = tokio::task::spawn_blocking({
        let mut cmd = h.command("simulate", &args);
        move || cmd.output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn report_lines(path: &std::path::Path) -> HashMap<String, serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["device_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_outbox_was_wiped_numbers_above_what_the_hub_has() {
    let h = harness!("a_device_whose_outbox_was_wiped_numbers_above_what_the_hub_has");
    let ids: Vec<String> = (0..3).map(|i| format!("wiped-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (reg, hub, c) = fleet(&h, &refs).await;
    let keys = h.keys_file(&reg, &ids);
    let (first, second) = (h.dir().join("first.ndjson"), h.dir().join("second.ndjson"));
    let s1 = simulate_once(&h, &c, &keys, &first, "2").await;
    assert_eq!(s1["in_outbox"], 0, "{s1}");
    // The devices are reflashed: their outboxes (and numbering) are gone.
    std::fs::remove_dir_all(h.dir().join("sim")).unwrap();
    let s2 = simulate_once(&h, &c, &keys, &second, "2").await;
    assert_eq!(s2["in_outbox"], 0, "{s2}");
    let (r1, r2) = (report_lines(&first), report_lines(&second));
    for id in &ids {
        let last1 = r1[id]["last_mid"].as_u64().unwrap();
        let (from2, last2) = (
            r2[id]["first_mid"].as_u64().unwrap(),
            r2[id]["last_mid"].as_u64().unwrap(),
        );
        assert!(last1 > 0 && last2 > from2, "{id}: {} {}", r1[id], r2[id]);
        // Without this, the second life restarted at mid 1: every message
        // was acknowledged as a duplicate and never stored.
        assert_eq!(from2, last1 + 1, "{id} numbers above its first life");
        assert_eq!(r2[id]["acked"], r2[id]["last_mid"]);
        assert_eq!(
            stored_once(&hub, id).await,
            (1..=last2).collect::<Vec<_>>(),
            "{id}: both lives stored in full"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_state_stops_the_agent_until_it_is_reset() {
    let h = harness!("an_unreadable_outbox_state_stops_the_agent_until_it_is_reset");
    let (reg, hub, c) = fleet(&h, &["d1"]).await;
    let out = finished(agent_with_lines(
        &h,
        &c,
        &reg,
        (1..=3).map(|i| format!("first {i}")),
    ))
    .await;
    assert!(out.status.success());
    assert_eq!(stored_once(&hub, "d1").await, vec![1, 2, 3]);
    assert_eq!(
        stored_payloads(&hub, "d1").await,
        ["first 1", "first 2", "first 3"]
    );
    let outbox = h.dir().join("outbox");
    let state = outbox.join("state.json");
    std::fs::write(&state, b"{\"acked\": 3, \"flo").unwrap();
    let run = |extra: &[&str]| {
        let mut flags = vec!["--exit-when-drained"];
        flags.extend_from_slice(extra);
        let args = h.agent_args(&c, "d1", &reg.key("d1"), outbox.to_str().unwrap(), &flags);
        let mut child = h
            .command("agent-again", &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "second 1").unwrap();
        writeln!(stdin, "second 2").unwrap();
        child
    };
    let refused = finished(run(&[])).await;
    assert!(
        !refused.status.success(),
        "an unreadable state was taken for empty"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&state.display().to_string()) && err.contains("--reset-state"),
        "{err}"
    );
    assert_eq!(stored_once(&hub, "d1").await, vec![1, 2, 3], "nothing sent");
    let reset = finished(run(&["--reset-state"])).await;
    assert!(reset.status.success());
    // Numbered above the hub's 3. What the outbox still held of its first
    // life is sent again under new mids (its acknowledgement state was what
    // got lost): duplicated content, nothing lost, nothing swallowed.
    let stored = stored_once(&hub, "d1").await;
    assert!(stored.len() >= 5, "{stored:?}");
    assert_eq!(stored, (1..=stored.len() as u64).collect::<Vec<_>>());
    let payloads: Vec<Vec<u8>> = hub
        .records_of("d1", 8)
        .await
        .into_iter()
        .map(|r| r.payload)
        .collect();
    let n = payloads.len();
    assert_eq!(
        &payloads[n - 2..],
        &[b"second 1".to_vec(), b"second 2".to_vec()]
    );
    assert!(payloads[3..n - 2].iter().all(|p| p.starts_with(b"first ")));
}
