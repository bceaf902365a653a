//! `follow` against a source whose change sequence was tampered with.

mod common;

use std::time::Duration;

use common::*;
use registry_sync::ops::{self, FollowOptions};

/// Follows `from` into `into` for `secs` seconds; returns the last status.
async fn follow_for(from: &Fixture, into: &Fixture, secs: u64) -> Option<ops::FollowStatus> {
    let mut last = None;
    let options = FollowOptions {
        interval: Duration::from_millis(50),
        retry: Duration::from_millis(50),
    };
    ops::follow(
        &*from.store,
        &*into.store,
        options,
        tokio::time::sleep(Duration::from_secs(secs)),
        |s| last = Some(*s),
    )
    .await
    .expect("follow stays up");
    last
}

#[tokio::test]
async fn a_change_numbered_beyond_the_sources_sequence_cannot_silence_follow() {
    let a = fixture(Kind::Sqlite, None).await;
    let b = fixture(Kind::Sqlite, None).await;
    a.store.claim_region(&region("a")).await.unwrap();
    b.store.claim_region(&region("b")).await.unwrap();
    a.store
        .create(vec![new_device("d1", 1), new_device("d2", 2)])
        .await
        .unwrap();
    // Forge d2's change number far beyond the source's own sequence.
    let pool = sqlx::SqlitePool::connect(&a.url).await.unwrap();
    sqlx::query("UPDATE devices SET seq = 9223372036854775807 WHERE device_id = 'd2'")
        .execute(&pool)
        .await
        .unwrap();
    follow_for(&a, &b, 1).await;
    assert_eq!(
        b.store
            .follow_watermark(&a.store.store_id().await.unwrap())
            .await
            .unwrap()
            .0,
        0,
        "the watermark jumped past everything the source will write"
    );
    // Once the row is repaired, follow goes on, and later changes arrive.
    sqlx::query("UPDATE devices SET seq = 2 WHERE device_id = 'd2'")
        .execute(&pool)
        .await
        .unwrap();
    a.store.create(vec![new_device("d3", 3)]).await.unwrap();
    let last = follow_for(&a, &b, 1).await.expect("a round");
    assert_eq!(last.lag, 0);
    assert_eq!(all(&*a.store).await, all(&*b.store).await);
}
