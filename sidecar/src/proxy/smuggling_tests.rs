//! Request smuggling, both directions: hostile framing (CL+TE, duplicate or signed
//! Content-Length, obs-fold, bare-LF chunk lines, bad chunk sizes, TE on HTTP/1.0) is refused
//! with a 4xx, or forwarded as exactly the messages the proxy itself saw: the upstream never sees
//! a request the client did not get its own answer for, and a client never gets two answers for
//! one response.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

async fn guard<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test hung")
}

pub(super) type Seen = Arc<Mutex<Vec<String>>>;

/// An upstream that parses requests strictly (hyper) and records each one's method, path and
/// body (`<broken body>` for one that broke off); it answers with the path in `x-path`.
pub(super) async fn recording_upstream() -> (SocketAddr, Seen) {
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = Arc::clone(&log);
                    async move {
                        let (head, body) = req.into_parts();
                        let body = match body.collect().await {
                            Ok(c) => String::from_utf8_lossy(&c.to_bytes()).into_owned(),
                            Err(_) => "<broken body>".to_owned(),
                        };
                        let path = head.uri.path().to_owned();
                        log.lock()
                            .unwrap()
                            .push(format!("{} {path} {body}", head.method));
                        let mut resp =
                            http::Response::new(Full::new(bytes::Bytes::from_static(b"ok")));
                        resp.headers_mut()
                            .insert("x-path", http::HeaderValue::from_str(&path).unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Sends `raw` and reads everything until the proxy closes; returns the status codes and the
/// `x-path` of every response in order.
async fn send_raw(proxy: SocketAddr, raw: &[u8]) -> (Vec<u16>, Vec<String>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.write_all(raw).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    answers(&out)
}

/// The statuses (interim `100 Continue` left out) and `x-path`s of the answers in `out`, in
/// order.
pub(super) fn answers(out: &[u8]) -> (Vec<u16>, Vec<String>) {
    let text = String::from_utf8_lossy(out);
    let statuses = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .filter(|s| *s != 100)
        .collect();
    let paths = text
        .lines()
        .filter_map(|l| l.strip_prefix("x-path: "))
        .map(str::to_owned)
        .collect();
    (statuses, paths)
}

/// The hostile requests: each followed by a second request on the same connection that a
/// desynchronised parser would take for part of the first, or the reverse.
const HOSTILE: &[(&str, &[u8])] = &[
    (
        "CL and TE",
        b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "TE and CL",
        b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 30\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "differing Content-Length",
        b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 40\r\n\r\n\
          abcGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "duplicate Content-Length",
        b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n\
          abcGET /b HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "signed Content-Length",
        b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: +3\r\n\r\n\
          abcGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "obs-fold",
        b"POST /a HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\ncontent-length: 3\r\n\r\n\
          abcGET /b HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "bare-LF chunk lines",
        b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          3\nabc\n0\n\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "invalid chunk size",
        b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          zz\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "chunk size overflow",
        b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          ffffffffffffffffff1\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "TE on HTTP/1.0",
        b"POST /a HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
    (
        "TE not chunked",
        b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    ),
];

#[tokio::test]
async fn hostile_request_framing_is_refused_or_forwarded_as_seen() {
    let (upstream, seen) = recording_upstream().await;
    let proxy = start(
        ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]),
        Arc::new(move |_: &TcpStream| Ok(upstream)),
    )
    .await
    .unwrap();
    let addr = proxy.local_addrs()[0];
    guard(async {
        for (name, raw) in HOSTILE {
            seen.lock().unwrap().clear();
            let (statuses, answered) = send_raw(addr, raw).await;
            let forwarded: Vec<String> = seen
                .lock()
                .unwrap()
                .iter()
                .map(|r| r.split(' ').nth(1).unwrap_or("").to_owned())
                .collect();
            eprintln!("{name}: answers {statuses:?}, forwarded {forwarded:?}");
            // Whatever reached the upstream, the client got exactly that, answer for answer.
            assert_eq!(
                forwarded, answered,
                "{name}: upstream saw {forwarded:?}, the client got answers for {answered:?} \
                 (statuses {statuses:?})"
            );
            // And every other answer is a refusal of the client's framing.
            for status in &statuses[answered.len()..] {
                assert!((400..500).contains(status), "{name}: {statuses:?}");
            }
            assert!(
                !statuses.is_empty() || forwarded.is_empty(),
                "{name}: something was forwarded but nothing answered"
            );
            assert!(
                !forwarded.iter().any(|p| p == "/smuggled")
                    || answered.contains(&"/smuggled".to_owned()),
                "{name}: a smuggled request reached the upstream"
            );
        }
    })
    .await;
}

/// Responses with hostile framing: the client gets one well-framed answer per request (the
/// upstream's, re-framed, or a 502), never a second response carved out of the first's body.
#[tokio::test]
async fn hostile_response_framing_never_splits_a_response() {
    let hostile: &[(&str, &'static [u8])] = &[
        (
            "TE and CL",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "differing Content-Length",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 50\r\n\r\n\
              abcHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "signed Content-Length",
            b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\nabcHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "invalid chunk size",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
    ];
    for (name, answer) in hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let answer: &'static [u8] = answer;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer).await;
                    // Keep the connection open: the extra bytes are what a split would use.
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        let proxy = start(
            ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]),
            Arc::new(move |_: &TcpStream| Ok(upstream)),
        )
        .await
        .unwrap();
        let addr = proxy.local_addrs()[0];
        guard(async {
            // Two requests on one connection: the second must not get the smuggled response.
            let (statuses, _) = send_raw(
                addr,
                b"GET /one HTTP/1.1\r\nhost: x\r\n\r\nGET /two HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .await;
            // The first answer is the upstream's (re-framed), a 502, or none (a body that breaks
            // after its head went out aborts the connection); a second, if any, is for /two
            // and comes from a fresh exchange: never one carved out of the first body.
            assert!(
                statuses.first().is_none_or(|s| matches!(s, 200 | 502)),
                "{name}: first answer {statuses:?}"
            );
            assert!(statuses.len() <= 2, "{name}: {statuses:?}");
        })
        .await;
    }
}
