//! Power cuts under the hub's small state files: role and epoch (with the
//! detachment), the de-duplication snapshot, and what the peer pulled.
//! Each is replaced whole; after a cut it must hold the last acknowledged
//! value or the one being written, never a mix, never nothing.

use std::path::Path;

use fleet_api::storage::SimDisk;
use fleet_api::{DeviceId, Epoch, Mid, Offset, PartitionId, Region, Role};
use hub::dedup_snapshot::{read_snapshot, snapshot_path, write_snapshot};
use hub::ingest::Accepted;
use hub::peer_pulled::PeerPulled;
use hub::state::{HubState, RoleEpoch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Outcome, fail};

const DIR: &str = "/hub/data";

fn region() -> Region {
    Region::new("a").expect("a valid region")
}

fn snapshot(rng: &mut StdRng, upto: u64) -> Accepted {
    (0..rng.random_range(0..40))
        .map(|i| {
            (
                DeviceId::new(format!("d{i}")).expect("a valid id"),
                (
                    Mid(rng.random_range(1..1000)),
                    Offset(rng.random_range(0..=upto)),
                ),
            )
        })
        .collect()
}

/// The last acknowledged value and the one in flight when the cut came.
struct Two<T> {
    done: Option<T>,
    trying: Option<T>,
}

impl<T: PartialEq + std::fmt::Debug> Two<T> {
    fn check(&self, what: &str, got: Option<T>) -> Outcome<()> {
        let ok = got == self.done || (got.is_some() && got == self.trying);
        if ok {
            Ok(())
        } else {
            fail(format!(
                "{what} after a cut is {got:?}; acknowledged {:?}, being written {:?}",
                self.done, self.trying
            ))
        }
    }
}

pub(super) fn run(seed: u64) -> Outcome<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = SimDisk::new();
    let dir = Path::new(DIR);
    let mut role = Two {
        done: None,
        trying: None,
    };
    let mut snap: Two<(Offset, Accepted)> = Two {
        done: None,
        trying: None,
    };
    let mut pulled: Two<u64> = Two {
        done: Some(0),
        trying: None,
    };
    let mut cuts = 0;
    for _ in 0..rng.random_range(2..6) {
        disk.arm_cut(rng.random_range(1..60), rng.random());
        let fs = disk.mount();
        let state = match HubState::open_on(fs.clone(), dir, &region(), Role::Primary) {
            Ok(s) => {
                if role.done.is_some() {
                    role.check("role and epoch", Some(s.get()))?;
                }
                role.done = Some(s.get());
                role.trying = None;
                Some(s)
            }
            Err(_) if disk.fired().is_some() => None,
            Err(e) => return fail(format!("hub state unreadable after a cut: {e}")),
        };
        let path = snapshot_path(&dir.join("dedup"), PartitionId(0));
        let pp = PeerPulled::load_on(fs.clone(), &dir.join("dedup"), 1);
        let _ = fleet_api::storage::create_dir_durable(&*fs, &dir.join("dedup"));
        for _ in 0..rng.random_range(1..20) {
            if disk.fired().is_some() {
                break;
            }
            match rng.random_range(0..3) {
                0 => {
                    let Some(state) = &state else { break };
                    let now = state.get();
                    let next = if now.role == Role::Primary && rng.random_bool(0.3) {
                        RoleEpoch {
                            role: Role::Secondary,
                            epoch: now.epoch,
                        }
                    } else {
                        RoleEpoch {
                            role: if rng.random_bool(0.5) {
                                Role::Primary
                            } else {
                                Role::Secondary
                            },
                            epoch: Epoch(now.epoch.0 + 1),
                        }
                    };
                    role.trying = Some(next);
                    match state.set(next) {
                        Ok(()) => {
                            role.done = Some(next);
                            role.trying = None;
                        }
                        Err(_) if disk.fired().is_some() => {}
                        Err(e) => return fail(format!("state write failed without a cut: {e}")),
                    }
                }
                1 => {
                    let upto = rng.random_range(0..10_000);
                    let map = snapshot(&mut rng, upto);
                    snap.trying = Some((Offset(upto), map.clone()));
                    match write_snapshot(&*fs, &path, Offset(upto), &map) {
                        Ok(()) => {
                            snap.done = snap.trying.take();
                        }
                        Err(_) if disk.fired().is_some() => {}
                        Err(e) => return fail(format!("snapshot write failed without a cut: {e}")),
                    }
                }
                _ => {
                    let upto = pulled.done.unwrap_or(0) + rng.random_range(1..100);
                    pp.advance(PartitionId(0), Offset(upto));
                    pulled.trying = Some(upto);
                    match pp.persist() {
                        Ok(()) => {
                            pulled.done = pulled.trying.take();
                        }
                        Err(_) if disk.fired().is_some() => {}
                        Err(e) => {
                            return fail(format!("peer-pulled write failed without a cut: {e}"));
                        }
                    }
                }
            }
        }
        if disk.fired().is_none() {
            disk.power_cut(&mut rng);
        }
        cuts += 1;
        let after = disk.mount();
        snap.check("the de-dup snapshot", read_snapshot(&*after, &path))?;
        let got = PeerPulled::load_on(after.clone(), &dir.join("dedup"), 1).durable(PartitionId(0));
        pulled.check("what the peer pulled", Some(got.0))?;
        // What survived is what the next life must keep.
        snap.done = read_snapshot(&*after, &path);
        snap.trying = None;
        pulled.done = Some(got.0);
        pulled.trying = None;
    }
    Ok(cuts)
}
