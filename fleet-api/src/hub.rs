//! What hubs send and receive: device acks, the status and read APIs, device
//! administration and error bodies.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, Epoch, Mid, Offset, PartitionId, Region};
use crate::registry::{DeviceRecord, DeviceStatus, Tags, UnixMillis};

/// A hub's role in its pair of regions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// Accepts device connections and writes.
    Primary,
    /// Replicates from the primary; refuses device connections.
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary" => Ok(Role::Primary),
            "secondary" => Ok(Role::Secondary),
            other => Err(format!("role {other:?} is neither primary nor secondary")),
        }
    }
}

/// Published by the hub to `devices/{id}/acks` (JSON).
///
/// `committed`: the highest mid durably in this region's log; `replicated`:
/// the highest mid durably in the other region's log too (equal to
/// `committed` without a secondary, or while the peer is detached: then
/// `detached` is true). A device deletes a message from its outbox only
/// once `replicated >= mid`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AckMessage {
    pub committed: Mid,
    pub replicated: Mid,
    pub epoch: Epoch,
    pub region: Region,
    /// The other region is detached: `replicated` means durable here only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
}

/// One partition in [`StatusResponse`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub id: PartitionId,
    /// The next offset to be written: records `0..high_watermark` are durable.
    pub high_watermark: Offset,
    /// Records `0..replicated` are durable in the other region too.
    pub replicated: Offset,
    /// The oldest offset still retained (records before it were removed by
    /// retention).
    #[serde(default)]
    pub log_start: Offset,
}

/// `GET /v1/status`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    pub region: Region,
    pub role: Role,
    pub epoch: Epoch,
    pub partitions: Vec<PartitionStatus>,
    pub replication_lag_ms: u64,
    /// Devices connected right now.
    #[serde(default)]
    pub connected_devices: u64,
    /// Where devices connect (`mqtt://host:port` or `mqtts://…`).
    #[serde(default)]
    pub mqtt_url: Option<String>,
    /// Where standard MQTT clients watch the live stream.
    #[serde(default)]
    pub stream_url: Option<String>,
    /// Whether this hub reaches its peer right now (a secondary that still
    /// hears from its primary vetoes automatic failover).
    #[serde(default)]
    pub peer_reachable: bool,
    #[serde(default)]
    pub replication: Option<ReplicationStatus>,
    /// True while a primary is fenced (accepting no writes).
    #[serde(default)]
    pub fenced: bool,
    /// The other region as this hub sees it (absent without a peer).
    #[serde(default)]
    pub peer: Option<PeerLink>,
    /// The registry as this hub's mirror holds it: a failover compares it
    /// between regions (identities before switching).
    #[serde(default)]
    pub registry: Option<RegistryStatus>,
    /// With several hubs per region on one shared log: this hub's id
    /// (the name partitions are placed by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_id: Option<String>,
    /// With several hubs per region: the partitions this hub writes now
    /// (devices of the others are served by other hubs). Absent when the
    /// hub writes every partition alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned: Option<Vec<PartitionId>>,
}

/// A hub's view of its region's registry.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct RegistryStatus {
    /// Devices in the registry (enabled or not; removed ones excluded).
    pub devices: u64,
    /// The highest version of any record it has applied (tombstones too).
    pub max_version: crate::registry::Version,
    /// The highest version per region where the record was last written:
    /// region B holds everything A wrote when its entry for A is at least
    /// A's own (a later write in B alone does not make it so).
    #[serde(default)]
    pub by_origin: std::collections::BTreeMap<String, crate::registry::Version>,
}

impl RegistryStatus {
    /// Whether this registry holds what `source` (of region `origin`)
    /// wrote, as far as versions tell.
    #[must_use]
    pub fn holds_writes_of(&self, source: &RegistryStatus, origin: &str) -> bool {
        if source.by_origin.is_empty() {
            // A hub that does not report origins (or an empty registry).
            return self.max_version >= source.max_version;
        }
        match source.by_origin.get(origin) {
            Some(theirs) => self
                .by_origin
                .get(origin)
                .is_some_and(|mine| mine >= theirs),
            // None of the source's current records was last written there.
            None => true,
        }
    }
}

/// How a hub's peer region stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// The peer counts: `replicated` means durable in both regions.
    Attached,
    /// The peer does not count: this region runs alone, without a second
    /// copy; `replicated` means durable here.
    Detached,
    /// Attached, but not answering right now (sync acknowledgements wait).
    Unreachable,
}

/// `peer` in [`StatusResponse`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PeerLink {
    pub state: PeerState,
    /// Wall-clock ms since when it is detached or unreachable.
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// Records written here since it was detached (no second copy yet).
    #[serde(default)]
    pub written_since: Option<u64>,
    /// Detached by an operator (only an operator attaches it again).
    #[serde(default)]
    pub manual: bool,
    /// Detached, and the peer is catching up: partitions it has caught up
    /// with count again already.
    #[serde(default)]
    pub partitions_caught_up: u32,
}

