//! In-process tests of the forwarding paths on 127.0.0.1, with an injected original-destination
//! resolver instead of eBPF. No sleeps, no timing assertions: the only timeouts are guards that
//! turn a hang into a failure.
//!
//! Size: about 1,000 lines because the fixtures (describing, gated and scripted upstreams, h1/h2
//! clients) are shared by every test of the forwarding paths; split by behaviour they would have
//! to move to a fixtures module that nothing else uses.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::*;
use crate::metrics::ProxyMetrics;
use crate::net::bind;

/// Turns a hang into a failure; never an assertion about speed.
pub(super) async fn guard<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test hung")
}

pub(super) fn fixed(addr: SocketAddr) -> Resolver {
    Arc::new(move |_: &TcpStream| Ok(addr))
}

async fn start_proxy(config: ProxyConfig, resolver: Resolver) -> (Proxy, SocketAddr) {
    let proxy = start(config, resolver).await.expect("proxy starts");
    let addr = proxy.local_addrs()[0];
    (proxy, addr)
}

fn loopback_config() -> ProxyConfig {
    ProxyConfig::new(["127.0.0.1:0".parse().expect("literal")])
}

async fn intercepting(upstream: SocketAddr) -> (Proxy, SocketAddr) {
    start_proxy(loopback_config(), fixed(upstream)).await
}

type EchoBody = http_body_util::combinators::WithTrailers<
    Full<Bytes>,
    std::future::Ready<Option<Result<HeaderMap, Infallible>>>,
>;

/// An HTTP upstream (HTTP/1 and h2c) that describes each request in response headers:
/// `x-conn-id` (which accepted connection), `x-seen-*` (what arrived), and a trailer.
/// `Upgrade: echo` requests get a 101 and an echo of the upgraded bytes.
async fn http_upstream() -> SocketAddr {
    describing_upstream(false, None).await
}

/// Like [`http_upstream`], but HTTP/2 only, so it sends its SETTINGS frame as soon as it accepts,
/// as Go and hyper h2c servers do. `spoke` gets a message once that frame is on the wire.
async fn h2_only_upstream(spoke: Option<mpsc::UnboundedSender<()>>) -> SocketAddr {
    describing_upstream(true, spoke).await
}

/// Reports the first completed write, so a test can order events without sleeping.
struct NotifyOnWrite {
    inner: TcpStream,
    spoke: Option<mpsc::UnboundedSender<()>>,
}

impl tokio::io::AsyncRead for NotifyOnWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NotifyOnWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(_))) {
            if let Some(spoke) = self.spoke.take() {
                let _ = spoke.send(());
            }
        }
        polled
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn describing_upstream(
    h2_only: bool,
    spoke: Option<mpsc::UnboundedSender<()>>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let id = conns.fetch_add(1, Ordering::SeqCst);
            let service = service_fn(move |mut req: Request<Incoming>| async move {
                let mut resp =
                    Response::new(Full::new(Bytes::from_static(b"hello")).with_trailers(
                        std::future::ready(Some(Ok({
                            let mut t = HeaderMap::new();
                            t.insert("x-trailer", HeaderValue::from_static("done"));
                            t
                        }))),
                    ));
                let seen = |v: Option<&HeaderValue>| {
                    v.cloned().unwrap_or(HeaderValue::from_static("<none>"))
                };
                let h = resp.headers_mut();
                h.insert("x-conn-id", HeaderValue::from(id));
                h.insert(
                    "x-seen-peer-ip",
                    HeaderValue::from_str(&peer.ip().to_string()).unwrap(),
                );
                h.insert(
                    "x-seen-forwarded-by",
                    seen(req.headers().get("x-forwarded-by")),
                );
                h.insert("x-seen-host", seen(req.headers().get(HOST)));
                h.insert("x-seen-xff", seen(req.headers().get("x-forwarded-for")));
                h.insert(
                    "x-seen-method",
                    HeaderValue::from_str(req.method().as_str()).unwrap(),
                );
                h.insert("x-seen-connection", seen(req.headers().get(CONNECTION)));
                h.insert(
                    "x-seen-path",
                    HeaderValue::from_str(req.uri().path_and_query().map_or("", |p| p.as_str()))
                        .unwrap(),
                );
                h.insert(
                    "x-seen-authority",
                    HeaderValue::from_str(req.uri().authority().map_or("<none>", |a| a.as_str()))
                        .unwrap(),
                );
                h.insert(
                    "x-seen-version",
                    HeaderValue::from_str(&format!("{:?}", req.version())).unwrap(),
                );
                if req.headers().get(UPGRADE).is_some_and(|u| u == "echo") {
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = on_upgrade.await else {
                            return;
                        };
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = io.read(&mut buf).await {
                            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    resp.headers_mut()
                        .insert(UPGRADE, HeaderValue::from_static("echo"));
                }
                Ok::<Response<EchoBody>, Infallible>(resp)
            });
            let spoke = spoke.clone();
            tokio::spawn(async move {
                let io = TokioIo::new(NotifyOnWrite {
                    inner: stream,
                    spoke,
                });
                if h2_only {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection_with_upgrades(io, service).await;
                }
            });
        }
    });
    addr
}

/// A TCP upstream that optionally greets first, then echoes everything until EOF.
async fn tcp_upstream(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if stream.write_all(greeting).await.is_err() {
                    return;
                }
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn get(uri: &str, host: &str) -> Request<Empty<Bytes>> {
    Request::get(uri)
        .header(HOST, host)
        .body(Empty::new())
        .unwrap()
}

fn header<'a>(resp: &'a Response<Incoming>, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .map_or("<missing>", |v| v.to_str().unwrap_or("<binary>"))
}

