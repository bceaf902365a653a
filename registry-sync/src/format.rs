//! The `fleet-registry/1` export format: NDJSON with a header line, one
//! record per line, and a trailer `{"end":true,"count":N}`.
//!
//! The trailer is what makes a file trustworthy: a file without it, or whose
//! count disagrees with its records, was cut short and is refused whole. The
//! reader streams (memory stays flat however large the file) and reports
//! every problem with its line number.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};

use fleet_api::{DeviceId, DeviceRecord, Region, UnixMillis};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "fleet-registry/1";

/// Longest accepted line: a record with 8 KiB of tags fits many times over;
/// anything longer is not a registry file.
pub const MAX_LINE: usize = 64 * 1024;

/// Line 1 of an export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub region: Option<Region>,
    pub exported_at: UnixMillis,
}

/// The last line of an export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trailer {
    pub end: bool,
    pub count: u64,
}

/// Writes an export line by line.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    count: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    ///
    /// # Errors
    /// When writing fails.
    pub fn new(mut out: W, region: Option<Region>, exported_at: UnixMillis) -> io::Result<Self> {
        let header = Header {
            format: FORMAT.to_string(),
            region,
            exported_at,
        };
        serde_json::to_writer(&mut out, &header)?;
        out.write_all(b"\n")?;
        Ok(Self { out, count: 0 })
    }

    /// # Errors
    /// When writing fails.
    pub fn record(&mut self, rec: &DeviceRecord) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, rec)?;
        self.out.write_all(b"\n")?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer and returns the output and the record count.
    ///
    /// # Errors
    /// When writing fails.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        let trailer = Trailer {
            end: true,
            count: self.count,
        };
        serde_json::to_writer(&mut self.out, &trailer)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok((self.out, self.count))
    }
}

/// What is wrong with a registry file, and where.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("line {line}: {reason}")]
    Line { line: u64, reason: String },
    #[error(
        "truncated: the file ends after line {lines} without the trailer {{\"end\":true,\"count\":N}}"
    )]
    Truncated { lines: u64 },
    #[error("line {line}: the trailer counts {stated} records but the file has {actual}")]
    CountMismatch { line: u64, stated: u64, actual: u64 },
    /// Only in [`Dedup::Sorted`] mode: the ids are not in order, so duplicates
    /// cannot be ruled out with O(1) memory. Read again with [`Dedup::Map`].
    #[error("line {line}: device ids are not sorted")]
    Unsorted { line: u64 },
    #[error("reading line {line}")]
    Io {
        line: u64,
        #[source]
        source: io::Error,
    },
}

impl FormatError {
    fn at(line: u64, reason: impl Into<String>) -> Self {
        FormatError::Line {
            line,
            reason: reason.into(),
        }
    }
}

/// How the reader finds duplicate device ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dedup {
    /// O(1) memory: the file must be sorted by `device_id` (every export is);
    /// otherwise reading stops with [`FormatError::Unsorted`].
    Sorted,
    /// Remembers every id: for files in any order.
    Map,
}

/// Reads and validates a registry file, one record at a time.
#[derive(Debug)]
pub struct Reader<R: BufRead> {
    input: R,
    line: u64,
    header: Header,
    count: u64,
    buf: Vec<u8>,
    last_id: Option<DeviceId>,
    seen: Option<HashMap<DeviceId, u64>>,
    done: bool,
}

