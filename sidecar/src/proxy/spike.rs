//! Issue 19's measurement spike (`--http1-engine spike`, `--target` mode only): how few
//! instructions an HTTP/1 exchange can take when the head is parsed into offsets of the
//! connection's buffer (httparse), forwarded as its original bytes (case and order kept, the
//! hop-by-hop lines dropped, the policy headers appended) in one `writev`, and one task drives
//! both sockets of the exchange. GET and HEAD without a body only; anything else is answered 501
//! and the connection closed. Not a product path: no retries, breaker or timeouts beyond the
//! header timeout; its result decides whether the real engine is built (docs/performance.md).
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::route::Route;
use super::shared::Shared;
use crate::metrics::access::Observer;
use crate::metrics::method_label;
use crate::policy::headers::{fresh_request_id, fresh_traceparent};

const MAX_HEADERS: usize = 64;
const BUF: usize = 8 * 1024;
/// Header names (lowercase) never forwarded: hop-by-hop (RFC 9110 7.6.1).
const HOP_BY_HOP: [&[u8]; 6] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"transfer-encoding",
    b"upgrade",
];

/// Idle upstream connections of the spike (one target).
static IDLE: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

fn is_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// What the spike keeps of a parsed request head: offsets into the buffer.
struct Head {
    len: usize,
    get: bool,
    keep_alive: bool,
    /// Where the request line ends (the first header line begins).
    line_end: usize,
    /// Header lines to forward, as ranges of the buffer (without their CRLF).
    lines: [(u32, u32); MAX_HEADERS],
    count: usize,
    has_request_id: bool,
    has_traceparent: bool,
}

enum Parsed {
    Head(Box<Head>),
    Partial,
    /// Answer this status and close.
    Refuse(StatusCode),
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Refuse(StatusCode::BAD_REQUEST),
    };
    let get = match req.method {
        Some("GET") => true,
        Some("HEAD") => false,
        _ => return Parsed::Refuse(StatusCode::NOT_IMPLEMENTED),
    };
    let http11 = req.version == Some(1);
    let base = buf.as_ptr() as usize;
    let mut head = Head {
        len,
        get,
        keep_alive: http11,
        line_end: 0,
        lines: [(0, 0); MAX_HEADERS],
        count: 0,
        has_request_id: false,
        has_traceparent: false,
    };
    let mut hosts = 0;
    for (i, h) in req.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let start = h.name.as_ptr() as usize - base;
        let end = h.value.as_ptr() as usize - base + h.value.len();
        if i == 0 {
            head.line_end = start;
        }
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            // A body: not the spike's (a GET with a body is legal, and rare).
            return Parsed::Refuse(StatusCode::NOT_IMPLEMENTED);
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            let v = h.value;
            if v.windows(5).any(|w| w.eq_ignore_ascii_case(b"close")) {
                head.keep_alive = false;
            } else if !http11 && v.windows(10).any(|w| w.eq_ignore_ascii_case(b"keep-alive")) {
                head.keep_alive = true;
            }
        }
        if is_hop(name) {
            continue;
        }
        head.has_request_id |= name.eq_ignore_ascii_case(b"x-request-id");
        head.has_traceparent |= name.eq_ignore_ascii_case(b"traceparent");
        head.lines[head.count] = (start as u32, end as u32);
        head.count += 1;
    }
    if req.headers.is_empty() {
        head.line_end = len - 2;
    }
    if hosts > 1 || (http11 && hosts == 0) {
        return Parsed::Refuse(StatusCode::BAD_REQUEST);
    }
    Parsed::Head(Box::new(head))
}

/// The response head's framing.
enum Framing {
    Length(u64),
    /// Chunked or close-delimited: relayed until the upstream closes; the connection is not
    /// reused (the spike does not parse chunks).
    UntilClose,
}

