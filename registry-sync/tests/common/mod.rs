//! Fixtures shared by the registry test files: a fresh registry on each backend.
#![allow(dead_code)]

use std::sync::Arc;

use fleet_api::{DeviceId, DeviceKey, DeviceStatus, Region, Tags};
use registry_sync::RegistryStore;
use registry_sync::store::{NewDevice, PostgresStore, SqliteStore};
use registry_sync::testing::TempPg;

/// A registry plus whatever keeps its database alive.
pub struct Fixture {
    pub store: Arc<dyn RegistryStore>,
    pub url: String,
    _keep: Keep,
}

enum Keep {
    Dir(tempfile::TempDir),
    Pg(TempPg),
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Sqlite,
    Postgres,
}

pub type Wall = Option<Arc<dyn Fn() -> u64 + Send + Sync>>;

pub async fn fixture(kind: Kind, wall: Wall) -> Fixture {
    match kind {
        Kind::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("registry.db").display());
            let mut s = SqliteStore::open(&url).await.unwrap();
            if let Some(w) = wall {
                s = s.with_wall_clock(move || w());
            }
            Fixture {
                store: Arc::new(s),
                url,
                _keep: Keep::Dir(dir),
            }
        }
        Kind::Postgres => {
            let pg = TempPg::new().await;
            let url = pg.url().to_string();
            let mut s = PostgresStore::open(&url).await.unwrap();
            if let Some(w) = wall {
                s = s.with_wall_clock(move || w());
            }
            Fixture {
                store: Arc::new(s),
                url,
                _keep: Keep::Pg(pg),
            }
        }
    }
}

pub fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

pub fn region(s: &str) -> Region {
    Region::new(s).unwrap()
}

pub fn key(n: u8) -> DeviceKey {
    DeviceKey::from_bytes([n; 32])
}

pub fn new_device(name: &str, k: u8) -> NewDevice {
    NewDevice {
        device_id: id(name),
        key_sha256: key(k).hash(),
        status: DeviceStatus::Enabled,
        tags: Tags::parse(&format!(r#"{{"name":"{name}"}}"#)).unwrap(),
    }
}

/// Every record, tombstones included, in id order.
pub async fn all(store: &dyn RegistryStore) -> Vec<fleet_api::DeviceRecord> {
    use futures::TryStreamExt;
    store.scan().try_collect().await.unwrap()
}

/// Runs the built `registry-sync` binary, as a user would.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_registry-sync"))
        .args(args)
        .env_remove("FLEET_DB")
        .output()
        .expect("run registry-sync")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the CLI and insists that it succeeded.
pub fn cli_ok(args: &[&str]) -> String {
    let o = cli(args);
    assert!(
        o.status.success(),
        "registry-sync {args:?} failed: {}",
        stderr(&o)
    );
    stdout(&o)
}

/// Polls `check` until it holds or `secs` pass (a condition, not a sleep).
pub async fn wait_for<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Stores `version` for `device` in the SQLite registry at `url` behind
/// the store's back (a record written by a peer whose clock runs ahead).
pub async fn force_version(url: &str, device: &str, version: u64) {
    let pool = sqlx::SqlitePool::connect(url).await.unwrap();
    sqlx::query("UPDATE devices SET version = ? WHERE device_id = ?")
        .bind(version as i64)
        .bind(device)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}
