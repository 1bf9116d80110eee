//! HTTP/1 heads as the native engine reads them: parsed by httparse into offsets of the
//! connection's buffer (no allocation per header), each line classified once, and the framing
//! checked strictly. Never more lenient than hyper, stricter where hyper is lenient (RFC 9112
//! 6.1-6.3, 11.2):
//!
//! | refused (request: 400, response: 502) | why |
//! |---|---|
//! | `Content-Length` and `Transfer-Encoding` together | which one frames the body is the classic desync |
//! | more than one `Content-Length` line, a list, a sign, or anything but digits | two parsers may pick different ones |
//! | `Transfer-Encoding` other than one line with exactly `chunked` | a coding we would not decode, or a list whose last item is read differently |
//! | `Transfer-Encoding` in an HTTP/1.0 message | 1.0 peers do not know it |
//! | more than one `Host` (requests; answered by the engine as hyper's path does, 400 `proxy-bad-request`) | which one routes is anybody's guess |
//! | obs-fold, bare CR, spaces before a colon, bad tokens | httparse refuses them |
//! | a request target hyper's URI parser would refuse | the same character classes as the `http` crate |
//!
//! Pure: no I/O; fuzzed by `fuzz/fuzz_targets/h1_head.rs` against hyper's own reading.
//!
//! Size: over 700 lines, about half of them tests: the head reader, its strict framing rules, the
//! name matching and line copying every request goes through, and the tests of each.
use std::mem::MaybeUninit;

use http::Method;

/// Most header lines a head may have (hyper's default too): beyond it, 431 / 502.
pub(crate) const MAX_HEADERS: usize = 100;

/// A range of the buffer a head was parsed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: u32,
    pub(crate) end: u32,
}

impl Span {
    pub(crate) fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    fn within(base: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes (more than zero).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Responses only: until the upstream closes.
    UntilClose,
}

/// What a header line is to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Forwarded as it came.
    Plain,
    /// `Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, a name the
    /// `Connection` header lists: never forwarded (RFC 9110 7.6.1).
    HopByHop,
    /// `Upgrade`: forwarded only with an upgrade the proxy passes on.
    Upgrade,
    Host,
    ContentLength,
    Expect,
    RequestId,
    Traceparent,
    Tracestate,
    ForwardedBy,
    ForwardedFor,
    ForwardedProto,
    ClientCert,
    Attempt,
}

/// One header line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Line {
    /// From the first byte of the name to the last byte of the value (original case, spacing).
    pub(crate) line: Span,
    pub(crate) value: Span,
    pub(crate) role: Role,
}

impl Line {
    /// The header's name, as it came.
    pub(crate) fn name<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let line = self.line.of(buf);
        &line[..name_len(line)]
    }
}

/// Copies header lines into a head being built, each ending in CRLF, in as few copies as it
/// can: lines that follow one another in their buffer, each ended there by a CRLF, go in one
/// copy (most of a head's kept lines are one such run); any other line is copied with a CRLF of
/// its own. What it writes is what copying line by line would. [`LineCopy::flush`] ends a head's
/// lines.
#[derive(Default)]
pub(crate) struct LineCopy {
    /// The run not yet copied: `buf[start..end]` (empty when equal).
    start: usize,
    end: usize,
}

impl LineCopy {
    pub(crate) fn push(&mut self, out: &mut Vec<u8>, buf: &[u8], line: &Line) {
        let (start, end) = (line.line.start as usize, line.line.end as usize);
        let crlf = buf.get(end..end + 2) == Some(b"\r\n".as_slice());
        if crlf && self.start != self.end && start == self.end {
            self.end = end + 2;
            return;
        }
        self.flush(out, buf);
        if crlf {
            (self.start, self.end) = (start, end + 2);
        } else {
            out.extend_from_slice(&buf[start..end]);
            out.extend_from_slice(b"\r\n");
        }
    }

    pub(crate) fn flush(&mut self, out: &mut Vec<u8>, buf: &[u8]) {
        if self.start != self.end {
            out.extend_from_slice(&buf[self.start..self.end]);
            self.end = self.start;
        }
    }
}

thread_local! {
    /// Line vectors of heads dropped on this thread, for the next heads.
    static SPARE: std::cell::RefCell<Vec<Vec<Line>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_lines() -> Vec<Line> {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(32))
}