/// A record as served by the read API (payload in base64).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WireRecord {
    pub partition: PartitionId,
    pub offset: Offset,
    pub device_id: DeviceId,
    /// `None` when the device published without a `/{mid}` suffix.
    pub mid: Option<Mid>,
    pub enqueued_at: UnixMillis,
    pub region: Region,
    pub epoch: Epoch,
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
}

/// How far a read of `GET /v1/partitions/{p}/records` goes (`?upto=`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadUpto {
    /// The prefix stored in both regions: it survives any failover.
    #[default]
    Replicated,
    /// Everything durable in this region: a forced failover can take the
    /// part beyond `replicated` out of the history.
    Committed,
}

impl ReadUpto {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadUpto::Replicated => "replicated",
            ReadUpto::Committed => "committed",
        }
    }
}

/// `GET /v1/partitions/{p}/records`. `high_watermark` is the end of what
/// the read may see (the replicated one by default).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RecordsResponse {
    pub records: Vec<WireRecord>,
    pub high_watermark: Offset,
    /// The serving hub's epoch (a secondary learns the primary's from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
}

/// Replication as a hub sees it, in `GET /v1/status`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// `off`, `async` or `sync`.
    pub mode: String,
    pub peer: Option<String>,
    /// `streaming`, `catching_up`, `stalled` (sync: acknowledgements wait),
    /// `throttled` (async: ingest paused), `reconciling` or `off`.
    pub state: String,
    pub lag_records: u64,
    pub lag_ms: u64,
}

/// `POST /v1/fence`: the primary's final high watermarks.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FenceResponse {
    pub high_watermarks: Vec<Offset>,
}

/// `POST /v1/demote` and `/v1/fence` bodies.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct EpochBody {
    #[serde(default)]
    pub epoch: Option<Epoch>,
}

/// `GET /v1/partitions/{p}/epoch_end?epoch=E`: where epoch `E` ends in this
/// hub's history (the first offset written in a later epoch), and the
/// largest epoch not above `E` that this history holds (`null` when it
/// holds none: then nothing before `offset` is known to be shared).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EpochEnd {
    pub offset: Offset,
    #[serde(default)]
    pub epoch: Option<Epoch>,
}

/// `GET /v1/partitions/{p}/epochs`: the partition's epoch history in the
/// retained log, oldest first, and its high watermark (where the last
/// epoch ends so far).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct EpochHistory {
    pub epochs: Vec<EpochStart>,
    pub high_watermark: Offset,
}

/// Where an epoch starts in a partition.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: Epoch,
    pub start: Offset,
}

impl EpochHistory {
    /// Where a reader whose last record (before `next`) was of epoch
    /// `last_epoch` in some history can be sure both histories agree: up to
    /// the end of that epoch here when this history holds it, otherwise up
    /// to the start of the largest epoch below it here (records of later
    /// epochs were written in a history this one does not share).
    #[must_use]
    pub fn agreed_until(&self, last_epoch: Epoch, next: Offset) -> Offset {
        let i = self.epochs.iter().rposition(|e| e.epoch <= last_epoch);
        let to = match i {
            Some(i) if self.epochs[i].epoch == last_epoch => self
                .epochs
                .get(i + 1)
                .map_or(self.high_watermark, |e| e.start),
            Some(i) => self.epochs[i].start,
            None => self.epochs.first().map_or(self.high_watermark, |e| e.start),
        };
        to.min(next)
    }
}

/// A divergent tail set aside at failback.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ArchivedRange {
    pub partition: PartitionId,
    pub from: Offset,
    pub to: Offset,
    pub epoch: Epoch,
    pub file: String,
}

/// `GET /v1/failback`: what was archived and whether the new history has it.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct FailbackReport {
    pub archived: Vec<ArchivedRange>,
    pub archived_records: u64,
    /// Archived `(device, mid)` not found in this hub's (new) history.
    pub missing_count: u64,
    pub missing: Vec<MissingRecord>,
}

/// One archived record the new history lacks.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct MissingRecord {
    pub device_id: DeviceId,
    pub mid: Option<Mid>,
}

/// `PUT /v1/devices/{id}`: creates the device when it does not exist.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePut {
    #[serde(default)]
    pub status: Option<DeviceStatus>,
    #[serde(default)]
    pub tags: Option<Tags>,
    /// Issue a new key (returned once) for an existing device.
    #[serde(default)]
    pub rotate_key: bool,
}

