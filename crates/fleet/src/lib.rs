//! The `fleet` command: one binary that runs every component (`fleet hub …`,
//! `fleet registry-sync …`) and the benchmarks (`fleet bench …`).

pub mod bench;
pub mod cli;
