//! The registry store contract, run against SQLite and PostgreSQL alike
//! (quickwit's metastore test-suite pattern): every backend must pass every test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use fleet_api::{DeviceRecord, DeviceStatus, Tags, Version};
use registry_sync::store::{Patch, Seq};
use registry_sync::{AuthOutcome, Outcome, RegistryError, RegistryStore};

async fn creates_and_reads_back(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("eu")).await.unwrap();
    let created = s.create(vec![new_device("d1", 1)]).await.unwrap();
    let got = s.get(&id("d1")).await.unwrap().unwrap();
    assert_eq!(created, vec![got.clone()]);
    assert_eq!(got.origin, region("eu"));
    assert_eq!(got.status, DeviceStatus::Enabled);
    assert!(got.version > Version(0));
    assert!(got.key_sha256.matches(&key(1)));
    assert_eq!(got.tags.to_map()["name"], "d1");
    assert!(!got.deleted);
    assert_eq!(s.get(&id("nope")).await.unwrap(), None);
}

async fn writes_need_a_region_and_keep_it(s: Arc<dyn RegistryStore>) {
    assert!(matches!(
        s.create(vec![new_device("d1", 1)]).await,
        Err(RegistryError::NoRegion)
    ));
    assert_eq!(s.region().await.unwrap(), None);
    s.claim_region(&region("a")).await.unwrap();
    s.claim_region(&region("a")).await.unwrap();
    let err = s.claim_region(&region("b")).await.unwrap_err();
    assert_eq!(err.to_string(), "this registry belongs to region a, not b");
}

async fn create_is_all_or_nothing(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    s.create(vec![new_device("a", 1), new_device("b", 2)])
        .await
        .unwrap();
    let err = s
        .create(vec![new_device("c", 3), new_device("a", 4)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::AlreadyExists(ref d) if d.as_str() == "a"),
        "{err}"
    );
    assert_eq!(
        s.get(&id("c")).await.unwrap(),
        None,
        "c must not be created"
    );
    let err = s
        .create(vec![new_device("x", 3), new_device("x", 4)])
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::AlreadyExists(_)));
    assert_eq!(s.counts().await.unwrap().devices, 2);
}

async fn verify_tells_every_case_apart(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    s.create(vec![new_device("d", 1)]).await.unwrap();
    assert_eq!(
        s.verify(&id("d"), &key(1)).await.unwrap(),
        AuthOutcome::Enabled
    );
    assert_eq!(
        s.verify(&id("d"), &key(2)).await.unwrap(),
        AuthOutcome::WrongKey
    );
    assert_eq!(
        s.verify(&id("x"), &key(1)).await.unwrap(),
        AuthOutcome::Unknown
    );
    let patch = Patch {
        status: Some(DeviceStatus::Disabled),
        ..Patch::default()
    };
    s.update(&id("d"), patch).await.unwrap();
    assert_eq!(
        s.verify(&id("d"), &key(1)).await.unwrap(),
        AuthOutcome::Disabled
    );
    // A wrong key on a disabled device is still a wrong key (no status leak).
    assert_eq!(
        s.verify(&id("d"), &key(2)).await.unwrap(),
        AuthOutcome::WrongKey
    );
    s.remove(&id("d")).await.unwrap();
    assert_eq!(
        s.verify(&id("d"), &key(1)).await.unwrap(),
        AuthOutcome::Unknown
    );
}

