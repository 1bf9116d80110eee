//! The native HTTP/1 engine's own behaviour, byte for byte: what reaches the upstream and the
//! client (header case and order, re-framed bodies, interim answers, pipelining, HTTP/1.0
//! clients), and that one upstream connection serves a keep-alive client.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::*;

async fn guard<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test hung")
}

/// An upstream that reports each request (head and body, as received) on `seen` and answers
/// every one with `answer`; counts its connections.
pub(super) async fn scripted_upstream(
    answer: &'static [u8],
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Vec<u8>>,
    Arc<AtomicUsize>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // A request: its head, then a body framed by content-length or chunks.
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let body_end = if head.contains("transfer-encoding: chunked") {
                        loop {
                            if let Some(i) = buf[end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                                break end + i + 5;
                            }
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    } else {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        while buf.len() < end + len {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        end + len
                    };
                    let _ = tx.send(buf.drain(..body_end).collect());
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx, accepted)
}

async fn proxy_to(upstream: SocketAddr) -> (Proxy, SocketAddr) {
    let config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
    assert_eq!(config.http.http1_engine, Http1Engine::Native);
    let proxy = start(config, Arc::new(move |_: &TcpStream| Ok(upstream)))
        .await
        .unwrap();
    let addr = proxy.local_addrs()[0];
    (proxy, addr)
}

/// Reads from `s` until `done` says the bytes so far are complete.
async fn read_until(s: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while !done(&out) {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn header_case_and_order_are_kept_both_ways_on_one_upstream_connection() {
    let (upstream, mut seen, accepted) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\nX-Up-Case: Kept\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\ncontent-length: 2\r\n\r\nok").await;
    let (proxy, addr) = proxy_to(upstream).await;
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let req = b"GET /x?y=1 HTTP/1.1\r\nHost: front\r\nX-Zeta: 1\r\nx-alpha: 2\r\nX-ALPHA: 3\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\n\r\n";
        for _ in 0..3 {
            c.write_all(req).await.unwrap();
            let answer = text(&read_until(&mut c, |b| b.ends_with(b"ok")).await);
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(
                answer.contains("X-Up-Case: Kept\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"),
                "the response's case and order: {answer}"
            );
            let head = text(&seen.recv().await.unwrap());
            let names: Vec<&str> = head.lines().map(|l| l.split(':').next().unwrap()).collect();
            assert_eq!(
                &names[..5],
                ["GET /x?y=1 HTTP/1.1", "Host", "X-Zeta", "x-alpha", "X-ALPHA"],
                "{head}"
            );
            assert!(!head.contains("Connection"), "hop-by-hop dropped: {head}");
            assert!(!head.contains("X-Private"), "a name Connection lists is dropped: {head}");
            assert!(head.contains("x-forwarded-by: sidecar\r\n"), "{head}");
            assert!(head.contains("x-request-id: "), "{head}");
            assert!(head.contains("traceparent: 00-"), "{head}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one upstream connection");
    })
    .await;
    proxy.stop_all();
}

#[tokio::test]
async fn chunked_bodies_are_reframed_and_pipelined_requests_answered_in_order() {
    let (upstream, mut seen, _) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;ext=1\r\nok\r\n0\r\nx-trailer: t\r\n\r\n",
    )
    .await;
    let (proxy, addr) = proxy_to(upstream).await;
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Two requests in one write: a chunked POST with extensions, then a GET.
        c.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;name=v\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let both = text(
            &read_until(&mut c, |b| {
                text(b).matches("0\r\n\r\n").count() == 2
            })
            .await,
        );
        assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");
        assert!(
            both.contains("transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
            "extensions and trailers dropped, chunks kept: {both}"
        );
        let first = text(&seen.recv().await.unwrap());
        assert!(first.starts_with("POST /up HTTP/1.1\r\n"), "{first}");
        assert!(
            first.ends_with("content-length: 3\r\n\r\nabc"),
            "a small chunked body is checked whole and sent sized: {first:?}"
        );
        assert!(!first.to_ascii_lowercase().contains("transfer-encoding"), "{first:?}");
        let second = text(&seen.recv().await.unwrap());
        assert!(second.starts_with("GET /next HTTP/1.1\r\n"), "{second}");
    })
    .await;
    proxy.stop_all();
}

