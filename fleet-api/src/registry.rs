//! Device identity records as they are stored, exported and merged between
//! regions (`fleet-registry/1`).
//!
//! The registry never holds a device key, only `sha256(key)`; the key itself
//! exists once, in the output of `device add`, and on the device.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::{DeviceId, Region};

/// Milliseconds since the Unix epoch.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// Now, from the system clock (0 before 1970).
    pub fn now() -> Self {
        Self(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

/// A hybrid-logical-clock timestamp: wall-clock milliseconds in the high 48
/// bits, a logical counter in the low 16. Orders registry writes across
/// regions (last writer wins).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(pub u64);

impl Version {
    pub const LOGICAL_BITS: u32 = 16;

    /// The wall-clock part, in milliseconds.
    pub fn millis(self) -> u64 {
        self.0 >> Self::LOGICAL_BITS
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Version({}ms+{})",
            self.millis(),
            self.0 & ((1 << Self::LOGICAL_BITS) - 1)
        )
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Whether a device may connect.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Enabled,
    Disabled,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Enabled => "enabled",
            DeviceStatus::Disabled => "disabled",
        }
    }
}

impl FromStr for DeviceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enabled" => Ok(DeviceStatus::Enabled),
            "disabled" => Ok(DeviceStatus::Disabled),
            other => Err(format!(
                "status {other:?} is neither \"enabled\" nor \"disabled\""
            )),
        }
    }
}

/// A device's secret: 32 random bytes, written as unpadded base64url (43
/// characters). Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey([u8; 32]);

/// Why a string is not a device key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a device key is 43 characters of unpadded base64url")]
    Encoding,
    #[error("a key hash is 64 hexadecimal characters")]
    HashEncoding,
}

impl DeviceKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses the base64url text form (as typed into `--key` or sent as the
    /// MQTT password).
    ///
    /// # Errors
    /// When the text is not 32 bytes of unpadded base64url.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        Self::parse_bytes(text.as_bytes())
    }

    /// Like [`DeviceKey::parse`], from raw bytes (an MQTT password field).
    ///
    /// # Errors
    /// When the bytes are not 32 bytes of unpadded base64url.
    pub fn parse_bytes(text: &[u8]) -> Result<Self, KeyError> {
        if text.len() != 43 {
            return Err(KeyError::Encoding);
        }
        let mut out = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut out) {
            Ok(32) => Ok(Self(out)),
            _ => Err(KeyError::Encoding),
        }
    }

    /// The text form. Named so that printing a key is always deliberate.
    pub fn expose(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0).into())
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(***)")
    }
}

/// `sha256(key)`, the only form of a key the registry keeps. Serialized as
/// 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Constant-time comparison with the hash of `key`.
    pub fn matches(&self, key: &DeviceKey) -> bool {
        self.0.ct_eq(&key.hash().0).into()
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// # Errors
    /// When the text is not 64 hexadecimal characters.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::HashEncoding)?;
        Ok(Self(out))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

impl Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyHash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A device's tags: a JSON object of at most 8 KiB, held as canonical JSON
/// text (keys sorted, no whitespace) so that equal tags compare equal and
/// records stream through exports without re-encoding.
#[derive(Clone, Serialize)]
#[serde(transparent)]
pub struct Tags(Box<serde_json::value::RawValue>);

/// Tags that break the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagsError {
    #[error("tags are {0} bytes of JSON, the limit is 8192")]
    TooLarge(usize),
    #[error("tags must be a JSON object")]
    NotAnObject,
    #[error("tags are not valid JSON: {0}")]
    Invalid(String),
}

impl Tags {
    pub const MAX_BYTES: usize = 8192;

    /// # Errors
    /// When the serialized object exceeds [`Tags::MAX_BYTES`].
    pub fn new(map: serde_json::Map<String, serde_json::Value>) -> Result<Self, TagsError> {
        let text = serde_json::Value::Object(map).to_string();
        if text.len() > Self::MAX_BYTES {
            return Err(TagsError::TooLarge(text.len()));
        }
        serde_json::value::RawValue::from_string(text)
            .map(Self)
            .map_err(|e| TagsError::Invalid(e.to_string()))
    }

