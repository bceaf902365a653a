//! The device identity registry and `registry-sync`.
//!
//! Each region keeps its own registry (a SQLite file or a PostgreSQL
//! database). Registries converge by a last-writer-wins merge ([`merge`]),
//! applied by `import`, `merge` and `follow` ([`ops`]) through one store trait
//! ([`store::RegistryStore`]) that both backends implement.

pub mod bench;
pub mod cli;
pub mod format;
pub mod hlc;
pub mod keys;
pub mod merge;
pub mod ops;
pub mod store;
pub mod testing;

pub use merge::{Outcome, Summary};
pub use store::{AuthOutcome, RegistryError, RegistryStore, open};
