//! What a failover checks before it promotes, and says it checked.
//!
//! Both modes: the target hub answers and is healthy (asked now, not from
//! the cache). Planned: there is a healthy primary to hand over from (its
//! replication lag is reported; the promotion itself catches up to lag 0),
//! and the target region's registry holds what the source's holds (highest
//! record version), waited for up to `registry_wait`: devices must not be
//! refused by the region they are sent to. Forced: the registries'
//! divergence is reported, never waited for.

use std::time::Duration;

use fleet_api::concierge::{FailoverCheck, Mode};
use fleet_api::hub::{RegistryStatus, StatusResponse};
use fleet_api::{Region, Role};
use tokio::time::Instant;

use crate::failover::FailoverError;
use crate::view::Fleet;

fn check(name: &str, passed: bool, detail: String) -> FailoverCheck {
    FailoverCheck {
        name: name.into(),
        passed,
        detail,
    }
}

fn describe(region: &Region, r: Option<RegistryStatus>) -> String {
    match r {
        Some(r) => format!(
            "{region} holds {} devices up to version {}",
            r.devices, r.max_version
        ),
        None => format!("{region} does not report its registry"),
    }
}

/// Runs the checks for promoting `to` in `mode`.
///
/// # Errors
/// [`FailoverError::Check`] naming the check that failed.
pub async fn before(
    fleet: &Fleet,
    to: &Region,
    mode: Mode,
) -> Result<Vec<FailoverCheck>, FailoverError> {
    let refused = |message: String| FailoverError::Check {
        region: to.clone(),
        message,
    };
    let spec = fleet
        .spec(to)
        .ok_or_else(|| FailoverError::UnknownRegion(to.clone()))?;
    let mut checks = Vec::new();
    let target = fleet.check(&spec).await.map_err(|why| {
        refused(format!(
            "the target is not healthy ({why}); nothing was promoted"
        ))
    })?;
    checks.push(check(
        "target_healthy",
        true,
        format!(
            "{to} answers and is healthy ({} at epoch {})",
            target.role, target.epoch
        ),
    ));
    // The source: for a planned failover the primary of another region,
    // asked now; a forced one does not wait on a lost region (its last
    // known status is enough for a report).
    let mut source: Option<(Region, StatusResponse)> = None;
    if mode == Mode::Planned {
        for h in fleet.hubs() {
            if &h.spec.region == to {
                continue;
            }
            if let Ok(s) = fleet.check(&h.spec).await
                && s.role == Role::Primary
                && source.as_ref().is_none_or(|(_, o)| s.epoch > o.epoch)
            {
                source = Some((h.spec.region.clone(), s));
            }
        }
    } else {
        source = last_known_primary(fleet, to);
    }
    match mode {
        Mode::Planned => {
            let Some((from, src)) = source else {
                return Err(refused(
                    "a planned failover needs a healthy primary to hand over from; none answers (use forced)".into(),
                ));
            };
            let lag = src.replication.as_ref().map_or(0, |r| r.lag_records);
            checks.push(check(
                "replication_lag",
                true,
                format!(
                    "{from} reports {lag} records not yet in {to} ({} ms); the promotion catches up to lag 0 before switching",
                    src.replication_lag_ms
                ),
            ));
            checks.push(
                wait_for_registry(fleet, &spec, to, &from, src.registry)
                    .await
                    .map_err(refused)?,
            );
        }
        Mode::Forced => {
            let (passed, detail) = match source {
                Some((from, src)) => {
                    let behind = match (src.registry, target.registry) {
                        (Some(s), Some(t)) => t.max_version < s.max_version,
                        _ => true,
                    };
                    (
                        !behind,
                        format!(
                            "{}; {}{}",
                            describe(to, target.registry),
                            describe(&from, src.registry),
                            if behind {
                                ": devices registered only there are refused until registry-sync merges"
                            } else {
                                ""
                            }
                        ),
                    )
                }
                None => (
                    false,
                    format!(
                        "{}; no other region's registry is known",
                        describe(to, target.registry)
                    ),
                ),
            };
            checks.push(check("registry", passed, detail));
        }
    }
    Ok(checks)
}

/// The primary of another region as last seen (it may be down now).
fn last_known_primary(fleet: &Fleet, to: &Region) -> Option<(Region, StatusResponse)> {
    fleet
        .hubs()
        .into_iter()
        .filter(|h| &h.spec.region != to)
        .filter_map(|h| h.status.map(|s| (h.spec.region, s)))
        .filter(|(_, s)| s.role == Role::Primary)
        .max_by_key(|(_, s)| s.epoch)
}

/// Waits until the target's registry reaches the source's highest version.
async fn wait_for_registry(
    fleet: &Fleet,
    spec: &crate::config::HubSpec,
    to: &Region,
    from: &Region,
    source: Option<RegistryStatus>,
) -> Result<FailoverCheck, String> {
    let Some(source) = source else {
        return Ok(check(
            "registry",
            false,
            format!("{from} does not report its registry; not compared"),
        ));
    };
    let started = Instant::now();
    let deadline = started + fleet.config.registry_wait;
    loop {
        let target = fleet.check(spec).await.ok().and_then(|s| s.registry);
        if let Some(t) = target
            && t.max_version >= source.max_version
        {
            return Ok(check(
                "registry",
                true,
                format!(
                    "{}; {} (waited {} ms)",
                    describe(to, Some(t)),
                    describe(from, Some(source)),
                    started.elapsed().as_millis()
                ),
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the registry of {to} is behind {from}'s after {} s ({}; {}): devices registered only in {from} would be refused; run registry-sync merge, or use forced",
                fleet.config.registry_wait.as_secs(),
                describe(to, target),
                describe(from, Some(source)),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