/// Serves one `--target` HTTP/1 connection with the spike engine.
pub(crate) async fn serve(shared: &Shared, route: &Route, mut client: TcpStream, obs: &Observer) {
    let Ok(upstream_addr) = route.authority.as_str().parse::<SocketAddr>() else {
        let _ = client
            .write_all(
                b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    let header_timeout = shared.config.http.header_timeout;
    let mut buf = vec![0u8; BUF];
    let mut filled = 0;
    let mut resp = vec![0u8; BUF];
    let forwarded_for = route.forwarded_for.clone();
    loop {
        let deadline = Instant::now() + header_timeout;
        let head = loop {
            match parse(&buf[..filled]) {
                Parsed::Head(h) => break h,
                Parsed::Refuse(status) => return refuse(&mut client, status).await,
                Parsed::Partial if filled == buf.len() => {
                    return refuse(&mut client, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await
                }
                Parsed::Partial => {}
            }
            match tokio::time::timeout_at(deadline, client.read(&mut buf[filled..])).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => filled += n,
            }
        };
        let start = Instant::now();
        let method = if head.get { Method::GET } else { Method::HEAD };
        let mut extra = Vec::with_capacity(256);
        extra.extend_from_slice(b"x-forwarded-by: sidecar\r\n");
        if !head.has_request_id {
            extra.extend_from_slice(b"x-request-id: ");
            extra.extend_from_slice(fresh_request_id().as_bytes());
            extra.extend_from_slice(b"\r\n");
        }
        if !head.has_traceparent {
            extra.extend_from_slice(b"traceparent: ");
            extra.extend_from_slice(fresh_traceparent().as_bytes());
            extra.extend_from_slice(b"\r\n");
        }
        if let Some(f) = &forwarded_for {
            extra.extend_from_slice(b"x-forwarded-for: ");
            extra.extend_from_slice(f.addr().as_bytes());
            extra.extend_from_slice(b"\r\nforwarded: ");
            extra.extend_from_slice(f.element().as_bytes());
            extra.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
        }
        extra.extend_from_slice(b"\r\n");
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(head.count * 2 + 2);
        slices.push(IoSlice::new(&buf[..head.line_end]));
        for &(s, e) in &head.lines[..head.count] {
            // Each line with its CRLF: the bytes after the value are the line's own CRLF.
            slices.push(IoSlice::new(&buf[s as usize..e as usize + 2]));
        }
        slices.push(IoSlice::new(&extra));
        let mut upstream = match take_idle() {
            Some(u) => u,
            None => match TcpStream::connect(upstream_addr).await {
                Ok(u) => {
                    let _ = u.set_nodelay(true);
                    u
                }
                Err(e) => {
                    debug!(error = %e, "spike: connect failed");
                    return refuse(&mut client, StatusCode::BAD_GATEWAY).await;
                }
            },
        };
        if write_all_vectored(&mut upstream, &mut slices)
            .await
            .is_err()
        {
            return refuse(&mut client, StatusCode::BAD_GATEWAY).await;
        }
        drop(slices);
        // The response head.
        let mut got = 0;
        let (head_len, status, framing, upstream_keep) = loop {
            match upstream.read(&mut resp[got..]).await {
                Ok(0) | Err(_) => return refuse(&mut client, StatusCode::BAD_GATEWAY).await,
                Ok(n) => got += n,
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&resp[..got]) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = r.code.unwrap_or(502);
                    let mut framing = Framing::UntilClose;
                    let mut keep = r.version == Some(1);
                    for h in r.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            match std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.parse().ok())
                            {
                                Some(len) => framing = Framing::Length(len),
                                None => return refuse(&mut client, StatusCode::BAD_GATEWAY).await,
                            }
                        } else if h.name.eq_ignore_ascii_case("connection")
                            && h.value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close"))
                        {
                            keep = false;
                        }
                    }
                    if !head.get || status == 204 || status == 304 {
                        framing = Framing::Length(0);
                    }
                    break (n, status, framing, keep);
                }
                Ok(httparse::Status::Partial) if got < resp.len() => continue,
                _ => return refuse(&mut client, StatusCode::BAD_GATEWAY).await,
            }
        };
        // Forward the head as it came (the spike's upstream is HTTP/1.1 keep-alive), then the
        // body bytes already read, then the rest.
        let body_read = got - head_len;
        let client_keep = head.keep_alive;
        let w = client.write_all(&resp[..got]).await;
        if w.is_err() {
            return;
        }
        let reusable = match framing {
            Framing::Length(len) => {
                let mut left = len.saturating_sub(body_read as u64);
                while left > 0 {
                    let want = left.min(resp.len() as u64) as usize;
                    match upstream.read(&mut resp[..want]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            left -= n as u64;
                            if client.write_all(&resp[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                body_read as u64 <= len
            }
            Framing::UntilClose => {
                let _ = tokio::io::copy(&mut upstream, &mut client).await;
                false
            }
        };
        if reusable && upstream_keep {
            put_idle(upstream);
        }
        obs.dest.record_as(
            method_label(&method),
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            start.elapsed(),
        );
        // The next request: what follows this head in the buffer.
        buf.copy_within(head.len..filled, 0);
        filled -= head.len;
        if !client_keep {
            let _ = client.shutdown().await;
            return;
        }
    }
}

async fn write_all_vectored(s: &mut TcpStream, slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = s.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

fn take_idle() -> Option<TcpStream> {
    IDLE.lock().unwrap_or_else(PoisonError::into_inner).pop()
}

fn put_idle(s: TcpStream) {
    let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if idle.len() < 256 {
        idle.push(s);
    }
}

async fn refuse(client: &mut TcpStream, status: StatusCode) {
    let code = match status {
        StatusCode::NOT_IMPLEMENTED => "proxy-unsupported-request",
        StatusCode::BAD_REQUEST => "downstream-protocol-error",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "downstream-head-too-large",
        _ => "upstream-error",
    };
    let line = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\nconnection: close\r\nx-sidecar-error: {code}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let _ = client.write_all(line.as_bytes()).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::{parse, Parsed};
    use crate::proxy::{start, Http1Engine, ProxyConfig, Resolver, Target};

    #[test]
    fn heads_are_offsets_and_bodies_or_ambiguity_are_refused() {
        let req =
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Mixed-Case: 1\r\nConnection: keep-alive\r\n\r\nNEXT";
        let Parsed::Head(h) = parse(req) else {
            panic!("a complete head")
        };
        assert_eq!(&req[..h.line_end], b"GET /a HTTP/1.1\r\n");
        let lines: Vec<&[u8]> = h.lines[..h.count]
            .iter()
            .map(|&(s, e)| &req[s as usize..e as usize])
            .collect();
        assert_eq!(lines, vec![&b"Host: x"[..], b"X-Mixed-Case: 1"]);
        assert_eq!(&req[h.len..], b"NEXT");
        assert!(h.keep_alive);
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
        for refused in [
            &b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 1\r\n\r\na"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse(refused), Parsed::Refuse(_)),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
    }

    /// An upstream that sends each raw request head it gets to `seen` and answers "ok".
    async fn raw_upstream(
        seen: mpsc::UnboundedSender<Vec<u8>>,
        accepted: Arc<std::sync::atomic::AtomicUsize>,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            let _ = seen.send(head);
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\nX-Up-Case: Kept\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_spike_keeps_header_case_and_order_and_reuses_the_upstream() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let upstream = raw_upstream(tx, Arc::clone(&accepted)).await;
        let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
        config.target = Some(Target::parse(&format!("http://{upstream}")).unwrap());
        config.http.http1_engine = Http1Engine::Spike;
        let resolver: Resolver = Arc::new(|_: &TcpStream| Err(std::io::Error::other("unused")));
        let proxy = start(config, resolver).await.unwrap();
        let addr = proxy.local_addrs()[0];
        let mut c = TcpStream::connect(addr).await.unwrap();
        let req = b"GET /x HTTP/1.1\r\nHost: front\r\nX-Zeta: 1\r\nx-alpha: 2\r\nConnection: keep-alive\r\n\r\n";
        let mut answer = vec![0u8; 1024];
        for _ in 0..2 {
            c.write_all(req).await.unwrap();
            let mut got = 0;
            while !answer[..got].ends_with(b"ok") {
                let n = c.read(&mut answer[got..]).await.unwrap();
                assert!(n > 0, "closed early");
                got += n;
            }
            let text = String::from_utf8_lossy(&answer[..got]);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(
                text.contains("X-Up-Case: Kept"),
                "the response's case too: {text}"
            );
            let head = String::from_utf8(rx.recv().await.unwrap()).unwrap();
            let order: Vec<&str> = head.lines().map(|l| l.split(':').next().unwrap()).collect();
            assert_eq!(
                &order[..4],
                ["GET /x HTTP/1.1", "Host", "X-Zeta", "x-alpha"],
                "{head}"
            );
            assert!(!head.contains("Connection"), "hop-by-hop dropped: {head}");
            assert!(head.contains("x-forwarded-by: sidecar\r\n"), "{head}");
            assert!(head.contains("x-request-id: "), "{head}");
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "both exchanges on one upstream connection"
        );
        // A POST: refused by the spike, the connection closed.
        c.write_all(b"POST / HTTP/1.1\r\nHost: f\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.starts_with(b"HTTP/1.1 501"),
            "{}",
            String::from_utf8_lossy(&rest)
        );
        proxy.stop_all();
    }
}
