//! The hub's HTTP API: health, metrics, status, the log read API and device
//! administration. Domain errors become HTTP responses here and only here.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleet_api::hub::{DevicePut, DeviceResponse, PartitionStatus, RecordsResponse, StatusResponse};
use fleet_api::{DeviceId, DeviceStatus, ErrorBody, ErrorCode, Offset, PartitionId, Secret};
use registry_sync::RegistryError;
use registry_sync::store::{NewDevice, Patch, RegistryStore};
use serde::Deserialize;

use crate::ingest::Ingest;
use crate::log::{EventLog, LogError, ReadLimits};
use crate::sessions::Sessions;
use crate::state::HubState;

/// What the handlers need.
#[derive(Debug)]
pub struct ApiState {
    pub state: Arc<HubState>,
    pub ingest: Arc<Ingest>,
    pub registry: Arc<dyn RegistryStore>,
    pub sessions: Arc<Sessions>,
    pub admin_token: Secret,
    pub read_token: Option<Secret>,
    pub mqtt_url: String,
    pub stream_url: Option<String>,
}

impl ApiState {
    fn log(&self) -> &Arc<dyn EventLog> {
        self.ingest.log()
    }
}

/// An error response: a status, a code and a message for the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = ?self.code, message = %self.message, "request failed");
        }
        let mut resp = (self.status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            RegistryError::AlreadyExists(_) => {
                Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, e.to_string())
            }
            _ if e.retryable() => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("registry: {e:#}"),
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("registry: {e:#}"),
            ),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match &e {
            LogError::NoSuchPartition(_) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            LogError::OffsetGone { .. } => {
                Self::new(StatusCode::GONE, ErrorCode::OffsetGone, e.to_string())
            }
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn require_admin(api: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    match bearer(headers) {
        Some(t) if api.admin_token.matches(t) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this call needs the admin bearer token",
        )),
    }
}

fn require_reader(api: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    match bearer(headers) {
        Some(t)
            if api.admin_token.matches(t)
                || api.read_token.as_ref().is_some_and(|r| r.matches(t)) =>
        {
            Ok(())
        }
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "reading the log needs the read or admin bearer token",
        )),
    }
}

/// The router for one hub.
pub fn router(api: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/status", get(status))
        .route("/v1/partitions/{p}/records", get(records))
        .route(
            "/v1/devices/{id}",
            get(get_device).put(put_device).delete(delete_device),
        )
        .with_state(api)
}

async fn healthz(State(api): State<Arc<ApiState>>) -> Response {
    match api.log().health() {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unhealthy", "problems": problems})),
        )
            .into_response(),
    }
}

async fn metrics_text() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::prom::handle().render(),
    )
        .into_response()
}

async fn status(State(api): State<Arc<ApiState>>) -> Json<StatusResponse> {
    let log = api.log();
    let re = api.state.get();
    let partitions = (0..log.partitions())
        .map(|p| {
            let hw = log.high_watermark(PartitionId(p));
            PartitionStatus {
                id: PartitionId(p),
                high_watermark: hw,
                // Without a secondary nothing more is promised than "here".
                replicated: hw,
            }
        })
        .collect();
    Json(StatusResponse {
        region: api.state.region().clone(),
        role: re.role,
        epoch: re.epoch,
        partitions,
        replication_lag_ms: 0,
        connected_devices: api.sessions.count() as u64,
        mqtt_url: Some(api.mqtt_url.clone()),
        stream_url: api.stream_url.clone(),
        peer_reachable: false,
    })
}

#[derive(Debug, Deserialize)]
struct RecordsQuery {
    #[serde(default)]
    from: u64,
    #[serde(default)]
    max: Option<usize>,
    #[serde(default)]
    wait_ms: u64,
}

const MAX_RECORDS: usize = 10_000;
const MAX_WAIT: Duration = Duration::from_secs(30);

async fn records(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(p): Path<u32>,
    Query(q): Query<RecordsQuery>,
) -> ApiResult<Json<RecordsResponse>> {
    require_reader(&api, &headers)?;
    let log = api.log();
    if p >= log.partitions() {
        return Err(LogError::NoSuchPartition(PartitionId(p)).into());
    }
    let p = PartitionId(p);
    let from = Offset(q.from);
    let limits = ReadLimits {
        max_records: q.max.unwrap_or(1000).clamp(1, MAX_RECORDS),
        max_bytes: 8 << 20,
    };
    let mut watch = log.watch(p);
    let mut recs = log.read(p, from, limits).await?;
    if recs.is_empty() && q.wait_ms > 0 {
        let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
        if tokio::time::timeout(wait, watch.wait_for(|hw| *hw > from))
            .await
            .is_ok()
        {
            recs = log.read(p, from, limits).await?;
        }
    }
    Ok(Json(RecordsResponse {
        records: recs.iter().map(|r| r.to_wire()).collect(),
        high_watermark: log.high_watermark(p),
    }))
}

fn device_id(id: &str) -> ApiResult<DeviceId> {
    DeviceId::new(id).map_err(|e| ApiError::bad_request(format!("invalid device id: {e}")))
}

async fn get_device(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceResponse>> {
    require_admin(&api, &headers)?;
    let id = device_id(&id)?;
    match api.registry.get(&id).await? {
        Some(device) => Ok(Json(DeviceResponse { device, key: None })),
        None => Err(RegistryError::NotFound(id).into()),
    }
}

async fn put_device(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Option<Json<DevicePut>>,
) -> ApiResult<Response> {
    require_admin(&api, &headers)?;
    let id = device_id(&id)?;
    let put = body.map(|Json(b)| b).unwrap_or_default();
    let exists = api.registry.get(&id).await?.is_some_and(|r| !r.deleted);
    if exists {
        let key = put.rotate_key.then(registry_sync::keys::generate);
        let patch = Patch {
            status: put.status,
            tags: put.tags,
            key_sha256: key.as_ref().map(|k| k.hash()),
        };
        let device = api.registry.update(&id, patch).await?;
        let key = key.map(|k| k.expose());
        Ok((StatusCode::OK, Json(DeviceResponse { device, key })).into_response())
    } else {
        let key = registry_sync::keys::generate();
        let new = NewDevice {
            device_id: id,
            key_sha256: key.hash(),
            status: put.status.unwrap_or(DeviceStatus::Enabled),
            tags: put.tags.unwrap_or_default(),
        };
        let device = api.registry.create(vec![new]).await?.remove(0);
        let body = DeviceResponse {
            device,
            key: Some(key.expose()),
        };
        Ok((StatusCode::CREATED, Json(body)).into_response())
    }
}

async fn delete_device(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceResponse>> {
    require_admin(&api, &headers)?;
    let id = device_id(&id)?;
    let device = api.registry.remove(&id).await?;
    api.sessions.kick(&id, crate::sessions::Kick::Revoked);
    Ok(Json(DeviceResponse { device, key: None }))
}