/// The answer to a device PUT: the record, and the key when one was issued.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DeviceResponse {
    pub device: DeviceRecord,
    /// Present only when this call created the device or rotated its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Machine-readable error codes of every Fleet HTTP API.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    NotFound,
    Conflict,
    /// The hub is not the primary (or was fenced) and refuses writes.
    NotPrimary,
    /// The compare-and-set on the epoch failed.
    EpochMismatch,
    /// The requested offset is no longer retained.
    OffsetGone,
    Unavailable,
    /// The concierge has no active hub (above the epoch asked for): a device
    /// that knows its last hub's epoch waits for the next one with
    /// `wait_for_epoch` rather than sleeping.
    NoActiveHub,
    /// The caller asks too fast (its address, or the fleet's reconnect
    /// schedule is full): come back after `Retry-After`.
    Paced,
    Internal,
}

/// The body of every error response: `{"error":{"code","message"}}`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

/// The partition of a device: FNV-1a (64 bit) of the id's bytes, mod `P`.
/// Written out here, not taken from a library, because it must never change:
/// both regions and every past log depend on it.
pub fn partition_for(device: &DeviceId, partitions: u32) -> PartitionId {
    debug_assert!(partitions > 0);
    PartitionId((fnv1a64(device.as_str().as_bytes()) % u64::from(partitions.max(1))) as u32)
}

pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn agreed_until_follows_the_whole_epoch_history() {
        use super::{EpochHistory, EpochStart};
        use crate::{Epoch, Offset};
        // A's history in the KIP-279 example: epoch 1 at 0..150, epoch 3 from 150.
        let a = EpochHistory {
            epochs: vec![
                EpochStart {
                    epoch: Epoch(1),
                    start: Offset(0),
                },
                EpochStart {
                    epoch: Epoch(3),
                    start: Offset(150),
                },
            ],
            high_watermark: Offset(160),
        };
        // A reader of B's history (epoch 2 from 80) stopped at 120: only
        // what precedes epoch 1's start is sure (B's epoch 2 is foreign).
        assert_eq!(a.agreed_until(Epoch(2), Offset(120)), Offset(0));
        // A reader of epoch 1 up to 100: all of it is shared.
        assert_eq!(a.agreed_until(Epoch(1), Offset(100)), Offset(100));
        // A reader of an epoch-1 history longer than A's epoch 1.
        assert_eq!(a.agreed_until(Epoch(1), Offset(170)), Offset(150));
        assert_eq!(a.agreed_until(Epoch(3), Offset(155)), Offset(155));
        assert_eq!(a.agreed_until(Epoch(0), Offset(5)), Offset(0));
    }

    use super::*;

    #[test]
    fn partition_is_stable() {
        // The published FNV-1a 64 test vectors: the hash may never change.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let id = DeviceId::new("foobar").unwrap();
        assert_eq!(
            partition_for(&id, 8).0,
            (0x8594_4171_f739_67e8u64 % 8) as u32
        );
        let spread: std::collections::HashSet<u32> = (0..64)
            .map(|i| partition_for(&DeviceId::new(format!("d{i}")).unwrap(), 8).0)
            .collect();
        assert_eq!(spread.len(), 8, "64 devices cover all 8 partitions");
    }

    #[test]
    fn ack_json_shape() {
        let ack = AckMessage {
            committed: Mid(5),
            replicated: Mid(3),
            epoch: Epoch(2),
            region: Region::new("eu").unwrap(),
            detached: false,
        };
        let text = serde_json::to_string(&ack).unwrap();
        assert_eq!(
            text,
            r#"{"committed":5,"replicated":3,"epoch":2,"region":"eu"}"#
        );
        assert_eq!(serde_json::from_str::<AckMessage>(&text).unwrap(), ack);
        let alone = AckMessage {
            replicated: Mid(5),
            detached: true,
            ..ack.clone()
        };
        let text = serde_json::to_string(&alone).unwrap();
        assert!(text.ends_with(r#""detached":true}"#), "{text}");
        assert_eq!(serde_json::from_str::<AckMessage>(&text).unwrap(), alone);
    }

    #[test]
    fn wire_record_payload_is_base64_and_mid_nullable() {
        let r = WireRecord {
            partition: PartitionId(1),
            offset: Offset(2),
            device_id: DeviceId::new("d").unwrap(),
            mid: None,
            enqueued_at: UnixMillis(3),
            region: Region::new("a").unwrap(),
            epoch: Epoch(1),
            payload: b"hi".to_vec(),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["payload"], "aGk=");
        assert!(v["mid"].is_null());
    }

    #[test]
    fn error_body_shape() {
        let e = ErrorBody::new(ErrorCode::NotPrimary, "no");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"error":{"code":"not_primary","message":"no"}}"#
        );
    }
}
