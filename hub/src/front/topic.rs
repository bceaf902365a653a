//! Topic rules of the device front: a device publishes only under
//! `devices/{its id}/messages/events[/{mid}]` and subscribes only under
//! `devices/{its id}/`.

use fleet_api::{DeviceId, Mid};

/// Why a topic or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("publish to {0:?} is outside devices/{{id}}/messages/events")]
    ForeignPublish(String),
    #[error("mid {0:?} is not a decimal u64")]
    BadMid(String),
    #[error("subscription {0:?} is outside devices/{{id}}/")]
    ForeignFilter(String),
    #[error("subscription {0:?} is not a valid MQTT filter")]
    InvalidFilter(String),
}

/// The mid of a telemetry publish (`None` without a `/{mid}` suffix).
///
/// # Errors
/// When the topic is not the device's telemetry topic or the mid is malformed.
pub fn parse_publish(topic: &str, device: &DeviceId) -> Result<Option<Mid>, TopicError> {
    let rest = topic
        .strip_prefix("devices/")
        .and_then(|r| r.strip_prefix(device.as_str()))
        .and_then(|r| r.strip_prefix("/messages/events"))
        .ok_or_else(|| TopicError::ForeignPublish(topic.to_string()))?;
    if rest.is_empty() {
        return Ok(None);
    }
    let mid = rest
        .strip_prefix('/')
        .ok_or_else(|| TopicError::ForeignPublish(topic.to_string()))?;
    // Digits only: "+1", " 1" or "" would parse differently elsewhere.
    if mid.is_empty() || mid.len() > 20 || !mid.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TopicError::BadMid(mid.to_string()));
    }
    mid.parse::<u64>()
        .map(|m| Some(Mid(m)))
        .map_err(|_| TopicError::BadMid(mid.to_string()))
}

/// Checks a subscription filter.
///
/// # Errors
/// When the filter is invalid or reaches outside `devices/{id}/`.
pub fn check_filter(filter: &str, device: &DeviceId) -> Result<(), TopicError> {
    if !rumqttc::mqttbytes::valid_filter(filter) {
        return Err(TopicError::InvalidFilter(filter.to_string()));
    }
    let own = filter
        .strip_prefix("devices/")
        .and_then(|r| r.strip_prefix(device.as_str()))
        .is_some_and(|r| r.starts_with('/'));
    if own {
        Ok(())
    } else {
        Err(TopicError::ForeignFilter(filter.to_string()))
    }
}

/// The topic the hub publishes commit acknowledgements to.
pub fn acks_topic(device: &DeviceId) -> String {
    format!("devices/{device}/acks")
}

/// True when `filter` matches `topic`.
pub fn matches(topic: &str, filter: &str) -> bool {
    rumqttc::mqttbytes::matches(topic, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> DeviceId {
        DeviceId::new("dev-1").unwrap()
    }

    #[test]
    fn publish_topics() {
        assert_eq!(
            parse_publish("devices/dev-1/messages/events", &d()),
            Ok(None)
        );
        assert_eq!(
            parse_publish("devices/dev-1/messages/events/42", &d()),
            Ok(Some(Mid(42)))
        );
        for foreign in [
            "devices/dev-2/messages/events",
            "devices/dev-10/messages/events",
            "devices/dev-1/messages/eventsX",
            "devices/dev-1/messages",
            "other/topic",
            "devices/dev-1/messages/events/1/2",
        ] {
            assert!(parse_publish(foreign, &d()).is_err(), "{foreign}");
        }
        for bad in ["", "+1", "-1", "1a", "99999999999999999999999"] {
            let t = format!("devices/dev-1/messages/events/{bad}");
            assert!(parse_publish(&t, &d()).is_err(), "{t}");
        }
    }

    #[test]
    fn filters() {
        for ok in ["devices/dev-1/acks", "devices/dev-1/#", "devices/dev-1/+/x"] {
            assert_eq!(check_filter(ok, &d()), Ok(()), "{ok}");
        }
        for bad in [
            "#",
            "devices/#",
            "devices/+/acks",
            "devices/dev-10/acks",
            "devices/dev-1",
            "devices/dev-1#",
        ] {
            assert!(check_filter(bad, &d()).is_err(), "{bad}");
        }
        assert!(matches("devices/dev-1/acks", "devices/dev-1/#"));
        assert!(!matches("devices/dev-1/acks", "devices/dev-1/x"));
    }
}
