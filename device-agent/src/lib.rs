//! The device agent: the binary on edge hardware. It resolves the concierge
//! through configured DNS servers, asks it which hub is active, and delivers
//! telemetry from a durable outbox (see [`outbox`]) with application-level
//! acknowledgements: a message leaves the outbox only when the hub reports it
//! stored in both regions.

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod discovery;
pub mod mqtt;
pub mod outbox;
pub mod simulate;
pub mod source;
