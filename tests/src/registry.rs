//! A device registry for tests: a SQLite file with devices whose keys the
//! test keeps, mirrored between regions as registry-sync would.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fleet_api::{DeviceId, DeviceKey, DeviceStatus, Region, Tags};
use registry_sync::RegistryStore;
use registry_sync::store::{NewDevice, Patch};

/// A SQLite registry with devices and their keys.
#[derive(Debug)]
pub struct Registry {
    pub url: String,
    pub store: Arc<dyn RegistryStore>,
    keys: HashMap<String, DeviceKey>,
}

impl Registry {
    /// A new registry file in `dir` for `region`.
    pub async fn sqlite(dir: &Path, region: &str) -> Registry {
        let url = format!(
            "sqlite://{}",
            dir.join(format!("registry-{region}.db")).display()
        );
        let store = registry_sync::open(&url).await.expect("open registry");
        store
            .claim_region(&Region::new(region).expect("region"))
            .await
            .expect("claim region");
        Registry {
            url,
            store,
            keys: HashMap::new(),
        }
    }

    /// Makes `other` hold the same devices (a registry-sync merge).
    pub async fn mirror_into(&self, other: &mut Registry) {
        let bar = registry_sync::cli::progress(None, "merge");
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        registry_sync::ops::merge(&*self.store, &*other.store, false, &bar)
            .await
            .expect("merge registries");
        for (id, key) in &self.keys {
            other.keys.insert(id.clone(), key.clone());
        }
    }

    /// Creates devices and remembers their keys.
    pub async fn add(&mut self, ids: &[&str]) {
        let new: Vec<(NewDevice, DeviceKey)> = ids
            .iter()
            .map(|id| {
                let key = registry_sync::keys::generate();
                let dev = NewDevice {
                    device_id: DeviceId::new(*id).expect("device id"),
                    key_sha256: key.hash(),
                    status: DeviceStatus::Enabled,
                    tags: Tags::default(),
                };
                (dev, key)
            })
            .collect();
        self.store
            .create(new.iter().map(|(d, _)| d.clone()).collect())
            .await
            .expect("create devices");
        for (d, k) in new {
            self.keys.insert(d.device_id.into_string(), k);
        }
    }

    /// The key of a device created here.
    pub fn key(&self, id: &str) -> String {
        self.keys[id].expose()
    }

    pub async fn set_status(&self, id: &str, status: DeviceStatus) {
        let patch = Patch {
            status: Some(status),
            ..Patch::default()
        };
        self.store
            .update(&DeviceId::new(id).expect("id"), patch)
            .await
            .expect("update device");
    }
}
