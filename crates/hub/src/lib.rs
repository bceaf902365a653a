//! A region's hub: device MQTT ingest into a durable, partitioned event log.
//!
//! This crate is being built up issue by issue; see the repository README for
//! what works today.