#[tokio::test]
async fn http1_is_forwarded_with_forwarded_by_and_host_kept() {
    let upstream = http_upstream().await;
    let (_proxy, proxy_addr) = intercepting(upstream).await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        let mut req = get("/hello?x=1", "example.test:8080");
        req.headers_mut()
            .insert("x-private", HeaderValue::from_static("secret"));
        req.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("x-private"));
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-forwarded-by"), "sidecar");
        assert_eq!(header(&resp, "x-seen-host"), "example.test:8080");
        assert_eq!(header(&resp, "x-seen-path"), "/hello?x=1");
        assert_eq!(header(&resp, "x-seen-version"), "HTTP/1.1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
    })
    .await;
}

#[tokio::test]
async fn keep_alive_reuses_one_upstream_connection() {
    let upstream = http_upstream().await;
    let (_proxy, proxy_addr) = intercepting(upstream).await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        let mut ids = Vec::new();
        for _ in 0..2 {
            client.ready().await.unwrap();
            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            ids.push(header(&resp, "x-conn-id").to_owned());
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(ids[0], ids[1], "both requests on one upstream connection");
        // The connection dialled during detection was the one used: nothing else was opened.
        assert_eq!(ids[0], "0");
    })
    .await;
}

#[tokio::test]
async fn sequential_client_connections_are_served_and_drained() {
    let upstream = http_upstream().await;
    let (proxy, proxy_addr) = intercepting(upstream).await;
    guard(async {
        // The second connection's pre-dialled upstream connection stays parked (the pool has an
        // idle one) until that client connection ends; it must not hold up the drain.
        let mut first = h1_client(proxy_addr).await;
        let resp = first.send_request(get("/", "a.test")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        drop(first);
        let mut second = h1_client(proxy_addr).await;
        let resp = second.send_request(get("/", "a.test")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    })
    .await;
    assert!(guard(proxy.shutdown(Duration::from_secs(10))).await);
}

#[tokio::test]
async fn h2c_prior_knowledge_goes_upstream_as_h2_with_trailers() {
    let upstream = http_upstream().await;
    let (_proxy, proxy_addr) = intercepting(upstream).await;
    guard(async {
        let mut client = h2_client(proxy_addr).await;
        let req = Request::get("http://example.test:8080/h2path")
            .header("te", "trailers")
            .body(Empty::new())
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-version"), "HTTP/2.0");
        assert_eq!(header(&resp, "x-seen-authority"), "example.test:8080");
        assert_eq!(header(&resp, "x-seen-forwarded-by"), "sidecar");
        assert_eq!(header(&resp, "x-seen-path"), "/h2path");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers relayed");
        assert_eq!(trailers["x-trailer"], "done");
        assert_eq!(&collected.to_bytes()[..], b"hello");
    })
    .await;
}

#[tokio::test]
async fn h2c_to_a_server_that_sends_settings_first_is_still_http() {
    // Whichever arrives first at the proxy, the client preface or the server's SETTINGS, the
    // connection must be recognised as HTTP/2 (the forwarded-by header proves the HTTP path).
    let (spoke_tx, mut spoke) = mpsc::unbounded_channel();
    let upstream = h2_only_upstream(Some(spoke_tx)).await;
    let (_proxy, proxy_addr) = intercepting(upstream).await;
    guard(async {
        // First the common order (client preface first), then the server's SETTINGS
        // certainly first: the client holds its preface until the server has written.
        for settings_first in [false, true] {
            let stream = TcpStream::connect(proxy_addr).await.unwrap();
            if settings_first {
                spoke.recv().await.expect("upstream wrote its SETTINGS");
            }
            let (mut client, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
                TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let req = Request::get("http://grpc.test/svc/Method")
                .body(Empty::new())
                .unwrap();
            let resp = client.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header(&resp, "x-seen-forwarded-by"), "sidecar");
            assert_eq!(header(&resp, "x-seen-authority"), "grpc.test");
            // Drain the notification of the first round's connection.
            while spoke.try_recv().is_ok() {}
        }
    })
    .await;
}

#[test]
fn h2_settings_frame_headers_are_recognised() {
    use super::detect::is_h2_settings_header;
    assert!(is_h2_settings_header(&[0, 0, 18, 4, 0, 0, 0, 0, 0]));
    assert!(is_h2_settings_header(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
    // SETTINGS ACK, other frame types, non-zero stream, odd lengths, greetings.
    assert!(!is_h2_settings_header(&[0, 0, 0, 4, 1, 0, 0, 0, 0]));
    assert!(!is_h2_settings_header(&[0, 0, 8, 6, 0, 0, 0, 0, 0]));
    assert!(!is_h2_settings_header(&[0, 0, 6, 4, 0, 0, 0, 0, 1]));
    assert!(!is_h2_settings_header(&[0, 0, 7, 4, 0, 0, 0, 0, 0]));
    assert!(!is_h2_settings_header(b"220 ready"));
}

#[tokio::test]
async fn opaque_tcp_is_relayed_byte_exact() {
    let upstream = tcp_upstream(b"").await;
    let (_proxy, proxy_addr) = intercepting(upstream).await;
    // Starts like a TLS record, so detection decides "opaque" from the first byte.
    let payload: Vec<u8> = (0..256 * 1024u32)
        .map(|i| if i == 0 { 0x16 } else { (i * 7 + 3) as u8 })
        .collect();
    let expected = payload.clone();
    let received = guard(async move {
        let stream = TcpStream::connect(proxy_addr).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&payload).await.unwrap();
            // Half-close: the echo server sees EOF and closes, which ends our read.
            w.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        r.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        received
    })
    .await;
    assert_eq!(received.len(), expected.len());
    assert!(received == expected, "bytes differ");
}

#[tokio::test]
async fn server_speaks_first_without_detection_delay() {
    let upstream = tcp_upstream(b"220 ready\r\n").await;
    let mut config = loopback_config();
    // A detection wait would now last a minute and trip the 20 s hang guard.
    config.detect_timeout = Duration::from_secs(60);
    let (_proxy, proxy_addr) = start_proxy(config, fixed(upstream)).await;
    guard(async {
        let mut stream = TcpStream::connect(proxy_addr).await.unwrap();
        let mut greeting = [0u8; 11];
        stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 ready\r\n");
        // And the connection stays a faithful relay afterwards.
        stream.write_all(b"EHLO x\r\n").await.unwrap();
        let mut echo = [0u8; 8];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"EHLO x\r\n");
    })
    .await;
}

#[tokio::test]
async fn refused_upstream_gives_502_naming_the_culprit() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let (_proxy, proxy_addr) = intercepting(closed).await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        let resp = client.send_request(get("/", "gone.test")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(header(&resp, "x-sidecar-error"), "upstream-connect-refused");
    })
    .await;
}

