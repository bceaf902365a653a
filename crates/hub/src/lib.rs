//! A region's hub: devices connect over MQTT, authenticate against the
//! registry and publish telemetry, which is acknowledged only once it is
//! durable in the partitioned event log.

pub mod log;