    /// Parses untrusted JSON text that must be an object within the size limit.
    ///
    /// # Errors
    /// When the text is not a JSON object or is too large.
    pub fn parse(text: &str) -> Result<Self, TagsError> {
        // Canonical JSON is never longer than the text it came from, so the
        // text's own length bounds the work on hostile input.
        if text.len() > 4 * Self::MAX_BYTES {
            return Err(TagsError::TooLarge(text.len()));
        }
        match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(m)) => Self::new(m),
            Ok(_) => Err(TagsError::NotAnObject),
            Err(e) => Err(TagsError::Invalid(e.to_string())),
        }
    }

    /// Accepts text this system wrote itself (canonical, from a registry
    /// database), checking only that it is a JSON object of legal size.
    ///
    /// # Errors
    /// When the text is not a JSON object or is too large.
    pub fn from_stored(text: String) -> Result<Self, TagsError> {
        if text.len() > Self::MAX_BYTES {
            return Err(TagsError::TooLarge(text.len()));
        }
        if !text.starts_with('{') {
            return Err(TagsError::NotAnObject);
        }
        serde_json::value::RawValue::from_string(text)
            .map(Self)
            .map_err(|e| TagsError::Invalid(e.to_string()))
    }

    /// The canonical JSON text.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    /// The tags as a JSON object.
    pub fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl Default for Tags {
    fn default() -> Self {
        Self::new(serde_json::Map::new()).expect("empty tags are valid")
    }
}

impl PartialEq for Tags {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for Tags {}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tags({})", self.0.get())
    }
}

impl<'de> Deserialize<'de> for Tags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::deserialize(d)?;
        Tags::new(map).map_err(serde::de::Error::custom)
    }
}

/// One device identity, exactly as stored, exported and merged.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub device_id: DeviceId,
    pub key_sha256: KeyHash,
    pub status: DeviceStatus,
    pub tags: Tags,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    pub version: Version,
    pub origin: Region,
    /// A tombstone: the device was removed. Kept so that the removal wins
    /// merges against older copies of the record.
    pub deleted: bool,
}

impl DeviceRecord {
    /// The merge order: the greater `(version, origin)` wins.
    pub fn merge_key(&self) -> (Version, &Region) {
        (self.version, &self.origin)
    }

    /// True when this record replaces `other` under the merge rule.
    pub fn supersedes(&self, other: &DeviceRecord) -> bool {
        self.merge_key() > other.merge_key()
    }

    /// True when a device with this record may connect.
    pub fn is_active(&self) -> bool {
        !self.deleted && self.status == DeviceStatus::Enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_and_hides_in_debug() {
        let k = DeviceKey::from_bytes([7; 32]);
        let text = k.expose();
        assert_eq!(text.len(), 43);
        assert_eq!(DeviceKey::parse(&text).unwrap(), k);
        assert_eq!(format!("{k:?}"), "DeviceKey(***)");
        assert!(!format!("{:?}", k.hash()).contains(&text));
    }

    #[test]
    fn key_parse_rejects_wrong_shapes() {
        assert_eq!(DeviceKey::parse("short"), Err(KeyError::Encoding));
        assert_eq!(DeviceKey::parse(&"!".repeat(43)), Err(KeyError::Encoding));
        let padded = format!("{}=", DeviceKey::from_bytes([1; 32]).expose());
        assert!(DeviceKey::parse(&padded).is_err());
    }

    #[test]
    fn hash_matches_only_its_key() {
        let k = DeviceKey::from_bytes([1; 32]);
        let other = DeviceKey::from_bytes([2; 32]);
        assert!(k.hash().matches(&k));
        assert!(!k.hash().matches(&other));
        let hex = k.hash().to_hex();
        assert_eq!(KeyHash::from_hex(&hex).unwrap(), k.hash());
        assert!(KeyHash::from_hex("zz").is_err());
    }

    #[test]
    fn tags_enforce_object_and_size() {
        let t = Tags::parse(r#"{ "site" : "a", "b": 1 }"#).unwrap();
        assert_eq!(t.as_json(), r#"{"b":1,"site":"a"}"#, "canonical");
        assert_eq!(t, Tags::parse(r#"{"site":"a","b":1}"#).unwrap());
        assert!(Tags::from_stored("[1]".into()).is_err());
        assert!(Tags::from_stored("{oops".into()).is_err());
        assert_eq!(Tags::parse("[1]"), Err(TagsError::NotAnObject));
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(8200));
        assert!(matches!(Tags::parse(&big), Err(TagsError::TooLarge(_))));
    }

    #[test]
    fn record_refuses_unknown_fields() {
        let k = DeviceKey::from_bytes([1; 32]).hash().to_hex();
        let line = format!(
            r#"{{"device_id":"d","key_sha256":"{k}","status":"enabled","tags":{{}},"created_at":1,"updated_at":1,"version":5,"origin":"a","deleted":false,"extra":1}}"#
        );
        let err = serde_json::from_str::<DeviceRecord>(&line).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
    }
}