#[tokio::test]
async fn refused_upstream_resets_opaque_client() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let (_proxy, proxy_addr) = intercepting(closed).await;
    guard(async {
        let mut stream = TcpStream::connect(proxy_addr).await.unwrap();
        stream.write_all(&[0x16, 3, 1, 0, 5]).await.unwrap();
        let mut buf = [0u8; 16];
        let outcome = stream.read(&mut buf).await;
        assert!(
            matches!(&outcome, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{outcome:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn target_mode_sends_everything_to_the_target() {
    let upstream = http_upstream().await;
    let mut config = loopback_config();
    config.target = Some(Target::parse(&format!("http://{upstream}")).unwrap());
    let no_resolver: Resolver =
        Arc::new(|_: &TcpStream| Err(io::Error::other("no lookup in target mode")));
    let (_proxy, proxy_addr) = start_proxy(config, no_resolver).await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        let resp = client.send_request(get("/t", "front.test")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-forwarded-by"), "sidecar");
        assert_eq!(header(&resp, "x-seen-host"), "front.test");
        assert_eq!(header(&resp, "x-seen-path"), "/t");

        // h2c clients are served too; the upstream hop is HTTP/1.1 with the authority as Host.
        let mut h2 = h2_client(proxy_addr).await;
        let req = Request::get("http://front.test/h2")
            .body(Empty::new())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-version"), "HTTP/1.1");
        assert_eq!(header(&resp, "x-seen-host"), "front.test");
        assert_eq!(header(&resp, "x-seen-forwarded-by"), "sidecar");
    })
    .await;
}

#[tokio::test]
async fn target_mode_prefixes_the_target_path() {
    let upstream = http_upstream().await;
    let mut config = loopback_config();
    config.target = Some(Target::parse(&format!("http://{upstream}/api/")).unwrap());
    let (_proxy, proxy_addr) = start_proxy(config, fixed(upstream)).await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        let resp = client.send_request(get("/v1?q=2", "x")).await.unwrap();
        assert_eq!(header(&resp, "x-seen-path"), "/api/v1?q=2");
    })
    .await;
}

#[tokio::test]
async fn upgrade_is_tunnelled() {
    let upstream = http_upstream().await;
    let (_proxy, proxy_addr) = intercepting(upstream).await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        let req = Request::get("/ws")
            .header(HOST, "ws.test")
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "echo")
            .body(Empty::new())
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(header(&resp, "x-seen-connection"), "upgrade");
        let upgraded = hyper::upgrade::on(resp).await.unwrap();
        let mut io = TokioIo::new(upgraded);
        io.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    })
    .await;
}

#[tokio::test]
async fn destination_equal_to_own_listener_is_refused() {
    let own: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
    let resolver_own = Arc::clone(&own);
    let resolver: Resolver = Arc::new(move |_: &TcpStream| {
        resolver_own
            .get()
            .copied()
            .ok_or_else(|| io::Error::other("not started"))
    });
    let (_proxy, proxy_addr) = start_proxy(loopback_config(), resolver).await;
    own.set(proxy_addr).unwrap();
    guard(async {
        let mut stream = TcpStream::connect(proxy_addr).await.unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let outcome = stream.read(&mut buf).await;
        assert!(matches!(outcome, Ok(0) | Err(_)), "{outcome:?}");
    })
    .await;
}

#[tokio::test]
async fn direct_dial_without_redirect_is_closed() {
    // The real resolver: on a plain loopback connection SO_ORIGINAL_DST either fails or (with
    // conntrack) names our own listener; both end in a close.
    let (_proxy, proxy_addr) = start_proxy(loopback_config(), original_dst_resolver()).await;
    guard(async {
        let mut stream = TcpStream::connect(proxy_addr).await.unwrap();
        let mut buf = [0u8; 64];
        let outcome = stream.read(&mut buf).await;
        assert!(matches!(outcome, Ok(0) | Err(_)), "{outcome:?}");
    })
    .await;
}

#[tokio::test]
async fn shutdown_drains_and_stops_accepting() {
    let upstream = http_upstream().await;
    let (proxy, proxy_addr) = intercepting(upstream).await;
    let mut client = guard(h1_client(proxy_addr)).await;
    let resp = guard(client.send_request(get("/", "a.test")))
        .await
        .unwrap();
    guard(resp.into_body().collect()).await.unwrap();
    // An idle keep-alive connection does not hold the drain up.
    assert!(guard(proxy.shutdown(Duration::from_secs(10))).await);
    assert!(TcpStream::connect(proxy_addr).await.is_err());
}