impl<R: BufRead> Reader<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    /// When line 1 is missing, not a header, or names another format.
    pub fn new(mut input: R, dedup: Dedup) -> Result<Self, FormatError> {
        let mut buf = Vec::new();
        let got = read_line(&mut input, &mut buf, 1)?;
        if !got {
            return Err(FormatError::at(
                1,
                "empty file: expected a fleet-registry/1 header",
            ));
        }
        let header: Header = match serde_json::from_slice::<serde_json::Value>(&buf) {
            Ok(v) => {
                let format = v.get("format").and_then(|f| f.as_str()).map(str::to_owned);
                match format {
                    Some(f) if f != FORMAT => {
                        return Err(FormatError::at(
                            1,
                            format!("unknown format {f:?}, expected {FORMAT:?}"),
                        ));
                    }
                    None => {
                        return Err(FormatError::at(
                            1,
                            format!(
                                "not a registry export: the header has no \"format\" (expected {FORMAT:?})"
                            ),
                        ));
                    }
                    Some(_) => serde_json::from_value(v)
                        .map_err(|e| FormatError::at(1, format!("invalid header: {e}")))?,
                }
            }
            Err(e) => return Err(FormatError::at(1, format!("invalid JSON in header: {e}"))),
        };
        Ok(Self {
            input,
            line: 1,
            header,
            count: 0,
            buf,
            last_id: None,
            seen: (dedup == Dedup::Map).then(HashMap::new),
            done: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The last line number read.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The next record, `Ok(None)` after a valid trailer.
    ///
    /// # Errors
    /// Any format problem, with its line; a missing trailer or wrong count.
    pub fn next_record(&mut self) -> Result<Option<DeviceRecord>, FormatError> {
        if self.done {
            return Ok(None);
        }
        self.line += 1;
        let line = self.line;
        if !read_line(&mut self.input, &mut self.buf, line)? {
            return Err(FormatError::Truncated { lines: line - 1 });
        }
        let rec = match serde_json::from_slice::<DeviceRecord>(&self.buf) {
            Ok(rec) => rec,
            Err(record_err) => {
                if let Ok(trailer) = serde_json::from_slice::<Trailer>(&self.buf) {
                    return self.finish(trailer).map(|()| None);
                }
                return Err(FormatError::at(line, record_err.to_string()));
            }
        };
        crate::hlc::plausible(rec.version, crate::hlc::wall_ms())
            .map_err(|why| FormatError::at(line, format!("device {}: {why}", rec.device_id)))?;
        self.check_duplicate(&rec.device_id, line)?;
        self.count += 1;
        Ok(Some(rec))
    }

    fn check_duplicate(&mut self, id: &DeviceId, line: u64) -> Result<(), FormatError> {
        if let Some(seen) = &mut self.seen {
            if let Some(first) = seen.insert(id.clone(), line) {
                return Err(FormatError::at(
                    line,
                    format!("duplicate device_id {id} (first on line {first})"),
                ));
            }
            return Ok(());
        }
        match &self.last_id {
            Some(last) if id == last => Err(FormatError::at(
                line,
                format!("duplicate device_id {id} (first on line {})", line - 1),
            )),
            Some(last) if id < last => Err(FormatError::Unsorted { line }),
            _ => {
                self.last_id = Some(id.clone());
                Ok(())
            }
        }
    }

    fn finish(&mut self, trailer: Trailer) -> Result<(), FormatError> {
        let line = self.line;
        if !trailer.end {
            return Err(FormatError::at(line, "the trailer must say \"end\":true"));
        }
        if trailer.count != self.count {
            return Err(FormatError::CountMismatch {
                line,
                stated: trailer.count,
                actual: self.count,
            });
        }
        self.line += 1;
        if read_line(&mut self.input, &mut self.buf, self.line)? {
            return Err(FormatError::at(self.line, "data after the trailer"));
        }
        self.done = true;
        Ok(())
    }
}

/// Reads one `\n`-terminated line into `buf` (without the newline), refusing
/// overlong lines. Returns false at end of input.
fn read_line<R: BufRead>(input: &mut R, buf: &mut Vec<u8>, line: u64) -> Result<bool, FormatError> {
    buf.clear();
    let io_err = |source| FormatError::Io { line, source };
    let n = io::Read::take(input, MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)
        .map_err(io_err)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        return Err(FormatError::at(
            line,
            format!("line is longer than {MAX_LINE} bytes"),
        ));
    } else {
        // The last line lacks its newline: the file was cut mid-line.
        return Err(FormatError::at(
            line,
            "incomplete line (no newline at the end): the file was cut short",
        ));
    }
    if buf.is_empty() {
        return Err(FormatError::at(line, "empty line"));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_api::{DeviceKey, DeviceStatus, Tags, Version};

    fn rec(id: &str) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::new(id).unwrap(),
            key_sha256: DeviceKey::from_bytes([3; 32]).hash(),
            status: DeviceStatus::Enabled,
            tags: Tags::parse(r#"{"site":"x"}"#).unwrap(),
            created_at: UnixMillis(10),
            updated_at: UnixMillis(11),
            version: Version(12),
            origin: Region::new("a").unwrap(),
            deleted: false,
        }
    }

    fn export(ids: &[&str]) -> String {
        let mut w =
            Writer::new(Vec::new(), Some(Region::new("a").unwrap()), UnixMillis(5)).unwrap();
        for id in ids {
            w.record(&rec(id)).unwrap();
        }
        String::from_utf8(w.finish().unwrap().0).unwrap()
    }

    fn read_all(text: &str) -> Result<Vec<DeviceRecord>, FormatError> {
        read_mode(text, Dedup::Sorted)
    }

    fn read_mode(text: &str, dedup: Dedup) -> Result<Vec<DeviceRecord>, FormatError> {
        let mut r = Reader::new(text.as_bytes(), dedup)?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let text = export(&["a", "b", "c"]);
        assert!(text.starts_with(r#"{"format":"fleet-registry/1","region":"a","exported_at":5}"#));
        assert!(text.ends_with("{\"end\":true,\"count\":3}\n"));
        assert_eq!(read_all(&text).unwrap(), vec![rec("a"), rec("b"), rec("c")]);
    }

    #[test]
    fn empty_export_round_trips() {
        assert!(read_all(&export(&[])).unwrap().is_empty());
    }

    #[test]
    fn every_cut_of_a_file_is_refused() {
        let text = export(&["a", "b"]);
        for cut in 0..text.len() {
            assert!(read_all(&text[..cut]).is_err(), "cut at {cut} was accepted");
        }
    }

    #[test]
    fn missing_trailer_is_truncation() {
        let text = export(&["a", "b"]);
        let cut: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        let err = read_all(&cut).unwrap_err();
        assert!(matches!(err, FormatError::Truncated { lines: 3 }), "{err}");
    }

    #[test]
    fn wrong_count_is_refused() {
        let text = export(&["a", "b"]).replace("\"count\":2", "\"count\":3");
        let err = read_all(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 4: the trailer counts 3 records but the file has 2"
        );
    }

    #[test]
    fn invalid_json_and_ids_name_their_line() {
        let text = export(&["a", "b"]).replace(r#""device_id":"b""#, r#""device_id":"b/x""#);
        let err = read_all(&text).unwrap_err().to_string();
        assert!(err.starts_with("line 3: device_id contains '/'"), "{err}");
        let good = export(&["a", "b"]);
        let mut lines: Vec<&str> = good.lines().collect();
        lines[2] = "{not json";
        let err = read_all(&(lines.join("\n") + "\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("line 3: key must be a string"), "{err}");
    }

    #[test]
    fn unknown_format_is_refused_on_line_one() {
        let text = export(&["a"]).replace("fleet-registry/1", "fleet-registry/9");
        let err = read_all(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "line 1: unknown format \"fleet-registry/9\", expected \"fleet-registry/1\""
        );
        let err = read_all("{\"x\":1}\n").unwrap_err().to_string();
        assert!(err.contains("no \"format\""), "{err}");
    }

    #[test]
    fn data_after_trailer_is_refused() {
        let text = export(&["a"]) + "{\"end\":true,\"count\":1}\n";
        assert_eq!(
            read_all(&text).unwrap_err().to_string(),
            "line 4: data after the trailer"
        );
    }

    #[test]
    fn sorted_duplicates_are_found() {
        let text = export(&["a", "b", "b"]);
        assert_eq!(
            read_all(&text).unwrap_err().to_string(),
            "line 4: duplicate device_id b (first on line 3)"
        );
    }

    #[test]
    fn unsorted_files_need_the_id_map() {
        let text = export(&["b", "a", "c", "a"]);
        assert!(matches!(
            read_all(&text).unwrap_err(),
            FormatError::Unsorted { line: 3 }
        ));
        assert_eq!(
            read_mode(&text, Dedup::Map).unwrap_err().to_string(),
            "line 5: duplicate device_id a (first on line 3)"
        );
        assert_eq!(
            read_mode(&export(&["b", "a"]), Dedup::Map).unwrap().len(),
            2
        );
    }
}
