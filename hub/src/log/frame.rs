//! The on-disk record frame.
//!
//! ```text
//! magic u8 = 0xF1 | body_len u32 LE | crc32 u32 LE (of body) | body
//! body: offset u64 | enqueued_at u64 | epoch u64
//!       | flags u8 (bit 0: mid follows; bit 1: first frame of a write)
//!       | [mid u64] | device_len u8 | device | region_len u8 | region
//!       | payload_len u32 | payload                    (all integers LE)
//! ```
//! The magic byte lets recovery look past a bad frame for a later good one.
//! The log's writer marks the first frame of each group-commit write: a
//! write starts only after the previous one was synced, so a valid first
//! frame of a later write after a bad frame proves the bad frame was
//! acknowledged (corruption: stop and report), while valid frames of the
//! same write only show that write was torn by a power cut (truncate).
//!
//! [`Frames`] is the one walk over the frames in a buffer: recovery, reads,
//! cutting the log and failback reports all use it.

use bytes::{Buf, BufMut, Bytes};
use fleet_api::{DeviceId, Epoch, Mid, Offset, Region, UnixMillis};

use super::NewRecord;

pub const MAGIC: u8 = 0xF1;
pub const HEADER: usize = 9;
/// The smallest frame: the header and the smallest body.
pub const MIN_FRAME: usize = HEADER + 27;
/// Larger bodies are never written, so a larger length means a bad frame.
pub const MAX_BODY: usize = 64 << 20;
/// The largest payload a frame holds with room for the largest device id,
/// region and fixed fields: a larger payload could be acknowledged, then
/// never read back.
pub const MAX_PAYLOAD: usize = MAX_BODY - 4096;

const FLAG_MID: u8 = 1;
const FLAG_STARTS_WRITE: u8 = 2;

/// Appends the frame of `rec` at `offset` to `out`; returns its length.
pub fn encode(out: &mut Vec<u8>, offset: Offset, rec: &NewRecord) -> usize {
    encode_flagged(out, offset, rec, false)
}

/// [`encode`], marking the frame as the first of a write when
/// `starts_write`.
pub fn encode_flagged(
    out: &mut Vec<u8>,
    offset: Offset,
    rec: &NewRecord,
    starts_write: bool,
) -> usize {
    let write_flag = if starts_write { FLAG_STARTS_WRITE } else { 0 };
    let start = out.len();
    out.put_u8(MAGIC);
    out.put_u32_le(0); // length, patched below
    out.put_u32_le(0); // crc, patched below
    let body_start = out.len();
    out.put_u64_le(offset.0);
    out.put_u64_le(rec.enqueued_at.0);
    out.put_u64_le(rec.epoch.0);
    match rec.mid {
        Some(m) => {
            out.put_u8(FLAG_MID | write_flag);
            out.put_u64_le(m.0);
        }
        None => out.put_u8(write_flag),
    }
    let id = rec.device_id.as_str().as_bytes();
    out.put_u8(id.len() as u8);
    out.put_slice(id);
    let region = rec.region.as_str().as_bytes();
    out.put_u8(region.len() as u8);
    out.put_slice(region);
    out.put_u32_le(rec.payload.len() as u32);
    out.put_slice(&rec.payload);
    let body_len = out.len() - body_start;
    let crc = crc32fast::hash(&out[body_start..]);
    out[start + 1..start + 5].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 5..start + 9].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// The result of looking at bytes where a frame should start.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid frame of `len` bytes.
    Frame {
        offset: Offset,
        record: NewRecord,
        len: usize,
        /// The first frame of a group-commit write.
        starts_write: bool,
    },
    /// The bytes end inside the frame: `need` bytes in total are required.
    Short { need: usize },
    /// Not a valid frame.
    Bad(&'static str),
}

/// Decodes the frame at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER {
        return Decoded::Short { need: HEADER };
    }
    if buf[0] != MAGIC {
        return Decoded::Bad("bad magic byte");
    }
    let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(27..=MAX_BODY).contains(&len) {
        return Decoded::Bad("impossible length");
    }
    if buf.len() < HEADER + len {
        return Decoded::Short { need: HEADER + len };
    }
    let crc = u32::from_le_bytes([buf[5], buf[6], buf[7], buf[8]]);
    let body = &buf[HEADER..HEADER + len];
    if crc32fast::hash(body) != crc {
        return Decoded::Bad("checksum mismatch");
    }
    match parse_body(body) {
        Some((offset, record, starts_write)) => Decoded::Frame {
            offset,
            record,
            len: HEADER + len,
            starts_write,
        },
        None => Decoded::Bad("malformed body"),
    }
}

/// A valid frame met while walking a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameAt {
    /// Byte position of the frame's first byte in the buffer.
    pub pos: usize,
    pub offset: Offset,
    pub record: NewRecord,
}

/// Why a walk over frames ended before the end of its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The buffer ends inside the frame at [`Frames::pos`]: `need` bytes
    /// from there are required.
    Short { need: usize },
    /// The bytes at [`Frames::pos`] are not a valid frame.
    Bad(&'static str),
}

/// The valid frames of a byte buffer, in order, from a start position up
/// to the first position that does not hold a whole valid frame.
///
/// This is the one walk over frames: recovery, reads, cutting the log and
/// failback reports all use it. After it ends, [`Frames::pos`] is where it
/// stopped and [`Frames::stop`] says why (`None`: the buffer ended exactly
/// after a frame).
#[derive(Debug)]
pub struct Frames<'a> {
    buf: &'a [u8],
    pos: usize,
    stop: Option<Stop>,
}