#[tokio::test]
async fn optional_listener_that_cannot_bind_is_skipped() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = loopback_config();
    config.listen.push(ListenAddr {
        addr: taken.local_addr().unwrap(),
        required: false,
    });
    let proxy = start(config.clone(), fixed(taken.local_addr().unwrap()))
        .await
        .unwrap();
    assert_eq!(proxy.local_addrs().len(), 1);
    config.listen[1].required = true;
    let err = start(config, fixed(taken.local_addr().unwrap()))
        .await
        .err()
        .expect("a required listener must bind");
    assert!(err.to_string().contains("cannot listen on"), "{err}");
}

#[tokio::test]
async fn partial_preface_waits_for_more_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let mut buf = [0u8; MAX_DETECT_LEN];
    client.write_all(b"GE").await.unwrap();
    let n = guard(outbound_client_bytes(&server, &mut buf, 0))
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(classify(&buf[..n], false), Detection::NeedMore);
    {
        // With no new bytes, waiting for more must not complete.
        let more = outbound_client_bytes(&server, &mut buf, 2);
        tokio::pin!(more);
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(more.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        let n = guard(more).await.unwrap();
        assert!(n > 2);
    }
    assert_eq!(classify(&buf[..6], false), Detection::Http1);
}

use detect::client_bytes as outbound_client_bytes;

/// `--workers 2` runs a multi-threaded runtime: the same paths must hold there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_works_on_a_multi_threaded_runtime() {
    let http = http_upstream().await;
    let (_proxy, proxy_addr) = intercepting(http).await;
    let tcp = tcp_upstream(b"").await;
    let (_tcp_proxy, tcp_proxy_addr) = intercepting(tcp).await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        for _ in 0..3 {
            client.ready().await.unwrap();
            let resp = client.send_request(get("/mt", "mt.test")).await.unwrap();
            assert_eq!(header(&resp, "x-seen-forwarded-by"), "sidecar");
            resp.into_body().collect().await.unwrap();
        }
        let mut stream = TcpStream::connect(tcp_proxy_addr).await.unwrap();
        stream.write_all(b"\x00binary\xff").await.unwrap();
        let mut back = [0u8; 8];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"\x00binary\xff");
    })
    .await;
}

fn erroring() -> Resolver {
    Arc::new(|_: &TcpStream| Err(io::Error::other("not this direction")))
}

/// Inbound on 127.0.0.1 with `dst` standing in for what sk_lookup would have kept as the local
/// address (a test cannot steer SYNs).
async fn inbound_to(dst: SocketAddr) -> (Proxy, SocketAddr) {
    let mut config = loopback_config();
    config.inbound = vec![ListenAddr {
        addr: "127.0.0.1:0".parse().unwrap(),
        required: true,
    }];
    let proxy = start_with_resolvers(
        config,
        Resolvers {
            outbound: erroring(),
            inbound: fixed(dst),
        },
    )
    .await
    .unwrap();
    let addr = proxy.inbound_addrs()[0];
    (proxy, addr)
}

#[tokio::test]
async fn inbound_http_reaches_the_app_from_the_passthrough_address() {
    let app = http_upstream().await;
    let (_proxy, inbound) = inbound_to(app).await;
    guard(async {
        let mut client = h1_client(inbound).await;
        let resp = client
            .send_request(get("/in", "10.200.0.2:8080"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-forwarded-by"), "sidecar");
        assert_eq!(header(&resp, "x-seen-host"), "10.200.0.2:8080");
        assert_eq!(header(&resp, "x-seen-peer-ip"), "127.0.0.6");
    })
    .await;
}

#[tokio::test]
async fn inbound_opaque_tcp_is_relayed() {
    let app = tcp_upstream(b"+OK\r\n").await;
    let (_proxy, inbound) = inbound_to(app).await;
    guard(async {
        let mut stream = TcpStream::connect(inbound).await.unwrap();
        let mut greeting = [0u8; 5];
        stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"+OK\r\n");
        stream.write_all(b"\x01\x02").await.unwrap();
        let mut echo = [0u8; 2];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"\x01\x02");
    })
    .await;
}

#[tokio::test]
async fn inbound_connection_dialled_directly_is_closed() {
    // With the real inbound lookup (the local address), a client that dials the inbound port
    // itself would be forwarded to the proxy again.
    let mut config = loopback_config();
    config.inbound = vec![ListenAddr {
        addr: "127.0.0.1:0".parse().unwrap(),
        required: true,
    }];
    let proxy = start_with_resolvers(config, Resolvers::kernel())
        .await
        .unwrap();
    let inbound = proxy.inbound_addrs()[0];
    guard(async {
        let mut stream = TcpStream::connect(inbound).await.unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let outcome = stream.read(&mut buf).await;
        assert!(matches!(outcome, Ok(0) | Err(_)), "{outcome:?}");
    })
    .await;
}

#[tokio::test]
async fn ipv4_and_ipv6_wildcards_bind_the_same_port() {
    let v4 = bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let port = v4.local_addr().unwrap().port();
    // Hosts with IPv6 disabled cannot run this case.
    if TcpListener::bind("[::1]:0").await.is_err() {
        return;
    }
    let v6 = bind(SocketAddr::new("::".parse().unwrap(), port));
    assert!(
        v6.is_ok(),
        "IPV6_V6ONLY must let [::] share the port: {v6:?}"
    );
}