/// A parsed head: offsets into the buffer it came from.
#[derive(Debug)]
pub(crate) struct Head {
    /// Bytes of the head, final CRLF included.
    pub(crate) len: usize,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) version: u8,
    /// Requests: the method; responses: GET.
    pub(crate) method: Method,
    /// Requests: the request target.
    pub(crate) target: Span,
    /// Responses: the status code and reason phrase.
    pub(crate) status: u16,
    pub(crate) reason: Span,
    pub(crate) lines: Vec<Line>,
    pub(crate) framing: Framing,
    /// The peer keeps the connection open after this message (its version and `Connection`).
    pub(crate) keep_alive: bool,
    /// `Connection` lists `upgrade` and an `Upgrade` line is present.
    pub(crate) upgrade: bool,
    /// `Expect: 100-continue` (requests).
    pub(crate) expect_continue: bool,
}

impl Drop for Head {
    fn drop(&mut self) {
        let mut lines = std::mem::take(&mut self.lines);
        if lines.capacity() <= 4 * MAX_HEADERS {
            lines.clear();
            SPARE.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < 64 {
                    s.push(lines);
                }
            });
        }
    }
}

impl Head {
    /// The value of the first line of `role`.
    pub(crate) fn value<'a>(&self, buf: &'a [u8], role: Role) -> Option<&'a [u8]> {
        self.lines
            .iter()
            .find(|l| l.role == role)
            .map(|l| l.value.of(buf))
    }

    pub(crate) fn count(&self, role: Role) -> usize {
        self.lines.iter().filter(|l| l.role == role).count()
    }
}

/// Why a head is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not HTTP/1, or ambiguous: 400 (request) or 502 (response).
    Malformed(&'static str),
    /// More than [`MAX_HEADERS`] lines: 431 (request) or 502 (response).
    TooManyHeaders,
}

impl Refusal {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed(why) => why,
            Refusal::TooManyHeaders => "too many header lines",
        }
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete.
pub(crate) fn parse_request(buf: &[u8]) -> Result<Option<Head>, Refusal> {
    // Uninitialised slots: httparse writes only the ones it fills (initialising a hundred
    // empty headers for every head was a fifth of the parse).
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders),
        Err(_) => return Err(Refusal::Malformed("not an HTTP/1 request head")),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Malformed("not an HTTP/1 request head"));
    };
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Malformed("invalid method"))?;
    check_target(path.as_bytes())?;
    let mut head = Head {
        len,
        version,
        method,
        target: Span::within(buf, path.as_bytes()),
        status: 0,
        reason: Span::default(),
        lines: take_lines(),
        framing: Framing::Empty,
        keep_alive: version == 1,
        upgrade: false,
        expect_continue: false,
    };
    read_lines(buf, req.headers, &mut head, true)?;
    Ok(Some(head))
}

/// Parses a response head at the start of `buf`: `Ok(None)` while incomplete. `method` is the
/// request's (a HEAD's answer has no body).
pub(crate) fn parse_response(buf: &[u8], method: &Method) -> Result<Option<Head>, Refusal> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders),
        Err(_) => return Err(Refusal::Malformed("not an HTTP/1 response head")),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(Refusal::Malformed("not an HTTP/1 response head"));
    };
    if !(100..=999).contains(&status) {
        return Err(Refusal::Malformed("invalid status code"));
    }
    let reason = resp.reason.unwrap_or("");
    let mut head = Head {
        len,
        version,
        method: Method::GET,
        target: Span::default(),
        status,
        reason: if reason.is_empty() {
            Span::default()
        } else {
            Span::within(buf, reason.as_bytes())
        },
        lines: take_lines(),
        framing: Framing::Empty,
        keep_alive: version == 1,
        upgrade: false,
        expect_continue: false,
    };
    read_lines(buf, resp.headers, &mut head, false)?;
    // RFC 9112 6.3: these never have a body, whatever the head says.
    let bodiless = *method == Method::HEAD || status < 200 || status == 204 || status == 304;
    if bodiless {
        head.framing = Framing::Empty;
    } else if head.framing == Framing::Empty && head.count(Role::ContentLength) == 0 {
        head.framing = Framing::UntilClose;
    }
    if head.framing == Framing::UntilClose {
        head.keep_alive = false;
    }
    Ok(Some(head))
}

