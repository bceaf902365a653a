//! The hub's HTTP API: health, metrics, status, the log read API and device
//! administration. Domain errors become HTTP responses here and only here.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleet_api::concierge::{FailoverResponse, PromoteRequest};
use fleet_api::hub::{
    DevicePut, DeviceResponse, PartitionStatus, ReadUpto, RecordsResponse, StatusResponse,
};
use fleet_api::hub::{EpochBody, EpochEnd, EpochHistory, FailbackReport, FenceResponse, PeerLink};
use fleet_api::{DeviceId, DeviceStatus, Epoch, ErrorBody, ErrorCode, Offset, PartitionId, Secret};
use registry_sync::RegistryError;
use registry_sync::store::{NewDevice, Patch, RegistryStore};
use serde::Deserialize;

use crate::ingest::Ingest;
use crate::log::{EventLog, LogError, ReadLimits};
use crate::replication::{Control, ControlError};
use crate::sessions::Sessions;
use crate::state::HubState;

/// What the handlers need.
#[derive(Debug)]
pub struct ApiState {
    /// This hub's id among the region's hubs sharing a log.
    pub hub_id: Option<String>,
    pub control: Arc<Control>,
    pub state: Arc<HubState>,
    pub ingest: Arc<Ingest>,
    pub registry: Arc<dyn RegistryStore>,
    pub sessions: Arc<Sessions>,
    pub admin_token: Secret,
    pub read_token: Option<Secret>,
    /// The peers' replication credential (None without a peer).
    pub peer_token: Option<Secret>,
    pub mqtt_url: String,
    pub stream_url: Option<String>,
    pub auth: Arc<crate::auth::Auth>,
    pub accept_health: Arc<crate::front::AcceptHealth>,
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
    pub(crate) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
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
            RegistryError::AlreadyExists(_) | RegistryError::ImplausibleVersion { .. } => {
                Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, e.to_string())
            }
            // The registry's state, not the request, is the problem.
            RegistryError::ClockAhead { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("registry: {e}"),
            ),
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

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::EpochMismatch { .. } => Self::new(
                StatusCode::CONFLICT,
                ErrorCode::EpochMismatch,
                e.to_string(),
            ),
            ControlError::Conflict(_) => {
                Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, e.to_string())
            }
            ControlError::NotPrimary => Self::new(
                StatusCode::CONFLICT,
                ErrorCode::NotPrimary,
                "this hub is not the primary",
            ),
            ControlError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                e.to_string(),
            ),
            ControlError::NotOwner(_) => Self::new(
                StatusCode::MISDIRECTED_REQUEST,
                ErrorCode::Conflict,
                e.to_string(),
            ),
            ControlError::Log(l) => l.into(),
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

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
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

fn is_peer(api: &ApiState, headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|t| api.peer_token.as_ref().is_some_and(|p| p.matches(t)))
}

/// Replication pulls, peer epochs: the peer credential only.
fn require_peer(api: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    if is_peer(api, headers) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Unauthorized,
        "replication (`replica` or `epoch`) needs the peer token; the read and admin tokens only read",
    ))
}

/// Fencing and demotion for a planned promotion: the peer or an operator.
fn require_admin_or_peer(api: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    if is_peer(api, headers) {
        return Ok(());
    }
    require_admin(api, headers)
}

