//! The last record of one device in a partition, found without reading the
//! partition: every device has its own subject, and a stream answers the
//! last message of a subject directly. A takeover on a shared log learns a
//! device's highest mid this way when the device first comes (appends only
//! ever raise a device's mid, so a last record with a mid holds the
//! highest; one without sends the caller to read the partition).

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use fleet_api::Offset;

use super::{Part, StreamNames};
use crate::log::frame::{self, Decoded};
use crate::log::{LogError, LogResult, Record};

impl Part {
    pub(super) async fn last_of(
        &self,
        names: &StreamNames,
        device: &str,
    ) -> LogResult<Option<Record>> {
        let meta = self.meta();
        // Newest generation first: offsets only grow along the chain.
        for (i, &(generation, first)) in meta.gens.iter().enumerate().rev() {
            // Where the next generation starts, this one's records end (a
            // cut leaves its tail in the old stream, unread).
            let end = meta.gens.get(i + 1).map(|(_, f)| *f);
            let stream = self
                .stream(generation)
                .ok_or_else(|| LogError::Io(format!("generation {generation} has no stream")))?;
            let subject = names.subject(self.id, generation, device);
            let m = match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
                Err(e) => {
                    return Err(LogError::Io(format!(
                        "jetstream last record of {device} in partition {}: {e}",
                        self.id
                    )));
                }
            };
            let corrupt = |detail: String| LogError::Corrupt {
                partition: self.id,
                offset: Offset(m.sequence.saturating_sub(1)),
                detail,
            };
            let record = match frame::decode(super::body::frame(&m.payload)) {
                Decoded::Frame { offset, record, .. } if offset.0 + 1 == m.sequence => Record {
                    partition: self.id,
                    offset,
                    record,
                },
                Decoded::Frame { offset, .. } => {
                    return Err(corrupt(format!("holds offset {offset}")));
                }
                Decoded::Short { .. } => return Err(corrupt("truncated frame".to_string())),
                Decoded::Bad(why) => return Err(corrupt(why.to_string())),
            };
            match end {
                Some(end) if record.offset.0 >= end => {
                    // Cut away: the device's last record in this
                    // generation's live part, by reading it (rare: after a
                    // failback, for a device silent since); none there,
                    // the older generations may hold one.
                    if let Some(r) = self.scan_last(first.max(meta.start), end, device).await? {
                        return Ok(Some(r));
                    }
                }
                _ => return Ok(Some(record)),
            }
        }
        Ok(None)
    }

    /// The last record of `device` among offsets `from..to`, by reading them.
    async fn scan_last(&self, from: u64, to: u64, device: &str) -> LogResult<Option<Record>> {
        let mut last = None;
        self.each_record(from, to, |r| {
            if r.record.device_id.as_str() == device {
                last = Some(r);
            }
        })
        .await?;
        Ok(last)
    }
}
