//! Connected devices: one session per device id. A new connection with the
//! same id takes over (the old one is told to close), and the hub can close
//! one device (revoked) or every device (demoted, shutting down).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fleet_api::{DeviceId, Epoch, Mid};
use tokio::sync::Notify;

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
    /// Silent for longer than its keep-alive allows (1.5×).
    KeepAlive,
    Shutdown,
    /// Its partition is written by another hub of the region now: the
    /// device asks the concierge again and goes there.
    PartitionMoved,
}

impl Kick {
    pub fn as_str(self) -> &'static str {
        match self {
            Kick::TakenOver => "taken_over",
            Kick::Revoked => "revoked",
            Kick::Demoted => "demoted",
            Kick::Moving(_) => "moving",
            Kick::KeepAlive => "keepalive",
            Kick::Shutdown => "shutdown",
            Kick::PartitionMoved => "partition_moved",
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

/// What the outside tells one connection. A watch, not a queue: only the
/// latest of each matters (the highest mids, the first kick), so a busy
/// connection misses nothing and a burst of notices fills nothing. One
/// small channel per connection: an idle device costs the hub little.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// Set once: the connection must end.
    pub kick: Option<Kick>,
    /// The highest mid the other region durably holds.
    pub replicated: Mid,
    /// What is durable here and in both regions, answered asynchronously
    /// (the query made when the device subscribed to its acks).
    pub acked: Option<(Option<Mid>, Option<Mid>)>,
}

impl Signals {
    /// Applies `msg`; true when something changed.
    fn apply(&mut self, msg: Outbound) -> bool {
        match msg {
            Outbound::Replicated(m) => {
                let higher = m > self.replicated;
                if higher {
                    self.replicated = m;
                }
                higher
            }
            Outbound::Acked {
                committed,
                replicated,
            } => {
                let next = match self.acked {
                    None => (committed, replicated),
                    Some((c, r)) => (c.max(committed), r.max(replicated)),
                };
                let changed = self.acked != Some(next);
                self.acked = Some(next);
                changed
            }
        }
    }
}

/// One connection's signals and the wake-up that says they changed: a
/// mutex and a `Notify` (whose stored permit means no change is missed
/// between two looks), far smaller than a channel, so an idle device costs
/// the hub little.
#[derive(Debug, Default)]
pub struct Cell {
    signals: Mutex<Signals>,
    changed: Notify,
    /// When the device was last heard from (ms on the sessions' clock) and
    /// how long it may stay silent (0: no keep-alive): one sweep checks
    /// every connection, instead of a timer in each.
    last_heard: AtomicU64,
    silence_ms: AtomicU64,
    /// Set while the hub is not reading from the device (throttled, its
    /// window full, waiting for the ingest budget): its silence is the
    /// hub's doing, not the device's.
    paused: std::sync::atomic::AtomicBool,
}

impl Cell {
    /// Changes the signals with `f`; wakes the connection if it said so.
    fn update(&self, f: impl FnOnce(&mut Signals) -> bool) {
        let changed = f(&mut self.signals.lock().unwrap_or_else(|e| e.into_inner()));
        if changed {
            self.changed.notify_one();
        }
    }

    /// The signals now.
    pub fn get(&self) -> Signals {
        *self.signals.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Handle {
    id: u64,
    cell: Arc<Cell>,
}

/// Every connected device.
pub struct Sessions {
    map: Mutex<HashMap<DeviceId, Handle>>,
    next: AtomicU64,
    /// The clock of [`Cell::last_heard`].
    started: tokio::time::Instant,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            map: Mutex::default(),
            next: AtomicU64::new(0),
            started: tokio::time::Instant::now(),
        }
    }
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
    /// Its signals; the connection's own tasks deliver through it too.
    pub cell: Arc<Cell>,
    device: DeviceId,
    sessions: &'a Sessions,
}

impl Session<'_> {
    /// Waits until the signals changed since the last call (at once if they
    /// changed meanwhile), and returns them.
    pub async fn changed(&self) -> Signals {
        self.cell.changed.notified().await;
        self.cell.get()
    }

    /// The device may stay silent this long before the sweep closes it.
    pub fn set_keep_alive(&self, silence: Option<std::time::Duration>) {
        let ms = silence.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.heard();
        self.cell.silence_ms.store(ms, Ordering::Release);
    }

    /// The device was heard from (or is not to be blamed for silence).
    pub fn heard(&self) {
        self.cell
            .last_heard
            .store(self.sessions.now_ms(), Ordering::Release);
    }

    /// Whether the hub reads from the device now: while it does not, the
    /// device's silence is not counted (and the count starts again after).
    pub fn reading(&self, reading: bool) {
        let was_paused = self.cell.paused.swap(!reading, Ordering::AcqRel);
        if was_paused && reading {
            self.heard();
        }
    }
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

/// Delivers `msg` to the connection of `cell`.
pub fn deliver(cell: &Cell, msg: Outbound) {
    cell.update(|s| s.apply(msg));
}

fn kick_one(cell: &Cell, why: Kick) {
    cell.update(|s| {
        let first = s.kick.is_none();
        if first {
            s.kick = Some(why);
        }
        first
    });
}

impl Sessions {
    /// Registers a connection for `device`, taking over any previous one.
    pub fn register(&self, device: &DeviceId) -> Session<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cell = Arc::new(Cell::default());
        // Heard now, before the sweep can see it.
        cell.last_heard.store(self.now_ms(), Ordering::Release);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let old = map.insert(
            device.clone(),
            Handle {
                id,
                cell: cell.clone(),
            },
        );
        metrics::gauge!("fleet_hub_connections").set(map.len() as f64);
        drop(map);
        if let Some(old) = old {
            kick_one(&old.cell, Kick::TakenOver);
        }
        Session {
            id,
            cell,
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
            kick_one(&h.cell, why);
        }
    }

