//! The chunked transfer coding (RFC 9112 7.1), decoded strictly and incrementally, so that the
//! engine knows exactly where a message ends whatever the read boundaries. Stricter than
//! httparse's chunk-size parser (which accepts LF inside extensions) and hyper's decoder:
//!
//! - a chunk size is 1 to 16 hex digits, followed by optional whitespace and extensions, then
//!   CRLF; every line ends in CRLF (a bare CR or LF anywhere is refused);
//! - extensions hold visible ASCII, spaces and tabs only, at most [`MAX_LINE`] bytes a line;
//! - chunk data is followed by CRLF exactly;
//! - trailer lines are `token ":" value`, at most [`MAX_TRAILERS`] bytes in all.
//!
//! Extensions and trailers are read and dropped: what is forwarded is re-encoded from the sizes
//! and data alone (the next hop never sees bytes a parser might read differently).
//! Pure: no I/O; fuzzed by `fuzz/fuzz_targets/h1_chunked.rs`.

/// The longest chunk-size line (size, extensions) accepted.
pub(crate) const MAX_LINE: usize = 4096;
/// The most bytes of trailer section accepted.
pub(crate) const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size,
    /// After the size: whitespace and extensions up to CR.
    Ext,
    /// CR seen; LF must follow.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// In a trailer line's name.
    TrailerName,
    /// In a trailer line's value.
    TrailerValue,
    TrailerLf,
    /// The final CR seen; LF must follow.
    EndLf,
    Done,
}

/// What the decoder found in its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A chunk of this many bytes begins.
    Chunk(u64),
    /// Chunk data: this range of the input.
    Data(usize, usize),
    /// The data of the current chunk is complete.
    ChunkEnd,
    /// The last chunk and the trailer section are read: the message ends here.
    End,
}

/// A chunked body being decoded.
#[derive(Clone, Debug)]
pub(crate) struct Decoder {
    state: State,
    size: u64,
    digits: u8,
    line: usize,
    left: u64,
    trailers: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
            left: 0,
            trailers: 0,
        }
    }
}

fn is_token(b: u8) -> bool {
    matches!(b, b'!' | b'#'..=b'\'' | b'*' | b'+' | b'-' | b'.' | b'^'..=b'`' | b'|' | b'~')
        || b.is_ascii_alphanumeric()
}

impl Decoder {
    /// True once the whole body has been read.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, reporting each event to `on`; returns how many bytes were used: all of
    /// them, unless the body ended before the end of `input` (the rest is the next message's).
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        mut on: impl FnMut(Event),
    ) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let n = (input.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                on(Event::Data(i, i + n));
                i += n;
                self.left -= n as u64;
                if self.left == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 16 {
                            return Err("chunk size too large");
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.size = self.size << 4 | u64::from(d);
                        self.digits += 1;
                        self.line += 1;
                    }
                    _ if self.digits == 0 => return Err("chunk size is not hex"),
                    b'\r' => self.state = State::SizeLf,
                    b';' | b' ' | b'\t' => {
                        self.state = State::Ext;
                        self.line += 1;
                    }
                    _ => return Err("invalid character after the chunk size"),
                },
                State::Ext => match b {
                    b'\r' => self.state = State::SizeLf,
                    b' ' | b'\t' | 0x21..=0x7e => {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err("chunk extensions too long");
                        }
                    }
                    _ => return Err("invalid character in chunk extensions"),
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err("chunk size line not ended by CRLF");
                    }
                    self.line = 0;
                    self.digits = 0;
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        on(Event::Chunk(self.size));
                        self.left = self.size;
                        self.size = 0;
                        self.state = State::Data;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err("chunk data not followed by CRLF");
                    }
                    on(Event::ChunkEnd);
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    self.count_trailer()?;
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if is_token(b) {
                        self.state = State::TrailerName;
                    } else {
                        return Err("invalid trailer line");
                    }
                }
                State::TrailerName => {
                    self.count_trailer()?;
                    if b == b':' {
                        self.state = State::TrailerValue;
                    } else if !is_token(b) {
                        return Err("invalid trailer name");
                    }
                }
                State::TrailerValue => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => self.state = State::TrailerLf,
                        b' ' | b'\t' | 0x21..=0x7e | 0x80..=0xff => {}
                        _ => return Err("invalid character in a trailer"),
                    }
                }
                State::TrailerLf => {
                    self.count_trailer()?;
                    if b != b'\n' {
                        return Err("trailer line not ended by CRLF");
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err("chunked body not ended by CRLF");
                    }
                    self.state = State::Done;
                    on(Event::End);
                    return Ok(i);
                }
                State::Data | State::Done => return Ok(i - 1),
            }
        }
        Ok(i)
    }

    fn count_trailer(&mut self) -> Result<(), &'static str> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err("trailer section too large");
        }
        Ok(())
    }
}

