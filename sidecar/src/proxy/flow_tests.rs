//! The policies (`crate::policy::exchange`) on the real request path, in process: a proxy on 127.0.0.1 with an injected
//! original destination, scripted upstreams (status by request number, resetting, hanging).
//! Timing is only asserted as "not before the configured time" (and bounded by a guard).
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::policy::breaker::BreakerConfig;
use crate::policy::{headers, DestinationPolicy, PolicyConfig};
use crate::proxy::{self, Proxy, ProxyConfig, Resolver};

async fn guard<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test hung")
}

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// An HTTP/1 upstream answering `status(n)` to its n-th request (0-based), recording each.
async fn scripted(status: impl Fn(usize) -> u16 + Send + Sync + 'static) -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let status = Arc::new(status);
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let (seen, status) = (Arc::clone(&seen), Arc::clone(&status));
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (seen, status) = (Arc::clone(&seen), Arc::clone(&status));
                    async move {
                        let (head, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let n = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(Seen {
                                method: head.method,
                                headers: head.headers,
                                body,
                            });
                            seen.len() - 1
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(format!("answer {n}"))));
                        *resp.status_mut() = StatusCode::from_u16(status(n)).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (addr, log)
}

/// Accepts, reads the request, then resets the connection (SO_LINGER 0).
async fn resetting() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = socket.set_zero_linger();
            drop(socket);
        }
    });
    addr
}

/// Accepts and reads, never answers (the sockets stay open until the test ends).
async fn hanging() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            held.push(socket);
        }
    });
    addr
}

async fn refusing() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn proxy_to(upstream: SocketAddr, policy: PolicyConfig) -> (Proxy, SocketAddr) {
    let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
    config.policy = policy;
    let resolver: Resolver = Arc::new(move |_: &TcpStream| Ok(upstream));
    let proxy = proxy::start(config, resolver).await.expect("proxy starts");
    let addr = proxy.local_addrs()[0];
    (proxy, addr)
}

/// Short times and no jitter wait, so tests are quick.
fn policy(f: impl FnOnce(&mut DestinationPolicy)) -> PolicyConfig {
    let mut defaults = DestinationPolicy {
        request_timeout: Duration::from_secs(5),
        ..DestinationPolicy::default()
    };
    defaults.retry.backoff = Duration::ZERO;
    f(&mut defaults);
    PolicyConfig {
        defaults,
        ..PolicyConfig::default()
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }
}

