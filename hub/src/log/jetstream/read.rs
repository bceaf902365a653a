//! Reading records back by offset.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind, LastRawMessageErrorKind};
use fleet_api::{Offset, PartitionId};
use futures::StreamExt;

use crate::log::frame::{self, Decoded};
use crate::log::{LogError, LogResult, ReadLimits, Record};

/// How many gets are in flight during one read.
const CONCURRENCY: usize = 32;

/// The message at `seq`, or `None` if the stream has none there. A direct
/// get may be answered by a replica that has not applied the latest writes
/// yet, so a miss is asked again of the stream's leader.
pub(super) async fn get(s: &stream::Stream, seq: u64) -> LogResult<Option<StreamMessage>> {
    match s.direct_get(seq).await {
        Ok(m) => return Ok(Some(m)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
        Err(e) => tracing::debug!(seq, error = %e, "direct get failed; asking the leader"),
    }
    match s.get_raw_message(seq).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(LogError::Io(format!(
            "jetstream get of sequence {seq}: {e}"
        ))),
    }
}

/// Reads offsets `from..to` (all in stream `s`) within `limits`; at least
/// one record when any is asked for.
pub(super) async fn read_range(
    p: PartitionId,
    s: &stream::Stream,
    from: u64,
    to: u64,
    limits: ReadLimits,
) -> LogResult<Vec<Record>> {
    let mut out: Vec<Record> = Vec::new();
    let mut bytes = 0usize;
    let mut next = from;
    while next < to && out.len() < limits.max_records {
        let n = (to - next)
            .min((limits.max_records - out.len()) as u64)
            .min(CONCURRENCY as u64 * 4);
        let got: Vec<LogResult<Option<StreamMessage>>> =
            futures::stream::iter((next..next + n).map(|o| get(s, o + 1)))
                .buffered(CONCURRENCY)
                .collect()
                .await;
        for (i, m) in got.into_iter().enumerate() {
            let offset = next + i as u64;
            let m = m?.ok_or(LogError::Corrupt {
                partition: p,
                offset: Offset(offset),
                detail: "missing from its stream".to_string(),
            })?;
            let record = decode(p, offset, &m.payload)?;
            let size = record.record.payload.len() + 64;
            if !out.is_empty() && bytes + size > limits.max_bytes {
                return Ok(out);
            }
            bytes += size;
            out.push(record);
        }
        next += n;
    }
    Ok(out)
}

fn decode(p: PartitionId, offset: u64, body: &[u8]) -> LogResult<Record> {
    let corrupt = |detail: String| LogError::Corrupt {
        partition: p,
        offset: Offset(offset),
        detail,
    };
    match frame::decode(super::body::frame(body)) {
        Decoded::Frame {
            offset: o, record, ..
        } if o.0 == offset => Ok(Record {
            partition: p,
            offset: o,
            record,
        }),
        Decoded::Frame { offset: o, .. } => Err(corrupt(format!("holds offset {o}"))),
        Decoded::Short { .. } => Err(corrupt("truncated frame".to_string())),
        Decoded::Bad(why) => Err(corrupt(why.to_string())),
    }
}

impl super::Part {
    /// Calls `f` with every record of offsets `from..to`, in order, read
    /// page by page; returns the offset it read up to (below `to` when the
    /// partition ends first).
    pub(super) async fn each_record(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(Record),
    ) -> LogResult<u64> {
        let mut at = from;
        while at < to {
            let limits = ReadLimits {
                max_records: 10_000,
                max_bytes: 64 << 20,
            };
            let batch = self.read(Offset(at), limits).await?;
            let Some(end) = batch.last().map(|r| r.offset.next()) else {
                break;
            };
            batch
                .into_iter()
                .filter(|r| r.offset.0 < to)
                .for_each(&mut f);
            at = end.0;
        }
        Ok(at.min(to))
    }
}
