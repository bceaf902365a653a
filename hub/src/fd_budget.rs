//! Sizing the connection caps under the process's file-descriptor limit.
//!
//! A cap above the limit is no cap: the hub runs out of descriptors first,
//! `accept` fails (and `/healthz` says so), log segments and snapshots
//! cannot be opened. So the caps not set explicitly are derived from the
//! soft `RLIMIT_NOFILE`, keeping a reserve for the log, the registry, peers
//! and the runtime; an explicit cap above what the limit allows is kept but
//! warned about.

pub use fleet_api::process::open_files_limit;

/// Caps asked for (`None`: derive).
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    pub mqtt: Option<usize>,
    pub pending: Option<usize>,
    pub http: Option<usize>,
}

/// The caps in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// MQTT device connections.
    pub mqtt: usize,
    /// Of those, not yet authenticated.
    pub pending: usize,
    /// HTTP connections.
    pub http: usize,
    /// Live-stream watchers (each holds three descriptors: the watcher's,
    /// the gate's to rumqttd, rumqttd's accepted one).
    pub stream: usize,
    /// Descriptors left for everything else.
    pub reserve: u64,
}

const MQTT_DEFAULT: usize = 100_000;
const PENDING_DEFAULT: usize = 4096;
const HTTP_DEFAULT: usize = 1024;
const STREAM_DEFAULT: usize = 1024;

/// The caps for a process that may open `limit` files (`None`: no limit
/// known, the defaults).
pub fn derive(limit: Option<u64>, asked: Asked) -> Budget {
    let Some(limit) = limit else {
        return Budget {
            mqtt: asked.mqtt.unwrap_or(MQTT_DEFAULT),
            pending: asked.pending.unwrap_or(PENDING_DEFAULT),
            http: asked.http.unwrap_or(HTTP_DEFAULT),
            stream: STREAM_DEFAULT,
            reserve: 0,
        };
    };
    // Segments, indexes and snapshots of every partition, the registry,
    // peers, the runtime: a fixed part and a share of larger limits.
    let reserve = 64 + limit / 16;
    let usable = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    // HTTP: its connections, and as many again for TLS handshakes and
    // handshaken connections waiting to be served.
    let http = asked.http.unwrap_or((usable / 16).clamp(8, HTTP_DEFAULT));
    let stream = (usable / 24).clamp(8, STREAM_DEFAULT);
    let mqtt = asked.mqtt.unwrap_or(
        usable
            .saturating_sub(2 * http)
            .saturating_sub(3 * stream)
            .clamp(16, MQTT_DEFAULT),
    );
    let pending = asked
        .pending
        .unwrap_or((mqtt / 2).clamp(8, PENDING_DEFAULT));
    Budget {
        mqtt,
        pending,
        http,
        stream,
        reserve,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_under_the_limit_with_a_reserve() {
        for limit in [128u64, 1024, 4096, 65_536, 1_048_576] {
            let b = derive(Some(limit), Asked::default());
            let used = (b.mqtt + 2 * b.http + 3 * b.stream) as u64 + b.reserve;
            assert!(used <= limit.max(128 + 16), "{limit}: {b:?}");
            assert!(b.pending <= b.mqtt);
        }
        // systemd's default soft limit: a few hundred devices.
        let b = derive(Some(1024), Asked::default());
        assert_eq!((b.mqtt, b.http, b.stream), (673, 56, 37));
        // The deploy unit's LimitNOFILE: the full defaults.
        let b = derive(Some(1_048_576), Asked::default());
        assert_eq!(
            (b.mqtt, b.pending, b.http, b.stream),
            (100_000, 4096, 1024, 1024)
        );
    }

    #[test]
    fn explicit_caps_are_kept() {
        let asked = Asked {
            mqtt: Some(5000),
            pending: Some(100),
            http: Some(64),
        };
        let b = derive(Some(1024), asked);
        assert_eq!((b.mqtt, b.pending, b.http), (5000, 100, 64));
        assert_eq!(derive(None, Asked::default()).mqtt, 100_000);
    }

    #[test]
    fn this_process_has_a_limit() {
        assert!(open_files_limit().is_some_and(|l| l > 0));
    }
}