/// Classifies every header line, reads `Connection`, and works out the framing (strictly).
fn read_lines(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
    head: &mut Head,
    request: bool,
) -> Result<(), Refusal> {
    let mut length: Option<u64> = None;
    let mut lengths = 0;
    let mut chunked = false;
    let mut codings = 0;
    let mut conn_upgrade = false;
    let mut has_upgrade = false;
    // Names `Connection` lists, dropped with the other hop-by-hop lines.
    let mut listed: Vec<&[u8]> = Vec::new();
    for h in headers {
        let name = h.name.as_bytes();
        let value = h.value;
        let role = role_of(name);
        match role {
            Role::ContentLength => {
                lengths += 1;
                length = Some(parse_length(value)?);
            }
            Role::HopByHop if is_named(name, b"transfer-encoding") => {
                codings += 1;
                chunked = trim(value).eq_ignore_ascii_case(b"chunked");
            }
            Role::HopByHop if is_named(name, b"connection") => {
                for token in value.split(|b| *b == b',').map(trim) {
                    if token.eq_ignore_ascii_case(b"close") {
                        head.keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        // HTTP/1.0 keep-alive; in 1.1 the default anyway.
                        head.keep_alive |= head.version == 0;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        conn_upgrade = true;
                    } else if !token.is_empty() {
                        listed.push(token);
                    }
                }
            }
            Role::Upgrade => has_upgrade = true,
            Role::Expect if request => {
                head.expect_continue |= trim(value).eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
        let name_span = Span::within(buf, name);
        let value_span = if value.is_empty() {
            // An empty value: its slice need not point into the buffer; the line ends at its
            // line break.
            let from = name_span.end as usize;
            let end = from
                + buf[from..]
                    .iter()
                    .position(|b| matches!(b, b'\r' | b'\n'))
                    .unwrap_or(0);
            Span {
                start: end as u32,
                end: end as u32,
            }
        } else {
            Span::within(buf, value)
        };
        head.lines.push(Line {
            line: Span {
                start: name_span.start,
                end: value_span.end,
            },
            value: value_span,
            role,
        });
    }
    // `Connection: close, x` with a close: keep_alive false already; an `x` line is dropped.
    if !listed.is_empty() {
        for line in &mut head.lines {
            let name = line.name(buf);
            if line.role != Role::Host
                && line.role != Role::ContentLength
                && listed.iter().any(|l| l.eq_ignore_ascii_case(name))
            {
                line.role = Role::HopByHop;
            }
        }
    }
    head.upgrade = conn_upgrade && has_upgrade;
    if codings > 0 {
        if codings > 1 || !chunked {
            return Err(Refusal::Malformed(
                "Transfer-Encoding other than a single chunked",
            ));
        }
        if head.version == 0 {
            return Err(Refusal::Malformed(
                "Transfer-Encoding in an HTTP/1.0 message",
            ));
        }
        if lengths > 0 {
            return Err(Refusal::Malformed(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        head.framing = Framing::Chunked;
    } else if lengths > 1 {
        return Err(Refusal::Malformed("more than one Content-Length"));
    } else if let Some(n) = length {
        head.framing = if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        };
    }
    Ok(())
}

/// The length of a header line's name (up to the colon).
fn name_len(line: &[u8]) -> usize {
    line.iter().position(|b| *b == b':').unwrap_or(line.len())
}

/// A `Content-Length` value: digits only (no sign, list or spaces inside), at most 18 of them.
fn parse_length(value: &[u8]) -> Result<u64, Refusal> {
    let value = trim(value);
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(Refusal::Malformed("invalid Content-Length"));
    }
    Ok(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let Some(start) = start else {
        return &[];
    };
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(start);
    &v[start..=end]
}

/// Whether `name`, a token (httparse refuses any other name), is `lower` (lowercase letters and
/// `-`) in any case. OR-ing 0x20 folds the case of a letter, and of no token byte onto another
/// letter or onto `-` (only CR, never in a token, folds onto `-`): so names compare eight bytes
/// at a time, not byte by byte through a lowercase table.
#[inline]
fn is_named(name: &[u8], lower: &[u8]) -> bool {
    const FOLD: u64 = 0x2020_2020_2020_2020;
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lower).all(|(a, b)| a | 0x20 == *b);
    }
    let word = |s: &[u8], at: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    let mut at = 0;
    while at + 8 < n {
        if word(name, at) | FOLD != word(lower, at) {
            return false;
        }
        at += 8;
    }
    // The last (possibly overlapping) eight.
    word(name, n - 8) | FOLD == word(lower, n - 8)
}

/// What a header name is to the proxy (case-insensitive; the common names first).
fn role_of(name: &[u8]) -> Role {
    // Dispatch on length: most names match no candidate of their length.
    let is = |n: &[u8]| is_named(name, n);
    match name.len() {
        2 if is(b"te") => Role::HopByHop,
        4 if is(b"host") => Role::Host,
        6 if is(b"expect") => Role::Expect,
        7 if is(b"upgrade") => Role::Upgrade,
        10 if is(b"connection") || is(b"keep-alive") => Role::HopByHop,
        10 if is(b"tracestate") => Role::Tracestate,
        11 if is(b"traceparent") => Role::Traceparent,
        12 if is(b"x-request-id") => Role::RequestId,
        14 if is(b"content-length") => Role::ContentLength,
        14 if is(b"x-forwarded-by") => Role::ForwardedBy,
        15 if is(b"x-forwarded-for") => Role::ForwardedFor,
        16 if is(b"proxy-connection") => Role::HopByHop,
        17 if is(b"transfer-encoding") => Role::HopByHop,
        17 if is(b"x-forwarded-proto") => Role::ForwardedProto,
        17 if is(b"x-sidecar-attempt") => Role::Attempt,
        23 if is(b"x-forwarded-client-cert") => Role::ClientCert,
        _ => Role::Plain,
    }
}

/// Whether hyper's URI parser (the `http` crate) accepts `target`; origin-form is checked here
/// with its character classes, any other form by the parser itself (rare: absolute-form,
/// `*`, authority-form).
fn check_target(target: &[u8]) -> Result<(), Refusal> {
    let bad = Refusal::Malformed("invalid request target");
    if target.first() != Some(&b'/') {
        return http::Uri::try_from(target).map(|_| ()).map_err(|_| bad);
    }
    if target.len() >= u16::MAX as usize {
        return Err(bad);
    }
    let mut query = false;
    let mut high = false;
    for &b in target {
        let ok = match b {
            b'#' => break,
            0x80..=0xFF => {
                high = true;
                true
            }
            // The `http` crate's query class: 0x21, 0x24-0x3B, 0x3D, 0x3F-0x7E.
            _ if query => matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E),
            b'?' => {
                query = true;
                true
            }
            // Its path class, with `"`, `{` and `}` accepted as it does.
            _ => matches!(
                b,
                0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E | b'"' | b'{' | b'}'
            ),
        };
        if !ok {
            return Err(bad);
        }
    }
    if high && std::str::from_utf8(target).is_err() {
        return Err(bad);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &[u8]) -> Head {
        parse_request(raw).unwrap().unwrap()
    }

    /// The names `role_of` and `read_lines` look for.
    const NAMES: &[&[u8]] = &[
        b"te",
        b"host",
        b"expect",
        b"upgrade",
        b"connection",
        b"keep-alive",
        b"tracestate",
        b"traceparent",
        b"x-request-id",
        b"content-length",
        b"x-forwarded-by",
        b"x-forwarded-for",
        b"proxy-connection",
        b"transfer-encoding",
        b"x-forwarded-proto",
        b"x-sidecar-attempt",
        b"x-forwarded-client-cert",
    ];

    #[test]
    fn names_compare_as_a_case_blind_comparison_would_for_every_token_byte() {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        for name in NAMES {
            assert!(is_named(&name.to_ascii_uppercase(), name));
            for at in 0..name.len() {
                for b in (0..=255u8).filter(|b| token(*b)) {
                    let mut other = name.to_vec();
                    other[at] = b;
                    assert_eq!(
                        is_named(&other, name),
                        other.eq_ignore_ascii_case(name),
                        "{:?} against {:?}",
                        String::from_utf8_lossy(&other),
                        String::from_utf8_lossy(name)
                    );
                }
            }
            assert!(!is_named(&name[1..], name));
        }
    }

    #[test]
    fn lines_copied_in_runs_are_what_a_copy_line_by_line_is() {
        let heads: [&[u8]; 4] = [
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-Empty:\r\nX-B: 2\r\nX-C: 3\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\nX-A: 1\r\nX-B: 2\nX-C: 3\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a \t\r\nX-A:  1  \r\nX-B:\t2\r\nX-Empty:  \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\nX-D: 4\r\n\r\n",
        ];
        for raw in heads {
            let head = req(raw);
            let n = head.lines.len();
            // Every choice of lines kept.
            for kept in 0..1u32 << n {
                let keep = |i: usize| kept & (1 << i) != 0;
                let mut by_line = Vec::new();
                let mut runs = Vec::new();
                let mut copy = LineCopy::default();
                for (_, line) in head.lines.iter().enumerate().filter(|(i, _)| keep(*i)) {
                    by_line.extend_from_slice(line.line.of(raw));
                    by_line.extend_from_slice(b"\r\n");
                    copy.push(&mut runs, raw, line);
                }
                copy.flush(&mut runs, raw);
                assert_eq!(
                    String::from_utf8_lossy(&runs),
                    String::from_utf8_lossy(&by_line),
                    "lines {kept:b} of {:?}",
                    String::from_utf8_lossy(raw)
                );
            }
        }
    }

    #[test]
    fn lines_are_offsets_with_case_and_roles() {
        let raw = b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Mixed: Case  \r\nContent-Length: 3\r\nConnection: keep-alive, X-Private\r\nx-private: 1\r\n\r\nabc";
        let h = req(raw);
        assert_eq!(h.len, raw.len() - 3);
        assert_eq!(h.target.of(raw), b"/a?b=1");
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.keep_alive);
        let lines: Vec<(&[u8], Role)> = h.lines.iter().map(|l| (l.line.of(raw), l.role)).collect();
        assert_eq!(
            lines,
            vec![
                (&b"Host: x"[..], Role::Host),
                (b"X-Mixed: Case", Role::Plain),
                (b"Content-Length: 3", Role::ContentLength),
                (b"Connection: keep-alive, X-Private", Role::HopByHop),
                (b"x-private: 1", Role::HopByHop),
            ]
        );
        assert_eq!(h.value(raw, Role::Host), Some(&b"x"[..]));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Ok(None)
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0x3\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: identity\r\n\r\n",
            b"POST / HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET /<x> HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET /?q=\"x\" HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET / HTTP/2.0\r\nhost: x\r\n\r\n",
            b"G@T / HTTP/1.1\r\nhost: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request(raw), Err(Refusal::Malformed(_))),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            parse_request(many.as_bytes()).unwrap_err(),
            Refusal::TooManyHeaders
        );
    }

    #[test]
    fn framing_and_keep_alive() {
        let h = req(b"POST / HTTP/1.1\r\nTransfer-Encoding:  Chunked \r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        let h = req(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive);
        let h = req(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);
        let h = req(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!h.keep_alive);
        let h = req(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(h.upgrade);
        let h = req(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        assert!(!h.upgrade, "Upgrade without Connection: upgrade is not one");
        let h = req(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\ncontent-length: 0\r\n\r\n");
        assert!(h.expect_continue);
        assert_eq!(h.framing, Framing::Empty);
        for target in ["/\"{a}\"|x?q={a:1}|x", "*", "http://h:1/p?q", "/é"] {
            let raw = format!("OPTIONS {target} HTTP/1.1\r\n\r\n");
            assert!(parse_request(raw.as_bytes()).is_ok(), "{target}");
        }
    }

    #[test]
    fn responses_frame_by_status_method_and_headers() {
        let get = Method::GET;
        let r = |raw: &[u8], m: &Method| parse_response(raw, m).unwrap().unwrap();
        let h = r(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &get);
        assert_eq!((h.status, h.framing), (200, Framing::Length(5)));
        let h = r(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(h.framing, Framing::Empty);
        let h = r(b"HTTP/1.1 204 No Content\r\n\r\n", &get);
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive);
        let h = r(b"HTTP/1.1 200 OK\r\n\r\n", &get);
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
        let h = r(
            b"HTTP/1.1 200 Fine Thanks\r\ntransfer-encoding: chunked\r\n\r\n",
            &get,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let raw = b"HTTP/1.1 200 Fine Thanks\r\n\r\n";
        assert_eq!(r(raw, &get).reason.of(raw), b"Fine Thanks");
        for raw in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                parse_response(raw, &get).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
