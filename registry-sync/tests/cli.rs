//! The registry-sync command line, driven through the built binary on real
//! SQLite files and PostgreSQL databases.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use fleet_api::DeviceKey;
use registry_sync::AuthOutcome;
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn device_add_prints_the_key_once_and_stores_only_its_hash() {
    let f = fixture(Kind::Sqlite, None).await;
    let out = cli_ok(&["device", "add", "--db", &f.url, "--region", "eu", "dev-1"]);
    let key_line = out
        .lines()
        .find(|l| l.starts_with("key"))
        .expect("key line");
    let key = key_line.rsplit(' ').next().unwrap();
    let key = DeviceKey::parse(key).expect("a valid key");
    assert_eq!(
        f.store.verify(&id("dev-1"), &key).await.unwrap(),
        AuthOutcome::Enabled
    );

    let shown = cli_ok(&["device", "show", "--db", &f.url, "dev-1"]);
    assert!(
        !shown.contains(&key.expose()),
        "show must not reveal the key"
    );
    let export = cli_ok(&["export", "--db", &f.url]);
    assert!(
        !export.contains(&key.expose()),
        "exports carry the hash only"
    );
    assert!(export.contains(&key.hash().to_hex()));

    let again = cli(&["device", "add", "--db", &f.url, "dev-1"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("device dev-1 already exists"),
        "{}",
        stderr(&again)
    );
}

#[tokio::test]
async fn bulk_add_writes_a_private_keys_file_in_one_transaction() {
    for kind in [Kind::Sqlite, Kind::Postgres] {
        let f = fixture(kind, None).await;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.ndjson");
        let keys_s = keys.to_str().unwrap();
        let out = cli_ok(&[
            "--json",
            "device",
            "add",
            "--db",
            &f.url,
            "--region",
            "a",
            "--count",
            "250",
            "--prefix",
            "sim-",
            "--keys-out",
            keys_s,
        ]);
        assert_eq!(json(&out)["created"], 250);
        let mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let lines: Vec<Value> = std::fs::read_to_string(&keys)
            .unwrap()
            .lines()
            .map(json)
            .collect();
        assert_eq!(lines.len(), 250);
        assert_eq!(lines[0]["device_id"], "sim-000");
        assert_eq!(lines[249]["device_id"], "sim-249");
        for l in [&lines[0], &lines[137], &lines[249]] {
            let k = DeviceKey::parse(l["key"].as_str().unwrap()).unwrap();
            let d = id(l["device_id"].as_str().unwrap());
            assert_eq!(f.store.verify(&d, &k).await.unwrap(), AuthOutcome::Enabled);
        }

        // An existing keys file is never overwritten, and nothing is created.
        let o = cli(&[
            "device",
            "add",
            "--db",
            &f.url,
            "--count",
            "3",
            "--prefix",
            "x-",
            "--keys-out",
            keys_s,
        ]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("write keys to"), "{}", stderr(&o));
        assert_eq!(f.store.counts().await.unwrap().devices, 250);

        // A clash with an existing id creates nothing and leaves no keys file behind.
        let keys2 = dir.path().join("keys2");
        let o = cli(&[
            "device",
            "add",
            "--db",
            &f.url,
            "--count",
            "300",
            "--prefix",
            "sim-",
            "--keys-out",
            keys2.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        assert!(!keys2.exists());
        assert_eq!(f.store.counts().await.unwrap().devices, 250);
    }
}

#[tokio::test]
async fn disable_enable_remove() {
    let f = fixture(Kind::Sqlite, None).await;
    let out = cli_ok(&[
        "--json", "device", "add", "--db", &f.url, "--region", "a", "d",
    ]);
    let key = DeviceKey::parse(json(&out)["key"].as_str().unwrap()).unwrap();
    cli_ok(&["device", "disable", "--db", &f.url, "d"]);
    assert_eq!(
        f.store.verify(&id("d"), &key).await.unwrap(),
        AuthOutcome::Disabled
    );
    cli_ok(&["device", "enable", "--db", &f.url, "d"]);
    assert_eq!(
        f.store.verify(&id("d"), &key).await.unwrap(),
        AuthOutcome::Enabled
    );
    let out = cli_ok(&["--json", "device", "remove", "--db", &f.url, "d"]);
    assert_eq!(json(&out)["deleted"], true);
    assert_eq!(
        f.store.verify(&id("d"), &key).await.unwrap(),
        AuthOutcome::Unknown
    );
    let o = cli(&["device", "disable", "--db", &f.url, "d"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("device d does not exist"));
}

async fn seeded(kind: Kind, region: &str, prefix: &str, n: usize) -> Fixture {
    let f = fixture(kind, None).await;
    f.store.claim_region(&common::region(region)).await.unwrap();
    let devices = (0..n)
        .map(|i| new_device(&format!("{prefix}{i:03}"), i as u8))
        .collect();
    f.store.create(devices).await.unwrap();
    f
}

#[tokio::test]
async fn export_import_round_trip_across_backends() {
    let a = seeded(Kind::Sqlite, "a", "d", 40).await;
    a.store.remove(&id("d007")).await.unwrap();
    let b = fixture(Kind::Postgres, None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.ndjson");
    let out = cli_ok(&[
        "--json",
        "export",
        "--db",
        &a.url,
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(json(&out)["exported"], 40);

    let out = cli_ok(&[
        "--json",
        "import",
        "--db",
        &b.url,
        "--in",
        file.to_str().unwrap(),
    ]);
    assert_eq!(
        json(&out),
        serde_json::json!({"inserted": 39, "updated": 0, "unchanged": 0, "deleted": 1, "total": 40})
    );
    assert_eq!(all(&*a.store).await, all(&*b.store).await);
    // Importing again is a no-op.
    let out = cli_ok(&[
        "--json",
        "import",
        "--db",
        &b.url,
        "--in",
        file.to_str().unwrap(),
    ]);
    assert_eq!(json(&out)["unchanged"], 40);
}

/// A state we can compare before and after a refused import.
async fn snapshot(f: &Fixture) -> (Vec<fleet_api::DeviceRecord>, registry_sync::store::Seq) {
    (all(&*f.store).await, f.store.max_seq().await.unwrap())
}

#[tokio::test]
async fn bad_import_files_are_refused_whole_with_their_line() {
    let src = seeded(Kind::Sqlite, "a", "d", 5).await;
    let good = cli_ok(&["export", "--db", &src.url]);
    let lines: Vec<&str> = good.lines().collect();
    assert_eq!(lines.len(), 7);
    let join = |ls: &[&str]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    let mut cases: Vec<(&str, String, &str)> = vec![
        (
            "truncated",
            join(&lines[..6]),
            "truncated: the file ends after line 6",
        ),
        (
            "cut mid-line",
            good[..good.len() - 10].to_string(),
            "line 7: incomplete line",
        ),
        (
            "wrong count",
            join(&[&lines[..6], &[r#"{"end":true,"count":9}"#]].concat()),
            "line 7: the trailer counts 9 records but the file has 5",
        ),
        (
            "invalid JSON",
            join(&[&lines[..3], &["{\"device_id\": oops"], &lines[4..]].concat()),
            "line 4: ",
        ),
        (
            "unknown format",
            good.replace("fleet-registry/1", "fleet-registry/2"),
            "line 1: unknown format \"fleet-registry/2\"",
        ),
        (
            "not an export",
            "hello\n".to_string(),
            "line 1: invalid JSON in header",
        ),
        ("empty", String::new(), "line 1: empty file"),
    ];
    // A version no clock will reach: it would stop the registry clock.
    let v: Value = json(lines[3]);
    let poisoned = lines[3].replace(
        &format!("\"version\":{}", v["version"]),
        "\"version\":18446744073709551615",
    );
    assert_ne!(poisoned, lines[3]);
    cases.push((
        "version from the future",
        join(&[&lines[..3], &[poisoned.as_str()], &lines[4..]].concat()),
        "line 4: device d002: version 18446744073709551615 is beyond this machine's clock",
    ));
    let bad_id = lines[3].replace("\"d002\"", "\"d 002\"");
    cases.push((
        "invalid device_id",
        join(&[&lines[..3], &[bad_id.as_str()], &lines[4..]].concat()),
        "line 4: device_id contains ' ' at position 1",
    ));
    cases.push((
        "duplicate device_id",
        join(
            &[
                &lines[..4],
                &[lines[3]],
                &lines[5..6],
                &[r#"{"end":true,"count":5}"#],
            ]
            .concat(),
        ),
        "line 5: duplicate device_id d002 (first on line 4)",
    ));
    cases.push((
        "unsorted duplicate",
        join(
            &[
                &lines[..1],
                &[lines[3], lines[1], lines[2], lines[3]],
                &[r#"{"end":true,"count":4}"#],
            ]
            .concat(),
        ),
        "line 5: duplicate device_id d002 (first on line 2)",
    ));

    for kind in [Kind::Sqlite, Kind::Postgres] {
        // The target already holds data, some of which the file would change.
        let target = seeded(kind, "b", "d", 3).await;
        let before = snapshot(&target).await;
        let dir = tempfile::tempdir().unwrap();
        for (name, text, expected) in &cases {
            let path = dir
                .path()
                .join(format!("{}.ndjson", name.replace(' ', "-")));
            std::fs::write(&path, text).unwrap();
            let o = cli(&[
                "import",
                "--db",
                &target.url,
                "--in",
                path.to_str().unwrap(),
            ]);
            assert!(!o.status.success(), "{name}: accepted");
            assert_eq!(o.status.code(), Some(1), "{name}");
            let err = stderr(&o);
            assert!(err.contains("refused, nothing applied"), "{name}: {err}");
            assert!(
                err.contains(expected),
                "{name}: expected {expected:?} in {err}"
            );
            assert_eq!(err.lines().count(), 1, "{name}: one clear line, got {err}");
            assert_eq!(
                snapshot(&target).await,
                before,
                "{kind:?} {name}: target changed"
            );
        }
    }
}

#[tokio::test]
async fn import_dry_run_changes_nothing() {
    let src = seeded(Kind::Sqlite, "a", "d", 3).await;
    let target = fixture(Kind::Sqlite, None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.ndjson");
    cli_ok(&["export", "--db", &src.url, "--out", file.to_str().unwrap()]);
    let out = cli_ok(&[
        "--json",
        "import",
        "--dry-run",
        "--db",
        &target.url,
        "--in",
        file.to_str().unwrap(),
    ]);
    let v = json(&out);
    assert_eq!(v["inserted"], 3);
    assert_eq!(v["dry_run"], true);
    assert_eq!(
        v["first_inserted"],
        serde_json::json!(["d000", "d001", "d002"])
    );
    assert!(all(&*target.store).await.is_empty());
}

async fn converge(a: &Fixture, b: &Fixture) {
    // Diverge: both sides change, add and remove devices.
    a.store.create(vec![new_device("only-a", 1)]).await.unwrap();
    b.store.create(vec![new_device("only-b", 2)]).await.unwrap();
    b.store.remove(&id("s001")).await.unwrap();
    let patch = registry_sync::store::Patch {
        tags: Some(fleet_api::Tags::parse(r#"{"v":"a"}"#).unwrap()),
        ..Default::default()
    };
    a.store.update(&id("s002"), patch).await.unwrap();

    let diff = json(&cli_ok(&[
        "--json", "diff", "--from", &b.url, "--into", &a.url,
    ]));
    assert_eq!(diff["inserted"], 1);
    assert_eq!(diff["deleted"], 1);
    assert_eq!(diff["first_deleted"], serde_json::json!(["s001"]));
    assert_eq!(diff["first_inserted"], serde_json::json!(["only-b"]));

    let first = json(&cli_ok(&[
        "--json", "merge", "--from", &b.url, "--into", &a.url,
    ]));
    assert_eq!(first["inserted"], 1);
    assert_eq!(first["deleted"], 1);
    let twice = json(&cli_ok(&[
        "--json", "merge", "--from", &b.url, "--into", &a.url,
    ]));
    assert_eq!(
        (
            twice["inserted"].as_u64(),
            twice["updated"].as_u64(),
            twice["deleted"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "merging twice changes nothing: {twice}"
    );
    cli_ok(&["merge", "--from", &a.url, "--into", &b.url]);
    assert_eq!(
        all(&*a.store).await,
        all(&*b.store).await,
        "A and B converged"
    );
    for (x, y) in [(&a.url, &b.url), (&b.url, &a.url)] {
        let d = json(&cli_ok(&["--json", "diff", "--from", x, "--into", y]));
        assert_eq!(d["unchanged"], d["total"], "{d}");
    }
}

async fn pair(ka: Kind, kb: Kind) -> (Fixture, Fixture) {
    let a = seeded(ka, "a", "s", 5).await;
    let b = fixture(kb, None).await;
    b.store.claim_region(&region("b")).await.unwrap();
    cli_ok(&["merge", "--from", &a.url, "--into", &b.url]);
    (a, b)
}

#[tokio::test]
async fn merge_converges_sqlite_to_sqlite() {
    let (a, b) = pair(Kind::Sqlite, Kind::Sqlite).await;
    converge(&a, &b).await;
}

#[tokio::test]
async fn merge_converges_postgres_to_postgres() {
    let (a, b) = pair(Kind::Postgres, Kind::Postgres).await;
    converge(&a, &b).await;
}

#[tokio::test]
async fn merge_converges_across_backends() {
    let (a, b) = pair(Kind::Sqlite, Kind::Postgres).await;
    converge(&a, &b).await;
}

#[tokio::test]
async fn merge_dry_run_and_same_registry() {
    let (a, b) = pair(Kind::Sqlite, Kind::Sqlite).await;
    a.store.create(vec![new_device("new", 1)]).await.unwrap();
    let before = snapshot(&b).await;
    let out = cli_ok(&["merge", "--dry-run", "--from", &a.url, "--into", &b.url]);
    assert!(
        out.starts_with("would change 1 of 6 records: 1 inserted"),
        "{out}"
    );
    assert!(out.contains("insert: new"), "{out}");
    assert_eq!(snapshot(&b).await, before);
    let o = cli(&["merge", "--from", &a.url, "--into", &a.url]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--from and --into are the same registry"));
}

#[tokio::test]
async fn bad_urls_and_usage_get_one_clear_line() {
    let o = cli(&["export", "--db", "mysql://x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unsupported database URL"),
        "{}",
        stderr(&o)
    );
    let o = cli(&["export", "--db", "postgres://nobody:secret@127.0.0.1:1/x"]);
    assert!(!o.status.success());
    assert!(
        !stderr(&o).contains("secret"),
        "passwords never printed: {}",
        stderr(&o)
    );
    let o = cli(&[
        "device",
        "add",
        "--db",
        "sqlite::memory:",
        "--region",
        "no/pe",
        "d",
    ]);
    assert!(stderr(&o).contains("invalid --region"), "{}", stderr(&o));
    // Ids that are path components are refused by name.
    for id in [".", ".."] {
        let o = cli(&[
            "device",
            "add",
            "--db",
            "sqlite::memory:",
            "--region",
            "a",
            id,
        ]);
        assert!(!o.status.success(), "{id} was accepted");
        assert!(stderr(&o).contains("dots"), "{id}: {}", stderr(&o));
    }
    let o = cli(&[
        "device",
        "add",
        "--db",
        "sqlite::memory:",
        "--tags",
        "[1]",
        "d",
    ]);
    assert!(
        stderr(&o).contains("tags must be a JSON object"),
        "{}",
        stderr(&o)
    );
    for sub in [
        &["--help"][..],
        &["device", "add", "--help"],
        &["follow", "--help"],
        &["bench", "--help"],
    ] {
        let o = cli(sub);
        assert!(
            o.status.success() && stdout(&o).contains("Usage"),
            "{sub:?}"
        );
    }
}

#[tokio::test]
async fn follow_keeps_the_target_converged_until_interrupted() {
    let a = seeded(Kind::Postgres, "a", "f", 10).await;
    let b = fixture(Kind::Sqlite, None).await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_registry-sync"))
        .args([
            "--json",
            "follow",
            "--from",
            &a.url,
            "--into",
            &b.url,
            "--interval-ms",
            "50",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let same = || async { all(&*a.store).await == all(&*b.store).await };
    wait_for(20, "initial convergence", same).await;
    a.store.remove(&id("f003")).await.unwrap();
    a.store.create(vec![new_device("late", 9)]).await.unwrap();
    wait_for(20, "changes to follow", same).await;

    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Ctrl-C stops cleanly: {}",
        stderr(&out)
    );
    let last = stdout(&out).lines().last().map(json).expect("status lines");
    assert_eq!(last["lag"], 0);
    assert_eq!(last["inserted"], 11);
    assert_eq!(last["deleted"], 1);

    // A restart resumes from the stored watermark: nothing is applied twice.
    a.store
        .create(vec![new_device("after-restart", 9)])
        .await
        .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_registry-sync"))
        .args([
            "--json",
            "follow",
            "--from",
            &a.url,
            "--into",
            &b.url,
            "--interval-ms",
            "50",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(20, "follow after restart", same).await;
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let last = stdout(&out).lines().last().map(json).expect("status lines");
    assert_eq!(last["total"], 1, "only the new change is applied: {last}");
}

#[tokio::test]
async fn merge_refuses_a_version_from_the_future_naming_the_device() {
    let (a, b) = pair(Kind::Sqlite, Kind::Sqlite).await;
    a.store
        .create(vec![new_device("poisoned", 1)])
        .await
        .unwrap();
    // Two hours ahead of this machine's clock: beyond the stated skew.
    let ahead =
        (registry_sync::hlc::wall_ms() + 2 * 3600 * 1000) << fleet_api::Version::LOGICAL_BITS;
    force_version(&a.url, "poisoned", ahead).await;
    let before = snapshot(&b).await;
    let o = cli(&["merge", "--from", &a.url, "--into", &b.url]);
    assert!(!o.status.success(), "a poisoned version was merged");
    assert!(stderr(&o).contains("poisoned"), "{}", stderr(&o));
    assert_eq!(snapshot(&b).await, before, "nothing of the merge applied");
}
