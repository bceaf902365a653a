//! A region's hub: devices connect over MQTT, authenticate against the
//! registry and publish telemetry, which is acknowledged only once it is
//! durable in the partitioned event log; committed records are streamed live
//! through an embedded rumqttd and served by an HTTP read API.
//!
//! [`Hub::start`] takes already-bound listeners and reports its addresses, so
//! tests bind port 0 and run many hubs side by side.

pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dedup_snapshot;
pub mod fd_budget;
pub mod front;
pub mod http;
pub mod ingest;
pub mod log;
pub mod origins;
pub mod ownership;
pub mod peer_pulled;
pub mod prom;
pub mod replication;
pub mod sessions;
pub mod state;
pub mod stream_gate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleet_api::{Offset, PartitionId, Secret};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::broker::{LivePublisher, LiveStream};
use crate::config::HubConfig;
use crate::front::Front;
use crate::ingest::Ingest;
use crate::log::file::FileLog;
use crate::log::jetstream::JetStreamLog;
use crate::log::{EventLog, ReadLimits};
use crate::replication::Control;
use crate::sessions::{Kick, Sessions};
use crate::state::HubState;

/// The listeners a hub serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub mqtt: TcpListener,
    pub http: TcpListener,
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub stream_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    ingest: Arc<Ingest>,
    _stream: Option<LiveStream>,
}

impl Hub {
    /// Opens the registry, state and log, and starts serving.
    ///
    /// # Errors
    /// When any of them cannot be opened.
    pub async fn start(config: HubConfig, listeners: Listeners) -> anyhow::Result<Hub> {
        let prom = prom::handle();
        let _ = prom;
        let registry = registry_sync::open(&config.registry)
            .await
            .with_context(|| {
                format!(
                    "open registry {}",
                    registry_sync::store::redact_url(&config.registry)
                )
            })?;
        registry
            .claim_region(&config.region)
            .await
            .context("claim the registry for this region")?;
        let state = Arc::new(
            HubState::open(&config.data, &config.region, config.role).context("open hub state")?,
        );
        let mut leases = None;
        let log: Arc<dyn EventLog> = match &config.jetstream {
            None => FileLog::open(config.log_config()).context("open event log")?,
            Some(js) => {
                let mut js = js.clone();
                js.retention = crate::log::jetstream::RetentionPolicy {
                    bytes: config.retention_bytes,
                    age: config.retention_age,
                };
                js.retention_check = config.retention_check;
                js.lease_ttl = config.lease_ttl;
                let log = JetStreamLog::open(js.clone())
                    .await
                    .with_context(|| format!("open JetStream event log {}", js.prefix))?;
                if config.front.payload_limit > log.max_payload() {
                    anyhow::bail!(
                        "--payload-limit {} is above what the JetStream servers take ({} bytes with a record's fields); lower it or raise the servers' max_payload",
                        config.front.payload_limit,
                        log.max_payload()
                    );
                }
                leases = log.leases();
                log
            }
        };
        let ingest = Ingest::open_with(
            log.clone(),
            state.clone(),
            &config.data,
            ingest::DEFAULT_BUDGET,
            config.replication,
            leases.is_some(),
        )
        .await
        .context("rebuild de-duplication state")?;
        let auth = Auth::load(registry.clone())
            .await
            .context("load the registry")?;
        crate::prom::zero_counters();
        auth.export_metrics();
        let sessions = Arc::new(Sessions::default());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if let Some(leases) = leases.clone() {
            // This hub's share of the region's partitions, before anything
            // (replication, promotion checks) works on them.
            let ownership = ownership::Ownership::new(
                leases,
                ingest.clone(),
                sessions.clone(),
                config.lease_ttl,
            );
            let mut ready = ownership.ready();
            tasks.spawn(ownership.run(shutdown.clone()));
            let wait = config.lease_ttl * 4 + Duration::from_secs(5);
            if tokio::time::timeout(wait, ready.wait_for(|r| *r))
                .await
                .is_err()
            {
                tracing::warn!(
                    waited_ms = wait.as_millis() as u64,
                    "the region's partition leases are not settled yet; going on"
                );
            }
        }

        let mqtt_addr = listeners.mqtt.local_addr()?;
        let http_addr = listeners.http.local_addr()?;
        let control = Control::new(&config, ingest.clone(), sessions.clone(), leases)
            .context("the peer HTTP client")?;
        // The region's role before this hub acts on its own.
        control
            .join_region()
            .await
            .context("join the region's role and epoch")?;
        control.fence_until_checked();
        control.spawn(&mut tasks, &shutdown);
        control.first_look(Duration::from_secs(2)).await;
        let front = Front::new(
            config.front.clone(),
            ingest.clone(),
            auth.clone(),
            sessions.clone(),
            state.clone(),
            control.throttle(),
        );
        let accept_health = front.accept_health.clone();
        tasks.spawn(front.serve(listeners.mqtt, shutdown.clone()));
        tasks.spawn(
            sessions
                .clone()
                .sweep_loop(Duration::from_millis(250), shutdown.clone()),
        );
        tasks.spawn(refresh_auth(
            auth.clone(),
            sessions.clone(),
            config.auth_refresh,
            shutdown.clone(),
        ));
        tasks.spawn(until(
            shutdown.clone(),
            ingest.clone().snapshot_loop(config.snapshot_every),
        ));

        let stream = match &config.stream {
            Some(s) => {
                // rumqttd on loopback, behind the read-only gate, with a
                // login only the gate knows.
                let internal = Secret::new(registry_sync::keys::generate().expose());
                let (user, password) = ("fleet-gate".to_string(), internal.clone());
                let started = tokio::task::spawn_blocking(move || {
                    LiveStream::start(
                        SocketAddr::from(([127, 0, 0, 1], 0)),
                        &user,
                        password.expose(),
                    )
                })
                .await
                .context("start live stream")??;
                let listener = TcpListener::bind(s.listen)
                    .await
                    .with_context(|| format!("bind live stream {}", s.listen))?;
                let gate_addr = listener.local_addr()?;
                let gate = stream_gate::StreamGate::new(stream_gate::GateConfig {
                    upstream: started.local_addr(),
                    user: s.user.clone(),
                    password: s.password.clone(),
                    internal_user: "fleet-gate".into(),
                    internal_password: internal,
                    max_filters: s.max_filters,
                    max_watchers: s.max_watchers,
                    tls: config.front.tls.clone(),
                });
                tasks.spawn(gate.serve(listener, shutdown.clone()));
                for p in 0..log.partitions() {
                    tasks.spawn(until(
                        shutdown.clone(),
                        feed_live_stream(
                            log.clone(),
                            PartitionId(p),
                            config.region.to_string(),
                            started.publisher(),
                        ),
                    ));
                }
                Some((started, gate_addr))
            }
            None => None,
        };
        let stream_addr = stream.as_ref().map(|(_, addr)| *addr);
        let scheme = if config.front.tls.is_some() {
            "mqtts"
        } else {
            "mqtt"
        };
        let api = Arc::new(http::ApiState {
            control: control.clone(),
            state: state.clone(),
            ingest: ingest.clone(),
            registry,
            sessions: sessions.clone(),
            admin_token: config.admin_token.clone(),
            read_token: config.read_token.clone(),
            peer_token: config.peer_token.clone(),
            hub_id: config.jetstream.as_ref().and_then(|j| j.hub_id.clone()),
            mqtt_url: format!("{scheme}://{}", config.advertise.unwrap_or(mqtt_addr)),
            stream_url: stream_addr.map(|a| format!("{scheme}://{a}")),
            auth: auth.clone(),
            accept_health,
        });
        let token = shutdown.clone();
        let router = http::router(api);
        match config.http_tls.clone() {
            None => {
                tasks.spawn(fleet_api::serve::serve(
                    listeners.http,
                    router,
                    config.http_limits,
                    token,
                ));
            }
            Some(tls) => {
                let listener = fleet_api::https::TlsListener::new(
                    listeners.http,
                    tls,
                    config.front.tls_handshake_timeout,
                )?;
                tasks.spawn(fleet_api::serve::serve(
                    listener,
                    router,
                    config.http_limits,
                    token,
                ));
            }
        }
        tracing::info!(region = %config.region, %mqtt_addr, %http_addr, stream = ?stream_addr, role = %state.get().role, epoch = %state.get().epoch, "hub started");
        Ok(Hub {
            mqtt_addr,
            http_addr,
            stream_addr,
            shutdown,
            tasks,
            ingest,
            _stream: stream.map(|(s, _)| s),
        })
    }