async fn updates_take_a_new_version(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    let v0 = s.create(vec![new_device("d", 1)]).await.unwrap()[0].clone();
    let v1 = s
        .update(
            &id("d"),
            Patch {
                tags: Some(Tags::parse(r#"{"floor":3}"#).unwrap()),
                key_sha256: Some(key(9).hash()),
                ..Patch::default()
            },
        )
        .await
        .unwrap();
    assert!(v1.version > v0.version);
    assert!(v1.updated_at >= v0.updated_at);
    assert_eq!(v1.created_at, v0.created_at);
    assert_eq!(v1.tags.to_map()["floor"], 3);
    assert_eq!(
        s.verify(&id("d"), &key(9)).await.unwrap(),
        AuthOutcome::Enabled
    );
    assert_eq!(s.get(&id("d")).await.unwrap().unwrap(), v1);
    assert!(matches!(
        s.update(&id("ghost"), Patch::default()).await,
        Err(RegistryError::NotFound(_))
    ));
}

async fn removal_leaves_a_tombstone_and_allows_recreation(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    s.create(vec![new_device("d", 1)]).await.unwrap();
    let tomb = s.remove(&id("d")).await.unwrap();
    assert!(tomb.deleted);
    assert_eq!(s.get(&id("d")).await.unwrap().unwrap(), tomb);
    assert!(matches!(
        s.remove(&id("d")).await,
        Err(RegistryError::NotFound(_))
    ));
    let counts = s.counts().await.unwrap();
    assert_eq!((counts.devices, counts.tombstones), (0, 1));
    let again = s.create(vec![new_device("d", 2)]).await.unwrap().remove(0);
    assert!(again.version > tomb.version && !again.deleted);
    assert_eq!(
        s.verify(&id("d"), &key(2)).await.unwrap(),
        AuthOutcome::Enabled
    );
}

async fn scan_is_ordered_bytewise_and_includes_tombstones(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    for name in ["b", "B", "a", "A-1", "_", "0"] {
        s.create(vec![new_device(name, 1)]).await.unwrap();
    }
    s.remove(&id("b")).await.unwrap();
    let ids: Vec<String> = all(&*s)
        .await
        .into_iter()
        .map(|r| r.device_id.into_string())
        .collect();
    assert_eq!(ids, ["0", "A-1", "B", "_", "a", "b"]);
}

async fn change_sequence_follows_commits(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    assert_eq!(s.max_seq().await.unwrap(), Seq(0));
    s.create(vec![new_device("a", 1), new_device("b", 1)])
        .await
        .unwrap();
    s.update(&id("a"), Patch::default()).await.unwrap();
    let all_changes = s.changes_since(Seq(0), 100).await.unwrap();
    let seqs: Vec<u64> = all_changes.iter().map(|(q, _)| q.0).collect();
    // "a" was rewritten: it now carries seq 3, "b" keeps 2.
    assert_eq!(seqs, [2, 3]);
    assert_eq!(all_changes[1].1.device_id, id("a"));
    assert_eq!(s.max_seq().await.unwrap(), Seq(3));
    assert_eq!(s.changes_since(Seq(2), 100).await.unwrap().len(), 1);
    assert_eq!(s.changes_since(Seq(0), 1).await.unwrap().len(), 1);
    assert!(s.changes_since(Seq(3), 100).await.unwrap().is_empty());
}

fn remote(name: &str, version: u64, origin: &str, deleted: bool) -> DeviceRecord {
    let mut r = DeviceRecord {
        device_id: id(name),
        key_sha256: key(7).hash(),
        status: DeviceStatus::Enabled,
        tags: Tags::default(),
        created_at: fleet_api::UnixMillis(1),
        updated_at: fleet_api::UnixMillis(2),
        version: Version(version),
        origin: region(origin),
        deleted,
    };
    if deleted {
        r.status = DeviceStatus::Disabled;
    }
    r
}

async fn apply_enforces_the_merge_rule(s: Arc<dyn RegistryStore>) {
    let mut tx = s.begin_apply().await.unwrap();
    let out = tx
        .apply(&[remote("a", 10, "x", false), remote("b", 10, "x", false)])
        .await
        .unwrap();
    assert_eq!(out, [Outcome::Inserted, Outcome::Inserted]);
    tx.commit().await.unwrap();

    let mut tx = s.begin_apply().await.unwrap();
    let out = tx
        .apply(&[
            remote("a", 9, "z", false),  // older: ignored
            remote("a", 10, "y", false), // same version, greater origin: wins
            remote("b", 11, "x", true),  // newer tombstone: deletes
            remote("c", 5, "x", true),   // unknown tombstone: recorded
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            Outcome::Unchanged,
            Outcome::Updated,
            Outcome::Deleted,
            Outcome::Deleted
        ]
    );
    tx.commit().await.unwrap();
    assert_eq!(
        s.get(&id("a")).await.unwrap().unwrap(),
        remote("a", 10, "y", false)
    );
    assert!(s.get(&id("b")).await.unwrap().unwrap().deleted);
    assert!(s.get(&id("c")).await.unwrap().unwrap().deleted);

    // Applying the same records again changes nothing.
    let mut tx = s.begin_apply().await.unwrap();
    let out = tx.apply(&all(&*s).await).await.unwrap();
    assert!(out.iter().all(|o| *o == Outcome::Unchanged), "{out:?}");
    tx.commit().await.unwrap();
}

async fn apply_rolls_back_whole(s: Arc<dyn RegistryStore>) {
    let mut tx = s.begin_apply().await.unwrap();
    tx.apply(&[remote("a", 10, "x", false)]).await.unwrap();
    tx.set_follow_watermark("src", Seq(5)).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(all(&*s).await.is_empty());
    assert_eq!(s.follow_watermark("src").await.unwrap(), Seq(0));
    assert_eq!(s.max_seq().await.unwrap(), Seq(0));

    let mut tx = s.begin_apply().await.unwrap();
    tx.apply(&[remote("a", 10, "x", false)]).await.unwrap();
    tx.set_follow_watermark("src", Seq(5)).await.unwrap();
    drop(tx); // dropped without commit: rolled back too
    assert!(all(&*s).await.is_empty());

    let mut tx = s.begin_apply().await.unwrap();
    tx.apply(&[remote("a", 10, "x", false)]).await.unwrap();
    tx.set_follow_watermark("src", Seq(5)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.follow_watermark("src").await.unwrap(), Seq(5));
}

/// Now plus `ms`, as a version.
fn ahead(ms: u64) -> u64 {
    (registry_sync::hlc::wall_ms() + ms) << Version::LOGICAL_BITS
}

async fn a_local_write_beats_every_merged_version(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    // A record from a region whose clock runs ahead of ours (within the
    // allowed skew).
    let future = remote("d", ahead(30 * 60 * 1000), "z", false);
    let mut tx = s.begin_apply().await.unwrap();
    tx.apply(std::slice::from_ref(&future)).await.unwrap();
    tx.commit().await.unwrap();
    let mine = s
        .update(
            &id("d"),
            Patch {
                status: Some(DeviceStatus::Disabled),
                ..Patch::default()
            },
        )
        .await
        .unwrap();
    assert!(mine.supersedes(&future));
    assert_eq!(s.get(&id("d")).await.unwrap().unwrap(), mine);
}

/// A version beyond the clock plus the skew (or the column) is refused with
/// the device named, and nothing of the batch is applied.
async fn apply_refuses_versions_from_the_future(s: Arc<dyn RegistryStore>) {
    for bad in [u64::MAX, 1 << 63, ahead(2 * 3600 * 1000)] {
        let mut tx = s.begin_apply().await.unwrap();
        let err = tx
            .apply(&[remote("ok", 10, "x", false), remote("bad", bad, "x", false)])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::ImplausibleVersion { device_id, .. } if device_id.as_str() == "bad"),
            "{err}"
        );
        drop(tx);
        assert!(all(&*s).await.is_empty(), "nothing applied for {bad}");
    }
}

