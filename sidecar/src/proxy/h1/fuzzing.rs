//! The engine's readers as the fuzz targets see them (`fuzz/fuzz_targets/h1_*.rs`): what it
//! reads of a head, and of a chunked body. Not an API.
use super::chunked::{self, Decoder, Event};
use super::wire::{self, Framing, Role};

/// A head as the engine reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub len: usize,
    pub version: u8,
    pub method: String,
    pub target: Vec<u8>,
    pub status: u16,
    /// `None` for no body, `Some(None)` chunked, `Some(Some(n))` a length, `until_close`.
    pub length: Option<Option<u64>>,
    pub until_close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// The lines it forwards (every line but the hop-by-hop ones), as they came.
    pub forwarded: Vec<Vec<u8>>,
    /// Every line: (name, value).
    pub lines: Vec<(Vec<u8>, Vec<u8>)>,
    pub hosts: usize,
}

fn read(buf: &[u8], head: &wire::Head) -> Read {
    let name = |l: &wire::Line| {
        let line = l.line.of(buf);
        let end = line.iter().position(|b| *b == b':').unwrap_or(line.len());
        line[..end].to_vec()
    };
    Read {
        len: head.len,
        version: head.version,
        method: head.method.as_str().to_owned(),
        target: head.target.of(buf).to_vec(),
        status: head.status,
        length: match head.framing {
            Framing::Empty | Framing::UntilClose => None,
            Framing::Length(n) => Some(Some(n)),
            Framing::Chunked => Some(None),
        },
        until_close: head.framing == Framing::UntilClose,
        keep_alive: head.keep_alive,
        upgrade: head.upgrade,
        forwarded: head
            .lines
            .iter()
            .filter(|l| l.role != Role::HopByHop && l.role != Role::Upgrade)
            .map(|l| l.line.of(buf).to_vec())
            .collect(),
        lines: head
            .lines
            .iter()
            .map(|l| (name(l), l.value.of(buf).to_vec()))
            .collect(),
        hosts: head.count(Role::Host),
    }
}

/// A request head at the start of `buf`: `Ok(None)` while incomplete.
pub fn request(buf: &[u8]) -> Result<Option<Read>, &'static str> {
    wire::parse_request(buf)
        .map(|h| h.map(|h| read(buf, &h)))
        .map_err(wire::Refusal::reason)
}

/// A response head to a HEAD request (`head`) or another.
pub fn response(buf: &[u8], head: bool) -> Result<Option<Read>, &'static str> {
    let method = if head {
        http::Method::HEAD
    } else {
        http::Method::GET
    };
    wire::parse_response(buf, &method)
        .map(|h| h.map(|h| read(buf, &h)))
        .map_err(wire::Refusal::reason)
}

/// A chunked body fed in `pieces`: its data and how many bytes it took (or `None` while
/// incomplete).
pub fn chunked(pieces: &[&[u8]]) -> Result<(Vec<u8>, Option<usize>), &'static str> {
    let mut d = Decoder::default();
    let mut data = Vec::new();
    let mut taken = 0;
    for piece in pieces {
        let used = d.decode(piece, |e| {
            if let Event::Data(s, e) = e {
                data.extend_from_slice(&piece[s..e]);
            }
        })?;
        taken += used;
        if d.is_done() {
            return Ok((data, Some(taken)));
        }
    }
    Ok((data, None))
}

/// The chunked coding of `data` as the engine writes it (one chunk, then the last).
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if !data.is_empty() {
        chunked::size_line(&mut out, data.len() as u64);
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(chunked::LAST_CHUNK);
    out
}
