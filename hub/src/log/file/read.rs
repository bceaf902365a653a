//! Reading durable records of a partition, checking every frame's CRC.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fleet_api::Offset;

use super::segment::Segment;
use super::{PartitionLog, io};
use crate::log::frame::{self, Frames, Stop};
use crate::log::{LogError, LogResult, ReadLimits, Record};

/// Bytes read from a segment at a time (a larger frame is read whole).
const CHUNK: u64 = 256 * 1024;

/// Durable records from `from` on, at most `limits`. A corrupt record is
/// never served: the read stops before it, with an error when it is the
/// first record asked for.
pub(super) fn read_blocking(
    part: &PartitionLog,
    from: Offset,
    limits: ReadLimits,
) -> LogResult<Vec<Record>> {
    let hw = *part.hw.borrow();
    let segs: Vec<Arc<Segment>> = part
        .segments
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let start = segs.first().map_or(hw, |s| s.base);
    if from < start {
        return Err(LogError::OffsetGone {
            partition: part.id,
            requested: from,
            start,
        });
    }
    let mut out = Vec::new();
    if from >= hw {
        return Ok(out);
    }
    let mut bytes = 0usize;
    let mut cur = from;
    let mut i = segs.partition_point(|s| s.base <= from).saturating_sub(1);
    let corrupt = |offset: Offset, detail: String| LogError::Corrupt {
        partition: part.id,
        offset,
        detail,
    };
    while i < segs.len() && out.len() < limits.max_records && bytes < limits.max_bytes && cur < hw {
        let seg = &segs[i];
        let seg_next = Offset(seg.next.load(Ordering::Acquire));
        let end = seg.durable_len.load(Ordering::Acquire);
        if cur >= seg_next {
            i += 1;
            continue;
        }
        let mut pos = seg.seek(cur);
        let mut chunk = Vec::new();
        'segment: while pos < end && cur < seg_next {
            let want = (end - pos).min(CHUNK).max(frame::HEADER as u64) as usize;
            chunk.resize(want, 0);
            let n = seg
                .file
                .read_at(&mut chunk, pos)
                .map_err(|e| io(seg.path.display(), e))?;
            chunk.truncate(n);
            let walked = loop {
                let mut frames = Frames::new(&chunk);
                for f in frames.by_ref() {
                    if f.offset > cur {
                        let e = corrupt(
                            cur,
                            format!("offset {} found where {cur} was due", f.offset),
                        );
                        return if out.is_empty() { Err(e) } else { Ok(out) };
                    }
                    if f.offset == cur {
                        bytes += f.record.payload.len();
                        out.push(Record {
                            partition: part.id,
                            offset: f.offset,
                            record: f.record,
                        });
                        cur = cur.next();
                        if out.len() >= limits.max_records
                            || bytes >= limits.max_bytes
                            || cur >= seg_next
                        {
                            break 'segment;
                        }
                    }
                }
                let at = frames.pos();
                // The chunk ending on a frame boundary is a frame cut short
                // at its header, like any other short read.
                let need = match frames.stop() {
                    None => frame::HEADER,
                    Some(Stop::Short { need }) => need,
                    Some(Stop::Bad(why)) => {
                        let e = corrupt(cur, why.to_string());
                        return if out.is_empty() { Err(e) } else { Ok(out) };
                    }
                };
                if pos + (at + need) as u64 > end {
                    let e = corrupt(cur, "record extends past the durable end".into());
                    return if out.is_empty() { Err(e) } else { Ok(out) };
                }
                if at == 0 {
                    // A frame larger than the chunk: read it whole.
                    chunk.resize(need, 0);
                    let n = seg
                        .file
                        .read_at(&mut chunk, pos)
                        .map_err(|e| io(seg.path.display(), e))?;
                    if n < need {
                        // The file is shorter than its durable length said
                        // when this read began: a cut shortened it. What was
                        // read is valid; the caller asks again.
                        return Ok(out);
                    }
                    chunk.truncate(n);
                    continue;
                }
                break at;
            };
            pos += walked as u64;
        }
        i += 1;
    }
    Ok(out)
}
