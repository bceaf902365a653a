//! The `fleet` command: one binary that runs every component (`fleet hub …`,
//! `fleet concierge …`, `fleet registry-sync …`, `fleet device-agent …`), a
//! whole fleet on loopback (`fleet up`), the failover drill (`fleet drill`)
//! the benchmarks (`fleet bench …`) and the power-cut torture (`fleet torture`).

pub mod bench;
pub mod cli;
pub mod drill;
pub mod picture;
pub mod torture;
pub mod up;