#[tokio::test]
async fn target_mode_has_no_inbound_side() {
    let upstream = http_upstream().await;
    let mut config = loopback_config();
    config.inbound = vec![ListenAddr {
        addr: "127.0.0.1:0".parse().unwrap(),
        required: true,
    }];
    config.target = Some(Target::parse(&format!("http://{upstream}")).unwrap());
    let proxy = start(config, erroring()).await.unwrap();
    assert!(proxy.inbound_addrs().is_empty());
}

/// An HTTP/1 upstream whose answers wait until the test lets them go (`gate`); counts the
/// connections it accepted and the requests it has received.
async fn gated_upstream() -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<tokio::sync::Semaphore>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (acc, rec, g) = (accepted.clone(), received.clone(), gate.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            acc.fetch_add(1, Ordering::SeqCst);
            let (rec, g) = (rec.clone(), g.clone());
            let service = service_fn(move |_req: Request<Incoming>| {
                let (rec, g) = (rec.clone(), g.clone());
                async move {
                    rec.fetch_add(1, Ordering::SeqCst);
                    g.acquire().await.expect("gate open").forget();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted, received, gate)
}

/// An intercepting proxy to `upstream` with its default policy adjusted by `policy`, and the
/// outbound connection metrics (where the pool's gauges are) to watch it by.
async fn pooled_proxy(
    upstream: SocketAddr,
    policy: impl FnOnce(&mut crate::policy::DestinationPolicy),
) -> (Proxy, SocketAddr, crate::metrics::ConnMetrics) {
    let (proxy, addr, metrics) = observed_proxy(upstream, policy).await;
    (proxy, addr, metrics.conns(Dir::Outbound).clone())
}

/// [`pooled_proxy`], with all of its metrics.
async fn observed_proxy(
    upstream: SocketAddr,
    policy: impl FnOnce(&mut crate::policy::DestinationPolicy),
) -> (Proxy, SocketAddr, Arc<ProxyMetrics>) {
    configured_proxy(upstream, |c| policy(&mut c.policy.defaults)).await
}

/// An intercepting proxy to `upstream`, its configuration adjusted by `configure`, with its
/// metrics.
async fn configured_proxy(
    upstream: SocketAddr,
    configure: impl FnOnce(&mut ProxyConfig),
) -> (Proxy, SocketAddr, Arc<ProxyMetrics>) {
    let metrics = ProxyMetrics::unregistered();
    let mut config = loopback_config();
    configure(&mut config);
    let telemetry = Telemetry {
        metrics: Arc::clone(&metrics),
        access_log: false,
    };
    let resolvers = Resolvers {
        outbound: fixed(upstream),
        inbound: local_addr_resolver(),
    };
    let proxy = start_observed(config, resolvers, telemetry).await.unwrap();
    let proxy_addr = proxy.local_addrs()[0];
    (proxy, proxy_addr, metrics)
}

/// Yields to the runtime until `done` holds (the proxy and the clients run on this same
/// single-threaded runtime, so each yield lets them make progress); `guard` bounds it.
pub(super) async fn until(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn connection_limit_queues_requests_instead_of_dialling() {
    let (upstream, accepted, received, gate) = gated_upstream().await;
    let (proxy, proxy_addr, pool) = pooled_proxy(upstream, |p| {
        p.max_connections = 2;
    })
    .await;
    guard(async {
        // One request first: the pool now knows the destination speaks HTTP/1, so the client
        // connections below are not pre-dialled (which would open connections outside the pool).
        gate.add_permits(1);
        let mut first = h1_client(proxy_addr).await;
        let resp = first.send_request(get("/", "a.test")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(tokio::spawn(async move {
                let mut client = h1_client(proxy_addr).await;
                let resp = client.send_request(get("/", "a.test")).await.unwrap();
                let status = resp.status();
                resp.into_body().collect().await.unwrap();
                status
            }));
        }
        // Two requests reach the upstream (the idle connection and one new one); three queue.
        until(|| pool.upstream_waits.get() == 3 && received.load(Ordering::SeqCst) == 3).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "no dial past the limit");
        assert_eq!(pool.upstream_open.get(), 2);
        gate.add_permits(5);
        for client in clients {
            assert_eq!(client.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(received.load(Ordering::SeqCst), 6);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "queued requests reused the two"
        );
        assert_eq!(pool.upstream_open.get(), 2);
    })
    .await;
    drop(proxy);
}

#[tokio::test]
async fn failed_dial_and_abandoned_body_free_their_slots() {
    // A refused destination: each failed dial must give its slot back, or a limit of 1 would
    // block the second request for ever.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = listener.local_addr().unwrap();
    drop(listener);
    let (proxy, proxy_addr, pool) = pooled_proxy(refused, |p| {
        p.max_connections = 1;
        p.retry.max_retries = 0;
        p.breaker.consecutive_failures = 0;
    })
    .await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        for _ in 0..2 {
            client.ready().await.unwrap();
            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(pool.upstream_open.get(), 0);
    })
    .await;
    drop(proxy);

    // A client that goes away mid-body: that connection cannot be reused and is closed; the
    // next request gets a new one.
    let (upstream, accepted, _received, gate) = gated_upstream().await;
    let (proxy, proxy_addr, pool) = pooled_proxy(upstream, |p| {
        p.max_connections = 1;
    })
    .await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        let sent = client.send_request(get("/", "a.test"));
        // The client gives up before the answer: the upstream connection is closed.
        until(|| pool.upstream_open.get() == 1).await;
        drop(sent);
        drop(client);
        gate.add_permits(2);
        until(|| pool.upstream_open.get() == 0).await;
        let mut client = h1_client(proxy_addr).await;
        let resp = client.send_request(get("/", "a.test")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
        assert!(accepted.load(Ordering::SeqCst) >= 2);
        assert_eq!(pool.upstream_open.get(), 1);
    })
    .await;
    drop(proxy);
}

#[tokio::test]
async fn upstream_closing_an_idle_connection_frees_its_slot() {
    // Answers one request per connection, then closes it (as a server whose keep-alive
    // timeout passed would), without saying so in the response.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let (proxy, proxy_addr, pool) = pooled_proxy(upstream, |p| {
        p.max_connections = 1;
    })
    .await;
    guard(async {
        let mut client = h1_client(proxy_addr).await;
        for round in 1..=3 {
            client.ready().await.unwrap();
            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "round {round}");
            resp.into_body().collect().await.unwrap();
            // The closed connection gives its slot back by itself: with a limit of 1, the
            // next request could not be served otherwise.
            until(|| pool.upstream_open.get() == 0).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    })
    .await;
    drop(proxy);
}

