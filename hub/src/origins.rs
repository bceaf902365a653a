//! The highest registry version per origin region (the region where a
//! record was last written), over the records as they are now: a record
//! superseded by a later write elsewhere no longer counts for its old
//! origin. A failover compares these between regions: region B holds what
//! A wrote when B's entry for A is at least A's own.
//!
//! Devices are keyed by a 64-bit hash of their id (not a second copy of
//! every id): a collision could at worst merge two devices' entries in a
//! statistic, never affect authentication.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use fleet_api::registry::Version;
use fleet_api::{DeviceId, DeviceRecord};

#[derive(Debug, Default)]
pub struct Origins {
    regions: Vec<String>,
    of: HashMap<u64, (u16, Version)>,
    summary: BTreeMap<String, Version>,
    dirty: bool,
}

fn key(id: &DeviceId) -> u64 {
    // Fixed keys: the same id always hashes the same in this process.
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id.as_str())
}

impl Origins {
    /// Takes the record as the device's current one (tombstones too).
    pub fn note(&mut self, rec: &DeviceRecord) {
        let origin = rec.origin.as_str();
        let idx = match self.regions.iter().position(|r| r == origin) {
            Some(i) => i,
            None => {
                self.regions.push(origin.to_string());
                self.regions.len() - 1
            }
        };
        let idx = u16::try_from(idx).unwrap_or(u16::MAX);
        let e = self
            .of
            .entry(key(&rec.device_id))
            .or_insert((idx, rec.version));
        if rec.version >= e.1 {
            *e = (idx, rec.version);
        }
        self.dirty = true;
    }

    /// The highest version per origin region.
    pub fn summary(&mut self) -> BTreeMap<String, Version> {
        if self.dirty {
            let mut top = vec![Version(0); self.regions.len()];
            for (i, v) in self.of.values() {
                if let Some(t) = top.get_mut(usize::from(*i)) {
                    *t = (*t).max(*v);
                }
            }
            self.summary = self
                .regions
                .iter()
                .zip(top)
                .filter(|(_, v)| v.0 > 0)
                .map(|(r, v)| (r.clone(), v))
                .collect();
            self.dirty = false;
        }
        self.summary.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_api::{DeviceStatus, KeyHash, Region, Tags, UnixMillis};

    fn rec(id: &str, origin: &str, version: u64) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::new(id).unwrap(),
            key_sha256: KeyHash([0; 32]),
            status: DeviceStatus::Enabled,
            tags: Tags::default(),
            created_at: UnixMillis(0),
            updated_at: UnixMillis(0),
            version: Version(version),
            origin: Region::new(origin).unwrap(),
            deleted: false,
        }
    }

    #[test]
    fn a_superseded_record_no_longer_counts_for_its_old_origin() {
        let mut o = Origins::default();
        o.note(&rec("d1", "a", 10));
        o.note(&rec("d2", "a", 5));
        o.note(&rec("d3", "b", 7));
        assert_eq!(o.summary().get("a"), Some(&Version(10)));
        // b wrote d1 later: a's highest own write is now d2's.
        o.note(&rec("d1", "b", 12));
        let s = o.summary();
        assert_eq!(s.get("a"), Some(&Version(5)));
        assert_eq!(s.get("b"), Some(&Version(12)));
        // An older copy arriving late changes nothing.
        o.note(&rec("d1", "a", 10));
        assert_eq!(o.summary().get("b"), Some(&Version(12)));
    }
}
