//! The device agent: discovers the active hub and delivers telemetry from a durable outbox.
//!
//! This crate is being built up issue by issue; see the repository README for
//! what works today.