/// Only answers the proxy made itself count as its errors: another sidecar's 502 with its own
/// `x-sidecar-error` is relayed as it is and not counted here (the error travels as a response
/// extension, never parsed back out of the header); a refused connect is counted.
#[tokio::test]
async fn relayed_error_headers_are_not_counted_as_ours() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 502 Bad Gateway\r\nx-sidecar-error: upstream-connect-refused\r\n\
                          content-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let refused_code = crate::error::ProxyError::UpstreamConnectRefused;
    guard(async {
        for (dst, counted) in [(upstream, 0), (refused, 1)] {
            let (_proxy, addr, metrics) = observed_proxy(dst, |_| {}).await;
            let mut client = h1_client(addr).await;
            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
            assert_eq!(
                resp.headers()["x-sidecar-error"],
                "upstream-connect-refused"
            );
            assert_eq!(
                metrics.error_count(Dir::Outbound, refused_code),
                counted,
                "{dst}: relayed answers are not ours, local ones are"
            );
        }
    })
    .await;
}

/// While alive, the process has no free file descriptor: the soft `RLIMIT_NOFILE` is lowered to
/// the lowest free descriptor number. Restored on drop.
struct NoFreeDescriptors {
    saved: (u64, u64),
}

impl NoFreeDescriptors {
    fn now() -> Self {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let saved = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let lowest_free = {
            let probe = std::fs::File::open("/dev/null").unwrap();
            std::os::fd::AsRawFd::as_raw_fd(&probe) as u64
        };
        setrlimit(Resource::RLIMIT_NOFILE, lowest_free, saved.1).unwrap();
        NoFreeDescriptors { saved }
    }
}

impl Drop for NoFreeDescriptors {
    fn drop(&mut self) {
        use nix::sys::resource::{setrlimit, Resource};
        let _ = setrlimit(Resource::RLIMIT_NOFILE, self.saved.0, self.saved.1);
    }
}

/// A proxy out of file descriptors answers 503 `proxy-local-resources`, and that is not the
/// destination's failure: its breaker (set to open at the first failure) stays closed, and the
/// next request, once descriptors are free again, goes through.
///
/// The descriptor limit is per process: the test runs its body in a child process of its own
/// (the test binary, re-run for this one test), whatever runner started it.
#[test]
fn out_of_descriptors_is_not_the_destinations_failure() {
    const CHILD: &str = "SIDECAR_TEST_FD_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "proxy::tests::out_of_descriptors_is_not_the_destinations_failure",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = closing_upstream().await;
        let (_proxy, addr, metrics) = observed_proxy(upstream, |p| {
            p.breaker.consecutive_failures = 1;
            p.retry.max_retries = 0;
        })
        .await;
        guard(async {
            let mut client = h1_client(addr).await;
            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.unwrap();
            let pool = metrics.conns(Dir::Outbound).clone();
            until(|| pool.upstream_open.get() == 0).await;

            let limit = NoFreeDescriptors::now();
            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            drop(limit);
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()["x-sidecar-error"], "proxy-local-resources");
            resp.into_body().collect().await.unwrap();

            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "the breaker did not open");
            let local = crate::error::ProxyError::ProxyLocalResources;
            assert_eq!(metrics.error_count(Dir::Outbound, local), 1);
        })
        .await;
    });
}

