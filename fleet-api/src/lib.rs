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
//! connection cap; `https` (feature `https-server`): its TLS listener;
//! `limit` (feature `limits`): rate limits per client address; `storage`
//! (feature `storage`): the file operations of durable structures, on the
//! real disk or a simulated one that loses power; `local` (feature
//! `local-servers`): free loopback ports and a local JetStream cluster.

#[cfg(feature = "client")]
pub mod client;
pub mod concierge;
#[cfg(feature = "https-server")]
pub mod https;
pub mod hub;
pub mod ids;
#[cfg(feature = "limits")]
pub mod limit;
#[cfg(feature = "local-servers")]
pub mod local;
#[cfg(feature = "process")]
pub mod process;
#[cfg(feature = "prometheus")]
pub mod prom;
pub mod registry;
pub mod rendezvous;
pub mod secret;
#[cfg(feature = "http-server")]
pub mod serve;
#[cfg(feature = "storage")]
pub mod storage;

pub use hub::{AckMessage, ErrorBody, ErrorCode, Role, partition_for};
pub use ids::{DeviceId, Epoch, IdError, Mid, Offset, PartitionId, Region};
pub use registry::{
    DeviceKey, DeviceRecord, DeviceStatus, KeyError, KeyHash, Tags, TagsError, UnixMillis, Version,
};
pub use secret::Secret;

/// An error and its causes on one line ("error sending request …: client
/// error (Connect): invalid peer certificate: UnknownIssuer"): reqwest's
/// and hyper's own messages leave the causes out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