fn require_reader(api: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    match bearer(headers) {
        Some(t)
            if api.admin_token.matches(t)
                || api.read_token.as_ref().is_some_and(|r| r.matches(t))
                || api.peer_token.as_ref().is_some_and(|r| r.matches(t)) =>
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
        .route("/v1/promote", post(promote))
        .route("/v1/demote", post(demote))
        .route("/v1/fence", post(fence))
        .route("/v1/unfence", post(unfence))
        .route("/v1/partitions/{p}/epoch_end", get(epoch_end))
        .route("/v1/partitions/{p}/epochs", get(epochs))
        .route("/v1/failback", get(failback))
        .route("/v1/peer/detach", post(peer_detach))
        .route("/v1/peer/attach", post(peer_attach))
        .with_state(api)
}

async fn healthz(State(api): State<Arc<ApiState>>) -> Response {
    let mut problems = api.log().health().err().unwrap_or_default();
    problems.extend(api.accept_health.problem());
    if problems.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unhealthy", "problems": problems})),
        )
            .into_response()
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
            let replicated = api.ingest.readable(PartitionId(p));
            PartitionStatus {
                id: PartitionId(p),
                high_watermark: hw,
                replicated,
                log_start: log.log_start(PartitionId(p)),
            }
        })
        .collect();
    let (replication, peer_reachable, lag_ms) = api.control.status();
    Json(StatusResponse {
        region: api.state.region().clone(),
        role: re.role,
        epoch: re.epoch,
        partitions,
        replication_lag_ms: lag_ms,
        connected_devices: api.sessions.count() as u64,
        mqtt_url: Some(api.mqtt_url.clone()),
        stream_url: api.stream_url.clone(),
        peer_reachable,
        replication,
        fenced: api.state.fenced(),
        peer: api.control.has_peer().then(|| api.control.peer_link()),
        registry: Some(api.auth.registry_status()),
        hub_id: api.hub_id.clone(),
        owned: api.ingest.owned_partitions(),
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
    /// Set by the secondary's replication pulls (region name).
    #[serde(default)]
    replica: Option<String>,
    /// The puller's epoch.
    #[serde(default)]
    epoch: Option<u64>,
    /// `replicated` (default): only the prefix stored in both regions;
    /// `committed`: everything durable here, which a forced failover can
    /// take out of the history.
    #[serde(default)]
    upto: ReadUpto,
}

const MAX_RECORDS: usize = 10_000;
const MAX_WAIT: Duration = Duration::from_secs(30);

async fn records(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(p): Path<u32>,
    Query(q): Query<RecordsQuery>,
) -> ApiResult<Json<RecordsResponse>> {
    // Only the peer's pulls move `replicated` or carry an epoch.
    let replication = q.replica.is_some() || q.epoch.is_some();
    if replication {
        require_peer(&api, &headers)?;
    } else {
        require_reader(&api, &headers)?;
    }
    let log = api.log();
    if p >= log.partitions() {
        return Err(LogError::NoSuchPartition(PartitionId(p)).into());
    }
    let p = PartitionId(p);
    let from = Offset(q.from);
    if replication {
        // A replication pull: `from` acknowledges everything below it.
        api.control.on_pull(p, from, q.epoch.map(Epoch)).await?;
    }
    let limits = ReadLimits {
        max_records: q.max.unwrap_or(1000).clamp(1, MAX_RECORDS),
        max_bytes: 8 << 20,
    };
    // The replica reads everything committed; readers the replicated
    // prefix unless they ask for more.
    let committed = replication || q.upto == ReadUpto::Committed;
    let bound = |api: &ApiState| {
        if committed {
            log.high_watermark(p)
        } else {
            api.ingest.readable(p)
        }
    };
    let read = |end: Offset| {
        let log = log.clone();
        async move {
            let mut recs = log.read(p, from, limits).await?;
            recs.retain(|r| r.offset < end);
            Ok::<_, LogError>(recs)
        }
    };
    let mut recs = read(bound(&api)).await?;
    if recs.is_empty() && q.wait_ms > 0 {
        let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
        let arrived = if committed {
            let mut watch = log.watch(p);
            tokio::time::timeout(wait, watch.wait_for(|hw| *hw > from))
                .await
                .is_ok()
        } else {
            api.ingest.wait_readable(p, from, wait).await
        };
        if arrived {
            recs = read(bound(&api)).await?;
        }
    }
    // Read after the records: an epoch change (which precedes any
    // truncation at failback) during the read shows as a newer epoch, so
    // readers that track the serving epoch notice the log may have changed.
    let epoch = api.state.get().epoch;
    Ok(Json(RecordsResponse {
        records: recs.iter().map(|r| r.to_wire()).collect(),
        high_watermark: bound(&api),
        epoch: Some(epoch),
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

/// Parses a JSON body (an empty body is the default), with our error shape.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

async fn promote(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<FailoverResponse>> {
    require_admin(&api, &headers)?;
    let req: PromoteRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid promotion: {e}")))?;
    Ok(Json(api.control.promote(req).await?))
}

async fn demote(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    require_admin_or_peer(&api, &headers)?;
    let b = body::<EpochBody>(&bytes)?;
    if is_peer(&api, &headers) {
        // The peer only ever tells a stale primary about a higher epoch;
        // stepping down without one is an operator's call.
        peer_epoch_above(&api, b.epoch)?;
    }
    api.control.demote(b);
    let re = api.state.get();
    Ok(Json(
        serde_json::json!({"role": re.role, "epoch": re.epoch}),
    ))
}

async fn fence(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<FenceResponse>> {
    require_admin_or_peer(&api, &headers)?;
    let b = body::<EpochBody>(&bytes)?;
    if is_peer(&api, &headers) {
        // The peer fences only for its promotion to a higher epoch.
        peer_epoch_above(&api, b.epoch)?;
    }
    Ok(Json(api.control.fence(b).await?))
}

async fn unfence(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    require_admin_or_peer(&api, &headers)?;
    // The peer may only take back the fence of its own abandoned promotion
    // (the epoch it fenced for); an operator may always unfence.
    let only_for = if is_peer(&api, &headers) {
        Some(body::<EpochBody>(&bytes)?.epoch.ok_or_else(|| {
            ApiError::bad_request("the peer unfences with the epoch it fenced for")
        })?)
    } else {
        None
    };
    api.control.unfence(only_for)?;
    Ok(Json(serde_json::json!({"fenced": api.state.fenced()})))
}

/// A peer's epoch must be given and above this hub's.
fn peer_epoch_above(api: &ApiState, epoch: Option<Epoch>) -> ApiResult<()> {
    let current = api.state.get().epoch;
    match epoch {
        Some(e) if e > current => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            format!("the peer must name an epoch above this hub's ({current})"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct EpochQuery {
    epoch: u64,
}

async fn epoch_end(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(p): Path<u32>,
    Query(q): Query<EpochQuery>,
) -> ApiResult<Json<EpochEnd>> {
    require_reader(&api, &headers)?;
    if p >= api.log().partitions() {
        return Err(LogError::NoSuchPartition(PartitionId(p)).into());
    }
    Ok(Json(
        api.control
            .epoch_end(PartitionId(p), Epoch(q.epoch))
            .await?,
    ))
}

async fn epochs(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(p): Path<u32>,
) -> ApiResult<Json<EpochHistory>> {
    require_reader(&api, &headers)?;
    if p >= api.log().partitions() {
        return Err(LogError::NoSuchPartition(PartitionId(p)).into());
    }
    Ok(Json(api.control.epochs(PartitionId(p)).await?))
}

async fn failback(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<Json<FailbackReport>> {
    require_reader(&api, &headers)?;
    Ok(Json(api.control.failback_report().await?))
}

async fn peer_detach(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<Json<PeerLink>> {
    require_admin(&api, &headers)?;
    Ok(Json(api.control.detach(true, "an operator detached it")?))
}

async fn peer_attach(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<Json<PeerLink>> {
    require_admin(&api, &headers)?;
    Ok(Json(api.control.attach()?))
}