async fn concurrent_writers_get_distinct_sequences(s: Arc<dyn RegistryStore>) {
    s.claim_region(&region("a")).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                s.create(vec![new_device(&format!("t{t}-{i}"), 1)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let changes = s.changes_since(Seq(0), 1000).await.unwrap();
    let seqs: Vec<u64> = changes.iter().map(|(q, _)| q.0).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    let mut versions: Vec<Version> = changes.iter().map(|(_, r)| r.version).collect();
    versions.dedup();
    assert_eq!(versions.len(), 40, "versions are unique");
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions follow commit order"
    );
}

async fn heads_and_compare_match_apply(s: Arc<dyn RegistryStore>) {
    use futures::TryStreamExt;
    use registry_sync::merge::Head;
    let mut tx = s.begin_apply().await.unwrap();
    tx.apply(&[remote("b", 10, "x", false), remote("a", 10, "x", true)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let heads: Vec<_> = s.scan_heads().try_collect().await.unwrap();
    assert_eq!(
        heads,
        vec![
            (
                id("a"),
                Head {
                    version: Version(10),
                    origin: region("x"),
                    deleted: true
                }
            ),
            (
                id("b"),
                Head {
                    version: Version(10),
                    origin: region("x"),
                    deleted: false
                }
            ),
        ]
    );
    let mut got = s.get_many(&[id("b"), id("zz"), id("a")]).await.unwrap();
    got.sort_by(|x, y| x.device_id.cmp(&y.device_id));
    assert_eq!(
        got,
        vec![remote("a", 10, "x", true), remote("b", 10, "x", false)]
    );

    let incoming = [
        remote("a", 11, "x", false),
        remote("b", 9, "x", false),
        remote("c", 1, "x", false),
    ];
    let probe: Vec<_> = incoming
        .iter()
        .map(|r| (r.device_id.clone(), Head::of(r)))
        .collect();
    let mut tx = s.begin_apply().await.unwrap();
    let predicted = tx.compare(&probe).await.unwrap();
    assert_eq!(
        predicted,
        [Outcome::Updated, Outcome::Unchanged, Outcome::Inserted]
    );
    assert_eq!(tx.apply(&incoming).await.unwrap(), predicted);
    tx.rollback().await.unwrap();
}

async fn store_ids_are_stable_and_distinct(s: Arc<dyn RegistryStore>) {
    let a = s.store_id().await.unwrap();
    assert_eq!(a, s.store_id().await.unwrap());
    assert_eq!(a.len(), 32);
}

/// Runs each test against each backend.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                let f = super::fixture(super::Kind::Sqlite, None).await;
                super::$test(f.store.clone()).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $test() {
                let f = super::fixture(super::Kind::Postgres, None).await;
                super::$test(f.store.clone()).await;
            })*
        }
    };
}