/// One request on a fresh connection to the proxy.
async fn send(
    proxy: SocketAddr,
    method: Method,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Answer {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri("/")
        .header("host", "svc.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (head, body) = resp.into_parts();
    Answer {
        status: head.status,
        headers: head.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn get(proxy: SocketAddr) -> Answer {
    send(proxy, Method::GET, &[], "").await
}

#[tokio::test]
async fn breaker_opens_after_exactly_n_failures_and_answers_503_without_the_upstream() {
    guard(async {
        let (upstream, log) = scripted(|_| 500).await;
        let (_proxy, addr) = proxy_to(
            upstream,
            policy(|p| {
                p.breaker.consecutive_failures = 3;
                p.breaker.open_time = Duration::from_secs(60);
            }),
        )
        .await;
        for i in 0..3 {
            let a = get(addr).await;
            assert_eq!(a.status, 500, "request {i} reaches the upstream");
            assert_eq!(
                a.header("x-sidecar-error"),
                "",
                "an upstream answer, not ours"
            );
        }
        let a = get(addr).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.header("x-sidecar-error"), "upstream-breaker-open");
        assert!(!a.header("x-request-id").is_empty());
        let retry_after: u64 = a.header("retry-after").parse().unwrap();
        assert!((59..=60).contains(&retry_after), "{retry_after}");
        assert_eq!(
            log.lock().unwrap().len(),
            3,
            "the open breaker did not send it"
        );
    })
    .await;
}

#[tokio::test]
async fn breaker_half_opens_after_the_open_time_and_closes_on_success() {
    guard(async {
        // Two failures, then healthy.
        let (upstream, log) = scripted(|n| if n < 2 { 500 } else { 200 }).await;
        let open_time = Duration::from_millis(300);
        let (_proxy, addr) = proxy_to(
            upstream,
            policy(|p| {
                p.breaker.consecutive_failures = 2;
                p.breaker.open_time = open_time;
            }),
        )
        .await;
        get(addr).await;
        get(addr).await;
        let opened = tokio::time::Instant::now();
        assert_eq!(get(addr).await.status, 503);
        // Poll until the probe goes through; never earlier than the open time.
        let probe = loop {
            let a = get(addr).await;
            if a.status != 503 {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(opened.elapsed() >= open_time - Duration::from_millis(5));
        assert_eq!(probe.status, 200);
        assert_eq!(get(addr).await.status, 200, "closed again");
        assert_eq!(log.lock().unwrap().len(), 4);
    })
    .await;
}

#[tokio::test]
async fn idempotent_requests_are_retried_on_503_and_others_are_not() {
    guard(async {
        // Every other request fails: each first attempt gets 503, its retry 200.
        let (upstream, log) = scripted(|n| if n % 2 == 0 { 503 } else { 200 }).await;
        let (_proxy, addr) = proxy_to(upstream, policy(|_| {})).await;

        let a = send(addr, Method::PUT, &[("content-length", "5")], "hello").await;
        assert_eq!(a.status, 200, "PUT retried");
        {
            let seen = log.lock().unwrap();
            assert_eq!(seen.len(), 2);
            assert_eq!(seen[1].body, "hello", "the body is replayed");
            assert_eq!(seen[1].headers["x-sidecar-attempt"], "2");
            assert!(!seen[0].headers.contains_key("x-sidecar-attempt"));
            assert_eq!(
                seen[0].headers["x-request-id"], seen[1].headers["x-request-id"],
                "one request, one id"
            );
        }

        let a = send(addr, Method::POST, &[("content-length", "5")], "hello").await;
        assert_eq!(
            a.status, 503,
            "POST not retried: the upstream's answer is passed on"
        );
        assert_eq!(a.body, "answer 2");
        assert_eq!(log.lock().unwrap().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn retries_stop_at_the_budget() {
    guard(async {
        let (upstream, log) = scripted(|_| 503).await;
        let (_proxy, addr) = proxy_to(
            upstream,
            policy(|p| {
                p.breaker = BreakerConfig::disabled();
                p.retry.max_retries = 1;
                p.retry.budget.ratio = 0.2;
                p.retry.budget.min_per_second = 0;
                p.retry.budget.window = Duration::from_secs(600);
            }),
        )
        .await;
        for _ in 0..10 {
            assert_eq!(get(addr).await.status, 503);
        }
        // 20 % of 10 requests: exactly two retries.
        assert_eq!(log.lock().unwrap().len(), 12);
    })
    .await;
}

#[tokio::test]
async fn connect_failure_and_reset_are_explained_and_retried() {
    guard(async {
        for (upstream, code, status) in [
            (refusing().await, "upstream-connect-refused", 502),
            (resetting().await, "upstream-reset", 502),
        ] {
            let (_proxy, addr) =
                proxy_to(upstream, policy(|p| p.breaker = BreakerConfig::disabled())).await;
            let a = get(addr).await;
            assert_eq!(a.status, status, "{code}");
            assert_eq!(a.header("x-sidecar-error"), code);
            assert_eq!(a.header("content-type"), "text/plain; charset=utf-8");
        }
    })
    .await;
}

#[tokio::test]
async fn request_timeout_answers_504_not_before_the_configured_time() {
    guard(async {
        let upstream = hanging().await;
        let timeout = Duration::from_millis(300);
        let (_proxy, addr) = proxy_to(upstream, policy(|p| p.request_timeout = timeout)).await;
        let start = tokio::time::Instant::now();
        let a = get(addr).await;
        assert!(start.elapsed() >= timeout);
        assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(a.header("x-sidecar-error"), "upstream-timeout");
    })
    .await;
}

#[tokio::test]
async fn request_ids_and_traces_are_kept_or_started() {
    guard(async {
        let (upstream, log) = scripted(|_| 200).await;
        let (_proxy, addr) = proxy_to(upstream, policy(|_| {})).await;
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        send(
            addr,
            Method::GET,
            &[("x-request-id", "abc"), ("traceparent", parent)],
            "",
        )
        .await;
        get(addr).await;
        let seen = log.lock().unwrap();
        assert_eq!(seen[0].headers["x-request-id"], "abc");
        assert_eq!(seen[0].headers["traceparent"], parent);
        assert_eq!(seen[0].headers["x-forwarded-by"], "sidecar");
        assert!(
            !seen[0].headers.contains_key("x-forwarded-for"),
            "outbound: the app is local"
        );
        let id = seen[1].headers["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 36, "a generated UUID: {id}");
        let tp = seen[1].headers["traceparent"].as_bytes();
        assert!(headers::is_valid_traceparent(tp));
        assert_eq!(seen[1].method, Method::GET);
    })
    .await;
}

/// Retries counted for `dst` so far (`sidecar_retries_total`, in the process-wide registry).
fn retries_of(dst: SocketAddr) -> u64 {
    let text = crate::metrics::render(prometheus::default_registry());
    let series = format!("sidecar_retries_total{{destination=\"{dst}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The error's retry safety drives the decision: a POST whose connection was refused never
/// reached the upstream, so it is sent again (its body was kept); a POST whose connection was
/// reset may have been processed, so it is not; a PUT is retried either way.
#[tokio::test]
async fn non_idempotent_requests_are_resent_only_when_they_never_arrived() {
    guard(async {
        let no_breaker = |p: &mut DestinationPolicy| p.breaker = BreakerConfig::disabled();
        let refused = refusing().await;
        let (_p1, addr) = proxy_to(refused, policy(no_breaker)).await;
        let a = send(addr, Method::POST, &[("content-length", "5")], "hello").await;
        assert_eq!(a.header("x-sidecar-error"), "upstream-connect-refused");
        assert_eq!(retries_of(refused), 2, "refused: sent again, twice");

        let reset = resetting().await;
        let (_p2, addr) = proxy_to(reset, policy(no_breaker)).await;
        let a = send(addr, Method::POST, &[("content-length", "5")], "hello").await;
        assert_eq!(a.header("x-sidecar-error"), "upstream-reset");
        assert_eq!(retries_of(reset), 0, "reset: the POST may have arrived");
        let a = send(addr, Method::PUT, &[("content-length", "5")], "hello").await;
        assert_eq!(a.header("x-sidecar-error"), "upstream-reset");
        assert_eq!(retries_of(reset), 2, "reset: an idempotent PUT is retried");
    })
    .await;
}

/// `--target` mode fronts one service for remote clients, who can make it answer 5xx at will:
/// without a rule naming the target there is no breaker, so no client can get everyone refused.
/// A rule naming the target turns it on.
#[tokio::test]
async fn target_mode_has_no_breaker_unless_a_rule_asks_for_one() {
    guard(async {
        let (upstream, log) = scripted(|_| 500).await;
        for (rule, refused_after) in [(false, None), (true, Some(5))] {
            let mut config = ProxyConfig::new(["127.0.0.1:0".parse().unwrap()]);
            config.target =
                Some(proxy::Target::parse(&format!("http://{upstream}")).expect("target"));
            config.policy = policy(|p| p.retry.max_retries = 0);
            if rule {
                let mut with_breaker = config.policy.defaults.clone();
                with_breaker.breaker = BreakerConfig::default();
                config
                    .policy
                    .destinations
                    .push(crate::policy::DestinationRule {
                        matcher: crate::policy::Match::parse(&upstream.to_string()).unwrap(),
                        policy: with_breaker,
                    });
            }
            let resolver: Resolver = Arc::new(move |_: &TcpStream| Ok(upstream));
            let proxy = proxy::start(config, resolver).await.expect("proxy starts");
            let addr = proxy.local_addrs()[0];
            let before = log.lock().unwrap().len();
            for i in 0..8 {
                let a = get(addr).await;
                let expected = match refused_after {
                    Some(n) if i >= n => 503,
                    _ => 500,
                };
                assert_eq!(a.status, expected, "rule {rule}, request {i}");
            }
            let reached = log.lock().unwrap().len() - before;
            assert_eq!(reached, refused_after.unwrap_or(8), "rule {rule}");
        }
    })
    .await;
}

/// A name rule is chosen by the request's `Host`: its short request timeout applies, where the
/// connection's address alone would give the default (far beyond the test's bound).
#[tokio::test]
async fn a_name_rule_is_chosen_by_the_requests_host() {
    use crate::policy::{DestinationRule, Match};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    guard(async {
        let upstream = hanging().await;
        let mut config = policy(|p| p.request_timeout = Duration::from_secs(600));
        let mut named = config.defaults.clone();
        named.request_timeout = Duration::from_millis(200);
        config.destinations.push(DestinationRule {
            matcher: Match::parse("slow.example:80").unwrap(),
            policy: named,
        });
        let (_proxy, addr) = proxy_to(upstream, config).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: Slow.Example:80\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
        assert!(
            answer.contains("x-sidecar-error: upstream-timeout"),
            "{answer}"
        );
    })
    .await;
}