/// Appends the chunk-size line of a chunk of `n` bytes (`n` in hex, CRLF) to `out`.
pub(crate) fn size_line(out: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for d in (0..digits).rev() {
        out.push(HEX[((n >> (d * 4)) & 0xf) as usize]);
    }
    out.extend_from_slice(b"\r\n");
}

/// The last chunk and an empty trailer section.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes: the data, and the bytes after the end.
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), &'static str> {
        let mut d = Decoder::default();
        let mut data = Vec::new();
        let mut at = 0;
        while at < input.len() && !d.is_done() {
            let piece = &input[at..(at + step).min(input.len())];
            let used = d.decode(piece, |e| {
                if let Event::Data(s, e) = e {
                    data.extend_from_slice(&piece[s..e]);
                }
            })?;
            at += used;
        }
        if !d.is_done() {
            return Err("incomplete");
        }
        Ok((data, input.len() - at))
    }

    #[test]
    fn decodes_at_every_split() {
        let body = b"3\r\nabc\r\n10;ext=\"v\" \r\n0123456789abcdef\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (data, rest) = decode(body, step).unwrap();
            assert_eq!(data, b"abc0123456789abcdef", "step {step}");
            assert_eq!(rest, 4, "step {step}");
        }
    }

    #[test]
    fn refuses_what_a_lenient_parser_would_read_differently() {
        for bad in [
            &b"3\nabc\r\n0\r\n\r\n"[..],
            b"3\r\nabc\n0\r\n\r\n",
            b"3;a\nb\r\nabc\r\n0\r\n\r\n",
            b"3\rx\nabc\r\n0\r\n\r\n",
            b"zz\r\nabc\r\n0\r\n\r\n",
            b"\r\nabc\r\n0\r\n\r\n",
            b"+3\r\nabc\r\n0\r\n\r\n",
            b"0x3\r\nabc\r\n0\r\n\r\n",
            b"ffffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nx: a\nb\r\n\r\n",
            b"0\r\n\n",
            b"3;\x01\r\nabc\r\n0\r\n\r\n",
        ] {
            assert!(decode(bad, 1).is_err(), "{}", String::from_utf8_lossy(bad));
            assert!(
                decode(bad, bad.len()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_LINE));
        assert!(decode(long.as_bytes(), 7).is_err());
        let trailers = format!("0\r\n{}\r\n", "x: y\r\n".repeat(MAX_TRAILERS / 6 + 1));
        assert!(decode(trailers.as_bytes(), 100).is_err());
    }

    #[test]
    fn size_lines_are_lowercase_hex() {
        for (n, line) in [
            (0u64, "0\r\n"),
            (10, "a\r\n"),
            (0x1f, "1f\r\n"),
            (u64::MAX, "ffffffffffffffff\r\n"),
        ] {
            let mut out = Vec::new();
            size_line(&mut out, n);
            assert_eq!(out, line.as_bytes());
        }
    }
}
