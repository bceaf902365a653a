//! The concierge and its DNS front against real hub processes, `dig` and
//! hickory's resolver.

use std::net::{IpAddr, SocketAddr};

use fleet_api::concierge::{EndpointResponse, RegionsResponse};
use tests::{HubNode, Registry, harness, wait_for};

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .send()
        .await
        .expect("http get")
}

async fn one_hub(h: &tests::Harness) -> HubNode {
    let reg = Registry::sqlite(h.dir(), "eu").await;
    h.hub("hub-eu", "eu", &reg.url, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_follows_the_active_hub_and_says_when_there_is_none() {
    let h = harness!("the_endpoint_follows_the_active_hub_and_says_when_there_is_none");
    let mut hub = one_hub(&h).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let url = format!("{}/v1/devices/sensor-1/endpoint", c.url());
    wait_for(10, "the hub to be active", || async {
        get(&url).await.status() == 200
    })
    .await;
    let e: EndpointResponse = get(&url).await.json().await.unwrap();
    assert_eq!(e.device_id.as_str(), "sensor-1");
    assert_eq!(e.region.as_str(), "eu");
    assert_eq!(e.mqtt_url, format!("mqtt://{}", hub.mqtt));
    assert_eq!(e.epoch.0, 1);
    assert_eq!(e.ttl_s, 5);
    let bad = get(&format!("{}/v1/devices/a%2Fb/endpoint", c.url())).await;
    assert_eq!(bad.status(), 400);
    // Written on the socket: URL libraries fold `%2E` segments away.
    for id in ["%2E", "%2E%2E", "%2e%2e"] {
        let status = tests::raw_status(
            c.http,
            &format!(
                "GET /v1/devices/{id}/endpoint HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, 400, "{id}");
    }

    hub.node.kill9();
    wait_for(10, "the concierge to notice", || async {
        get(&url).await.status() == 503
    })
    .await;
    let r = get(&url).await;
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Not pacing: a device that knows its last epoch long-polls instead.
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_active_hub", "{body}");
    let regions: RegionsResponse = get(&format!("{}/v1/regions", c.url()))
        .await
        .json()
        .await
        .unwrap();
    assert!(!regions.regions[0].healthy);
    assert!(
        regions.regions[0]
            .problem
            .as_deref()
            .unwrap_or("")
            .contains("unreachable")
    );

    hub.restart(&h);
    wait_for(10, "the hub to be back", || async {
        get(&url).await.status() == 200
    })
    .await;
    let regions: RegionsResponse = get(&format!("{}/v1/regions", c.url()))
        .await
        .json()
        .await
        .unwrap();
    let eu = &regions.regions[0];
    assert!(eu.healthy && eu.active);
    assert_eq!(eu.role, Some(fleet_api::Role::Primary));
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (scripts/services.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_front_is_authoritative_for_its_zone_only() {
    let h = harness!("the_dns_front_is_authoritative_for_its_zone_only");
    let hub = one_hub(&h).await;
    let c = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("eu", &hub)],
        &["--ttl-s", "7"],
    );
    let answer = dig(c.dns, &["concierge.fleet.test", "A"]);
    assert!(answer.contains("status: NOERROR"), "{answer}");
    assert!(answer.contains(" aa"), "authoritative: {answer}");
    assert!(!answer.contains(" ra"), "never recursive: {answer}");
    assert!(
        answer.contains("concierge.fleet.test.\t7\tIN\tA\t127.0.0.1"),
        "{answer}"
    );
    let tcp = dig(c.dns, &["+tcp", "CONCIERGE.Fleet.Test", "A", "+short"]);
    assert_eq!(tcp.trim(), "127.0.0.1", "over TCP, any case");
    let nx = dig(c.dns, &["nope.fleet.test", "A"]);
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("IN\tSOA\tns.fleet.test."),
        "{nx}"
    );
    let refused = dig(c.dns, &["example.com", "A"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let soa = dig(c.dns, &["fleet.test", "SOA", "+short"]);
    assert!(
        soa.starts_with("ns.fleet.test. hostmaster.fleet.test. 1"),
        "{soa}"
    );
    let ns = dig(c.dns, &["fleet.test", "NS", "+short"]);
    assert_eq!(ns.trim(), "ns.fleet.test.");
    let nodata = dig(c.dns, &["concierge.fleet.test", "AAAA"]);
    assert!(
        nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
        "{nodata}"
    );
    // Without EDNS (as most stub resolvers ask), the same answers, served
    // again from the fast path: the client's spelling and id each time,
    // the RD bit echoed.
    for (spelling, rd) in [
        ("concierge.fleet.test", "+rec"),
        ("CoNcIeRgE.fleet.TEST", "+norec"),
        ("concierge.FLEET.test", "+rec"),
    ] {
        let plain = dig(c.dns, &["+noedns", rd, spelling, "A"]);
        assert!(plain.contains("status: NOERROR"), "{plain}");
        assert!(
            plain.contains(&format!("{spelling}.\t7\tIN\tA\t127.0.0.1")),
            "{plain}"
        );
        assert_eq!(plain.contains(" rd"), rd == "+rec", "{plain}");
        assert!(!plain.contains("OPT PSEUDOSECTION"), "{plain}");
    }
    let nx = dig(c.dns, &["+noedns", "Nope.fleet.test", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");

    // The same through hickory's resolver, pinned to the front.
    use hickory_resolver::Resolver;
    use hickory_resolver::config::{
        ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
    };
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let mut udp = ConnectionConfig::udp();
    udp.port = c.dns.port();
    let ns = NameServerConfig::new(c.dns.ip(), true, vec![udp]);
    let mut opts = ResolverOpts::default();
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = 0;
    let r = Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .unwrap();
    let ips: Vec<IpAddr> = r
        .lookup_ip("concierge.fleet.test.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert_eq!(ips, vec![IpAddr::from([127, 0, 0, 1])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_many_clients_is_answered_each_to_its_own() {
    let h = harness!("a_burst_from_many_clients_is_answered_each_to_its_own");
    let hub = one_hub(&h).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    // The first answer fills the fast path's cache.
    let first = dig(c.dns, &["+noedns", "concierge.fleet.test", "A"]);
    assert!(first.contains("status: NOERROR"), "{first}");
    // Every client sends all its queries before reading: the front finds
    // them queued together, reads them in batches and answers each batch
    // to several clients at once.
    const CLIENTS: u16 = 8;
    const EACH: u16 = 16;
    let mut sockets = Vec::new();
    for _ in 0..CLIENTS {
        sockets.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    let spelling = |id: u16| {
        let name: String = "concierge.fleet.test"
            .chars()
            .enumerate()
            .map(|(i, ch)| {
                if (usize::from(id) >> (i % 16)) & 1 == 1 {
                    ch.to_ascii_uppercase()
                } else {
                    ch
                }
            })
            .collect();
        name
    };
    for (k, s) in (0..CLIENTS).zip(&sockets) {
        for i in 0..EACH {
            let id = k * 1000 + i;
            s.send_to(&tests::dns::query(&spelling(id), id, 1), c.dns)
                .await
                .unwrap();
        }
    }
    for (k, s) in (0..CLIENTS).zip(&sockets) {
        let mut seen = std::collections::BTreeSet::new();
        let mut buf = [0u8; 1500];
        while seen.len() < usize::from(EACH) {
            let (n, from) =
                tokio::time::timeout(std::time::Duration::from_secs(5), s.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("client {k}: only {} of {EACH} answers came", seen.len())
                    })
                    .unwrap();
            assert_eq!(from, c.dns);
            let answer = &buf[..n];
            let id = u16::from_be_bytes([answer[0], answer[1]]);
            assert!(
                id / 1000 == k && id % 1000 < EACH,
                "client {k} got the answer to id {id}"
            );
            assert!(seen.insert(id), "client {k}: id {id} answered twice");
            assert_eq!(answer[2] & 0x81, 0x81, "a response with RD echoed");
            assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
            let asked = tests::dns::query(&spelling(id), id, 1);
            assert_eq!(
                &answer[12..asked.len()],
                &asked[12..],
                "the client's spelling"
            );
            assert_eq!(&answer[n - 4..], &[127, 0, 0, 1], "the hub's address");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_replica_leaves_the_answers() {
    let h = harness!("an_unhealthy_replica_leaves_the_answers");
    let hub = one_hub(&h).await;
    // Two replicas on the same port of two loopback addresses.
    let port = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (a, b) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let replicas = ["--replica", &a, "--replica", &b];
    let first = h.concierge("concierge-1", &a, &[("eu", &hub)], &replicas);
    let mut second = h.concierge("concierge-2", &b, &[("eu", &hub)], &replicas);
    let both = || dig(first.dns, &["concierge.fleet.test", "A", "+short"]);
    wait_for(10, "both replicas in the answer", || async {
        both() == "127.0.0.1\n127.0.0.2\n"
    })
    .await;
    // Either replica's front gives the same answer.
    assert_eq!(
        dig(second.dns, &["concierge.fleet.test", "A", "+short"]),
        "127.0.0.1\n127.0.0.2\n"
    );
    second.node.kill9();
    wait_for(5, "the dead replica to leave", || async {
        both() == "127.0.0.1\n"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_and_floods_do_not_hurt_the_front_or_the_api() {
    let h = harness!("malformed_packets_and_floods_do_not_hurt_the_front_or_the_api");
    let hub = one_hub(&h).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u32 {
        let junk: Vec<u8> = (0..(i % 300))
            .map(|j| (i.wrapping_mul(31).wrapping_add(j) % 251) as u8)
            .collect();
        sock.send_to(&junk, c.dns).await.unwrap();
    }
    // A flood of real queries while the HTTP side keeps answering.
    let flood = tokio::spawn({
        let dns = c.dns;
        async move {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            // A well-formed query for concierge.fleet.test A.
            let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in ["concierge", "fleet", "test"] {
                q.push(label.len() as u8);
                q.extend_from_slice(label.as_bytes());
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            for _ in 0..20_000 {
                let _ = s.send_to(&q, dns).await;
            }
        }
    });
    let url = format!("{}/v1/devices/d/endpoint", c.url());
    let mut ok = 0;
    for _ in 0..50 {
        if get(&url).await.status() == 200 {
            ok += 1;
        }
    }
    flood.await.unwrap();
    assert_eq!(ok, 50, "the endpoint failed during the flood");
    assert_eq!(
        dig(c.dns, &["concierge.fleet.test", "A", "+short"]),
        "127.0.0.1\n",
        "the front stopped answering"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_pacing_spreads_a_storm() {
    let h = harness!("reconnect_pacing_spreads_a_storm");
    let hub = one_hub(&h).await;
    let c = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("eu", &hub)],
        // The storm's 200 devices all ask from this one address.
        &["--connect-rate", "20", "--lookups-per-source", "100000"],
    );
    let url = format!("{}/v1/devices/d/endpoint", c.url());
    wait_for(10, "an active hub", || async {
        get(&url).await.status() == 200
    })
    .await;
    let client = reqwest::Client::new();
    let started = tokio::time::Instant::now();
    let answers = futures::future::join_all((0..200).map(|i| {
        let client = client.clone();
        let url = format!("{}/v1/devices/storm-{i}/endpoint", c.url());
        async move { client.get(url).send().await.unwrap() }
    }))
    .await;
    let took = started.elapsed();
    // Every device is answered, with its own start: the 200 slots of 20/s
    // reach ~10 s out, less what the storm itself took to arrive.
    let mut starts = Vec::new();
    let mut latest = (0, 0);
    for (i, r) in answers.into_iter().enumerate() {
        assert_eq!(r.status(), 200);
        let e: EndpointResponse = r.json().await.unwrap();
        starts.push(e.start_in_ms);
        if e.start_in_ms >= latest.1 {
            latest = (i, e.start_in_ms);
        }
    }
    starts.sort_unstable();
    let now = starts.iter().filter(|s| **s == 0).count();
    let drained = (20.0 * took.as_secs_f64()).ceil() as usize;
    assert!(
        now <= 1 + drained,
        "{now} told to connect at once ({drained} slots passed during the storm)"
    );
    let last = *starts.last().unwrap();
    assert!(
        last + took.as_millis() as u64 >= 9_900 && last <= 10_000,
        "the last slot is {last} ms out"
    );
    let distinct: std::collections::BTreeSet<u64> = starts.iter().copied().collect();
    assert!(
        distinct.len() >= 190,
        "devices are spread over time, not sent together: {} distinct starts",
        distinct.len()
    );
    // Asking again keeps a device's slot (it does not take a new one
    // further out), and a refresh from where the device already is takes
    // none at all.
    let asked_again = tokio::time::Instant::now();
    let again = |q: &'static str| {
        let url = format!("{}/v1/devices/storm-{}/endpoint{q}", c.url(), latest.0);
        async move {
            let e: EndpointResponse = get(&url).await.json().await.unwrap();
            e.start_in_ms
        }
    };
    let first = again("").await;
    let waited = (asked_again.elapsed() + took).as_millis() as u64;
    assert!(first <= last, "{first} > {last}");
    assert!(
        first + waited + 100 >= last,
        "storm-{} lost its slot: {first} ms now, {last} ms then",
        latest.0
    );
    assert_eq!(again("?connected_to=eu").await, 0);
    let next: EndpointResponse = get(&format!("{}/v1/devices/late/endpoint", c.url()))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        next.start_in_ms + (asked_again.elapsed() + took).as_millis() as u64 + 100 >= last,
        "a new device goes after the storm ({} ms, last {last} ms)",
        next.start_in_ms
    );
}

/// Validates `value` against `#/components/schemas/NAME` of the OpenAPI document.
fn validate(doc: &serde_json::Value, name: &str, value: &serde_json::Value) {
    let schema = serde_json::json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": doc["components"],
    });
    let validator =
        jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("schema {name}: {e}"));
    if let Err(e) = validator.validate(value) {
        panic!("{name} does not match /openapi.json: {e}\n{value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_the_real_responses() {
    let h = harness!("openapi_describes_the_real_responses");
    let mut hub = one_hub(&h).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    let doc: serde_json::Value = get(&format!("{}/openapi.json", c.url()))
        .await
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/devices/{device_id}/endpoint",
        "/v1/regions",
        "/v1/failover",
        "/healthz",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    let url = format!("{}/v1/devices/d1/endpoint", c.url());
    wait_for(10, "an active hub", || async {
        get(&url).await.status() == 200
    })
    .await;
    validate(
        &doc,
        "EndpointResponse",
        &get(&url).await.json().await.unwrap(),
    );
    validate(
        &doc,
        "RegionsResponse",
        &get(&format!("{}/v1/regions", c.url()))
            .await
            .json()
            .await
            .unwrap(),
    );
    validate(
        &doc,
        "ErrorBody",
        &get(&format!("{}/v1/devices/a%20b/endpoint", c.url()))
            .await
            .json()
            .await
            .unwrap(),
    );
    let unauthorized = reqwest::Client::new()
        .post(format!("{}/v1/failover", c.url()))
        .json(&serde_json::json!({"to": "eu", "mode": "forced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    validate(&doc, "ErrorBody", &unauthorized.json().await.unwrap());
    let unknown = reqwest::Client::new()
        .post(format!("{}/v1/failover", c.url()))
        .bearer_auth(tests::ADMIN_TOKEN)
        .json(&serde_json::json!({"to": "mars", "mode": "forced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["message"], "unknown region mars");
    validate(&doc, "ErrorBody", &body);
    hub.node.kill9();
    wait_for(10, "no active hub", || async {
        get(&url).await.status() == 503
    })
    .await;
    validate(&doc, "ErrorBody", &get(&url).await.json().await.unwrap());
    validate(
        &doc,
        "RegionsResponse",
        &get(&format!("{}/v1/regions", c.url()))
            .await
            .json()
            .await
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_a_browser() {
    let h = harness!("the_status_page_renders_in_a_browser");
    let hub = one_hub(&h).await;
    let c = h.concierge("concierge", "127.0.0.1:0", &[("eu", &hub)], &[]);
    wait_for(10, "an active hub", || async {
        get(&format!("{}/v1/devices/d/endpoint", c.url()))
            .await
            .status()
            == 200
    })
    .await;
    let profile = h.dir().join("chromium-profile");
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            &format!("{}/", c.url()),
        ])
        .output()
        .await
        .expect("chromium (scripts/services.sh installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("Fleet concierge · fleet.test"), "{dom}");
    assert!(
        dom.contains(r#"<strong id="active-region">eu</strong>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"class="card healthy active" data-region="eu""#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<span class="badge primary">primary</span>"#),
        "{dom}"
    );
    assert!(dom.contains("no failover yet"), "{dom}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_lookup_can_wait_for_the_next_epoch() {
    let h = harness!("an_endpoint_lookup_can_wait_for_the_next_epoch");
    let (ra, rb) = tests::load::registries(&h, &["d1"]).await;
    let (a, b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    let c = h.concierge("concierge", "127.0.0.1:0", &[("a", &a), ("b", &b)], &[]);
    let url = |q: &str| format!("{}/v1/devices/d1/endpoint{q}", c.url());
    wait_for(10, "a to be active", || async {
        get(&url("")).await.status() == 200
    })
    .await;
    // Above epoch 0: a (epoch 1) answers at once.
    let now: EndpointResponse = get(&url("?wait_for_epoch=0")).await.json().await.unwrap();
    assert_eq!((now.region.as_str(), now.epoch.0), ("a", 1));
    // Above epoch 1: nothing yet; after wait_s, 503 saying so.
    let none = get(&url("?wait_for_epoch=1&wait_s=1")).await;
    assert_eq!(none.status(), 503);
    assert!(none.headers().contains_key("retry-after"));
    let text = none.text().await.unwrap();
    assert!(text.contains("above epoch 1"), "{text}");
    // A device waiting for the next epoch is answered with b once it is
    // promoted, without asking again.
    let waiting = tokio::spawn({
        let url = url("?wait_for_epoch=1&wait_s=30");
        async move { get(&url).await }
    });
    let r = tests::load::admin_post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "forced"}),
    )
    .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status(), 200);
    let next: EndpointResponse = answer.json().await.unwrap();
    assert_eq!(next.region.as_str(), "b");
    assert!(next.epoch.0 >= 2);
    // A bad query is a client error.
    assert_eq!(get(&url("?wait_for_epoch=soon")).await.status(), 400);
}