/// Sends `request` as raw bytes and reads the whole answer (the proxy closes after it).
async fn raw_exchange(proxy: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A response with both Transfer-Encoding and Content-Length (a response-splitting attempt, or a
/// broken server): the native engine refuses it (502: which one frames the body is the classic
/// desync); hyper's forwards it as one message framed by its chunks, with no stale
/// Content-Length that would cut it. Neither relays a second message carved out of it.
#[tokio::test]
async fn response_with_te_and_cl_is_refused_or_framed_by_its_chunks() {
    let upstream = raw_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\
          connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    for engine in [Http1Engine::Native, Http1Engine::Hyper] {
        let mut config = loopback_config();
        config.http.http1_engine = engine;
        let (_proxy, addr) = start_proxy(config, fixed(upstream)).await;
        guard(async {
            let mut client = h1_client(addr).await;
            let resp = client.send_request(get("/", "a.test")).await.unwrap();
            if engine == Http1Engine::Native {
                assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
                assert_eq!(resp.headers()["x-sidecar-error"], "upstream-protocol-error");
                return;
            }
            assert_eq!(resp.status(), StatusCode::OK);
            assert_ne!(
                resp.headers().get("content-length").map(|v| v.as_bytes()),
                Some(&b"3"[..]),
                "the upstream's Content-Length is not passed on"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hello world");
        })
        .await;
    }
}

/// A request with two Host headers is refused (400), not forwarded for the upstream to pick one.
#[tokio::test]
async fn duplicate_host_is_refused() {
    let (upstream, heads) = counting_upstream().await;
    let (_proxy, addr) = intercepting(upstream).await;
    guard(async {
        let answer = raw_exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: a.test\r\nhost: admin.internal\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.contains("x-sidecar-error: proxy-bad-request"),
            "{answer}"
        );
    })
    .await;
    assert_eq!(
        heads.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );
}

/// Reads until the peer closes (or resets); returns what arrived.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out
}

/// A client that sends part of a request head and stalls is closed at the header timeout (and
/// so is a kept-alive connection that stays idle); meanwhile other clients are served.
#[tokio::test]
async fn stalled_heads_and_idle_keep_alive_are_closed_at_the_header_timeout() {
    let (upstream, _) = counting_upstream().await;
    let timeout = Duration::from_millis(300);
    let (_proxy, addr, metrics) =
        configured_proxy(upstream, |c| c.http.header_timeout = timeout).await;
    guard(async {
        let started = tokio::time::Instant::now();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\nx-slow: 1")
            .await
            .unwrap();
        // Served meanwhile.
        let answer = raw_exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        read_until_closed(&mut stalled).await;
        assert!(
            started.elapsed() >= timeout,
            "closed at the timeout, not before"
        );

        // Keep-alive: one request, then silence.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&read_until_closed(&mut idle).await).into_owned();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "answered, then closed when idle: {answer}"
        );
        let timeouts = crate::error::ProxyError::DownstreamHeaderTimeout;
        until(|| metrics.error_count(Dir::Outbound, timeouts) == 2).await;
    })
    .await;
}

/// A request head over `max_header_bytes` is answered 431 and the connection closed, before the
/// proxy buffers more of it.
#[tokio::test]
async fn oversized_heads_are_refused_with_431() {
    let (upstream, heads) = counting_upstream().await;
    let (_proxy, addr, metrics) =
        configured_proxy(upstream, |c| c.http.max_header_bytes = 4096).await;
    guard(async {
        let big = format!(
            "GET / HTTP/1.1\r\nhost: a.test\r\nx-big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The proxy may close while we are still writing: that is the point.
        let _ = s.write_all(big.as_bytes()).await;
        let answer = String::from_utf8_lossy(&read_until_closed(&mut s).await).into_owned();
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
        let too_large = crate::error::ProxyError::DownstreamHeadTooLarge;
        until(|| metrics.error_count(Dir::Outbound, too_large) == 1).await;
        let fine = raw_exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(fine.starts_with("HTTP/1.1 200"), "{fine}");
    })
    .await;
    assert_eq!(
        heads.load(Ordering::SeqCst),
        1,
        "only the normal request went upstream"
    );
}

/// At `max_connections` open in a direction, new connections are reset at accept and counted;
/// once one closes, new ones are served again.
#[tokio::test]
async fn connections_past_the_cap_are_refused_at_accept() {
    let (upstream, _) = counting_upstream().await;
    let (proxy, addr, metrics) = configured_proxy(upstream, |c| c.max_connections = 2).await;
    guard(async {
        let first = TcpStream::connect(addr).await.unwrap();
        let _second = TcpStream::connect(addr).await.unwrap();
        until(|| proxy.active(Dir::Outbound).get() == 2).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        let _ = third
            .write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
            .await;
        let answer = read_until_closed(&mut third).await;
        assert!(answer.is_empty(), "refused, not served: {answer:?}");
        let refused = metrics.conns(Dir::Outbound).refused.clone();
        assert_eq!(refused.get(), 1);
        assert_eq!(proxy.active(Dir::Outbound).get(), 2);

        drop(first);
        until(|| proxy.active(Dir::Outbound).get() == 1).await;
        let answer = raw_exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(refused.get(), 1);
    })
    .await;
}

/// Every valid request-line form reaching the app inbound is proxied as HTTP: the app sees the
/// proxy's headers and the real client after whatever `X-Forwarded-For` the client forged, never
/// the client's bytes passed through as they were.
#[tokio::test]
async fn inbound_request_line_forms_are_proxied_as_http() {
    let app = http_upstream().await;
    let (_proxy, inbound) = inbound_to(app).await;
    let forms: [(&str, &str); 4] = [
        ("\r\nGET /a HTTP/1.1", "GET"),
        ("get /a HTTP/1.1", "get"),
        ("PROPFIND /a HTTP/1.1", "PROPFIND"),
        ("GET http://app.test/a HTTP/1.1", "GET"),
    ];
    guard(async {
        for (line, method) in forms {
            let request = format!(
                "{line}\r\nhost: app.test\r\nx-forwarded-for: 6.6.6.6\r\nconnection: close\r\n\r\n"
            );
            let answer = raw_exchange(inbound, request.as_bytes()).await;
            let has = |h: &str| answer.lines().any(|l| l.eq_ignore_ascii_case(h));
            assert!(answer.starts_with("HTTP/1.1 200"), "{line:?}: {answer}");
            assert!(has("x-seen-forwarded-by: sidecar"), "{line:?}: {answer}");
            assert!(has("x-seen-xff: 6.6.6.6, 127.0.0.1"), "{line:?}: {answer}");
            assert!(
                has(&format!("x-seen-method: {method}")),
                "{line:?}: {answer}"
            );
            assert!(has("x-seen-path: /a"), "{line:?}: {answer}");
        }
    })
    .await;
}

/// An app that reads each request's whole body before answering `200 ok` (as most do), and
/// counts the requests it has started.
async fn body_reading_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&started);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, started)
}