impl<'a> Frames<'a> {
    /// Walks `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Self::at(buf, 0)
    }

    /// Walks `buf` from byte `pos` (which must be where a frame starts).
    pub fn at(buf: &'a [u8], pos: usize) -> Self {
        Self {
            buf,
            pos,
            stop: None,
        }
    }

    /// Where the next frame starts, or where the walk stopped.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Why the walk stopped short of the end of the buffer, if it did.
    pub fn stop(&self) -> Option<Stop> {
        self.stop
    }
}

impl Iterator for Frames<'_> {
    type Item = FrameAt;

    fn next(&mut self) -> Option<FrameAt> {
        if self.stop.is_some() || self.pos >= self.buf.len() {
            return None;
        }
        match decode(&self.buf[self.pos..]) {
            Decoded::Frame {
                offset,
                record,
                len,
                ..
            } => {
                let pos = self.pos;
                self.pos += len;
                Some(FrameAt {
                    pos,
                    offset,
                    record,
                })
            }
            Decoded::Short { need } => {
                self.stop = Some(Stop::Short { need });
                None
            }
            Decoded::Bad(why) => {
                self.stop = Some(Stop::Bad(why));
                None
            }
        }
    }
}

fn parse_body(mut b: &[u8]) -> Option<(Offset, NewRecord, bool)> {
    fn need(b: &[u8], n: usize) -> Option<()> {
        (b.remaining() >= n).then_some(())
    }
    need(b, 25)?;
    let offset = Offset(b.get_u64_le());
    let enqueued_at = UnixMillis(b.get_u64_le());
    let epoch = Epoch(b.get_u64_le());
    let flags = b.get_u8();
    if flags & !(FLAG_MID | FLAG_STARTS_WRITE) != 0 {
        return None;
    }
    let mid = if flags & FLAG_MID != 0 {
        need(b, 8)?;
        Some(Mid(b.get_u64_le()))
    } else {
        None
    };
    need(b, 1)?;
    let n = usize::from(b.get_u8());
    need(b, n)?;
    let device_id = DeviceId::new(std::str::from_utf8(&b[..n]).ok()?).ok()?;
    b.advance(n);
    need(b, 1)?;
    let n = usize::from(b.get_u8());
    need(b, n)?;
    let region = Region::new(std::str::from_utf8(&b[..n]).ok()?).ok()?;
    b.advance(n);
    need(b, 4)?;
    let n = b.get_u32_le() as usize;
    if b.remaining() != n {
        return None;
    }
    let payload = Bytes::copy_from_slice(b);
    Some((
        offset,
        NewRecord {
            device_id,
            mid,
            enqueued_at,
            region,
            epoch,
            payload,
        },
        flags & FLAG_STARTS_WRITE != 0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(payload: &[u8], mid: Option<u64>) -> NewRecord {
        NewRecord {
            device_id: DeviceId::new("dev-1").unwrap(),
            mid: mid.map(Mid),
            enqueued_at: UnixMillis(1234),
            region: Region::new("eu").unwrap(),
            epoch: Epoch(3),
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn round_trip() {
        for (payload, mid) in [(&b"hello"[..], Some(7)), (&b""[..], None)] {
            for starts_write in [false, true] {
                let mut buf = Vec::new();
                let n = encode_flagged(&mut buf, Offset(42), &rec(payload, mid), starts_write);
                assert_eq!(n, buf.len());
                assert_eq!(
                    decode(&buf),
                    Decoded::Frame {
                        offset: Offset(42),
                        record: rec(payload, mid),
                        len: n,
                        starts_write,
                    }
                );
            }
        }
    }

    #[test]
    fn frames_walk_to_the_first_invalid_byte() {
        let mut buf = Vec::new();
        let a = encode(&mut buf, Offset(5), &rec(b"a", Some(1)));
        encode(&mut buf, Offset(6), &rec(b"bb", None));
        let whole = buf.len();
        let mut frames = Frames::new(&buf);
        let got: Vec<(usize, Offset)> = frames.by_ref().map(|f| (f.pos, f.offset)).collect();
        assert_eq!(got, vec![(0, Offset(5)), (a, Offset(6))]);
        assert_eq!((frames.pos(), frames.stop()), (whole, None));

        let mut frames = Frames::at(&buf, a);
        assert_eq!(frames.next().map(|f| f.offset), Some(Offset(6)));
        assert_eq!(frames.next(), None);

        let mut frames = Frames::new(&buf[..whole - 1]);
        assert_eq!(frames.by_ref().count(), 1);
        assert_eq!(frames.pos(), a);
        assert_eq!(frames.stop(), Some(Stop::Short { need: whole - a }));

        let mut bad = buf.clone();
        bad[a] = 0;
        let mut frames = Frames::new(&bad);
        assert_eq!(frames.by_ref().count(), 1);
        assert_eq!(
            (frames.pos(), frames.stop()),
            (a, Some(Stop::Bad("bad magic byte")))
        );
        assert_eq!(frames.next(), None, "a stopped walk stays stopped");
    }

    #[test]
    fn every_prefix_is_short_and_every_flip_is_bad() {
        let mut buf = Vec::new();
        encode(&mut buf, Offset(1), &rec(b"payload bytes", Some(9)));
        for cut in 0..buf.len() {
            assert!(
                matches!(decode(&buf[..cut]), Decoded::Short { .. }),
                "cut {cut}"
            );
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(
                !matches!(decode(&bad), Decoded::Frame { .. }),
                "flipping byte {i} went unnoticed"
            );
        }
    }
}
