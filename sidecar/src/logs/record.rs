//! Lines to JSON records, and records to batch bodies. Records are written straight into the body
//! buffer as bytes: a JSON object line is embedded verbatim (so nothing about it changes, not even
//! key order), everything else is wrapped as a plain message.
use std::io::Write;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;

use super::checkpoint::Entry;

/// Appends the record for one complete line (without its `\n`) to `out`.
pub fn encode_line(line: &[u8], out: &mut Vec<u8>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let trimmed = line.trim_ascii();
    if trimmed.first() == Some(&b'{') && is_json_object(trimmed) {
        out.extend_from_slice(trimmed);
        return;
    }
    encode_plain(&String::from_utf8_lossy(line), out);
}

/// Appends the record for a line cut to `prefix` (the first `max-line-bytes` bytes of a line of
/// `original_length` bytes). A cut JSON object is no longer JSON, so it is always a plain message.
pub fn encode_truncated(prefix: &[u8], original_length: u64, out: &mut Vec<u8>) {
    let prefix = utf8_prefix(prefix);
    out.extend_from_slice(b"{\"message\":");
    push_json_string(&String::from_utf8_lossy(prefix), out);
    out.extend_from_slice(b",\"level\":\"INFO\",\"truncated\":true,\"original_length\":");
    out.extend_from_slice(original_length.to_string().as_bytes());
    out.push(b'}');
}

/// True for a line that needs no record.
pub(crate) fn is_blank(line: &[u8]) -> bool {
    line.trim_ascii().is_empty()
}

fn encode_plain(message: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"message\":");
    push_json_string(message, out);
    out.extend_from_slice(b",\"level\":\"INFO\"}");
}

fn push_json_string(s: &str, out: &mut Vec<u8>) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Strictly valid JSON whose top level is an object. A full parse (not a lenient skim) because the
/// bytes go into the body verbatim: one bad escape or invalid UTF-8 would make the collector
/// refuse the whole batch.
fn is_json_object(bytes: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<serde_json::Value>(bytes),
        Ok(serde_json::Value::Object(_))
    )
}

/// `bytes` without a multi-byte character cut in half at its end (the cut is ours, not the
/// writer's, so it should not turn into a replacement character).
fn utf8_prefix(bytes: &[u8]) -> &[u8] {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes,
        // error_len() == None: the input ends in the middle of a character.
        Err(e) if e.error_len().is_none() => &bytes[..e.valid_up_to()],
        Err(_) => bytes,
    }
}

/// When a batch is sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub lines: usize,
    pub bytes: usize,
    pub wait: std::time::Duration,
}

/// The batch being filled: records joined by commas, ready to be wrapped.
pub(crate) struct Batch {
    limits: BatchLimits,
    records: Vec<u8>,
    count: usize,
    first_at: Option<Instant>,
    /// `{"service":...,"timestamp":"...","logs":[` and `]}`, counted against the byte limit.
    envelope_len: usize,
}

impl Batch {
    pub(crate) fn new(limits: BatchLimits, service: &str) -> Self {
        let envelope_len = envelope_head(service, "2000-01-01T00:00:00.000Z").len() + 2;
        Batch {
            limits,
            records: Vec::new(),
            count: 0,
            first_at: None,
            envelope_len,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// True when no further record may be added.
    pub(crate) fn is_full(&self) -> bool {
        self.count >= self.limits.lines || self.body_len() >= self.limits.bytes
    }

    /// True when the first record has waited `wait`.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        self.first_at
            .is_some_and(|t| now.saturating_duration_since(t) >= self.limits.wait)
    }

    /// When the batch will be due, if it has records.
    pub(crate) fn due_at(&self) -> Option<Instant> {
        self.first_at.map(|t| t + self.limits.wait)
    }

    fn body_len(&self) -> usize {
        self.envelope_len + self.records.len()
    }

    /// Adds one encoded record unless it would break a limit; the first record is always taken
    /// (a single record larger than the byte limit still has to go somewhere).
    pub(crate) fn try_push(&mut self, record: &[u8], now: Instant) -> bool {
        if self.count > 0
            && (self.count >= self.limits.lines
                || self.body_len() + 1 + record.len() > self.limits.bytes)
        {
            return false;
        }
        if self.count > 0 {
            self.records.push(b',');
        }
        self.records.extend_from_slice(record);
        self.count += 1;
        self.first_at.get_or_insert(now);
        true
    }

    /// The request body, stamped with `now`, gzipped when asked for.
    pub(crate) fn seal(
        self,
        service: &str,
        now: SystemTime,
        gzip: bool,
        positions: Vec<Entry>,
    ) -> Sealed {
        let mut body = envelope_head(service, &rfc3339(now)).into_bytes();
        body.extend_from_slice(&self.records);
        body.extend_from_slice(b"]}");
        let body = if gzip {
            let mut enc = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::fast());
            // Writing into a Vec cannot fail.
            match enc.write_all(&body).and_then(|()| enc.finish()) {
                Ok(compressed) => compressed,
                Err(_) => body,
            }
        } else {
            body
        };
        Sealed {
            body: Bytes::from(body),
            lines: self.count as u64,
            positions,
        }
    }
}