    /// Stops serving, closes device connections and writes a final
    /// de-duplication snapshot.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
        self.ingest.snapshot().await;
    }
}

/// Runs `fut` until `token` is cancelled.
async fn until(token: CancellationToken, fut: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = token.cancelled() => {}
        () = fut => {}
    }
}

async fn refresh_auth(
    auth: Arc<Auth>,
    sessions: Arc<Sessions>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match auth.refresh().await {
            Ok(revoked) => {
                for device in revoked {
                    tracing::info!(device_id = %device, "device revoked, disconnecting");
                    sessions.kick(&device, Kick::Revoked);
                }
                auth.export_metrics();
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "registry refresh failed; keeping the last known devices")
            }
        }
    }
}

/// Tails one partition into the live stream, from the records committed
/// after the hub started.
async fn feed_live_stream(
    log: Arc<dyn EventLog>,
    p: PartitionId,
    region: String,
    mut out: LivePublisher,
) {
    let mut watch = log.watch(p);
    let mut from: Offset = *watch.borrow_and_update();
    loop {
        if watch.wait_for(|hw| *hw > from).await.is_err() {
            return;
        }
        match log.read(p, from, ReadLimits::default()).await {
            Ok(records) => {
                for r in &records {
                    out.publish(
                        &region,
                        r.record.device_id.as_str(),
                        r.record.payload.clone(),
                    );
                }
                if let Some(last) = records.last() {
                    from = last.offset.next();
                }
            }
            Err(e) => {
                tracing::warn!(partition = %p, error = %e, "live stream stops for this partition");
                return;
            }
        }
    }
}
