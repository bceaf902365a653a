//! What a failover checks before it promotes, and says it checked.
//!
//! Both modes: the target hub answers and is healthy (a manual failover
//! asks it now; an automatic one trusts the poller's view, which already
//! tolerates single failed probes, so it is not slowed down). Planned: there
//! is a healthy primary to hand over from (its replication lag is reported;
//! the promotion itself catches up to lag 0), and the target region's
//! registry holds what the source region wrote (highest version per origin
//! region), waited for up to `registry_wait`: devices must not be refused by
//! the region they are sent to. Forced: the registries' divergence is
//! reported, never waited for.

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

fn describe(region: &Region, r: Option<&RegistryStatus>) -> String {
    match r {
        Some(r) => format!(
            "{region} holds {} devices up to version {}",
            r.devices, r.max_version
        ),
        None => format!("{region} does not report its registry"),
    }
}

/// Runs the checks for promoting `to` in `mode`; `live`: ask the target
/// now (manual failovers) rather than trust the poller's view.
///
/// # Errors
/// [`FailoverError::Check`] naming the check that failed.
pub async fn before(
    fleet: &Fleet,
    to: &Region,
    mode: Mode,
    live: bool,
) -> Result<Vec<FailoverCheck>, FailoverError> {
    let refused = |message: String| FailoverError::Check {
        region: to.clone(),
        message,
    };
    let spec = fleet
        .spec(to)
        .ok_or_else(|| FailoverError::UnknownRegion(to.clone()))?;
    let mut checks = Vec::new();
    let target = if live {
        fleet.check(&spec).await.map_err(|why| {
            refused(format!(
                "the target does not count as healthy ({why}); nothing was promoted"
            ))
        })?
    } else {
        fleet
            .hubs()
            .into_iter()
            .find(|h| &h.spec.region == to && h.healthy)
            .and_then(|h| h.status)
            .ok_or_else(|| refused("the target is not healthy; nothing was promoted".into()))?
    };
    checks.push(check(
        "target_healthy",
        true,
        format!(
            "{to} answers and is healthy ({} at epoch {})",
            target.role, target.epoch
        ),
    ));
    match mode {
        Mode::Planned => {
            // The source: the primary of another region, asked now.
            let mut source: Option<(Region, StatusResponse)> = None;
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
            let Some((from, src)) = source else {
                return Err(refused(
                    "a planned failover needs a primary to hand over from, and no other region's hub answers as a healthy primary; if the primary region is lost, use forced".into(),
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
                wait_for_registry(fleet, &spec, to, &from, src.registry.as_ref())
                    .await
                    .map_err(refused)?,
            );
        }
        Mode::Forced => {
            // A lost region is not waited for: its last known status is
            // enough for a report.
            let (passed, detail) = match last_known_primary(fleet, to) {
                Some((from, src)) => match (&src.registry, &target.registry) {
                    (Some(s), Some(t)) => {
                        let holds = t.holds_writes_of(s, from.as_str());
                        (
                            holds,
                            format!(
                                "{}; {} when last seen{}",
                                describe(to, Some(t)),
                                describe(&from, Some(s)),
                                if holds {
                                    ""
                                } else {
                                    ": devices registered only there are refused until registry-sync merges"
                                }
                            ),
                        )
                    }
                    (s, t) => (
                        false,
                        format!(
                            "{}; {}: not compared",
                            describe(to, t.as_ref()),
                            describe(&from, s.as_ref())
                        ),
                    ),
                },
                None => (
                    false,
                    format!(
                        "{}; no other region's registry is known",
                        describe(to, target.registry.as_ref())
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

/// Waits until the target's registry holds what the source region wrote.
async fn wait_for_registry(
    fleet: &Fleet,
    spec: &crate::config::HubSpec,
    to: &Region,
    from: &Region,
    source: Option<&RegistryStatus>,
) -> Result<FailoverCheck, String> {
    let Some(source) = source else {
        return Err(format!(
            "{from} does not report its registry, so it cannot be compared with {to}'s; nothing was promoted"
        ));
    };
    let started = Instant::now();
    let deadline = started + fleet.config.registry_wait;
    loop {
        let target = fleet.check(spec).await;
        if let Ok(Some(t)) = target.as_ref().map(|s| s.registry.as_ref())
            && t.holds_writes_of(source, from.as_str())
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
            let found = match &target {
                Ok(s) => describe(to, s.registry.as_ref()),
                Err(why) => format!("{to} could not be asked ({why})"),
            };
            return Err(format!(
                "the registry of {to} is behind {from}'s after {} s ({found}; {}): devices registered only in {from} would be refused; run registry-sync merge, or use forced",
                fleet.config.registry_wait.as_secs(),
                describe(from, Some(source)),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
