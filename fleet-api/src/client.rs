//! A Rust client of a hub's HTTP API: status, and the log read API with
//! long polling (what consumers, the secondary region and tools use).
//!
//! It lives here, behind the `client` feature, so that consumers can read the
//! logs without compiling the hub (broker, log, MQTT front).

use std::time::Duration;

use crate::hub::{EpochHistory, ReadUpto, RecordsResponse, StatusResponse, WireRecord};
use crate::{ErrorBody, ErrorCode, Offset, PartitionId, Secret};

/// Errors of the hub client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("hub {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("hub answered {status}: {message}")]
    Api {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
}

impl ClientError {
    /// True when the same call may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => *status >= 500,
        }
    }
}

/// A client of one hub.
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    token: Option<Secret>,
    http: reqwest::Client,
}

impl HubClient {
    /// `base` is the hub's HTTP URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        Self::with_http(base, token, Self::builder().build().unwrap_or_default())
    }

    /// Like [`HubClient::new`], trusting `roots` besides the public web
    /// roots (hubs serving HTTPS with a private CA).
    ///
    /// # Errors
    /// When the TLS client cannot be set up.
    pub fn trusting(
        base: impl Into<String>,
        token: Option<Secret>,
        roots: &[reqwest::Certificate],
    ) -> Result<Self, reqwest::Error> {
        let http = trusting(Self::builder(), roots).build()?;
        Ok(Self::with_http(base, token, http))
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(45))
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(10))
    }

    fn with_http(base: impl Into<String>, token: Option<Secret>, http: reqwest::Client) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let transport = |source| ClientError::Transport {
            url: url.clone(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(transport);
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (Some(b.error.code), b.error.message),
            Err(_) => (None, text),
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            code,
            message,
        })
    }

    /// `GET /v1/status`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.get("/v1/status").await
    }

    /// `GET /v1/partitions/{p}/epochs`: the partition's epoch history.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn epochs(&self, p: PartitionId) -> Result<EpochHistory, ClientError> {
        self.get(&format!("/v1/partitions/{}/epochs", p.0)).await
    }

    /// Reads replicated records from `from`, waiting up to `wait` for new
    /// ones.
    ///
    /// # Errors
    /// Transport or API errors (`offset_gone` when retention passed `from`).
    pub async fn records(
        &self,
        p: PartitionId,
        from: Offset,
        max: usize,
        wait: Duration,
    ) -> Result<RecordsResponse, ClientError> {
        self.records_upto(p, from, max, wait, ReadUpto::Replicated)
            .await
    }

    /// Reads records from `from` up to the replicated or the committed
    /// end, waiting up to `wait` for new ones.
    ///
    /// # Errors
    /// Transport or API errors (`offset_gone` when retention passed `from`).
    pub async fn records_upto(
        &self,
        p: PartitionId,
        from: Offset,
        max: usize,
        wait: Duration,
        upto: ReadUpto,
    ) -> Result<RecordsResponse, ClientError> {
        self.get(&format!(
            "/v1/partitions/{}/records?from={}&max={max}&wait_ms={}&upto={}",
            p.0,
            from.0,
            wait.as_millis(),
            upto.as_str()
        ))
        .await
    }

    /// Every committed record of partition `p`, read page by page from
    /// the start.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn committed_records(&self, p: PartitionId) -> Result<Vec<WireRecord>, ClientError> {
        let mut out = Vec::new();
        let mut from = Offset(0);
        loop {
            let page = self
                .records_upto(p, from, 10_000, Duration::ZERO, ReadUpto::Committed)
                .await?;
            let Some(last) = page.records.last() else {
                return Ok(out);
            };
            from = last.offset.next();
            out.extend(page.records);
        }
    }
}

/// Errors of loading a CA file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("read CA {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parse CA {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no certificate in CA {0}")]
    Empty(String),
}

/// The certificates in a PEM file, to trust as roots when calling HTTPS
/// hubs signed by a private CA (besides the public web roots).
///
/// # Errors
/// When the file cannot be read or holds no certificate.
pub fn load_ca(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, CaError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| CaError::Read {
        path: shown.clone(),
        source,
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| CaError::Parse {
        path: shown.clone(),
        source,
    })?;
    if certs.is_empty() {
        return Err(CaError::Empty(shown));
    }
    Ok(certs)
}

/// `builder` trusting `roots` too.
pub fn trusting(
    mut builder: reqwest::ClientBuilder,
    roots: &[reqwest::Certificate],
) -> reqwest::ClientBuilder {
    for r in roots {
        builder = builder.add_root_certificate(r.clone());
    }
    builder
}
