//! Types that cross a process or region boundary.
//!
//! Everything here is plain data: no sockets, files or databases, so that the
//! device agent can depend on it without pulling in server crates. Anything
//! ordered is a newtype (`Epoch`, `Offset`, `Mid`, `Version`) so that the
//! compiler keeps the different counters apart; secrets print as `***`.
//!
//! The one exception is [`client`] (feature `client`): the HTTP client of a
//! hub's API, for consumers and tools that must not compile the hub; and
//! [`process`] (feature `process`): logging and signals of server processes;
//! `prom` (feature `prometheus`): the process's metrics recorder; and
//! `serve` (feature `http-server`): axum with header timeouts and a
//! connection cap.

#[cfg(feature = "client")]
pub mod client;
pub mod concierge;
pub mod hub;
pub mod ids;
#[cfg(feature = "process")]
pub mod process;
#[cfg(feature = "prometheus")]
pub mod prom;
pub mod registry;
pub mod secret;
#[cfg(feature = "http-server")]
pub mod serve;

pub use hub::{AckMessage, ErrorBody, ErrorCode, Role, partition_for};
pub use ids::{DeviceId, Epoch, IdError, Mid, Offset, PartitionId, Region};
pub use registry::{
    DeviceKey, DeviceRecord, DeviceStatus, KeyError, KeyHash, Tags, TagsError, UnixMillis, Version,
};
pub use secret::Secret;
