//! Which hub to read from: the primary, unfenced, with the highest epoch
//! among the configured hubs of both regions.

use std::sync::Arc;
use std::time::Duration;

use fleet_api::client::HubClient;
use fleet_api::hub::PartitionStatus;
use fleet_api::{Epoch, Role};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::Ctx;

/// The primary the consumer reads from now.
#[derive(Clone, Debug)]
pub(crate) struct Primary {
    pub(crate) idx: usize,
    pub(crate) epoch: Epoch,
    pub(crate) partitions: Vec<PartitionStatus>,
}

/// The configured hubs and which of them is primary now.
pub(crate) struct Hubs {
    pub(crate) urls: Vec<String>,
    pub(crate) clients: Vec<HubClient>,
    pub(crate) primary: watch::Sender<Option<Primary>>,
    /// Wakes the tracker early (a read failed, an epoch changed).
    pub(crate) nudge: Notify,
}

impl Ctx {
    /// Keeps `primary` on the hub that is primary and unfenced with the
    /// highest epoch.
    pub(crate) async fn track_hubs(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let mut best: Option<Primary> = None;
            for (idx, c) in self.hubs.clients.iter().enumerate() {
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
                else {
                    continue;
                };
                if s.role == Role::Primary
                    && !s.fenced
                    && best.as_ref().is_none_or(|b| s.epoch > b.epoch)
                {
                    best = Some(Primary {
                        idx,
                        epoch: s.epoch,
                        partitions: s.partitions,
                    });
                }
            }
            let before = self
                .hubs
                .primary
                .borrow()
                .as_ref()
                .map(|p| (p.idx, p.epoch));
            let now = best.as_ref().map(|p| (p.idx, p.epoch));
            if before != now {
                match &best {
                    Some(p) => {
                        tracing::info!(hub = %self.hubs.urls[p.idx], epoch = %p.epoch, "reading from primary")
                    }
                    None => tracing::warn!("no primary hub reachable; waiting"),
                }
            }
            if let Some(p) = &best {
                for s in &p.partitions {
                    metrics::gauge!("fleet_consumer_high_watermark", "group" => self.group(), "partition" => s.id.0.to_string())
                        .set(s.high_watermark.0 as f64);
                }
            }
            self.hubs.primary.send_replace(best);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.hubs.nudge.notified() => {}
            }
        }
    }
}
