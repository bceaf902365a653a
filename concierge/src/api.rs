//! The concierge's HTTP API. Domain errors become HTTP responses here only;
//! `/openapi.json` is generated from these handlers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleet_api::concierge::{EndpointResponse, FailoverRequest, FailoverResponse, RegionsResponse};
use fleet_api::{DeviceId, Epoch, ErrorBody, ErrorCode};
use utoipa::OpenApi;

use crate::failover::{self, FailoverError};
use crate::pacing::{Paced, Pacer};
use crate::view::Fleet;

/// What the handlers share.
#[derive(Debug)]
pub struct ApiState {
    pub fleet: Arc<Fleet>,
    pub pacer: Pacer,
    /// Long-polling lookups in progress, per address and in all.
    pub long_polls: fleet_api::limit::Slots<std::net::IpAddr>,
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Fleet concierge",
        description = "Which hub is active, and failover."
    ),
    paths(endpoint, regions, failover_handler, healthz),
    components(schemas(
        EndpointResponse,
        RegionsResponse,
        FailoverRequest,
        FailoverResponse,
        ErrorBody
    ))
)]
pub struct ApiDoc;

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody::new(code, message))).into_response()
}

fn unavailable(code: ErrorCode, retry_after_s: u64, message: impl Into<String>) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, code, message);
    if let Ok(v) = HeaderValue::from_str(&retry_after_s.max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

pub fn router(api: Arc<ApiState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .route("/v1/devices/{device_id}/endpoint", get(endpoint))
        .route("/v1/regions", get(regions))
        .route("/v1/failover", post(failover_handler))
        .with_state(api)
}

/// 503 for an address over its lookup rate.
fn source_paced(peer: SocketAddr, wait: Duration) -> Response {
    metrics::counter!("fleet_concierge_endpoint_requests_total", "result" => "source_paced")
        .increment(1);
    let secs = wait.as_secs() + 1;
    unavailable(
        ErrorCode::Paced,
        secs,
        format!("too many lookups from {}: come back in {secs} s", peer.ip()),
    )
}

/// The longest long poll of an endpoint lookup, seconds.
const MAX_WAIT_S: u64 = 30;

/// The query of an endpoint lookup.
#[derive(Debug, serde::Deserialize)]
struct EndpointQuery {
    wait_for_epoch: Option<u64>,
    wait_s: Option<u64>,
    /// The region the device is connected to (a refresh of its endpoint):
    /// an answer that keeps it there is no CONNECT and takes no slot of
    /// the reconnect schedule.
    connected_to: Option<String>,
}

/// Where a device should connect.
#[utoipa::path(
    get,
    path = "/v1/devices/{device_id}/endpoint",
    params(
        ("device_id" = String, Path, description = "1–128 of [A-Za-z0-9._:-]"),
        ("wait_for_epoch" = Option<u64>, Query, description = "answer only with a hub whose epoch is above this one, waiting for it (long poll)"),
        ("wait_s" = Option<u64>, Query, description = "how long to wait for it, seconds (at most 30; default 10)"),
        ("connected_to" = Option<String>, Query, description = "the region the device is connected to: an answer that keeps it there takes no reconnect slot")
    ),
    responses(
        (status = 200, description = "The active hub, and when to connect (start_in_ms: the device's slot of the reconnect schedule)", body = EndpointResponse),
        (status = 400, description = "Invalid device id or query", body = ErrorBody),
        (status = 503, description = "No hub is active above the epoch waited for (code no_active_hub), or the caller or the reconnect schedule is over its rate (code paced): see Retry-After", body = ErrorBody,
         headers(("Retry-After" = u64, description = "seconds to wait")))
    )
)]
async fn endpoint(
    State(api): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(device_id): Path<String>,
    query: Result<Query<EndpointQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        metrics::counter!("fleet_concierge_endpoint_requests_total", "result" => "bad_request")
            .increment(1);
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "wait_for_epoch and wait_s are whole numbers",
        );
    };
    let Ok(device_id) = DeviceId::new(&device_id) else {
        metrics::counter!("fleet_concierge_endpoint_requests_total", "result" => "bad_request")
            .increment(1);
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("invalid device id {device_id:?}"),
        );
    };
    // The address pays before any waiting; the fleet's slot is taken only
    // once there is a hub to send the device to.
    if let Err(Paced::Source(wait)) = api.pacer.source(peer.ip()) {
        return source_paced(peer, wait);
    }
    let active = match query.wait_for_epoch {
        None => api.fleet.active(),
        Some(e) => {
            // Long polls hold a connection: a few per address, half the
            // server's in all; beyond that the answer is given at once.
            let held = api
                .long_polls
                .take(&fleet_api::limit::source_key(peer.ip()))
                .ok();
            match held {
                Some(_slot) => {
                    let wait = Duration::from_secs(query.wait_s.unwrap_or(10).min(MAX_WAIT_S));
                    api.fleet.active_above(Epoch(e), wait).await
                }
                None => api.fleet.active().filter(|a| a.epoch > Epoch(e)),
            }
        }
    };
    let Some(active) = active else {
        metrics::counter!("fleet_concierge_endpoint_requests_total", "result" => "no_active_hub")
            .increment(1);
        let why = match query.wait_for_epoch {
            Some(e) => format!("no hub above epoch {e} is active yet"),
            None => "no hub is active right now".into(),
        };
        return unavailable(ErrorCode::NoActiveHub, api.fleet.config.ttl_s.into(), why);
    };
    let stays = query
        .connected_to
        .as_deref()
        .is_some_and(|r| r == active.region.as_str());
    let start_in = if stays {
        Duration::ZERO
    } else {
        match api.pacer.fleet(peer.ip(), &device_id) {
            Ok(start_in) => start_in,
            Err(Paced::Fleet(wait)) => {
                metrics::counter!("fleet_concierge_endpoint_requests_total", "result" => "paced")
                    .increment(1);
                let secs = wait.as_secs() + 1;
                return unavailable(
                    ErrorCode::Paced,
                    secs,
                    format!("the reconnect schedule is full: come back in {secs} s"),
                );
            }
            Err(Paced::Source(wait)) => return source_paced(peer, wait),
        }
    };
    let result = if start_in.is_zero() {
        "ok"
    } else {
        "scheduled"
    };
    metrics::counter!("fleet_concierge_endpoint_requests_total", "result" => result).increment(1);
    let mqtt_url = api.fleet.hub_for(&active, &device_id);
    Json(EndpointResponse {
        device_id,
        region: active.region,
        mqtt_url,
        epoch: active.epoch,
        ttl_s: api.fleet.config.ttl_s,
        start_in_ms: u64::try_from(start_in.as_millis()).unwrap_or(u64::MAX),
    })
    .into_response()
}

