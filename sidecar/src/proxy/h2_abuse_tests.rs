//! HTTP/2 abuse against the proxy's h2c server, with hand-made frames (no client library would
//! send them): rapid reset (CVE-2023-44487), a CONTINUATION flood (CVE-2024-27316 and kin) and a
//! stream flood. Each ends with the proxy sending GOAWAY and closing the connection, so what one
//! client can make the proxy hold stays bounded.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::metrics::ProxyMetrics;

async fn guard<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test hung")
}

const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET / HTTP/2` for authority `a`, HPACK with the static table only: `:method GET` (2),
/// `:scheme http` (6), `:path /` (4), `:authority` (1) literal "a".
const REQUEST_BLOCK: &[u8] = &[0x82, 0x86, 0x84, 0x41, 0x01, b'a'];

/// An upstream that accepts and never answers: every stream stays in flight.
async fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

async fn h2c_proxy(upstream: SocketAddr) -> (Proxy, SocketAddr, Arc<ProxyMetrics>) {
    let metrics = ProxyMetrics::unregistered();
    let telemetry = Telemetry {
        metrics: Arc::clone(&metrics),
        access_log: false,
    };
    let resolvers = Resolvers {
        outbound: Arc::new(move |_: &TcpStream| Ok(upstream)),
        inbound: local_addr_resolver(),
    };
    let proxy = start_observed(
        ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]),
        resolvers,
        telemetry,
    )
    .await
    .unwrap();
    let addr = proxy.local_addrs()[0];
    (proxy, addr, metrics)
}

/// Waits until the connection's end has been counted as the client's protocol breach.
async fn counted_as_a_breach(metrics: &ProxyMetrics) {
    let breach = crate::error::ProxyError::DownstreamProtocol;
    while metrics.error_count(Dir::Outbound, breach) == 0 {
        tokio::task::yield_now().await;
    }
}

/// Connects, sends the preface and an empty SETTINGS frame.
async fn h2c_connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(H2_PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

/// Reads frames until the server closes; true if one of them was a GOAWAY.
async fn saw_goaway(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let mut at = 0;
    while at + 9 <= buf.len() {
        let len = (usize::from(buf[at]) << 16)
            | (usize::from(buf[at + 1]) << 8)
            | usize::from(buf[at + 2]);
        if buf[at + 3] == GOAWAY {
            return true;
        }
        at += 9 + len;
    }
    false
}

/// Writes `frames` for as long as the server takes them (it may close half-way: that is the
/// point).
async fn flood(s: &mut TcpStream, frames: impl Iterator<Item = Vec<u8>>) {
    for f in frames {
        if s.write_all(&f).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn rapid_reset_ends_with_goaway() {
    let (_proxy, addr, metrics) = h2c_proxy(silent_upstream().await).await;
    guard(async {
        let mut s = h2c_connect(addr).await;
        let frames = (0..10_000u32).flat_map(|i| {
            let id = 2 * i + 1;
            [
                frame(HEADERS, END_HEADERS | END_STREAM, id, REQUEST_BLOCK),
                frame(RST_STREAM, 0, id, &8u32.to_be_bytes()),
            ]
        });
        flood(&mut s, frames).await;
        assert!(saw_goaway(&mut s).await, "rapid reset ends with GOAWAY");
        counted_as_a_breach(&metrics).await;
    })
    .await;
}

#[tokio::test]
async fn continuation_flood_ends_with_goaway() {
    let (_proxy, addr, metrics) = h2c_proxy(silent_upstream().await).await;
    guard(async {
        let mut s = h2c_connect(addr).await;
        // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION frames
        // of literal headers (`x: <1000 bytes>`, not indexed) forever.
        let mut literal = vec![0x00, 0x01, b'x', 0x7f, 0xe9, 0x06];
        literal.extend(std::iter::repeat_n(b'v', 1000));
        let first = frame(HEADERS, 0, 1, REQUEST_BLOCK);
        let rest = (0..100_000).map(|_| frame(CONTINUATION, 0, 1, &literal));
        flood(&mut s, std::iter::once(first).chain(rest)).await;
        assert!(
            saw_goaway(&mut s).await,
            "a never-ending header block ends with GOAWAY"
        );
        counted_as_a_breach(&metrics).await;
    })
    .await;
}

#[tokio::test]
async fn stream_flood_is_refused_past_the_limit() {
    let upstream = silent_upstream().await;
    let proxy = start(
        {
            let mut c = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
            c.http.h2_max_concurrent_streams = 10;
            c
        },
        Arc::new(move |_: &TcpStream| Ok(upstream)),
    )
    .await
    .unwrap();
    let addr = proxy.local_addrs()[0];
    guard(async {
        let mut s = h2c_connect(addr).await;
        // Far more streams than allowed, none of them ever answered (the upstream is silent),
        // and no SETTINGS ack read: a client ignoring the limit.
        let frames = (0..5_000u32)
            .map(|i| frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, REQUEST_BLOCK));
        flood(&mut s, frames).await;
        assert!(
            saw_goaway(&mut s).await,
            "ignoring the stream limit ends with GOAWAY"
        );
    })
    .await;
}

/// An HTTP/2 connection with no stream open for the idle timeout is closed with GOAWAY (idle
/// HTTP/2 connections cannot pile up); not before its last stream is done.
#[tokio::test]
async fn idle_h2_connections_are_closed() {
    // Any answer ends the stream: this upstream speaks HTTP/1 only, so the proxy answers 502.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    drop(listener);
    let idle = Duration::from_millis(300);
    let proxy = start(
        {
            let mut c = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
            c.http.h2_idle_timeout = idle;
            c
        },
        Arc::new(move |_: &TcpStream| Ok(upstream)),
    )
    .await
    .unwrap();
    let addr = proxy.local_addrs()[0];
    guard(async {
        let mut s = h2c_connect(addr).await;
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, REQUEST_BLOCK))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        // Read frames until the GOAWAY (the graceful close then waits for a PING answer, which
        // this hand-made client does not give).
        let mut buf = Vec::new();
        let mut at = 0;
        let goaway = loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break false;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut found = false;
            while at + 9 <= buf.len() {
                let len = (usize::from(buf[at]) << 16)
                    | (usize::from(buf[at + 1]) << 8)
                    | usize::from(buf[at + 2]);
                if at + 9 + len > buf.len() {
                    break;
                }
                found |= buf[at + 3] == GOAWAY;
                at += 9 + len;
            }
            if found {
                break true;
            }
        };
        assert!(goaway, "closed with GOAWAY");
        assert!(started.elapsed() >= idle, "not before the idle timeout");
    })
    .await;
}
