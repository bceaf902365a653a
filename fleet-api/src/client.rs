//! A Rust client of a hub's HTTP API: status, and the log read API with
//! long polling (what consumers and the secondary region use).

use std::time::Duration;

use fleet_api::hub::{RecordsResponse, StatusResponse};
use fleet_api::{Epoch, ErrorBody, Offset, PartitionId, Secret};

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
        code: Option<fleet_api::ErrorCode>,
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
        let http = crate::https::trusting(Self::builder(), roots).build()?;
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

    /// `GET /v1/partitions/{p}/epoch_end`: the first offset holding a record
    /// of a later epoch than `epoch` (where the regions' logs may diverge).
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn epoch_end(&self, p: PartitionId, epoch: Epoch) -> Result<Offset, ClientError> {
        let end: fleet_api::hub::EpochEnd = self
            .get(&format!(
                "/v1/partitions/{}/epoch_end?epoch={}",
                p.0, epoch.0
            ))
            .await?;
        Ok(end.offset)
    }

    /// Reads records from `from`, waiting up to `wait` for new ones.
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
        self.get(&format!(
            "/v1/partitions/{}/records?from={}&max={max}&wait_ms={}",
            p.0,
            from.0,
            wait.as_millis()
        ))
        .await
    }
}
