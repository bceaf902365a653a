//! The merge rule: a last-writer-wins map (a state-based CRDT).
//!
//! Per device the record with the greater `(version, origin)` wins. Because
//! that order is total and a record never changes without a new version,
//! merging is idempotent, commutative and associative, and tombstones
//! (`deleted`) survive merges like any other record. This module is pure;
//! stores call [`decide`] and then write only what changed.

use std::collections::BTreeMap;

use fleet_api::{DeviceId, DeviceRecord, Region, Version};
use serde::Serialize;

/// The part of a stored record the merge rule looks at. Stores fetch only
/// this for the records they compare, which keeps merges cheap.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Head {
    pub version: Version,
    pub origin: Region,
    pub deleted: bool,
}

impl Head {
    pub fn of(rec: &DeviceRecord) -> Head {
        Head {
            version: rec.version,
            origin: rec.origin.clone(),
            deleted: rec.deleted,
        }
    }
}

/// What merging one incoming record into a registry does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// The device was unknown: the record is inserted.
    Inserted,
    /// The incoming record replaces an older live record (or revives a tombstone).
    Updated,
    /// The incoming record is a tombstone that replaces a live record or
    /// records a removal the registry had not seen.
    Deleted,
    /// The registry already holds this record or a newer one.
    Unchanged,
}

impl Outcome {
    pub fn changes(self) -> bool {
        self != Outcome::Unchanged
    }
}

impl Head {
    fn key(&self) -> (Version, &Region) {
        (self.version, &self.origin)
    }
}

/// Decides the outcome of merging a record with head `incoming` into a
/// registry that holds `existing`.
pub fn decide(existing: Option<&Head>, incoming: &Head) -> Outcome {
    match existing {
        Some(cur) if incoming.key() <= cur.key() => Outcome::Unchanged,
        Some(cur) if incoming.deleted && !cur.deleted => Outcome::Deleted,
        // A newer live record, a revival, or a newer tombstone over an older
        // one: all are written so that stores converge record for record.
        Some(_) => Outcome::Updated,
        None if incoming.deleted => Outcome::Deleted,
        None => Outcome::Inserted,
    }
}

/// Counts of a merge or import, in the `--json` shape of DESIGN.md.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct Summary {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub total: u64,
}

impl Summary {
    pub fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Inserted => self.inserted += 1,
            Outcome::Updated => self.updated += 1,
            Outcome::Deleted => self.deleted += 1,
            Outcome::Unchanged => self.unchanged += 1,
        }
        self.total += 1;
    }

    pub fn changed(&self) -> u64 {
        self.inserted + self.updated + self.deleted
    }
}

