//! A failover checks what it claims to, and says so in its answer: the
//! target's health, the replication lag, and that the target region's
//! registry holds the source's identities (planned: waited for, bounded;
//! forced: reported).

use fleet_api::concierge::FailoverResponse;
use fleet_api::hub::StatusResponse;
use tests::load::{admin_post as post, registries, status};
use tests::{HubNode, harness, wait_for};

async fn registry_version(hub: &HubNode) -> u64 {
    let s: StatusResponse = status(hub).await;
    s.registry
        .expect("the hub reports its registry")
        .max_version
        .0
}

fn check<'a>(done: &'a FailoverResponse, name: &str) -> &'a fleet_api::concierge::FailoverCheck {
    done.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} check in {done:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_check_health_lag_and_identities_and_report_it() {
    let h = harness!("failovers_check_health_lag_and_identities_and_report_it");
    let (mut ra, mut rb) = registries(&h, &["d1"]).await;
    let (a, mut b) = h.pair(("a", &ra), ("b", &rb), None, &[]);
    let c = h.concierge(
        "concierge",
        "127.0.0.1:0",
        &[("a", &a), ("b", &b)],
        &["--registry-wait-s", "2"],
    );
    // Hubs report their registry.
    let s = status(&a).await.registry.expect("registry in /v1/status");
    assert_eq!(s.devices, 1);
    assert_eq!(registry_version(&b).await, s.max_version.0);

    // A device registered in region a only: a planned failover to b waits,
    // then refuses, naming the registry, even though b has a later write of
    // its own (a higher version alone proves nothing).
    ra.add(&["d2"]).await;
    wait_for(10, "hub a to see the new device", || async {
        status(&a).await.registry.is_some_and(|r| r.devices == 2)
    })
    .await;
    rb.add(&["d9"]).await;
    wait_for(10, "hub b to see its own new device", || async {
        status(&b).await.registry.is_some_and(|r| r.devices == 2)
    })
    .await;
    assert!(registry_version(&b).await > registry_version(&a).await);
    let r = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "planned"}),
    )
    .await;
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert!(code >= 400, "{code}: {text}");
    assert!(text.contains("registry of b is behind"), "{text}");
    assert_eq!(
        status(&a).await.role,
        fleet_api::Role::Primary,
        "nothing was promoted"
    );

    // Once registry-sync merged, the planned failover goes ahead and says
    // what it checked.
    ra.mirror_into(&mut rb).await;
    let r = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "planned"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let done: FailoverResponse = r.json().await.unwrap();
    assert!(check(&done, "target_healthy").passed, "{done:?}");
    assert!(check(&done, "replication_lag").passed, "{done:?}");
    let reg = check(&done, "registry");
    assert!(reg.passed, "{done:?}");
    assert!(reg.detail.contains("2 devices"), "{}", reg.detail);

    // A device only in b, and b is lost: the forced failover to a goes
    // ahead and reports the divergence.
    rb.add(&["d3"]).await;
    wait_for(10, "hub b to see the new device", || async {
        status(&b).await.registry.is_some_and(|r| r.devices == 4)
    })
    .await;
    // The concierge's view must have caught b's registry before b dies:
    // wait for a poll of b that came after b counted the new device.
    let counted = tokio::time::Instant::now();
    let regions_url = format!("{}/v1/regions", c.url());
    wait_for(10, "the concierge to poll b again", || {
        let url = regions_url.clone();
        async move {
            let since = counted.elapsed().as_millis() as u64;
            let view: fleet_api::concierge::RegionsResponse =
                reqwest::get(url).await.unwrap().json().await.unwrap();
            view.regions.iter().any(|r| {
                r.region.as_str() == "b" && r.last_seen_ms_ago.is_some_and(|ago| ago < since)
            })
        }
    })
    .await;
    b.node.kill9();
    let r = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "a", "mode": "forced"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let done: FailoverResponse = r.json().await.unwrap();
    assert!(check(&done, "target_healthy").passed);
    let reg = check(&done, "registry");
    assert!(!reg.passed, "{done:?}");
    assert!(
        reg.detail.contains("refused until registry-sync merges"),
        "{}",
        reg.detail
    );

    // A failover to a hub that is down is refused before anything happens.
    let r = post(
        format!("{}/v1/failover", c.url()),
        serde_json::json!({"to": "b", "mode": "forced"}),
    )
    .await;
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert!(code >= 400, "{code}: {text}");
    assert!(text.contains("does not count as healthy"), "{text}");
}