/// More slow inbound clients than outbound's per-destination connection limit (128), each
/// holding a connection to the app with a body that does not come: another inbound client is
/// still answered, because inbound has its own, larger limit.
#[tokio::test]
async fn slow_inbound_clients_do_not_starve_the_others() {
    const SLOW: usize = 600;
    let (app, started) = body_reading_app().await;
    let proxy = both_ways_to(app, |_| {}).await;
    let (inbound, outbound) = (proxy.inbound_addrs()[0], proxy.local_addrs()[0]);
    guard(async {
        let mut slow = Vec::new();
        for _ in 0..SLOW {
            let mut s = TcpStream::connect(inbound).await.unwrap();
            s.write_all(b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 1000\r\n\r\nabc")
                .await
                .unwrap();
            slow.push(s);
        }
        // Every slow request holds a connection to the app.
        until(|| started.load(Ordering::SeqCst) >= SLOW).await;
        let asked = tokio::time::Instant::now();
        let answer = raw_exchange(
            inbound,
            b"GET /fast HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        eprintln!(
            "an inbound GET among {SLOW} slow POSTs: answered in {:?}",
            asked.elapsed()
        );
        // Outbound (its own pool) is not affected either.
        let answer = raw_exchange(
            outbound,
            b"GET /out HTTP/1.1\r\nhost: dep\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(slow);
    })
    .await;
}

/// Connections on which neither side says anything are closed after the idle timeout (as idle
/// opaque ones are), so silent clients cannot pile up; the proxy's connection count returns to 0.
#[tokio::test]
async fn silent_connections_are_closed_at_the_idle_timeout() {
    const SILENT: usize = 200;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    // A server that never speaks either (holds what it accepts).
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let idle = Duration::from_millis(300);
    let (proxy, addr, _) =
        configured_proxy(upstream, |c| c.policy.defaults.idle_timeout = idle).await;
    guard(async {
        let started = tokio::time::Instant::now();
        let mut silent = Vec::new();
        for _ in 0..SILENT {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        for s in &mut silent {
            read_until_closed(s).await;
        }
        assert!(started.elapsed() >= idle, "not before the idle timeout");
        until(|| proxy.active(Dir::Outbound).get() == 0).await;
    })
    .await;
}

/// Inbound at its connection limit is reported for `/ready` (so that the pod leaves its Service's
/// endpoints while it refuses new clients), and clears once a connection closes.
#[tokio::test]
async fn inbound_at_the_cap_reports_overload() {
    let app = http_upstream().await;
    let proxy = both_ways_to(app, |c| c.max_connections = 1).await;
    let load = proxy.inbound_load();
    guard(async {
        assert_eq!(load(), Ok(()));
        let held = TcpStream::connect(proxy.inbound_addrs()[0]).await.unwrap();
        until(|| proxy.active(Dir::Inbound).get() == 1).await;
        let err = load().unwrap_err();
        assert!(err.starts_with("overloaded"), "{err}");
        drop(held);
        until(|| proxy.active(Dir::Inbound).get() == 0).await;
        assert_eq!(load(), Ok(()));
    })
    .await;
}

/// `200 ok`, then the connection closes.
pub(super) const OK_THEN_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";

/// An upstream that reads each connection's request head, answers `answer` byte for byte and
/// closes (so that each request through the proxy dials anew); counts the heads it received.
pub(super) async fn answering_upstream(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(answer).await;
            });
        }
    });
    (addr, heads)
}

async fn closing_upstream() -> SocketAddr {
    answering_upstream(OK_THEN_CLOSE).await.0
}

async fn raw_upstream(answer: &'static [u8]) -> SocketAddr {
    answering_upstream(answer).await.0
}

async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    answering_upstream(OK_THEN_CLOSE).await
}

/// A proxy with both directions going to `app` (an inbound listener on loopback too), its
/// configuration adjusted by `configure`.
async fn both_ways_to(app: SocketAddr, configure: impl FnOnce(&mut ProxyConfig)) -> Proxy {
    let mut config = loopback_config();
    config.inbound = vec![ListenAddr {
        addr: "127.0.0.1:0".parse().unwrap(),
        required: true,
    }];
    configure(&mut config);
    start_with_resolvers(
        config,
        Resolvers {
            outbound: fixed(app),
            inbound: fixed(app),
        },
    )
    .await
    .unwrap()
}

/// The size of the future `f` returns (without calling it).
fn future_size<A, B, C, D, E, F: Future>(_: fn(A, B, C, D, E) -> F) -> usize {
    size_of::<F>()
}

/// Every connection's task holds its future for the connection's whole life, so the future is
/// memory per connection. A captured connection's is the size of its largest phase (the HTTP/1
/// engine's loop), not of every phase together: 12.5 KB when detection, the opaque relay, mesh
/// TLS and hyper were all held inline; 744 bytes (release) until the engine's loop stopped
/// keeping a parsed head across awaits and its head reader its arguments twice, and the
/// connection's guards and rarely set fields (the caller, the transcoder) shrank: 512 then;
/// the client's address for the access log (18 bytes, its observer now shared) came in with
/// the drain token (found through the shared state) and those two boxes made one.
/// tokio allocates a task in steps of 128 bytes (its cell is 128-aligned) with 112 bytes of its
/// own: up to 528 bytes of future, the task is 640 bytes (it was 896).
#[test]
fn a_captured_connection_task_holds_one_phase_at_a_time() {
    let size = future_size(transparent::serve);
    // Debug builds lay out a little more (528); the bound holds for both.
    eprintln!("a captured connection's task: {size} bytes");
    assert!(size <= 528, "a captured connection's task is {size} bytes");
}