/// Merges `from` into `into` in memory: the reference model of what the SQL
/// stores do, used by the property tests and for small in-memory diffs.
pub fn merge_into(
    into: &mut BTreeMap<DeviceId, DeviceRecord>,
    from: &BTreeMap<DeviceId, DeviceRecord>,
) -> Summary {
    let mut summary = Summary::default();
    for rec in from.values() {
        let outcome = decide(
            into.get(&rec.device_id).map(Head::of).as_ref(),
            &Head::of(rec),
        );
        if outcome.changes() {
            into.insert(rec.device_id.clone(), rec.clone());
        }
        summary.add(outcome);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_api::{DeviceKey, DeviceStatus, Region, Tags, UnixMillis, Version};
    use proptest::prelude::*;

    fn rec(id: &str, version: u64, origin: &str, deleted: bool, key: u8) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::new(id).unwrap(),
            key_sha256: DeviceKey::from_bytes([key; 32]).hash(),
            status: if key.is_multiple_of(2) {
                DeviceStatus::Enabled
            } else {
                DeviceStatus::Disabled
            },
            tags: Tags::default(),
            created_at: UnixMillis(1),
            updated_at: UnixMillis(version),
            version: Version(version),
            origin: Region::new(origin).unwrap(),
            deleted,
        }
    }

    #[test]
    fn decide_covers_each_case() {
        let old = rec("d", 1, "a", false, 0);
        let new = rec("d", 2, "a", false, 1);
        let tomb = rec("d", 3, "b", true, 1);
        let h = Head::of;
        assert_eq!(decide(None, &h(&old)), Outcome::Inserted);
        assert_eq!(decide(Some(&h(&old)), &h(&new)), Outcome::Updated);
        assert_eq!(decide(Some(&h(&new)), &h(&old)), Outcome::Unchanged);
        assert_eq!(decide(Some(&h(&new)), &h(&new)), Outcome::Unchanged);
        assert_eq!(decide(Some(&h(&new)), &h(&tomb)), Outcome::Deleted);
        assert_eq!(decide(None, &h(&tomb)), Outcome::Deleted);
        assert_eq!(decide(Some(&h(&tomb)), &h(&new)), Outcome::Unchanged);
        let later_tomb = rec("d", 4, "a", true, 1);
        assert_eq!(decide(Some(&h(&tomb)), &h(&later_tomb)), Outcome::Updated);
    }

    #[test]
    fn origin_breaks_version_ties() {
        let a = rec("d", 5, "a", false, 0);
        let b = rec("d", 5, "b", false, 2);
        assert_eq!(decide(Some(&Head::of(&a)), &Head::of(&b)), Outcome::Updated);
        assert_eq!(
            decide(Some(&Head::of(&b)), &Head::of(&a)),
            Outcome::Unchanged
        );
    }

    type Map = BTreeMap<DeviceId, DeviceRecord>;

    /// Registries drawn from a small id space so that they overlap. A record's
    /// content is a function of `(id, version, origin)`: the invariant that
    /// every real registry keeps (a write always takes a new version).
    fn registry() -> impl Strategy<Value = Map> {
        prop::collection::vec(
            (0u8..6, 1u64..5, prop::sample::select(vec!["a", "b", "c"])),
            0..12,
        )
        .prop_map(|entries| {
            let mut m = Map::new();
            for (id, version, origin) in entries {
                // One (device, version, origin) names exactly one write.
                let salt = id ^ (version as u8) ^ origin.as_bytes()[0];
                let r = rec(
                    &format!("dev-{id}"),
                    version,
                    origin,
                    salt.is_multiple_of(3),
                    salt,
                );
                let keep = m
                    .get(&r.device_id)
                    .is_none_or(|cur: &DeviceRecord| r.supersedes(cur));
                if keep {
                    m.insert(r.device_id.clone(), r);
                }
            }
            m
        })
    }

    fn merged(a: &Map, b: &Map) -> Map {
        let mut out = a.clone();
        merge_into(&mut out, b);
        out
    }

    proptest! {
        #[test]
        fn merge_is_idempotent(a in registry(), b in registry()) {
            let once = merged(&a, &b);
            let mut twice = once.clone();
            let second = merge_into(&mut twice, &b);
            prop_assert_eq!(&once, &twice);
            prop_assert_eq!(second.changed(), 0);
        }

        #[test]
        fn merge_is_commutative(a in registry(), b in registry()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in registry(), b in registry(), c in registry()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn both_directions_converge(a in registry(), b in registry()) {
            let mut left = a.clone();
            let mut right = b.clone();
            merge_into(&mut left, &right.clone());
            merge_into(&mut right, &left.clone());
            prop_assert_eq!(left, right);
        }

        #[test]
        fn tombstones_survive_merges(a in registry(), b in registry()) {
            let out = merged(&a, &b);
            for tomb in a.values().chain(b.values()).filter(|r| r.deleted) {
                let winner = &out[&tomb.device_id];
                // The tombstone is either still there or beaten by a strictly newer write.
                prop_assert!(winner == tomb || winner.supersedes(tomb));
                // No older live record resurrects a removed device.
                prop_assert!(winner.merge_key() >= tomb.merge_key());
            }
        }

        #[test]
        fn summary_counts_every_incoming_record(a in registry(), b in registry()) {
            let mut out = a.clone();
            let s = merge_into(&mut out, &b);
            prop_assert_eq!(s.total, b.len() as u64);
            prop_assert_eq!(s.inserted + s.updated + s.deleted + s.unchanged, s.total);
        }
    }
}
