//! Device authentication from an in-memory mirror of the registry.
//!
//! Every CONNECT is checked here, so that 10 000 devices reconnecting at once
//! after a failover cost 10 000 hash comparisons, not 10 000 queries. The
//! mirror loads the whole registry once and then tails its change sequence
//! (`changes_since`), so a disabled or removed device is refused within one
//! refresh interval, and devices that just became inactive are reported to
//! the caller (the hub disconnects them). A device missing from the mirror
//! (created a moment ago) costs one query, and unknown ids are remembered
//! briefly so that a storm of bad ids cannot flood the database either.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleet_api::{DeviceId, DeviceKey, DeviceRecord, KeyHash};
use futures::TryStreamExt;
use registry_sync::store::{RegistryStore, Seq};
use registry_sync::{AuthOutcome, RegistryError};
use tokio::time::Instant;

/// A live device (tombstones are not kept).
#[derive(Clone, Copy)]
struct Entry {
    key: KeyHash,
    enabled: bool,
}

impl Entry {
    fn of(rec: &DeviceRecord) -> Option<Entry> {
        (!rec.deleted).then(|| Entry {
            key: rec.key_sha256,
            enabled: rec.is_active(),
        })
    }
}

/// How long an unknown id is answered from memory.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);

/// The registry mirror.
pub struct Auth {
    store: Arc<dyn RegistryStore>,
    devices: RwLock<HashMap<DeviceId, Entry>>,
    seq: std::sync::Mutex<Seq>,
    unknown: std::sync::Mutex<HashMap<DeviceId, Instant>>,
    /// The highest record version applied, overall and per origin region.
    max_version: std::sync::atomic::AtomicU64,
    origins: std::sync::Mutex<crate::origins::Origins>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

impl Auth {
    /// Loads the whole registry.
    ///
    /// # Errors
    /// When the registry cannot be read.
    pub async fn load(store: Arc<dyn RegistryStore>) -> Result<Arc<Auth>, RegistryError> {
        // Read the sequence first: changes made during the scan are re-applied
        // by the first refresh (applying a record twice is harmless).
        let seq = store.max_seq().await?;
        let mut devices = HashMap::new();
        let mut max_version = 0;
        let mut origins = crate::origins::Origins::default();
        let mut scan = store.scan();
        while let Some(rec) = scan.try_next().await? {
            max_version = rec.version.0.max(max_version);
            origins.note(&rec);
            if let Some(e) = Entry::of(&rec) {
                devices.insert(rec.device_id, e);
            }
        }
        drop(scan);
        Ok(Arc::new(Auth {
            store,
            devices: RwLock::new(devices),
            seq: std::sync::Mutex::new(seq),
            unknown: std::sync::Mutex::new(HashMap::new()),
            max_version: std::sync::atomic::AtomicU64::new(max_version),
            origins: std::sync::Mutex::new(origins),
        }))
    }

    /// Checks a device's key (constant-time comparison).
    ///
    /// # Errors
    /// Only when the device is not in the mirror and the registry query fails.
    pub async fn verify(
        &self,
        id: &DeviceId,
        key: &DeviceKey,
    ) -> Result<AuthOutcome, RegistryError> {
        let known = self
            .devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied();
        if let Some(e) = known {
            return Ok(if !e.key.matches(key) {
                AuthOutcome::WrongKey
            } else if e.enabled {
                AuthOutcome::Enabled
            } else {
                AuthOutcome::Disabled
            });
        }
        {
            let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if unknown
                .get(id)
                .is_some_and(|t| now.duration_since(*t) < NEGATIVE_TTL)
            {
                let _ = KeyHash([0; 32]).matches(key);
                return Ok(AuthOutcome::Unknown);
            }
            if unknown.len() > 100_000 {
                unknown.retain(|_, t| now.duration_since(*t) < NEGATIVE_TTL);
            }
        }
        let outcome = self.store.verify(id, key).await?;
        if outcome == AuthOutcome::Unknown {
            self.unknown
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), Instant::now());
        }
        Ok(outcome)
    }

    /// Applies the registry's changes since the last refresh; returns the
    /// devices that may no longer connect (disabled, removed, or re-keyed).
    ///
    /// # Errors
    /// When the registry cannot be read (the mirror stays as it was).
    pub async fn refresh(&self) -> Result<Vec<DeviceId>, RegistryError> {
        let mut revoked = Vec::new();
        loop {
            let after = *self.seq.lock().unwrap_or_else(|e| e.into_inner());
            let changes = self.store.changes_since(after, 10_000).await?;
            let Some(&(last, _)) = changes.last() else {
                return Ok(revoked);
            };
            let full = changes.len() == 10_000;
            {
                let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
                let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
                let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
                for (_, rec) in changes {
                    self.max_version
                        .fetch_max(rec.version.0, std::sync::atomic::Ordering::AcqRel);
                    origins.note(&rec);
                    let before = devices.get(&rec.device_id).copied();
                    let after = Entry::of(&rec);
                    let lost = before.is_some_and(|b| {
                        b.enabled && after.is_none_or(|a| !a.enabled || a.key != b.key)
                    });
                    if lost {
                        revoked.push(rec.device_id.clone());
                    }
                    unknown.remove(&rec.device_id);
                    match after {
                        Some(e) => devices.insert(rec.device_id, e),
                        None => devices.remove(&rec.device_id),
                    };
                }
            }
            *self.seq.lock().unwrap_or_else(|e| e.into_inner()) = last;
            if !full {
                return Ok(revoked);
            }
        }
    }

    /// Devices in the mirror and the highest version applied.
    pub fn registry_status(&self) -> fleet_api::hub::RegistryStatus {
        fleet_api::hub::RegistryStatus {
            devices: self.devices.read().unwrap_or_else(|e| e.into_inner()).len() as u64,
            max_version: fleet_api::registry::Version(
                self.max_version.load(std::sync::atomic::Ordering::Acquire),
            ),
            by_origin: self
                .origins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .summary(),
        }
    }

    /// Sets the registry gauges (devices, highest version).
    pub fn export_metrics(&self) {
        let r = self.registry_status();
        metrics::gauge!("fleet_hub_registry_devices").set(r.devices as f64);
        metrics::gauge!("fleet_hub_registry_max_version").set(r.max_version.0 as f64);
    }

    /// Devices in the mirror that may connect.
    pub fn active_devices(&self) -> usize {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.enabled)
            .count()
    }
}