    /// Closes every connection.
    pub fn kick_all(&self, why: Kick) {
        for h in self.map.lock().unwrap_or_else(|e| e.into_inner()).values() {
            kick_one(&h.cell, why);
        }
    }

    /// Closes the connection of every device `which` selects.
    pub fn kick_where(&self, which: impl Fn(&DeviceId) -> bool, why: Kick) {
        for (device, h) in self.map.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if which(device) {
                kick_one(&h.cell, why);
            }
        }
    }

    /// Delivers `msg` to `device`'s connection if it is connected; never
    /// lost to a busy connection (the highest values are kept).
    pub fn send(&self, device: &DeviceId, msg: Outbound) {
        if let Some(h) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
        {
            deliver(&h.cell, msg);
        }
    }

    pub fn count(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Closes every connection silent for longer than its keep-alive allows.
    pub fn sweep(&self) {
        let now = self.now_ms();
        for h in self.map.lock().unwrap_or_else(|e| e.into_inner()).values() {
            let silence = h.cell.silence_ms.load(Ordering::Acquire);
            let heard = h.cell.last_heard.load(Ordering::Acquire);
            let paused = h.cell.paused.load(Ordering::Acquire);
            if silence > 0 && !paused && now.saturating_sub(heard) > silence {
                kick_one(&h.cell, Kick::KeepAlive);
            }
        }
    }

    /// Sweeps every `every` until `shutdown`: keep-alives are enforced
    /// within that much of their limit.
    pub async fn sweep_loop(
        self: Arc<Self>,
        every: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => self.sweep(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test(start_paused = true)]
    async fn the_sweep_closes_only_connections_silent_past_their_keep_alive() {
        let s = Sessions::default();
        let (quiet, talking, forever) = (
            DeviceId::new("quiet").unwrap(),
            DeviceId::new("talking").unwrap(),
            DeviceId::new("forever").unwrap(),
        );
        let a = s.register(&quiet);
        let b = s.register(&talking);
        let c = s.register(&forever);
        a.set_keep_alive(Some(std::time::Duration::from_millis(1500)));
        b.set_keep_alive(Some(std::time::Duration::from_millis(1500)));
        c.set_keep_alive(None);
        for _ in 0..4 {
            tokio::time::advance(std::time::Duration::from_millis(500)).await;
            b.heard();
            s.sweep();
        }
        assert_eq!(a.cell.get().kick, Some(Kick::KeepAlive));
        assert_eq!(b.cell.get().kick, None);
        assert_eq!(c.cell.get().kick, None);
        // While the hub does not read from a device, its silence is not
        // counted; once it reads again, the count starts over.
        let paused = DeviceId::new("paused").unwrap();
        let d = s.register(&paused);
        d.set_keep_alive(Some(std::time::Duration::from_millis(1500)));
        d.reading(false);
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        s.sweep();
        assert_eq!(d.cell.get().kick, None);
        d.reading(true);
        tokio::time::advance(std::time::Duration::from_millis(1000)).await;
        s.sweep();
        assert_eq!(d.cell.get().kick, None);
        tokio::time::advance(std::time::Duration::from_millis(1000)).await;
        s.sweep();
        assert_eq!(d.cell.get().kick, Some(Kick::KeepAlive));
    }

    #[test]
    fn takeover_kicks_the_old_session_only() {
        let s = Sessions::default();
        let d = DeviceId::new("d").unwrap();
        let first = s.register(&d);
        let second = s.register(&d);
        assert_eq!(first.cell.get().kick, Some(Kick::TakenOver));
        assert_eq!(second.cell.get().kick, None);
        drop(first); // must not unregister the newer session
        assert_eq!(s.count(), 1);
        drop(second);
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn a_burst_of_replicated_notices_loses_none() {
        let s = Sessions::default();
        let d = DeviceId::new("d").unwrap();
        let session = s.register(&d);
        // The connection is busy: a thousand notices arrive unread.
        for m in 1..=1000 {
            s.send(&d, Outbound::Replicated(Mid(m)));
        }
        let seen = session.changed().now_or_never().expect("woken");
        assert_eq!(seen.replicated, Mid(1000));
        // Late, lower notices change nothing, and wake nobody.
        s.send(&d, Outbound::Replicated(Mid(7)));
        assert!(session.changed().now_or_never().is_none());
        // A kick is kept once: a later one does not replace it.
        s.kick(&d, Kick::Revoked);
        s.kick(&d, Kick::Shutdown);
        let seen = session.changed().now_or_never().expect("woken");
        assert_eq!(seen.kick, Some(Kick::Revoked));
    }
}
