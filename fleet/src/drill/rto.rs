//! RTO as DESIGN.md defines it: per device, from the moment its hub stopped
//! serving it (the kill, or the fence of a planned promotion, which closes
//! its connection) to its first PUBACK from the new primary; and where that
//! time went, from the devices' own session timestamps (`simulate
//! --report`): detection and promotion (the fleet's), the concierge's
//! answer, the admission slot it gave, the CONNECT, and the first PUBACK.

use device_agent::agent::SessionTimes;
use serde::Serialize;

use super::Percentiles;

/// One device's RTO and its parts, ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    pub rto: u64,
    /// Kill → the concierge sees the primary down (forced; 0 when planned).
    pub detection: u64,
    /// → the new primary is promoted.
    pub promotion: u64,
    /// → the concierge named the new primary to this device.
    pub discovery: u64,
    /// The start offset the concierge gave (admission control).
    pub admission: u64,
    /// → CONNACK.
    pub connect: u64,
    /// → the session's first PUBLISH: a device whose outbox was empty
    /// publishes when its next message comes (rate-bound, not the fleet's).
    pub idle: u64,
    /// → the first PUBACK (durable in the new primary).
    pub publish: u64,
}

/// The fleet's RTO.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rto {
    pub rto_ms: Percentiles,
    /// The device at the 99th percentile, broken down.
    pub p99_breakdown: Breakdown,
    /// Each part's own percentiles over all devices that moved.
    pub discovery_ms: Percentiles,
    pub admission_ms: Percentiles,
    pub connect_ms: Percentiles,
    pub idle_ms: Percentiles,
    pub publish_ms: Percentiles,
    pub devices_moved: usize,
}

/// What the drill knows of the failover, wall-clock ms.
#[derive(Clone, Copy, Debug)]
pub struct Failover<'a> {
    /// The region devices had to move to.
    pub new_region: &'a str,
    /// When the primary was killed, or the planned promotion asked for.
    pub started: u64,
    /// Forced: when the concierge saw the primary down; planned: `None`
    /// (each device's hub stopped serving it when it fenced).
    pub detected: Option<u64>,
    /// When the new primary was promoted.
    pub promoted: u64,
}

/// One device: its first session on the new primary with a PUBACK, and
/// when its old hub stopped serving it. `None` when it never moved.
pub fn device(sessions: &[SessionTimes], f: &Failover<'_>) -> Option<Breakdown> {
    let (i, new) = sessions.iter().enumerate().find(|(_, s)| {
        s.region == f.new_region && s.connected_ms >= f.started && s.first_puback_ms.is_some()
    })?;
    let puback = new.first_puback_ms?;
    let stopped = match f.detected {
        // A kill stops serving everyone at once.
        Some(_) => f.started,
        // A fence closes each connection: the end of the device's session
        // before the new one (if it ended after the promotion was asked).
        None => sessions[..i]
            .iter()
            .rev()
            .filter(|s| s.region != f.new_region)
            .find_map(|s| s.ended_ms)
            .map_or(f.started, |e| e.max(f.started)),
    }
    .min(puback);
    // The device's own timestamps are exact and in order; the drill's
    // (detected, promoted) are polled, so they are held between the stop
    // and the device's answer: the parts then add up to the RTO exactly.
    let answered = new.endpoint_at_ms.clamp(stopped, puback);
    let promoted = f.promoted.clamp(stopped, answered);
    let detected = f.detected.map_or(stopped, |d| d.clamp(stopped, promoted));
    let admitted = (answered + new.start_in_ms).min(puback);
    let connected = new.connected_ms.clamp(admitted, puback);
    let sent = new
        .first_publish_ms
        .unwrap_or(connected)
        .clamp(connected, puback);
    Some(Breakdown {
        rto: puback - stopped,
        detection: detected - stopped,
        promotion: promoted - detected,
        discovery: answered - promoted,
        admission: admitted - answered,
        connect: connected - admitted,
        idle: sent - connected,
        publish: puback - sent,
    })
}

fn percentiles(mut v: Vec<u64>) -> Percentiles {
    v.sort_unstable();
    let at = |q: f64| {
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        max: v.last().copied().unwrap_or(0),
    }
}

