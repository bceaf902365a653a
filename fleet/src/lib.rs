//! The `fleet` command: one binary that runs every component (`fleet hub …`,
//! `fleet concierge …`, `fleet registry-sync …`, `fleet device-agent …`), a
//! whole fleet on loopback (`fleet up`), the failover drill (`fleet drill`)
//! and the benchmarks (`fleet bench …`).

pub mod bench;
pub mod cli;
pub mod drill;
pub mod picture;
pub mod up;