#[tokio::test]
async fn an_http10_client_gets_a_close_delimited_body_and_expect_continue_is_answered() {
    let (upstream, mut seen, _) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let (proxy, addr) = proxy_to(upstream).await;
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).await.unwrap();
        let all = text(&all);
        assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
        assert!(all.contains("connection: close\r\n"), "{all}");
        assert!(!all.contains("transfer-encoding"), "{all}");
        assert!(
            all.ends_with("\r\n\r\nhello"),
            "decoded, close-delimited: {all}"
        );
        let _ = seen.recv().await.unwrap();

        // Expect: 100-continue: the client hears 100 before it sends the body.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
        )
        .await
        .unwrap();
        let interim = text(&read_until(&mut c, |b| b.ends_with(b"\r\n\r\n")).await);
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"body").await.unwrap();
        let answer = text(&read_until(&mut c, |b| b.ends_with(b"0\r\n\r\n")).await);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let up = text(&seen.recv().await.unwrap());
        assert!(up.ends_with("\r\n\r\nbody"), "{up}");
    })
    .await;
    proxy.stop_all();
}

#[tokio::test]
async fn refusals_carry_the_error_header_and_close() {
    let (upstream, mut seen, _) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let (proxy, addr) = proxy_to(upstream).await;
    guard(async {
        for (raw, status, code) in [
            (&b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "400", "downstream-protocol-error"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", "400", "proxy-bad-request"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", "400", "downstream-body-error"),
        ] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(raw).await.unwrap();
            let mut all = Vec::new();
            let _ = c.read_to_end(&mut all).await;
            let all = text(&all);
            assert!(all.starts_with(&format!("HTTP/1.1 {status} ")), "{all}");
            assert!(all.contains(&format!("x-sidecar-error: {code}\r\n")), "{all}");
        }
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nx: {}\r\n\r\n", "y".repeat(64 * 1024));
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(big.as_bytes()).await;
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all).await;
        assert!(text(&all).starts_with("HTTP/1.1 431 "), "{}", text(&all));
        assert!(seen.try_recv().is_err(), "nothing reached the upstream");
    })
    .await;
    proxy.stop_all();
}

/// A local answer to a bodiless request keeps the connection, and the next request on it is
/// read from where the first one ended (not the first one again).
#[tokio::test]
async fn a_local_answer_leaves_the_connection_at_the_next_request() {
    let (upstream, mut seen, _) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let (proxy, addr) = proxy_to(upstream).await;
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"GET /dup HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nGET /fine HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
        let both = text(&read_until(&mut c, |b| b.ends_with(b"ok")).await);
        assert!(both.starts_with("HTTP/1.1 400 "), "{both}");
        assert_eq!(both.matches("HTTP/1.1 ").count(), 2, "{both}");
        let up = text(&seen.recv().await.unwrap());
        assert!(up.starts_with("GET /fine "), "{up}");
        assert!(seen.try_recv().is_err(), "only /fine went upstream");
    })
    .await;
    proxy.stop_all();
}

/// A chunked body longer than the buffering limit is relayed as it arrives, re-chunked, from
/// where the reading stopped (mid-chunk included).
#[tokio::test]
async fn a_long_chunked_body_is_streamed_from_where_buffering_stopped() {
    let (upstream, mut seen, _) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let (proxy, addr) = proxy_to(upstream).await;
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let chunk = vec![b'x'; 50_000];
        let mut raw = b"POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..3 {
            raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            raw.extend_from_slice(&chunk);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        c.write_all(&raw).await.unwrap();
        let answer = text(&read_until(&mut c, |b| b.ends_with(b"ok")).await);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let up = seen.recv().await.unwrap();
        let end = up.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = text(&up[..end]).to_ascii_lowercase();
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        let body = &up[end..];
        let (data, taken) = h1::fuzzing::chunked(&[body]).expect("strictly chunked");
        assert_eq!(taken, Some(body.len()), "ends exactly");
        assert_eq!(data.len(), 150_000, "every byte of data, once");
    })
    .await;
    proxy.stop_all();
}

