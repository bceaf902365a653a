//! Failover: promote a region's hub with compare-and-set on the epoch, by
//! hand (`POST /v1/failover`) or automatically when the primary stays down.
//! The epoch lives in the hubs; two concierges racing send the same
//! `expected_epoch`, and the hub lets exactly one of them win.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::concierge::{FailoverEvent, FailoverResponse, Mode, PromoteRequest};
use fleet_api::{ErrorBody, ErrorCode, Region, Role};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::view::Fleet;

/// Why a failover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("unknown region {0}")]
    UnknownRegion(Region),
    #[error("another failover won the race: {0}")]
    Lost(String),
    #[error("the hub of {region} refused: {message}")]
    Refused { region: Region, message: String },
    #[error("the hub of {region} is unreachable: {message}")]
    Unreachable { region: Region, message: String },
    /// A check before promoting failed; nothing was promoted.
    #[error("not failing over to {region}: {message}")]
    Check { region: Region, message: String },
}

/// Promotes `to` and records the event.
///
/// # Errors
/// See [`FailoverError`].
pub async fn run(
    fleet: &Fleet,
    to: &Region,
    mode: Mode,
    trigger: &str,
) -> Result<FailoverResponse, FailoverError> {
    let spec = fleet
        .spec(to)
        .ok_or_else(|| FailoverError::UnknownRegion(to.clone()))?;
    let checks = crate::checks::before(fleet, to, mode, trigger != "automatic").await?;
    let request = PromoteRequest {
        expected_epoch: fleet.max_epoch(),
        mode,
    };
    let started = Instant::now();
    tracing::info!(region = %to, mode = mode.as_str(), expected_epoch = %request.expected_epoch, trigger, "failover");
    let resp = fleet
        .http()
        .post(format!("{}/v1/promote", spec.http_url))
        .bearer_auth(fleet.config.hub_token.expose())
        .timeout(Duration::from_secs(120))
        .json(&request)
        .send()
        .await
        .map_err(|e| FailoverError::Unreachable {
            region: to.clone(),
            message: e.to_string(),
        })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let (code, message) = match serde_json::from_str::<ErrorBody>(&body) {
            Ok(b) => (Some(b.error.code), b.error.message),
            Err(_) => (None, body),
        };
        return Err(if code == Some(ErrorCode::EpochMismatch) {
            FailoverError::Lost(message)
        } else {
            FailoverError::Refused {
                region: to.clone(),
                message: format!("{status}: {message}"),
            }
        });
    }
    let mut done: FailoverResponse =
        serde_json::from_str(&body).map_err(|e| FailoverError::Refused {
            region: to.clone(),
            message: format!("unexpected answer: {e}"),
        })?;
    done.took_ms = started.elapsed().as_millis() as u64;
    done.checks = checks;
    metrics::counter!("fleet_concierge_failovers_total", "mode" => mode.as_str(), "trigger" => trigger.to_string()).increment(1);
    fleet.record_failover(FailoverEvent {
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        to: to.clone(),
        mode,
        epoch: done.epoch,
        took_ms: done.took_ms,
        trigger: trigger.to_string(),
    });
    fleet.poll_once().await;
    Ok(done)
}

/// Promotes a healthy secondary (forced) once the primary has been down for
/// `after`, unless the secondary itself still hears from the primary.
///
/// Decided right after each look at the hubs (not on a timer of its own),
/// so a primary that failed its last check is acted on within that poll.
/// One missed check never promotes: the primary must have failed
/// `--failures` consecutive checks (or reported itself unhealthy), and
/// the secondary must have lost it too.
pub async fn auto(fleet: Arc<Fleet>, after: Duration, shutdown: CancellationToken) {
    let mut looks = fleet.looks();
    let mut quiet_until = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = looks.changed() => if changed.is_err() { return },
        }
        if fleet.active().is_some() || Instant::now() < quiet_until {
            continue;
        }
        let hubs = fleet.hubs();
        let primary_down_long = hubs.iter().any(|h| {
            !h.healthy
                && h.status.as_ref().is_some_and(|s| s.role == Role::Primary)
                && h.down_since.is_some_and(|t| t.elapsed() >= after)
        });
        if !primary_down_long {
            continue;
        }
        // The healthy secondary that is most caught up, and that does not
        // itself still see the primary (a partition between the concierge and
        // the primary only must not trigger a failover).
        let candidate = hubs
            .iter()
            .filter(|h| h.healthy)
            .filter_map(|h| h.status.as_ref().map(|s| (h, s)))
            .filter(|(_, s)| s.role == Role::Secondary && !s.peer_reachable)
            .min_by_key(|(_, s)| s.replication_lag_ms);
        let Some((h, _)) = candidate else { continue };
        match run(&fleet, &h.spec.region, Mode::Forced, "automatic").await {
            Ok(r) => {
                tracing::warn!(region = %r.region, epoch = %r.epoch, "automatic failover done")
            }
            Err(FailoverError::Lost(why)) => {
                tracing::info!(%why, "another replica failed over first")
            }
            Err(e @ FailoverError::Check { .. }) => {
                // Nothing happened: try again at the next poll.
                tracing::warn!(error = %e, "automatic failover held back by its checks");
                continue;
            }
            Err(e) => tracing::error!(error = %e, "automatic failover failed"),
        }
        // However short `after` is, a failed attempt (or a flap back) is
        // not retried at every poll.
        quiet_until = Instant::now() + after.max(fleet.config.poll * 10);
    }
}