/// The fleet's RTO from every device's sessions.
pub fn fleet<'a>(devices: impl IntoIterator<Item = &'a [SessionTimes]>, f: &Failover<'_>) -> Rto {
    let mut moved: Vec<Breakdown> = devices.into_iter().filter_map(|s| device(s, f)).collect();
    moved.sort_unstable_by_key(|b| b.rto);
    let p99_breakdown = moved
        .get(((moved.len().max(1) - 1) as f64 * 0.99).round() as usize)
        .copied()
        .unwrap_or_default();
    let part = |g: fn(&Breakdown) -> u64| percentiles(moved.iter().map(g).collect());
    Rto {
        rto_ms: part(|b| b.rto),
        p99_breakdown,
        discovery_ms: part(|b| b.discovery),
        admission_ms: part(|b| b.admission),
        connect_ms: part(|b| b.connect),
        idle_ms: part(|b| b.idle),
        publish_ms: part(|b| b.publish),
        devices_moved: moved.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(
        region: &str,
        at: u64,
        start_in: u64,
        conn: u64,
        ack: Option<u64>,
        end: Option<u64>,
    ) -> SessionTimes {
        SessionTimes {
            region: region.into(),
            epoch: 1,
            endpoint_at_ms: at,
            start_in_ms: start_in,
            connected_ms: conn,
            first_publish_ms: ack.map(|a| a - 5),
            first_puback_ms: ack,
            ended_ms: end,
        }
    }

    #[test]
    fn a_forced_failover_counts_from_the_kill_to_the_first_puback() {
        let f = Failover {
            new_region: "b",
            started: 10_000,
            detected: Some(10_400),
            promoted: 10_600,
        };
        let s = [
            session("a", 1_000, 0, 1_010, Some(1_020), Some(10_001)),
            // A failed look at a before b was promoted leaves no session;
            // b named at 10_650, slot 100 ms later, CONNACK at 10_760.
            session("b", 10_650, 100, 10_760, Some(10_790), None),
        ];
        let b = device(&s, &f).unwrap();
        assert_eq!(
            b,
            Breakdown {
                rto: 790,
                detection: 400,
                promotion: 200,
                discovery: 50,
                admission: 100,
                connect: 10,
                idle: 25,
                publish: 5,
            }
        );
        assert_eq!(
            b.detection + b.promotion + b.discovery + b.admission + b.connect + b.idle + b.publish,
            b.rto
        );
    }

    #[test]
    fn a_planned_failover_counts_from_the_fence_that_closed_the_session() {
        let f = Failover {
            new_region: "b",
            started: 10_000,
            detected: None,
            promoted: 10_300,
        };
        let s = [
            session("a", 1_000, 0, 1_010, Some(1_020), Some(10_120)),
            session("b", 10_310, 0, 10_330, Some(10_345), None),
        ];
        let b = device(&s, &f).unwrap();
        assert_eq!(b.rto, 225);
        assert_eq!((b.detection, b.promotion, b.discovery), (0, 180, 10));
    }

    #[test]
    fn a_planned_stop_is_the_old_regions_session_end_not_a_failed_try_at_the_new_one() {
        let f = Failover {
            new_region: "b",
            started: 10_000,
            detected: None,
            promoted: 10_300,
        };
        let s = [
            session("a", 1_000, 0, 1_010, Some(1_020), Some(10_120)),
            // A first try at b that never got a PUBACK ends later.
            session("b", 10_310, 0, 10_330, None, Some(10_900)),
            session("b", 10_950, 0, 10_960, Some(10_975), None),
        ];
        assert_eq!(device(&s, &f).unwrap().rto, 855);
    }

    #[test]
    fn a_device_without_a_puback_from_the_new_primary_did_not_move() {
        let f = Failover {
            new_region: "b",
            started: 10_000,
            detected: None,
            promoted: 10_300,
        };
        let s = [
            session("a", 1_000, 0, 1_010, Some(1_020), Some(10_120)),
            session("b", 10_310, 0, 10_330, None, Some(10_400)),
            // A session on b from before the failover does not count.
            session("b", 9_000, 0, 9_010, Some(9_020), None),
        ];
        assert_eq!(device(&s, &f), None);
        let rto = fleet([&s[..]], &f);
        assert_eq!(rto.devices_moved, 0);
    }
}
