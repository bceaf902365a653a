//! Connected devices: one session per device id. A new connection with the
//! same id takes over (the old one is told to close), and the hub can close
//! one device (revoked) or every device (demoted, shutting down).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fleet_api::{DeviceId, Epoch, Mid};
use tokio::sync::{mpsc, watch};

/// Why a session must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    TakenOver,
    Revoked,
    Demoted,
    /// Another hub takes over at this epoch (a planned promotion fenced
    /// this one, or it learned a higher epoch): the device is told so on
    /// its acks topic before the connection closes, and moves at once.
    Moving(Epoch),
    Shutdown,
}

impl Kick {
    pub fn as_str(self) -> &'static str {
        match self {
            Kick::TakenOver => "taken_over",
            Kick::Revoked => "revoked",
            Kick::Demoted => "demoted",
            Kick::Moving(_) => "moving",
            Kick::Shutdown => "shutdown",
        }
    }
}

/// Sent to a connection from outside its task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// What is durable here and in both regions, learned asynchronously
    /// (the answer to a query made when the device subscribed to its acks).
    Acked {
        committed: Option<Mid>,
        replicated: Option<Mid>,
    },
    /// The other region durably holds the device's records up to this mid.
    Replicated(Mid),
}

struct Handle {
    id: u64,
    kick: watch::Sender<Option<Kick>>,
    out: mpsc::Sender<Outbound>,
    /// The highest mid the other region holds: a watch, not a queue, so a
    /// connection that is busy for a moment misses nothing (only the
    /// highest matters) and a burst of notices cannot fill anything.
    replicated: watch::Sender<Mid>,
}

/// Every connected device.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<DeviceId, Handle>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("connected", &self.count())
            .finish()
    }
}

/// A registered connection. Dropping it unregisters the device (unless a
/// newer connection has taken over).
pub struct Session<'a> {
    pub id: u64,
    pub kicked: watch::Receiver<Option<Kick>>,
    pub outbound: mpsc::Receiver<Outbound>,
    pub sender: mpsc::Sender<Outbound>,
    /// [`Outbound::Replicated`] notices, the highest only.
    pub replicated: watch::Receiver<Mid>,
    device: DeviceId,
    sessions: &'a Sessions,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("device", &self.device)
            .finish()
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let mut map = self.sessions.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.device).is_some_and(|h| h.id == self.id) {
            map.remove(&self.device);
        }
        metrics::gauge!("fleet_hub_connections").set(map.len() as f64);
    }
}

impl Sessions {
    /// Registers a connection for `device`, taking over any previous one.
    pub fn register(&self, device: &DeviceId) -> Session<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (kick, kicked) = watch::channel(None);
        let (out, outbound) = mpsc::channel(64);
        let (replicated_tx, replicated) = watch::channel(Mid(0));
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let old = map.insert(
            device.clone(),
            Handle {
                id,
                kick,
                out: out.clone(),
                replicated: replicated_tx,
            },
        );
        metrics::gauge!("fleet_hub_connections").set(map.len() as f64);
        drop(map);
        if let Some(old) = old {
            let _ = old.kick.send(Some(Kick::TakenOver));
        }
        Session {
            id,
            kicked,
            outbound,
            sender: out,
            replicated,
            device: device.clone(),
            sessions: self,
        }
    }

    /// Closes `device`'s connection, if any.
    pub fn kick(&self, device: &DeviceId, why: Kick) {
        if let Some(h) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
        {
            let _ = h.kick.send(Some(why));
        }
    }

    /// Closes every connection.
    pub fn kick_all(&self, why: Kick) {
        for h in self.map.lock().unwrap_or_else(|e| e.into_inner()).values() {
            let _ = h.kick.send(Some(why));
        }
    }

    /// Delivers `msg` to `device`'s connection if it is connected.
    /// `Replicated` notices are never lost (the highest is kept); an
    /// `Acked` answer is dropped only if 64 are already waiting.
    pub fn send(&self, device: &DeviceId, msg: Outbound) {
        if let Some(h) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
        {
            match msg {
                Outbound::Replicated(m) => {
                    h.replicated.send_if_modified(|cur| {
                        let higher = m > *cur;
                        if higher {
                            *cur = m;
                        }
                        higher
                    });
                }
                Outbound::Acked { .. } => {
                    let _ = h.out.try_send(msg);
                }
            }
        }
    }

    pub fn count(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_kicks_the_old_session_only() {
        let s = Sessions::default();
        let d = DeviceId::new("d").unwrap();
        let first = s.register(&d);
        let second = s.register(&d);
        assert_eq!(*first.kicked.borrow(), Some(Kick::TakenOver));
        assert_eq!(*second.kicked.borrow(), None);
        drop(first); // must not unregister the newer session
        assert_eq!(s.count(), 1);
        drop(second);
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn a_burst_of_replicated_notices_loses_none() {
        let s = Sessions::default();
        let d = DeviceId::new("d").unwrap();
        let mut session = s.register(&d);
        // The connection is busy: a thousand notices arrive unread.
        for m in 1..=1000 {
            s.send(&d, Outbound::Replicated(Mid(m)));
        }
        assert!(session.replicated.has_changed().unwrap());
        assert_eq!(*session.replicated.borrow_and_update(), Mid(1000));
        // Late, lower notices change nothing.
        s.send(&d, Outbound::Replicated(Mid(7)));
        assert!(!session.replicated.has_changed().unwrap());
    }
}