/// Every region's role, epoch, health and replication lag, and the failover timeline.
#[utoipa::path(get, path = "/v1/regions", responses((status = 200, body = RegionsResponse)))]
async fn regions(State(api): State<Arc<ApiState>>) -> Json<RegionsResponse> {
    Json(RegionsResponse {
        regions: api.fleet.views(),
        failovers: api.fleet.timeline(),
    })
}

/// Promotes a region's hub (admin bearer token).
#[utoipa::path(
    post,
    path = "/v1/failover",
    request_body = FailoverRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, body = FailoverResponse),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "Another failover won the race, or a check before promoting failed (target unhealthy, registry behind)", body = ErrorBody),
        (status = 502, description = "The hub refused", body = ErrorBody),
        (status = 503, description = "The hub is unreachable", body = ErrorBody)
    )
)]
async fn failover_handler(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| api.fleet.config.admin_token.matches(t)) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this call needs the admin bearer token",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let req: FailoverRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("invalid failover request: {e}"),
            );
        }
    };
    match failover::run(&api.fleet, &req.to, req.mode, "manual").await {
        Ok(done) => Json(done).into_response(),
        Err(e @ FailoverError::UnknownRegion(_)) => error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        ),
        Err(e @ FailoverError::Lost(_)) => error(
            StatusCode::CONFLICT,
            ErrorCode::EpochMismatch,
            e.to_string(),
        ),
        Err(e @ FailoverError::Check { .. }) => {
            tracing::warn!(error = %e, "failover refused by its checks");
            error(StatusCode::CONFLICT, ErrorCode::Conflict, e.to_string())
        }
        Err(e @ FailoverError::Refused { .. }) => {
            tracing::error!(error = %e, "failover refused");
            error(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unavailable,
                e.to_string(),
            )
        }
        Err(e @ FailoverError::Unreachable { .. }) => {
            tracing::error!(error = %e, "failover failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                e.to_string(),
            )
        }
    }
}

/// This replica is up (the DNS front hands out healthy replicas only).
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "up")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics_text() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::prom::handle().render(),
    )
        .into_response()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn page(State(api): State<Arc<ApiState>>) -> Html<String> {
    Html(crate::page::render(&api.fleet))
}