fn envelope_head(service: &str, timestamp: &str) -> String {
    let mut head = Vec::with_capacity(64 + service.len());
    head.extend_from_slice(b"{\"service\":");
    push_json_string(service, &mut head);
    head.extend_from_slice(b",\"timestamp\":\"");
    head.extend_from_slice(timestamp.as_bytes());
    head.extend_from_slice(b"\",\"logs\":[");
    String::from_utf8_lossy(&head).into_owned()
}

/// A batch ready to send: its body, how many records it holds, and where every tracked file
/// stands once it is acknowledged.
#[derive(Debug)]
pub(crate) struct Sealed {
    pub body: Bytes,
    pub lines: u64,
    pub positions: Vec<Entry>,
}

pub(crate) use crate::units::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn rec(line: &[u8]) -> serde_json::Value {
        let mut out = Vec::new();
        encode_line(line, &mut out);
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }

    #[test]
    fn json_object_lines_are_embedded_verbatim() {
        let line = br#"{"z":1, "a":{"nested":[1,2]},"level":"WARN"}"#;
        let mut out = Vec::new();
        encode_line(line, &mut out);
        assert_eq!(out, line.to_vec(), "bytes kept, key order kept");
        let mut out = Vec::new();
        encode_line(b"  {\"a\":1}  \r", &mut out);
        assert_eq!(out, b"{\"a\":1}");
    }

    #[test]
    fn everything_else_is_a_plain_message() {
        for line in [
            &b"plain text"[..],
            b"{\"seq\": 1, broken",
            b"[1,2,3]",
            b"42",
            b"\"a string\"",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":1} trailing",
        ] {
            let v = rec(line);
            assert_eq!(v["message"], String::from_utf8_lossy(line).as_ref());
            assert_eq!(v["level"], "INFO");
            assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
        }
    }

    #[test]
    fn invalid_utf8_never_reaches_the_body_raw() {
        let v = rec(b"{\"a\":\"\xff\"}");
        assert_eq!(v["message"], "{\"a\":\"\u{fffd}\"}");
        let v = rec(b"caf\xc3\xa9 \xff");
        assert_eq!(v["message"], "caf\u{e9} \u{fffd}");
        let v = rec(b"ends with cr\r");
        assert_eq!(v["message"], "ends with cr");
    }

    #[test]
    fn truncated_records_carry_the_marker_and_cut_on_a_char_boundary() {
        let mut out = Vec::new();
        // "é" is two bytes; a cut after its first byte must not leave half of it.
        encode_truncated(b"ab\xc3", 1000, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["message"], "ab");
        assert_eq!(v["truncated"], true);
        assert_eq!(v["original_length"], 1000);
        assert_eq!(v["level"], "INFO");
    }

    #[test]
    fn batches_respect_line_and_byte_limits() {
        let limits = BatchLimits {
            lines: 3,
            bytes: 1 << 20,
            wait: Duration::from_secs(1),
        };
        let now = Instant::now();
        let mut b = Batch::new(limits, "svc");
        assert!(b.try_push(b"{}", now));
        assert!(b.try_push(b"{}", now));
        assert!(b.try_push(b"{}", now));
        assert!(b.is_full());
        assert!(!b.try_push(b"{}", now));

        let limits = BatchLimits {
            lines: 100,
            bytes: 200,
            wait: Duration::from_secs(1),
        };
        let mut b = Batch::new(limits, "svc");
        let big = vec![b'x'; 150];
        assert!(b.try_push(&big, now), "the first record always fits");
        assert!(!b.try_push(&big, now));
        assert!(!b.is_due(now));
        assert!(b.is_due(now + Duration::from_secs(1)));
    }

    #[test]
    fn sealed_body_is_the_seed_format() {
        let limits = BatchLimits {
            lines: 10,
            bytes: 1 << 20,
            wait: Duration::from_secs(1),
        };
        let now = Instant::now();
        let mut b = Batch::new(limits, "svc \"q\"");
        let mut r = Vec::new();
        encode_line(b"hello", &mut r);
        assert!(b.try_push(&r, now));
        assert!(b.try_push(b"{\"k\":1}", now));
        let t = UNIX_EPOCH + Duration::from_millis(1_714_566_896_789);
        let sealed = b.seal("svc \"q\"", t, false, Vec::new());
        let v: serde_json::Value = serde_json::from_slice(&sealed.body).unwrap_or_default();
        assert_eq!(v["service"], "svc \"q\"");
        assert_eq!(v["timestamp"], "2024-05-01T12:34:56.789Z");
        assert_eq!(v["logs"][0]["message"], "hello");
        assert_eq!(v["logs"][1]["k"], 1);
        assert_eq!(sealed.lines, 2);
    }

    #[test]
    fn gzip_bodies_decompress_to_the_same_json() {
        use std::io::Read;
        let limits = BatchLimits {
            lines: 10,
            bytes: 1 << 20,
            wait: Duration::from_secs(1),
        };
        let mut b = Batch::new(limits, "svc");
        assert!(b.try_push(b"{\"k\":1}", Instant::now()));
        let sealed = b.seal("svc", UNIX_EPOCH, true, Vec::new());
        let mut text = String::new();
        let read = flate2::read::GzDecoder::new(&sealed.body[..]).read_to_string(&mut text);
        assert!(read.is_ok(), "{read:?}");
        assert_eq!(
            text,
            r#"{"service":"svc","timestamp":"1970-01-01T00:00:00.000Z","logs":[{"k":1}]}"#
        );
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59.000Z");
    }
}
