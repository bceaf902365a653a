//! The runner's HTTP API: `GET /healthz`, `GET /metrics`, `GET /v1/consumer`
//! and `POST /v1/breaker/{open,close}` (admin bearer token).
//!
//! Served with hyper alone: five fixed routes do not need the web framework
//! the hub uses, and a consumer deployment should not compile it. Requests
//! must send their headers within [`HEADER_TIMEOUT`], idle keep-alive
//! connections are closed, and at most [`MAX_CONNECTIONS`] are served at once,
//! so idle or half-sent connections cannot pile up.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_api::{ErrorBody, ErrorCode, Secret};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Consumer;
use crate::cli::{BreakerAction, group_status, set_breaker};

/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 256;

/// What the API serves.
#[derive(Debug)]
pub struct RunnerApi {
    pub consumer: Arc<Consumer>,
    pub admin_token: Secret,
}

/// Serves the API on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, api: Arc<RunnerApi>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(route(&api, req).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(peer = %peer, error = %e, "http connection ended");
            }
            drop(permit);
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(api: &RunnerApi, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(crate::prom::handle().render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/v1/consumer") => match group_status(api.consumer.store()).await {
            Ok(group) => json(
                StatusCode::OK,
                &serde_json::json!({"instance": api.consumer.status(), "group": group}),
            ),
            Err(e) => unavailable(&e),
        },
        (&Method::POST, "/v1/breaker/open") => breaker(api, &req, BreakerAction::Open).await,
        (&Method::POST, "/v1/breaker/close") => breaker(api, &req, BreakerAction::Close).await,
        (
            _,
            "/healthz" | "/metrics" | "/v1/consumer" | "/v1/breaker/open" | "/v1/breaker/close",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::BadRequest,
            format!("{} is not allowed on {path}", req.method()),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no route {path}"),
        ),
    }
}

async fn breaker(api: &RunnerApi, req: &Request<Incoming>, action: BreakerAction) -> Reply {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| api.admin_token.matches(t)) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this call needs the admin bearer token".into(),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match set_breaker(api.consumer.store(), action).await {
        Ok(state) => json(
            StatusCode::OK,
            &serde_json::json!({"breaker": state.name()}),
        ),
        Err(e) => unavailable(&e),
    }
}

fn unavailable(e: &anyhow::Error) -> Reply {
    tracing::error!(error = %format!("{e:#}"), "consumer api request failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        format!("{e:#}"),
    )
}

fn error(status: StatusCode, code: ErrorCode, message: String) -> Reply {
    json(status, &ErrorBody::new(code, message))
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Reply {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
