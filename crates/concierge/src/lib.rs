//! The concierge: tells devices which hub is active, with its DNS front.
//!
//! This crate is being built up issue by issue; see the repository README for
//! what works today.
