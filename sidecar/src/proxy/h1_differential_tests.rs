//! The native engine against hyper on the same bytes (issue 19's differential test): a corpus of
//! request streams, well-formed and hostile, each
//!
//! - sent to a hyper server directly (the oracle: what hyper reads), through the hyper engine,
//!   and through the native engine;
//! - and through the native engine again with the client's bytes split into two reads at every
//!   byte boundary (a scripted client connection: the split is exact, not left to TCP).
//!
//! What must hold: the native engine forwards a prefix of what the oracle reads, message for
//! message (method, path and body equal): it may refuse earlier, never read more or differently;
//! where hyper (or the hyper engine) refuses a stream outright, so does the native engine; and
//! every split gives the answers and forwarded messages of the unsplit run.
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::smuggling_tests::{answers, recording_upstream as oracle_upstream, Seen};
use super::*;

/// The request streams. Each ends with `connection: close` (or is refused before), so that
/// every run ends by itself.
const CORPUS: &[(&str, &[u8])] = &[
    ("get", b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nconnection: close\r\n\r\n"),
    ("post with a length", b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nconnection: close\r\n\r\nhello"),
    ("chunked with extensions and trailers", b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n3;a=b\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n"),
    ("pipelined", b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nokGET /3 HTTP/1.1\r\nHost: h\r\nconnection: close\r\n\r\n"),
    ("http/1.0", b"GET /old HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\nGET /old2 HTTP/1.0\r\nHost: h\r\n\r\n"),
    ("odd spacing and empty values", b"GET /s HTTP/1.1\r\nHost:h\r\nX-A:   v  \r\nX-Empty:\r\nx-b:\tt\r\nconnection: close\r\n\r\n"),
    ("absolute form", b"GET http://h:8080/abs?q HTTP/1.1\r\nHost: h\r\nconnection: close\r\n\r\n"),
    ("expect 100-continue", b"PUT /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\nconnection: close\r\n\r\nabc"),
    ("zero length", b"POST /z HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nconnection: close\r\n\r\n"),
    ("leading zeros in chunk size", b"POST /lz HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n0003\r\nabc\r\n000\r\n\r\n"),
    ("CL and TE", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("differing CL", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 40\r\n\r\nabcGET /smuggled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("duplicate CL", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("CL list", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3, 3\r\n\r\nabcGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("signed CL", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: +3\r\n\r\nabcGET /smuggled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("obs-fold", b"POST /a HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\ncontent-length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("bare-LF chunk lines", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\nabc\n0\n\nGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("LF inside a chunk extension", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3;x\nGET /smuggled HTTP/1.1\r\nabc\r\n0\r\n\r\n"),
    ("invalid chunk size", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("chunk size overflow", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffff1\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("TE on HTTP/1.0", b"POST /a HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("TE not chunked", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("TE chunked twice", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("space before colon", b"GET /a HTTP/1.1\r\nhost : x\r\nconnection: close\r\n\r\n"),
    ("bad target", b"GET /a<b> HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("bare CR in a header", b"GET /a HTTP/1.1\r\nhost: x\rmore\r\nconnection: close\r\n\r\n"),
    ("NUL in a header", b"GET /a HTTP/1.1\r\nhost: x\r\nx: a\0b\r\nconnection: close\r\n\r\n"),
    ("HTTP/2 version", b"GET /a HTTP/2.0\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
];

/// Sends `raw` over TCP and reads until the peer closes.
async fn over_tcp(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// A client connection whose reads are scripted: each read returns (up to) the next piece;
/// after the last one, reads wait (the client waits for its answers). Writes are collected.
struct Scripted {
    pieces: VecDeque<Vec<u8>>,
    out: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(mut piece) = self.pieces.pop_front() else {
            return Poll::Pending;
        };
        let n = piece.len().min(buf.remaining());
        buf.put_slice(&piece[..n]);
        if n < piece.len() {
            self.pieces.push_front(piece.split_off(n));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.out.lock().unwrap().extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves one scripted client with the native engine of `proxy` (a `--target` proxy).
async fn native(proxy: &Proxy, pieces: Vec<Vec<u8>>) -> Vec<u8> {
    let client = engine_client(proxy);
    let out = Arc::new(Mutex::new(Vec::new()));
    let io = Scripted {
        pieces: pieces.into(),
        out: Arc::clone(&out),
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        h1::serve(client, io, h1::Serve::Whole),
    )
    .await
    .expect("the engine ended the connection");
    let out = out.lock().unwrap().clone();
    out
}

/// The native engine's view of one client of `proxy` (a `--target` proxy).
fn engine_client(proxy: &Proxy) -> h1::Client {
    let shared = &proxy.shared;
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let route = Arc::new(shared.target_route.as_ref().unwrap().for_client(peer));
    let host = shared
        .outbound
        .raw
        .host(&route.authority, 128, route.plan.clone());
    h1::Client {
        shared: Arc::clone(shared),
        observer: shared.target_observer(),
        peer: peer.into(),
        pool: Arc::clone(&shared.outbound.raw),
        host,
        route,
        strict: false,
        inbound: None,
        dir: Dir::Inbound,
    }
}

/// Every request allocates its exchange's future: 2,992 bytes (release) while the exchange was
/// an `async` block that kept what admission decided twice (as captured, and as moved out of it)
/// and a REST call's state inline in every request; 1,880 since the work is chosen before the
/// first poll and the record wraps it (debug builds lay out a little more).
#[tokio::test]
async fn an_exchange_holds_what_admission_decided_once() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (proxy, _) = target_proxy(upstream, Http1Engine::Native).await;
    let size = h1::exchange_size(&engine_client(&proxy)).await;
    eprintln!("an exchange's future: {size} bytes");
    assert!(size <= 2048, "an exchange's future is {size} bytes");
}

async fn target_proxy(upstream: SocketAddr, engine: Http1Engine) -> (Proxy, SocketAddr) {
    let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
    config.target = Some(Target::parse(&format!("http://{upstream}")).unwrap());
    config.http.http1_engine = engine;
    config.http.header_timeout = Duration::from_secs(3);
    let resolver: Resolver = Arc::new(|_: &TcpStream| Err(io::Error::other("unused")));
    let proxy = start(config, resolver).await.unwrap();
    let addr = proxy.local_addrs()[0];
    (proxy, addr)
}

fn take(seen: &Seen) -> Vec<String> {
    std::mem::take(&mut *seen.lock().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_engine_reads_what_hyper_reads_or_less_at_every_split() {
    let (upstream, seen) = oracle_upstream().await;
    let (native_proxy, _) = target_proxy(upstream, Http1Engine::Native).await;
    let (_hyper_proxy, hyper_addr) = target_proxy(upstream, Http1Engine::Hyper).await;
    let mut splits = 0usize;
    for (name, raw) in CORPUS {
        take(&seen);
        let oracle_out = over_tcp(upstream, raw).await;
        let oracle = take(&seen);
        over_tcp(hyper_addr, raw).await;
        let via_hyper = take(&seen);
        let native_out = native(&native_proxy, vec![raw.to_vec()]).await;
        let via_native = take(&seen);
        let (statuses, paths) = answers(&native_out);
        eprintln!(
            "{name}: oracle read {oracle:?}; hyper engine forwarded {via_hyper:?}; native forwarded {via_native:?}, answered {statuses:?}"
        );
        assert!(
            oracle.starts_with(&via_native),
            "{name}: the native engine forwarded {via_native:?}, hyper reads {oracle:?}"
        );
        // The hyper engine (hyper's server and client) is no stricter a reader than hyper
        // itself, but may stop earlier for reasons of its own (it closes an HTTP/1.0 keep-alive
        // client after one answer): what it refuses outright, the native engine refuses too.
        if via_hyper.is_empty() {
            assert!(
                via_native.is_empty(),
                "{name}: the hyper engine forwarded nothing, the native engine {via_native:?}"
            );
        }
        if answers(&oracle_out).0.first().is_some_and(|s| *s >= 400) && oracle.is_empty() {
            assert!(
                via_native.is_empty(),
                "{name}: hyper refuses it; native forwarded {via_native:?}"
            );
        }
        // Every forwarded message was answered to the client, in order.
        assert_eq!(
            paths.len(),
            via_native.len(),
            "{name}: answers {statuses:?} / {paths:?} for {via_native:?}"
        );
        for k in 1..raw.len() {
            let split_out = native(&native_proxy, vec![raw[..k].to_vec(), raw[k..].to_vec()]).await;
            let split_seen = take(&seen);
            assert_eq!(
                split_seen, via_native,
                "{name}: split at {k}: forwarded {split_seen:?}, unsplit {via_native:?}"
            );
            assert_eq!(
                answers(&split_out),
                (statuses.clone(), paths.clone()),
                "{name}: split at {k}"
            );
            splits += 1;
        }
    }
    eprintln!("{} streams, {splits} split runs", CORPUS.len());
}
