//! Protocol detection from the first bytes a client sends (peeked, never consumed).
//!
//! What a server must accept as HTTP/1 is accepted as HTTP/1 (RFC 9112 2.2, 3): any method token,
//! upper or lower case; empty lines before the request line; absolute-form on inbound. That
//! matters for security: a request passed through as opaque bytes reaches the app with whatever
//! `X-Forwarded-For` the client wrote and none of the proxy's headers. Anything that is not a
//! request line (TLS, databases, custom protocols) goes through as opaque TCP. A standard method
//! with an origin-form target decides at once; an extension method needs its whole request line
//! (ending in `HTTP/1.x`) or a full peek buffer of request-line characters.
//!
//! Also the peeking itself: waiting for more client bytes without consuming them, and telling an
//! h2c server's unsolicited SETTINGS frame from a server that speaks first.
use std::io;
use std::os::fd::AsRawFd;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The HTTP/2 client connection preface (RFC 9113 3.4), sent first by "prior knowledge" h2c clients.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many bytes detection looks at: enough for the h2 preface and for the request line of an
/// extension method with a short path (`PROPFIND /calendars/x HTTP/1.1`).
pub const MAX_DETECT_LEN: usize = 64;

/// Methods that decide at once with an origin-form (`/`) or asterisk-form (`*`) target.
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"CONNECT",
];

/// Empty lines a client may send before its request line (RFC 9112 2.2: a server SHOULD ignore
/// at least one); more than this and it is not HTTP.
const MAX_LEADING_EMPTY_LINES: usize = 4;

/// What the first client bytes say about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// An HTTP/1.x request line.
    Http1,
    /// The h2c prior-knowledge preface.
    Http2,
    /// Anything else; relay bytes untouched.
    Opaque,
    /// A strict prefix of something that could still become HTTP: wait for more bytes.
    NeedMore,
}

/// `tchar` of RFC 9110 5.6.2: what a method token is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies a peeked prefix of the client's first flight. `inbound`: the client is another
/// host calling the app (absolute-form is then HTTP to be proxied); outbound, an absolute-form
/// request (`GET http://...`) or a `CONNECT` means the app talks to an explicit forward proxy at
/// the original destination, which must see its requests verbatim: opaque.
pub fn classify(buf: &[u8], inbound: bool) -> Detection {
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detection::Http2
        } else {
            Detection::NeedMore
        };
    }
    // Empty lines first (CRLF or a bare LF).
    let mut line = buf;
    let mut empty = 0;
    loop {
        if line.starts_with(b"\r\n") {
            line = &line[2..];
        } else if line.starts_with(b"\n") {
            line = &line[1..];
        } else if line == b"\r" {
            return Detection::NeedMore;
        } else {
            break;
        }
        empty += 1;
        if empty > MAX_LEADING_EMPTY_LINES {
            return Detection::Opaque;
        }
    }
    if line.is_empty() {
        return Detection::NeedMore;
    }
    let token_len = line.iter().take_while(|b| is_tchar(**b)).count();
    if token_len == line.len() {
        // A bare word: wait for more only if it could be the start of a standard method (in
        // any case). HTTP clients write the request line at once, so an extension method comes
        // with its space; other protocols that start with a word ("PING") are not kept waiting.
        let could_be_method = METHODS
            .iter()
            .any(|m| m.len() >= token_len && m[..token_len].eq_ignore_ascii_case(line));
        return if could_be_method {
            Detection::NeedMore
        } else {
            Detection::Opaque
        };
    }
    if token_len == 0 || token_len > 32 || line[token_len] != b' ' {
        return Detection::Opaque;
    }
    let method = &line[..token_len];
    let Some(&first) = line.get(token_len + 1) else {
        return Detection::NeedMore;
    };
    if method == b"CONNECT" || method == b"PRI" {
        // CONNECT: a tunnel to an explicit proxy. PRI is reserved for the h2 preface.
        return Detection::Opaque;
    }
    let absolute = first == b'h' || first == b'H';
    let target_ok = match first {
        b'/' | b'*' => true,
        _ if absolute => inbound,
        _ => false,
    };
    if !target_ok {
        return Detection::Opaque;
    }
    if METHODS.contains(&method) && !absolute {
        return Detection::Http1;
    }
    // An extension method, or absolute-form: the rest of the request line must be one.
    let rest = &line[token_len + 1..];
    match rest.iter().position(|b| *b == b'\r' || *b == b'\n') {
        Some(end) => {
            let request_line = &rest[..end];
            let version_ok =
                request_line.ends_with(b" HTTP/1.1") || request_line.ends_with(b" HTTP/1.0");
            let target = &request_line[..request_line.len().saturating_sub(9)];
            if version_ok && !target.is_empty() && target.iter().all(u8::is_ascii_graphic) {
                Detection::Http1
            } else {
                Detection::Opaque
            }
        }
        None if rest.iter().all(|b| b.is_ascii_graphic() || *b == b' ') => {
            // No end of line yet: a request line if it goes on like one. A full buffer of it
            // is enough evidence (hyper parses the rest, and answers 400 if it is not HTTP).
            if buf.len() >= MAX_DETECT_LEN {
                Detection::Http1
            } else {
                Detection::NeedMore
            }
        }
        None => Detection::Opaque,
    }
}

