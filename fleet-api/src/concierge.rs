//! What the concierge answers, and what it asks hubs to do.

use serde::{Deserialize, Serialize};

use crate::hub::Role;
use crate::ids::{DeviceId, Epoch, Offset, PartitionId, Region};

/// `GET /v1/devices/{id}/endpoint`: where the device should connect.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointResponse {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub device_id: DeviceId,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub region: Region,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub mqtt_url: String,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub epoch: Epoch,
    /// Ask again after this many seconds.
    pub ttl_s: u32,
    /// Connect no sooner than this many milliseconds from now: after a
    /// failover the concierge hands every device its own slot of the hubs'
    /// admission rate, so the herd arrives at the rate hubs admit CONNECTs
    /// instead of all at once (or seconds late, at random).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_in_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One region in `GET /v1/regions`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegionView {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub region: Region,
    /// `None` while the hub has never answered.
    pub role: Option<Role>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>))]
    pub epoch: Option<Epoch>,
    pub healthy: bool,
    /// The one region devices are sent to.
    pub active: bool,
    pub replication_lag_ms: Option<u64>,
    pub connected_devices: Option<u64>,
    pub mqtt_url: String,
    /// Milliseconds since the hub last answered its status.
    pub last_seen_ms_ago: Option<u64>,
    /// Why the region is unhealthy, when it is.
    pub problem: Option<String>,
    /// Set while this region runs alone: its peer is detached, so what it
    /// writes has no second copy. Wall-clock ms since then.
    #[serde(default)]
    pub detached_since_ms: Option<u64>,
    /// Records written without a second copy since the peer was detached.
    #[serde(default)]
    pub written_while_detached: Option<u64>,
}

/// `GET /v1/regions`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegionsResponse {
    pub regions: Vec<RegionView>,
    /// Failovers this replica performed or saw, newest first.
    pub failovers: Vec<FailoverEvent>,
}

/// How a promotion treats the old primary.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Mode {
    /// The primary stops writes, the secondary catches up, then switches: no loss.
    #[default]
    Planned,
    /// Immediate, for an unreachable primary: unreplicated records stay with
    /// the devices that sent them (their outboxes).
    Forced,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Planned => "planned",
            Mode::Forced => "forced",
        }
    }
}

/// `POST /v1/failover` (concierge, admin).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailoverRequest {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub to: Region,
    pub mode: Mode,
}

/// Records a promotion could not bring along, per partition: offsets
/// `from..to` of the old primary that the new one does not have.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnreplicatedRange {
    #[cfg_attr(feature = "openapi", schema(value_type = u32))]
    pub partition: PartitionId,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub from: Offset,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub to: Offset,
}

/// The answer to a failover or promotion.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailoverResponse {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub region: Region,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub epoch: Epoch,
    pub mode: Mode,
    pub took_ms: u64,
    /// Forced mode: what the new primary had not replicated, as it last knew.
    #[serde(default)]
    pub unreplicated: Vec<UnreplicatedRange>,
    /// What the concierge checked before promoting (empty in a hub's own
    /// answer).
    #[serde(default)]
    pub checks: Vec<FailoverCheck>,
}

/// One check a failover made before promoting, and what it found.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailoverCheck {
    /// `target_healthy`, `replication_lag` or `registry`.
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// A failover in the concierge's timeline.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailoverEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub to: Region,
    pub mode: Mode,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub epoch: Epoch,
    pub took_ms: u64,
    /// `manual` or `automatic`.
    pub trigger: String,
}

/// `POST /v1/promote` (hub, admin): compare-and-set on the epoch.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub expected_epoch: Epoch,
    pub mode: Mode,
}
