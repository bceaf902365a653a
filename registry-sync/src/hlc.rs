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

/// How far ahead of this machine's clock a record's version may be: the
/// regions' clocks are assumed within an hour of each other. A version
/// beyond it (a clock far off, or a crafted record claiming version
/// 18446744073709551615) would stop the registry clock: every later local
/// write would claim the same version and change nothing.
pub const MAX_SKEW_MS: u64 = 60 * 60 * 1000;

/// The highest version accepted when the wall clock reads `wall_ms`: an
/// hour ahead, and never beyond what a signed 64-bit column holds.
#[must_use]
pub fn limit(wall_ms: u64) -> Version {
    let ms = wall_ms
        .saturating_add(MAX_SKEW_MS)
        .min((i64::MAX as u64) >> Version::LOGICAL_BITS);
    Version((ms << Version::LOGICAL_BITS) | ((1 << Version::LOGICAL_BITS) - 1))
}

/// Whether `v` is a version this registry may take now.
///
/// # Errors
/// Why not, naming the limit.
pub fn plausible(v: Version, wall_ms: u64) -> Result<(), String> {
    let max = limit(wall_ms);
    if v > max {
        return Err(format!(
            "version {v} is beyond this machine's clock plus {} s (at most {max}): a clock far off, or a forged record",
            MAX_SKEW_MS / 1000
        ));
    }
    Ok(())
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
    fn versions_beyond_the_clock_plus_the_skew_or_the_column_are_refused() {
        let now = 1_800_000_000_000;
        assert!(plausible(tick(Version(0), now), now).is_ok());
        assert!(plausible(tick(Version(0), now + MAX_SKEW_MS), now).is_ok());
        assert!(plausible(tick(Version(0), now + MAX_SKEW_MS + 1), now).is_err());
        assert!(plausible(Version(u64::MAX), now).is_err());
        assert!(limit(u64::MAX).0 <= i64::MAX as u64);
    }

    #[test]
    fn a_write_after_observing_a_future_version_wins_over_it() {
        let remote = tick(Version(0), 9_000);
        let mine = tick(observe(tick(Version(0), 1_000), remote), 1_001);
        assert!(mine > remote);
    }
}