/// True if `head` is the frame header of an HTTP/2 SETTINGS frame (type 4, no flags, stream 0):
/// the server connection preface of RFC 9113 3.4.
pub(crate) fn is_h2_settings_header(head: &[u8; 9]) -> bool {
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    // SETTINGS payloads are 6-byte entries; 16384 is the smallest maximum frame size.
    head[3] == 4 && head[4] == 0 && head[5..9] == [0, 0, 0, 0] && length % 6 == 0 && length <= 16384
}

/// Waits until the client has more than `seen` bytes waiting (or closed), and peeks them.
///
/// `peek` alone cannot wait for *more* data: with bytes already waiting the socket stays
/// readable and peek returns at once. Inside `async_io`, "no new bytes" is reported as
/// `WouldBlock`, which clears tokio's readiness only if no new readiness event arrived since the
/// check, so no wake-up can be lost.
pub(crate) async fn client_bytes(
    client: &TcpStream,
    buf: &mut [u8],
    seen: usize,
) -> io::Result<usize> {
    client
        .async_io(Interest::READABLE, || {
            let n = recv(
                client.as_raw_fd(),
                buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            if n == 0 || n > seen {
                Ok(n)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        })
        .await
}

/// The largest TLS record a ClientHello may arrive in (RFC 8446 5.1: 2^14 bytes of payload, plus
/// the 5-byte header).
pub const MAX_HELLO_RECORD: usize = 5 + 16_384;

/// What the first TLS record of a client says about mesh TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// Not all of the first record is here yet: this many bytes are needed.
    NeedMore(usize),
    /// A ClientHello offering the mesh ALPN protocol: a sidecar's.
    Mesh,
    /// Anything else: the app's own TLS, or not TLS at all.
    Other,
}

/// True if `buf` may start a TLS handshake record (content type 22, version 3.x).
pub fn looks_like_tls(buf: &[u8]) -> bool {
    buf.first() == Some(&22) && buf.get(1).is_none_or(|v| *v == 3)
}

/// Reads the first TLS record for a ClientHello offering `alpn` (only the first record: a
/// sidecar's ClientHello always fits in one). Never panics on any input.
pub fn client_hello(buf: &[u8], alpn: &[u8]) -> Hello {
    if buf.len() < 5 {
        return if buf.is_empty() || looks_like_tls(buf) {
            Hello::NeedMore(5)
        } else {
            Hello::Other
        };
    }
    if buf[0] != 22 || buf[1] != 3 {
        return Hello::Other;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len == 0 || 5 + len > MAX_HELLO_RECORD {
        return Hello::Other;
    }
    if buf.len() < 5 + len {
        return Hello::NeedMore(5 + len);
    }
    match offers_alpn(&buf[5..5 + len], alpn) {
        Some(true) => Hello::Mesh,
        _ => Hello::Other,
    }
}

/// A cursor over a byte slice: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Whether the handshake message(s) in `record` start with a ClientHello offering `alpn`
/// (`None`: malformed or cut short).
fn offers_alpn(record: &[u8], alpn: &[u8]) -> Option<bool> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return Some(false);
    }
    let body_len = r.take(3)?;
    let body_len =
        usize::from(body_len[0]) << 16 | usize::from(body_len[1]) << 8 | usize::from(body_len[2]);
    let mut hello = Reader(r.take(body_len)?);
    hello.take(2 + 32)?; // legacy_version, random
    hello.vec8()?; // legacy_session_id
    hello.vec16()?; // cipher_suites
    hello.vec8()?; // legacy_compression_methods
    let mut extensions = Reader(hello.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind == 16 {
            let mut list = Reader(data);
            let mut protocols = Reader(list.vec16()?);
            while !protocols.0.is_empty() {
                if protocols.vec8()? == alpn {
                    return Some(true);
                }
            }
            return Some(false);
        }
    }
    Some(false)
}

