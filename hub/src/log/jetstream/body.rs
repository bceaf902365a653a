//! What a stream message holds: the id of the writer that stored it, then
//! the record's frame (the file log's, unchanged).
//!
//! The id says, when a writer confirms its publishes after an error, whether
//! the message at an offset is its own or another writer's (the partition
//! is then fenced). It used to travel as a header (`Fleet-Write-Id`); in
//! the body it is 9 bytes the servers store without a header line to parse
//! and keep per message (`fleet bench ingest --log jetstream`: hub / raw
//! publisher 0.76 → 0.83 median of rounds in one run; see the README).
//! Messages stored with the header hold the frame alone and still read.
//! Hubs older than this layout cannot read it (the README says so).

use std::fmt;

use bytes::Bytes;
use fleet_api::Offset;

use super::super::{NewRecord, frame};

/// Marks a body that starts with a writer id; never a frame's first byte.
const TAG: u8 = 0xF2;
const _: () = assert!(TAG != frame::MAGIC);

/// Bytes before the frame.
const PREFIX: usize = 9;

/// One writer's id: a nonce, new for each view of the partition the writer
/// takes, so two writers' (or two views') ids never meet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct WriterId(u64);

impl WriterId {
    /// A fresh nonce (not a choice a test needs to steer: ids must only
    /// never collide).
    pub fn new() -> Self {
        WriterId(rand::random())
    }
}

impl fmt::Display for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The body `writer` stores for `rec` at `offset`: its id, then the frame.
pub(super) fn encode(writer: WriterId, offset: Offset, rec: &NewRecord) -> Bytes {
    let mut out = Vec::with_capacity(rec.payload.len() + 64 + PREFIX);
    out.push(TAG);
    out.extend_from_slice(&writer.0.to_le_bytes());
    frame::encode(&mut out, offset, rec);
    Bytes::from(out)
}

/// The body a hub stores for `rec` at `offset` (under a writer id of its
/// own): what a raw publisher writes to store the same bytes (`fleet bench
/// ingest --log jetstream`).
pub fn stored_body(offset: Offset, rec: &NewRecord) -> Bytes {
    encode(WriterId::new(), offset, rec)
}

/// The frame a message body holds (what follows a writer id, or the whole
/// body of one stored without).
pub(super) fn frame(body: &[u8]) -> &[u8] {
    match body {
        [TAG, rest @ ..] if rest.len() >= PREFIX - 1 => &rest[PREFIX - 1..],
        _ => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_gives_back_its_frame_with_or_without_a_writer_id() {
        let rec = NewRecord {
            device_id: fleet_api::DeviceId::new("d").unwrap(),
            mid: Some(fleet_api::Mid(1)),
            enqueued_at: fleet_api::UnixMillis(1_700_000_000_000),
            region: fleet_api::Region::new("eu").unwrap(),
            epoch: fleet_api::Epoch(1),
            payload: Bytes::from_static(b"x"),
        };
        let mut alone = Vec::new();
        frame::encode(&mut alone, Offset(3), &rec);
        let w = WriterId::new();
        let body = encode(w, Offset(3), &rec);
        assert_eq!(body.len(), PREFIX + alone.len());
        assert_eq!(frame(&body), &alone[..]);
        // The same record from the same writer is the same body; from
        // another writer it is not (what the confirmation tells apart).
        assert_eq!(encode(w, Offset(3), &rec), body);
        assert_ne!(stored_body(Offset(3), &rec), body);
        // Stored before the id moved into the body: the frame alone.
        assert_eq!(frame(&alone), &alone[..]);
        // A tag without a whole id is not a prefix: the frame decoder
        // reports the bytes as they are.
        assert_eq!(frame(&[TAG, 1, 2]), &[TAG, 1, 2]);
        assert_eq!(frame(&[]), &[] as &[u8]);
        assert_eq!(w.to_string().len(), 16);
    }
}