/// A `--target` proxy to `upstream`, its configuration adjusted by `configure`, with its
/// metrics (the header-timeout count, where these tests look).
async fn observed_target_proxy(
    upstream: SocketAddr,
    configure: impl FnOnce(&mut ProxyConfig),
) -> (Proxy, Arc<crate::metrics::ProxyMetrics>) {
    let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
    config.target = Some(Target::parse(&format!("http://{upstream}")).unwrap());
    configure(&mut config);
    let metrics = crate::metrics::ProxyMetrics::unregistered();
    let telemetry = Telemetry {
        metrics: Arc::clone(&metrics),
        access_log: false,
    };
    let resolvers = Resolvers {
        outbound: original_dst_resolver(),
        inbound: local_addr_resolver(),
    };
    let proxy = start_observed(config, resolvers, telemetry).await.unwrap();
    (proxy, metrics)
}

/// The drain, as a connection of the engine sees it: an idle kept-alive connection closes at
/// once; a request under way when the drain begins gets the detection limit to arrive (one
/// completed in time is answered; a stalled one is closed then, not at the header timeout, and
/// not counted as one).
#[tokio::test]
async fn the_drain_closes_idle_connections_and_gives_a_request_under_way_the_detection_limit() {
    let (upstream, _seen, _) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let (proxy, metrics) = observed_target_proxy(upstream, |config| {
        config.detect_timeout = Duration::from_millis(300);
        // Far beyond the test's own bound: a connection closed at all was closed by the drain.
        config.http.header_timeout = Duration::from_secs(600);
    })
    .await;
    let addr = proxy.local_addrs()[0];
    guard(async {
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut idle, |b| b.ends_with(b"ok")).await;
        let mut completes = TcpStream::connect(addr).await.unwrap();
        completes
            .write_all(b"GET /late HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut stalls = TcpStream::connect(addr).await.unwrap();
        stalls
            .write_all(b"GET /stalled HTTP/1.1\r\n")
            .await
            .unwrap();

        proxy.stop_inbound();
        completes.write_all(b"Host: a\r\n\r\n").await.unwrap();
        let answer = text(&read_until(&mut completes, |b| b.ends_with(b"ok")).await);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let mut rest = Vec::new();
        for (name, s) in [("idle", &mut idle), ("stalled", &mut stalls)] {
            rest.clear();
            let n = s.read_to_end(&mut rest).await.unwrap_or(0);
            assert_eq!(n, 0, "{name}: closed without an answer: {}", text(&rest));
        }
        let timeouts = metrics.error_count(
            Dir::Inbound,
            crate::error::ProxyError::DownstreamHeaderTimeout,
        );
        assert_eq!(
            timeouts, 0,
            "a connection the drain closed counted as a header timeout"
        );
    })
    .await;
}

/// The header timeout still ends a head that stalls, at its deadline, and is counted, whatever
/// the connection's timer was moved to before (it is moved later lazily: `h1/timer.rs`).
#[tokio::test]
async fn a_stalled_head_after_a_request_meets_the_header_timeout_and_is_counted() {
    let (upstream, _seen, _) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let (proxy, metrics) = observed_target_proxy(upstream, |config| {
        config.http.header_timeout = Duration::from_millis(1000);
    })
    .await;
    let addr = proxy.local_addrs()[0];
    guard(async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Requests 100 ms apart move the timer later each time (the exchange's deadline, then
        // the next head's); then, 500 ms after the last answer, a head begun and never finished.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            read_until(&mut c, |b| b.ends_with(b"ok")).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let begun = tokio::time::Instant::now();
        c.write_all(b"GET /stalled HTTP/1.1\r\n").await.unwrap();
        let mut rest = Vec::new();
        let n = c.read_to_end(&mut rest).await.unwrap_or(0);
        let took = begun.elapsed();
        assert_eq!(n, 0, "closed without an answer: {}", text(&rest));
        // Its deadline ran from when its wait began, 500 ms before the head did: closed about
        // 500 ms after the head began, neither at a deadline the timer had before (earlier) nor
        // at one renewed by the head (1 s).
        assert!(
            took >= Duration::from_millis(450),
            "closed after {took:?}: too early"
        );
        assert!(
            took < Duration::from_millis(980),
            "closed after {took:?}: renewed"
        );
        let timeouts = metrics.error_count(
            Dir::Inbound,
            crate::error::ProxyError::DownstreamHeaderTimeout,
        );
        assert_eq!(timeouts, 1);
    })
    .await;
    proxy.stop_all();
}
