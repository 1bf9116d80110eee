//! Protocol detection from the first bytes a client sends (peeked, never consumed).
//!
//! The rules are deliberately narrow: only what is certainly HTTP is proxied as HTTP; anything
//! else (TLS, databases, custom protocols, explicit-proxy traffic) goes through as opaque TCP,
//! which is always correct, only less observable.
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

/// How many bytes detection may need to look at: the h2 preface is the longest thing it matches.
pub const MAX_DETECT_LEN: usize = H2_PREFACE.len();

/// Request methods we accept as the start of an HTTP/1 request line. Extension methods (WebDAV,
/// lowercase, custom) are passed through as opaque TCP, which is still correct.
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"CONNECT",
];

/// What the first client bytes say about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// An HTTP/1.x request line in origin form (`GET /path`) or asterisk form (`OPTIONS *`).
    Http1,
    /// The h2c prior-knowledge preface.
    Http2,
    /// Anything else; relay bytes untouched.
    Opaque,
    /// A strict prefix of something that could still become HTTP: wait for more bytes.
    NeedMore,
}

/// Classifies a peeked prefix of the client's first flight.
///
/// `CONNECT` and absolute-form request lines (`GET http://...`) are classified as opaque on
/// purpose: such a client is talking to an explicit forward proxy at the original destination,
/// and that proxy, not us, must see its requests verbatim.
pub fn classify(buf: &[u8]) -> Detection {
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
    for &method in METHODS {
        let n = buf.len().min(method.len());
        if buf[..n] != method[..n] {
            continue;
        }
        if buf.len() <= method.len() {
            // "PO" could be POST or anything else: undecided until more arrives.
            return Detection::NeedMore;
        }
        if buf[method.len()] != b' ' {
            continue;
        }
        let Some(&first) = buf.get(method.len() + 1) else {
            return Detection::NeedMore;
        };
        if method == b"CONNECT" {
            return Detection::Opaque;
        }
        return match first {
            b'/' | b'*' => Detection::Http1,
            _ => Detection::Opaque,
        };
    }
    Detection::Opaque
}

/// True if the upstream's first bytes are an HTTP/2 frame header of a SETTINGS frame
/// (type 4, no flags, stream 0): the server connection preface of RFC 9113 3.4.
pub(crate) fn starts_with_h2_settings(stream: &TcpStream) -> bool {
    let mut head = [0u8; 9];
    match recv(
        stream.as_raw_fd(),
        &mut head,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(9) => is_h2_settings_header(&head),
        _ => false,
    }
}

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

pub(crate) async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(classify(b"POST /x"), Detection::Http1);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Detection::Http1);
        assert_eq!(classify(b"DELETE /"), Detection::Http1);
        assert_eq!(classify(b"PATCH /a"), Detection::Http1);
    }

    #[test]
    fn h2_preface() {
        assert_eq!(classify(H2_PREFACE), Detection::Http2);
        let mut longer = H2_PREFACE.to_vec();
        longer.extend_from_slice(&[0, 0, 18, 4]);
        assert_eq!(classify(&longer), Detection::Http2);
    }

    #[test]
    fn partial_prefixes_wait() {
        for cut in 1..H2_PREFACE.len() {
            assert_eq!(
                classify(&H2_PREFACE[..cut]),
                Detection::NeedMore,
                "cut {cut}"
            );
        }
        assert_eq!(classify(b""), Detection::NeedMore);
        assert_eq!(classify(b"G"), Detection::NeedMore);
        assert_eq!(classify(b"GET"), Detection::NeedMore);
        assert_eq!(classify(b"GET "), Detection::NeedMore);
        assert_eq!(classify(b"OPTIO"), Detection::NeedMore);
    }

    #[test]
    fn everything_else_is_opaque() {
        // TLS ClientHello, a database startup packet, SSH, lowercase methods, binary.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Detection::Opaque);
        assert_eq!(classify(&[0, 0, 0, 8, 4, 210, 22, 47]), Detection::Opaque);
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2"), Detection::Opaque);
        assert_eq!(classify(b"get / HTTP/1.1"), Detection::Opaque);
        assert_eq!(classify(b"GETX / HTTP/1.1"), Detection::Opaque);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Detection::Opaque);
    }

    #[test]
    fn explicit_proxy_traffic_is_opaque() {
        assert_eq!(
            classify(b"CONNECT example.com:443 HTTP/1.1"),
            Detection::Opaque
        );
        assert_eq!(
            classify(b"GET http://example.com/ HTTP/1.1"),
            Detection::Opaque
        );
    }

    #[test]
    fn decision_never_needs_more_than_max_detect_len() {
        let mut buf = H2_PREFACE.to_vec();
        buf.resize(MAX_DETECT_LEN + 8, b'x');
        for len in MAX_DETECT_LEN..buf.len() {
            assert_ne!(classify(&buf[..len]), Detection::NeedMore);
        }
        let req = b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_ne!(classify(&req[..MAX_DETECT_LEN]), Detection::NeedMore);
    }
}
