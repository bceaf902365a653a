//! The hub's role and epoch, persisted next to its data.
//!
//! Role and epoch live in the hubs (the concierge only reads them). They are
//! written with fsync + rename before any behaviour depends on them, so a
//! restarted hub comes back in the role it last had, never in the one its
//! command line suggested at first start.
//!
//! The same file says whether the peer region is detached (this hub runs
//! alone: acknowledgements are local), so a restart does not bring back a
//! stalled pairing with a region that is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_api::storage::{self, Storage};
use fleet_api::{Epoch, Region, Role};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Role and epoch, changed together.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RoleEpoch {
    pub role: Role,
    pub epoch: Epoch,
}

/// The peer region is detached: this hub acknowledges what is durable here
/// alone, until the peer has caught up again.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Detached {
    /// Wall-clock ms when it was detached.
    pub since_ms: u64,
    /// Detached by an operator: only an operator attaches it again. Otherwise
    /// (a forced promotion, or unreachable too long) the peer re-attaches by
    /// catching up.
    pub manual: bool,
    /// Per partition, the high watermark when it was detached.
    pub high_watermarks: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct File {
    region: Region,
    role: Role,
    epoch: Epoch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detached: Option<Detached>,
}

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a hub state file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the data directory belongs to region {found}, not {expected}")]
    WrongRegion { found: Region, expected: Region },
    #[error("refusing to move the epoch back from {current} to {next}")]
    EpochBackwards { current: Epoch, next: Epoch },
}

/// The current role and epoch, observable.
#[derive(Debug)]
pub struct HubState {
    fs: Arc<dyn Storage>,
    path: PathBuf,
    region: Region,
    current: watch::Sender<RoleEpoch>,
    /// A fenced primary accepts no writes (planned promotion in progress,
    /// or not yet sure after a restart that no one superseded it).
    fenced: std::sync::atomic::AtomicBool,
    detached: watch::Sender<Option<Detached>>,
    /// Serializes writes of the file (role/epoch and detachment share it).
    write: std::sync::Mutex<()>,
}

impl HubState {
    /// Loads `DIR/state.json`, or creates it with `initial` role and epoch 1.
    ///
    /// # Errors
    /// When the file is unreadable, invalid, or names another region.
    pub fn open(dir: &Path, region: &Region, initial: Role) -> Result<HubState, StateError> {
        Self::open_on(storage::real(), dir, region, initial)
    }

