//! Hybrid logical clock for registry versions.
//!
//! A version is `wall_ms << 16 | logical`. A local write gets a version
//! greater than every version this registry has written *or merged*, and at
//! least the wall clock, so a change made after seeing a remote record always
//! wins over it, and versions stay close to real time for humans.

use fleet_api::Version;

/// The version for a local write, given the greatest version this registry has
/// seen and the wall clock.
#[must_use]
pub fn tick(last: Version, wall_ms: u64) -> Version {
    let physical = wall_ms << Version::LOGICAL_BITS;
    Version(physical.max(last.0.saturating_add(1)))
}

/// The clock after seeing `remote` (a merged record's version).
#[must_use]
pub fn observe(last: Version, remote: Version) -> Version {
    last.max(remote)
}

/// Milliseconds since the Unix epoch from the system clock.
pub fn wall_ms() -> u64 {
    fleet_api::UnixMillis::now().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_follows_the_wall_clock_when_it_is_ahead() {
        let v = tick(Version(0), 1_000);
        assert_eq!(v.millis(), 1_000);
        assert_eq!(v.0 & 0xffff, 0);
    }

    #[test]
    fn tick_is_strictly_monotonic_when_the_clock_stalls_or_goes_back() {
        let a = tick(Version(0), 5_000);
        let b = tick(a, 5_000);
        let c = tick(b, 4_000);
        assert!(a < b && b < c);
        assert_eq!(c.millis(), 5_000);
    }

    #[test]
    fn a_write_after_observing_a_future_version_wins_over_it() {
        let remote = tick(Version(0), 9_000);
        let mine = tick(observe(tick(Version(0), 1_000), remote), 1_001);
        assert!(mine > remote);
    }
}