pub(crate) async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello (rustls) offering `alpn`.
    fn hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn mesh_client_hellos_are_told_apart_from_other_tls() {
        let ours = b"sidecar.mesh.dev/mtls-1";
        let mesh = hello(&[ours]);
        assert_eq!(client_hello(&mesh, ours), Hello::Mesh);
        assert!(looks_like_tls(&mesh[..1]));
        for cut in [0, 1, 4, 5, 40, mesh.len() - 1] {
            let got = client_hello(&mesh[..cut], ours);
            assert!(
                matches!(got, Hello::NeedMore(n) if n > cut),
                "{cut}: {got:?}"
            );
        }
        assert_eq!(
            client_hello(&hello(&[b"h2", b"http/1.1"]), ours),
            Hello::Other
        );
        assert_eq!(client_hello(&hello(&[]), ours), Hello::Other);
        // Our protocol among others is still ours.
        assert_eq!(client_hello(&hello(&[b"h2", ours]), ours), Hello::Mesh);
        // Not TLS, and a record whose length field lies: never a panic.
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n", ours), Hello::Other);
        let mut lying = mesh.clone();
        lying[3..5].copy_from_slice(&200u16.to_be_bytes());
        assert!(matches!(
            client_hello(&lying, ours),
            Hello::Other | Hello::Mesh
        ));
        for i in 5..mesh.len() {
            let mut broken = mesh.clone();
            broken[i] ^= 0xff;
            let _ = client_hello(&broken, ours);
        }
    }

    fn out(buf: &[u8]) -> Detection {
        classify(buf, false)
    }

    #[test]
    fn http1_request_lines() {
        for inbound in [false, true] {
            assert_eq!(classify(b"GET / HTTP/1.1\r\n", inbound), Detection::Http1);
            assert_eq!(classify(b"POST /x", inbound), Detection::Http1);
            assert_eq!(classify(b"OPTIONS * HTTP/1.1", inbound), Detection::Http1);
            assert_eq!(classify(b"DELETE /", inbound), Detection::Http1);
            assert_eq!(classify(b"PATCH /a", inbound), Detection::Http1);
        }
    }

    #[test]
    fn every_valid_request_line_form_is_http() {
        // Empty lines before the request line (RFC 9112 2.2).
        assert_eq!(out(b"\r\nGET / HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(out(b"\n\r\nGET /"), Detection::Http1);
        assert_eq!(out(b"\r"), Detection::NeedMore);
        assert_eq!(out(b"\r\n"), Detection::NeedMore);
        // Extension methods, lower-case methods (valid tokens): their whole request line.
        assert_eq!(out(b"PROPFIND /dav HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(out(b"get / HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(out(b"GETX / HTTP/1.0\r\n"), Detection::Http1);
        assert_eq!(out(b"PROPFIND /dav HTTP/1."), Detection::NeedMore);
        assert_eq!(out(b"get"), Detection::NeedMore);
        // A bare word that is no standard method's start is not kept waiting.
        assert_eq!(out(b"PROPFIND"), Detection::Opaque);
        assert_eq!(out(b"ping"), Detection::Opaque);
        let long = format!("MKCALENDAR /{} HTTP/1.1\r\n", "c".repeat(80));
        assert_eq!(out(&long.as_bytes()[..MAX_DETECT_LEN]), Detection::Http1);
        // Absolute-form: HTTP inbound (another host calling the app), opaque outbound.
        assert_eq!(
            classify(b"GET http://app/ HTTP/1.1\r\n", true),
            Detection::Http1
        );
        assert_eq!(
            classify(b"GET http://app/ HTTP/1.1\r\n", false),
            Detection::Opaque
        );
    }

    #[test]
    fn h2_preface() {
        assert_eq!(out(H2_PREFACE), Detection::Http2);
        let mut longer = H2_PREFACE.to_vec();
        longer.extend_from_slice(&[0, 0, 18, 4]);
        assert_eq!(out(&longer), Detection::Http2);
    }

    #[test]
    fn partial_prefixes_wait() {
        for cut in 1..H2_PREFACE.len() {
            assert_eq!(out(&H2_PREFACE[..cut]), Detection::NeedMore, "cut {cut}");
        }
        assert_eq!(out(b""), Detection::NeedMore);
        assert_eq!(out(b"G"), Detection::NeedMore);
        assert_eq!(out(b"GET"), Detection::NeedMore);
        assert_eq!(out(b"GET "), Detection::NeedMore);
        assert_eq!(out(b"OPTIO"), Detection::NeedMore);
    }

    #[test]
    fn everything_else_is_opaque() {
        // TLS ClientHello, a database startup packet, SSH, Redis, binary, no version.
        assert_eq!(out(&[0x16, 0x03, 0x01, 0x02, 0x00]), Detection::Opaque);
        assert_eq!(out(&[0, 0, 0, 8, 4, 210, 22, 47]), Detection::Opaque);
        assert_eq!(out(b"SSH-2.0-OpenSSH_9.2\r\n"), Detection::Opaque);
        assert_eq!(out(b"PRI * HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(out(b"*1\r\n$4\r\nPING\r\n"), Detection::Opaque);
        assert_eq!(out(b"PING\r\n"), Detection::Opaque);
        assert_eq!(out(b"get key\r\n"), Detection::Opaque, "memcached");
        assert_eq!(out(b"FOO /x SIP/2.0\r\n"), Detection::Opaque);
        assert_eq!(out(b"\r\n\r\n\r\n\r\n\r\nGET /"), Detection::Opaque);
    }

    #[test]
    fn explicit_proxy_traffic_is_opaque() {
        for inbound in [false, true] {
            assert_eq!(
                classify(b"CONNECT example.com:443 HTTP/1.1", inbound),
                Detection::Opaque
            );
        }
        assert_eq!(out(b"GET http://example.com/ HTTP/1.1"), Detection::Opaque);
    }

    #[test]
    fn decision_never_needs_more_than_max_detect_len() {
        let samples: [&[u8]; 8] = [
            H2_PREFACE,
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PROPFIND /",
            b"\r\n\r\nGET",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEF ",
            b"GET http://a/",
            b"x",
        ];
        for sample in samples {
            for inbound in [false, true] {
                let mut buf = sample.to_vec();
                buf.resize(MAX_DETECT_LEN, b'x');
                assert_ne!(
                    classify(&buf, inbound),
                    Detection::NeedMore,
                    "{:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
        }
    }
}
