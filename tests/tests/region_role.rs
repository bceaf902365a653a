//! Regions of several hubs on one JetStream log each: the region's role and
//! epoch are one value every hub of it follows (real hubs, real
//! nats-server clusters, real HTTP).

use fleet::up::{Fleet, Launcher, UpOptions};
use fleet_api::concierge::{Mode, PromoteRequest};
use fleet_api::hub::StatusResponse;
use fleet_api::{Epoch, Role};

async fn status(url: &str) -> Option<StatusResponse> {
    reqwest::get(format!("{url}/v1/status"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// A fence of region a (two hubs) stops and frees both hubs, however often
/// and through whichever hub. Then two hubs of region b promoted at the same
/// moment with the same expected epoch: exactly one wins, and afterwards
/// every hub of b is primary at the new epoch and every hub of a secondary
/// at it (none left behind in the old role).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_of_a_region_promoted_at_once_have_one_winner_and_move_together() {
    let h = tests::harness!("two_hubs_of_a_region_promoted_at_once");
    let mut opts = UpOptions::new(h.logs().join("run"));
    opts.jetstream = true;
    opts.hubs_per_region = 2;
    opts.replication = "sync".into();
    let launcher = Launcher {
        exe: env!("CARGO_BIN_EXE_fleet-node").into(),
    };
    let fleet = Fleet::up(launcher, opts).await.expect("the fleet starts");
    let a = fleet.regions[0].http_urls();
    let b = fleet.regions[1].http_urls();
    assert_eq!((a.len(), b.len()), (2, 2));
    for url in a.iter().chain(&b) {
        let s = status(url).await.expect("every hub answers");
        assert_eq!(s.epoch, Epoch(1), "{url}");
    }
    let http = reqwest::Client::new();
    // A fence given to one hub of a stops both, an unfence frees both, and
    // a second fence for the same epoch (through the other hub) stops both
    // again: an earlier fence's answers never count for a later one.
    let fenced_everywhere = |want: bool| {
        let a = a.clone();
        async move {
            for url in &a {
                if status(url).await.is_none_or(|s| s.fenced != want) {
                    return false;
                }
            }
            true
        }
    };
    for (fence_at, unfence_at) in [(&a[0], &a[0]), (&a[1], &a[0]), (&a[0], &a[1])] {
        let r = http
            .post(format!("{fence_at}/v1/fence"))
            .bearer_auth(fleet.admin_token.expose())
            .json(&serde_json::json!({"epoch": 2}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        let f: fleet_api::hub::FenceResponse = r.json().await.unwrap();
        assert_eq!(f.high_watermarks.len(), 8);
        tests::wait_for(10, "both hubs of a fenced", || fenced_everywhere(true)).await;
        let r = http
            .post(format!("{unfence_at}/v1/unfence"))
            .bearer_auth(fleet.admin_token.expose())
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        tests::wait_for(10, "both hubs of a unfenced", || fenced_everywhere(false)).await;
    }
    let promote = |url: String| {
        let http = http.clone();
        let token = fleet.admin_token.expose().to_string();
        async move {
            http.post(format!("{url}/v1/promote"))
                .bearer_auth(token)
                .json(&PromoteRequest {
                    expected_epoch: Epoch(1),
                    mode: Mode::Forced,
                })
                .send()
                .await
                .expect("the hub answers")
                .status()
        }
    };
    let (first, second) = tokio::join!(promote(b[0].clone()), promote(b[1].clone()));
    let won = [first, second].iter().filter(|s| s.is_success()).count();
    assert_eq!(won, 1, "one winner: {first} and {second}");
    let loser = if first.is_success() { second } else { first };
    assert_eq!(
        loser,
        reqwest::StatusCode::CONFLICT,
        "the other lost the race"
    );
    tests::wait_for(
        20,
        "every hub of b primary and of a secondary at epoch 2",
        || {
            let (a, b) = (a.clone(), b.clone());
            async move {
                for (urls, role) in [(&a, Role::Secondary), (&b, Role::Primary)] {
                    for url in urls {
                        if !status(url)
                            .await
                            .is_some_and(|s| s.role == role && s.epoch == Epoch(2))
                        {
                            return false;
                        }
                    }
                }
                true
            }
        },
    )
    .await;
    // A second promotion at the old epoch is refused by either hub of b.
    for url in &b {
        assert_eq!(promote(url.clone()).await, reqwest::StatusCode::CONFLICT);
    }
    fleet.down().await;
}