    /// [`HubState::open`] on the given disk.
    ///
    /// # Errors
    /// As [`HubState::open`].
    pub fn open_on(
        fs: Arc<dyn Storage>,
        dir: &Path,
        region: &Region,
        initial: Role,
    ) -> Result<HubState, StateError> {
        let path = dir.join("state.json");
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        storage::create_dir_durable(&*fs, dir).map_err(io)?;
        let mut detached = None;
        let current = match fs.read(&path) {
            Ok(bytes) => {
                let f: File = serde_json::from_slice(&bytes).map_err(|e| StateError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                if &f.region != region {
                    return Err(StateError::WrongRegion {
                        found: f.region,
                        expected: region.clone(),
                    });
                }
                if f.role != initial {
                    tracing::info!(
                        stored = %f.role,
                        flag = %initial,
                        epoch = %f.epoch,
                        "keeping the stored role; --role applies only to a new data directory"
                    );
                }
                detached = f.detached;
                RoleEpoch {
                    role: f.role,
                    epoch: f.epoch,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let re = RoleEpoch {
                    role: initial,
                    epoch: Epoch(1),
                };
                write(&*fs, &path, region, re, None).map_err(io)?;
                re
            }
            Err(e) => return Err(io(e)),
        };
        Ok(HubState {
            fs,
            path,
            region: region.clone(),
            current: watch::Sender::new(current),
            fenced: std::sync::atomic::AtomicBool::new(false),
            detached: watch::Sender::new(detached),
            write: std::sync::Mutex::new(()),
        })
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn get(&self) -> RoleEpoch {
        *self.current.borrow()
    }

    /// True when this hub may accept device connections and writes.
    pub fn accepting(&self) -> bool {
        self.get().role == Role::Primary && !self.fenced()
    }

    pub fn fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops (or resumes) accepting writes without changing role or epoch.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced
            .store(fenced, std::sync::atomic::Ordering::Release);
        self.current.send_modify(|_| {});
    }

    pub fn subscribe(&self) -> watch::Receiver<RoleEpoch> {
        self.current.subscribe()
    }

    /// Persists and then publishes a new role and epoch.
    ///
    /// # Errors
    /// When the state cannot be written durably (nothing changes then).
    pub fn set(&self, next: RoleEpoch) -> Result<(), StateError> {
        let _one = self.write.lock().unwrap_or_else(|e| e.into_inner());
        // Under the write lock: no two changes can interleave, and none
        // moves the epoch back (a stale decision loses here, visibly).
        let current = self.get().epoch;
        if next.epoch < current {
            return Err(StateError::EpochBackwards {
                current,
                next: next.epoch,
            });
        }
        let detached = self.detached.borrow().clone();
        write(&*self.fs, &self.path, &self.region, next, detached).map_err(|source| {
            StateError::Io {
                path: self.path.clone(),
                source,
            }
        })?;
        self.current.send_replace(next);
        Ok(())
    }

    /// Whether (and since when) the peer is detached.
    pub fn detached(&self) -> Option<Detached> {
        self.detached.borrow().clone()
    }

    pub fn subscribe_detached(&self) -> watch::Receiver<Option<Detached>> {
        self.detached.subscribe()
    }

    /// Persists and then publishes the peer's detachment (`None`: attached).
    ///
    /// # Errors
    /// When the state cannot be written durably (nothing changes then).
    pub fn set_detached(&self, next: Option<Detached>) -> Result<(), StateError> {
        let _one = self.write.lock().unwrap_or_else(|e| e.into_inner());
        write(
            &*self.fs,
            &self.path,
            &self.region,
            self.get(),
            next.clone(),
        )
        .map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.detached.send_replace(next);
        Ok(())
    }
}

fn write(
    fs: &dyn Storage,
    path: &Path,
    region: &Region,
    re: RoleEpoch,
    detached: Option<Detached>,
) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(&File {
        region: region.clone(),
        role: re.role,
        epoch: re.epoch,
        detached,
    })
    .map_err(std::io::Error::other)?;
    storage::replace_durable(fs, path, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_persists_and_the_stored_role_wins() {
        let dir = tempfile::tempdir().unwrap();
        let eu = Region::new("eu").unwrap();
        let s = HubState::open(dir.path(), &eu, Role::Secondary).unwrap();
        assert_eq!(
            s.get(),
            RoleEpoch {
                role: Role::Secondary,
                epoch: Epoch(1)
            }
        );
        s.set(RoleEpoch {
            role: Role::Primary,
            epoch: Epoch(2),
        })
        .unwrap();
        let again = HubState::open(dir.path(), &eu, Role::Secondary).unwrap();
        assert_eq!(
            again.get(),
            RoleEpoch {
                role: Role::Primary,
                epoch: Epoch(2)
            }
        );
        let d = Detached {
            since_ms: 7,
            manual: true,
            high_watermarks: vec![3, 4],
        };
        again.set_detached(Some(d.clone())).unwrap();
        let third = HubState::open(dir.path(), &eu, Role::Secondary).unwrap();
        assert_eq!(third.detached(), Some(d));
        assert_eq!(
            third.get().epoch,
            Epoch(2),
            "detaching keeps role and epoch"
        );
        third.set_detached(None).unwrap();
        assert_eq!(
            HubState::open(dir.path(), &eu, Role::Secondary)
                .unwrap()
                .detached(),
            None
        );
        let err =
            HubState::open(dir.path(), &Region::new("us").unwrap(), Role::Primary).unwrap_err();
        assert!(err.to_string().contains("belongs to region eu"), "{err}");
    }
}