conformance!(
    creates_and_reads_back,
    writes_need_a_region_and_keep_it,
    create_is_all_or_nothing,
    verify_tells_every_case_apart,
    updates_take_a_new_version,
    removal_leaves_a_tombstone_and_allows_recreation,
    scan_is_ordered_bytewise_and_includes_tombstones,
    change_sequence_follows_commits,
    apply_enforces_the_merge_rule,
    apply_rolls_back_whole,
    a_local_write_beats_every_merged_version,
    apply_refuses_versions_from_the_future,
    concurrent_writers_get_distinct_sequences,
    store_ids_are_stable_and_distinct,
    heads_and_compare_match_apply,
);

/// A wall clock that jumps backwards must not make versions go backwards.
async fn versions_survive_a_clock_going_back(kind: Kind) {
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = now.clone();
    let f = fixture(kind, Some(Arc::new(move || clock.load(Ordering::SeqCst)))).await;
    let s = f.store;
    s.claim_region(&region("a")).await.unwrap();
    let a = s.create(vec![new_device("a", 1)]).await.unwrap().remove(0);
    now.store(10, Ordering::SeqCst);
    let b = s.create(vec![new_device("b", 1)]).await.unwrap().remove(0);
    let a2 = s.update(&id("a"), Patch::default()).await.unwrap();
    assert!(a.version < b.version && b.version < a2.version);
}

/// A registry whose clock is far ahead of the machine's (a record written
/// by a machine hours in the future, or stored before versions were
/// bounded) refuses local writes instead of printing success for a write
/// that changes nothing.
async fn a_clock_far_ahead_refuses_writes_instead_of_losing_them(kind: Kind) {
    let real = registry_sync::hlc::wall_ms();
    let now = Arc::new(AtomicU64::new(real + 10 * 3600 * 1000));
    let clock = now.clone();
    let f = fixture(kind, Some(Arc::new(move || clock.load(Ordering::SeqCst)))).await;
    let s = f.store;
    s.claim_region(&region("a")).await.unwrap();
    s.create(vec![new_device("d", 1)]).await.unwrap();
    now.store(real, Ordering::SeqCst);
    let err = s
        .update(
            &id("d"),
            Patch {
                status: Some(DeviceStatus::Disabled),
                ..Patch::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::ClockAhead { .. }), "{err}");
    assert_eq!(
        s.get(&id("d")).await.unwrap().unwrap().status,
        DeviceStatus::Enabled
    );
}

#[tokio::test]
async fn sqlite_a_clock_far_ahead_refuses_writes() {
    a_clock_far_ahead_refuses_writes_instead_of_losing_them(Kind::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_clock_far_ahead_refuses_writes() {
    a_clock_far_ahead_refuses_writes_instead_of_losing_them(Kind::Postgres).await;
}

#[tokio::test]
async fn sqlite_versions_survive_a_clock_going_back() {
    versions_survive_a_clock_going_back(Kind::Sqlite).await;
}

#[tokio::test]
async fn postgres_versions_survive_a_clock_going_back() {
    versions_survive_a_clock_going_back(Kind::Postgres).await;
}

#[tokio::test]
async fn two_stores_have_different_ids() {
    let a = fixture(Kind::Sqlite, None).await;
    let b = fixture(Kind::Postgres, None).await;
    assert_ne!(
        a.store.store_id().await.unwrap(),
        b.store.store_id().await.unwrap()
    );
}

/// A record stored ahead of this registry's clock (within the skew bound,
/// so it was accepted: written by a peer whose clock runs a minute fast,
/// then the database restored without its clock row): a local write that
/// cannot supersede it is an error, not a success that changed nothing.
#[tokio::test]
async fn a_local_write_that_does_not_take_effect_is_an_error() {
    let f = fixture(Kind::Sqlite, None).await;
    let s = f.store;
    s.claim_region(&region("a")).await.unwrap();
    s.create(vec![new_device("d", 1)]).await.unwrap();
    let ahead = (registry_sync::hlc::wall_ms() + 60_000) << Version::LOGICAL_BITS;
    force_version(&f.url, "d", ahead).await;
    let err = s
        .update(
            &id("d"),
            Patch {
                status: Some(DeviceStatus::Disabled),
                ..Patch::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::NotApplied(d) if d.as_str() == "d"),
        "{err}"
    );
    assert_eq!(
        s.get(&id("d")).await.unwrap().unwrap().status,
        DeviceStatus::Enabled,
        "nothing was applied"
    );
}
