//! The admin port (default `0.0.0.0:15090`, never captured by the kernel programs): probes,
//! Prometheus, the configuration in force, and `POST /shutdown` for Jobs.
//!
//! | path | method | answer |
//! |---|---|---|
//! | `/live` | GET | 200 `live` once the proxy's listeners are bound (also while draining); 503 before |
//! | `/ready` | GET | 200 `ready` when listeners, interception (`--pin-dir`) and app probe (`--app-probe`) all hold; else 503 listing what does not; 503 while draining |
//! | `/metrics` | GET | Prometheus text exposition (0.0.4) |
//! | `/config` | GET | the configuration in force, JSON |
//! | `/shutdown` | POST | 202 `draining`: starts the drain as SIGTERM does; 403 unless the peer is a loopback address; 405 for other methods |
//!
//! Anything else: 404. `HEAD` is answered like `GET` without a body.
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::{Readiness, Trigger};
use crate::net::INBOUND_PASSTHROUGH_V4;
use crate::reload::{Cause, Outcome, Reloader};

/// Default admin listeners: every address of both families, so that the kubelet's probes and
/// Prometheus reach it on the pod IP, IPv6-only clusters included (the IPv6 one is skipped with a
/// warning when IPv6 is off). 15090 is the metrics port the seed used (Istio's).
pub const DEFAULT_ADMIN: &str = "0.0.0.0:15090,[::]:15090";
/// A client that has not sent its request head in this long is dropped (probes send at once).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once; more are reset at accept. Probes and scrapes need a handful;
/// the cap keeps a flood of admin connections from costing the data path memory and CPU.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// `/config`'s body, rendered on each request (the policies in force change on reload).
pub type ConfigView = Box<dyn Fn() -> String + Send + Sync>;

/// What the admin endpoints answer from.
pub struct AdminState {
    pub readiness: Arc<Readiness>,
    pub registry: Registry,
    pub config: ConfigView,
    pub shutdown: UnboundedSender<Trigger>,
    /// `POST /reload` (none: the endpoint answers 404).
    pub reloader: Option<Arc<Reloader>>,
    /// The only uid whose processes may `POST /shutdown` and `/reload`: the proxy's own.
    pub own_uid: u32,
    /// Connections reset at accept because [`MAX_ADMIN_CONNECTIONS`] were open.
    pub refused: prometheus::IntCounter,
}

impl AdminState {
    /// The state, with its refusal counter (`sidecar_admin_connections_refused_total`)
    /// registered in `registry`.
    pub fn new(
        readiness: Arc<Readiness>,
        registry: Registry,
        config: ConfigView,
        shutdown: UnboundedSender<Trigger>,
        reloader: Option<Arc<Reloader>>,
    ) -> AdminState {
        let refused = prometheus::IntCounter::new(
            "sidecar_admin_connections_refused_total",
            "Admin connections reset at accept because 64 were open",
        )
        // A constant, valid name: creating the counter cannot fail.
        .unwrap_or_else(|e| unreachable!("admin metric definition: {e}"));
        crate::metrics::register(&registry, Box::new(refused.clone()), "admin");
        AdminState {
            readiness,
            registry,
            config,
            shutdown,
            reloader,
            own_uid: nix::unistd::geteuid().as_raw(),
            refused,
        }
    }
}

/// Serves the admin endpoints on `listener` until `cancel`, at most [`MAX_ADMIN_CONNECTIONS`]
/// connections at once.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer, local) = match accepted.and_then(|(s, p)| {
            let local = s.local_addr()?;
            Ok((s, p, local))
        }) {
            Ok(triple) => triple,
            Err(e) => {
                tracing::debug!(error = %e, "admin: accept failed");
                // Out of descriptors: let connections finish rather than spin (rate limiting).
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "admin: too many connections; refusing");
            state.refused.inc();
            let _ = stream.set_zero_linger();
            continue;
        };
        let state = Arc::clone(&state);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move {
                    let get = req.method() == Method::GET || req.method() == Method::HEAD;
                    let post = req.method() == Method::POST;
                    let resp = match req.uri().path() {
                        "/metrics" if get => metrics(&state, req.method() == Method::HEAD).await,
                        "/shutdown" if post => mutation(&state, peer, local, "/shutdown").await,
                        "/reload" if post => mutation(&state, peer, local, "/reload").await,
                        _ => answer(&state, &req),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Only the pod itself may stop the sidecar: a loopback peer, but not 127.0.0.6, the source of
/// the proxy's own inbound connections (a captured admin port would otherwise let the whole
/// network in through the proxy).
pub fn may_shutdown(peer: SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    ip.is_loopback() && ip != IpAddr::V4(INBOUND_PASSTHROUGH_V4)
}

/// Who may `POST /shutdown` and `/reload`: a loopback peer ([`may_shutdown`]) whose socket
/// belongs to the proxy's own uid, as the kernel's socket table says. The app's containers
/// share the pod's loopback: an SSRF in the app, or any process in another container, would
/// otherwise stop or reconfigure the sidecar. `Err`: why not, for the 403.
pub fn authorize(peer: SocketAddr, local: SocketAddr, own_uid: u32) -> Result<(), String> {
    if !may_shutdown(peer) {
        return Err("only from inside the pod (loopback)".to_owned());
    }
    match crate::net::tcp_socket_uid(peer, local) {
        Ok(Some(uid)) if uid == own_uid => Ok(()),
        Ok(Some(uid)) => Err(format!(
            "only from the proxy's own uid ({own_uid}); the caller runs as uid {uid}. Run \
             `sidecar shutdown` / `sidecar reload` in the proxy's container (a preStop hook), \
             or use --shutdown-file"
        )),
        Ok(None) => Err("cannot tell who is calling (the connection is gone)".to_owned()),
        Err(e) => Err(format!("cannot tell who is calling: /proc/net/tcp: {e}")),
    }
}

/// `POST /shutdown` and `POST /reload`, for the proxy's own uid only ([`authorize`]).
async fn mutation(
    state: &Arc<AdminState>,
    peer: SocketAddr,
    local: SocketAddr,
    path: &'static str,
) -> Response<Full<Bytes>> {
    let own_uid = state.own_uid;
    // Reading the socket table is file I/O, like the reload itself: the blocking pool.
    let allowed = tokio::task::spawn_blocking(move || authorize(peer, local, own_uid))
        .await
        .unwrap_or_else(|e| Err(format!("check failed: {e}")));
    if let Err(why) = allowed {
        tracing::warn!(%peer, "refused POST {path}: {why}");
        return text(
            StatusCode::FORBIDDEN,
            format!("forbidden: POST {path} is accepted {why}\n"),
        );
    }
    match path {
        "/shutdown" => {
            let already = state.readiness.is_draining();
            let _ = state.shutdown.send(Trigger::Admin(peer));
            text(
                StatusCode::ACCEPTED,
                if already {
                    "draining (already)\n".into()
                } else {
                    "draining\n".into()
                },
            )
        }
        _ => match &state.reloader {
            None => text(
                StatusCode::NOT_FOUND,
                "no reloadable configuration\n".into(),
            ),
            Some(reloader) => {
                tracing::info!(%peer, "POST /reload");
                let outcome = crate::reload::run_blocking(reloader, Cause::Admin).await;
                let status = match outcome {
                    Outcome::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::OK,
                };
                text(status, format!("{}\n", outcome.describe()))
            }
        },
    }
}

fn answer(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method();
    let read = method == Method::GET || method == Method::HEAD;
    let mut resp = match req.uri().path() {
        "/live" | "/ready" | "/metrics" | "/config" if !read => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into()).with_header(ALLOW, "GET, HEAD")
        }
        "/live" if state.readiness.is_listening() => text(StatusCode::OK, "live\n".into()),
        "/live" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not live: listeners not bound yet\n".into(),
        ),
        "/ready" => match state.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(problems) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", problems.join("; ")),
            ),
        },
        "/config" => {
            text(StatusCode::OK, (state.config)()).with_header(CONTENT_TYPE, "application/json")
        }
        // POST is handled by `mutation`.
        "/shutdown" | "/reload" => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into()).with_header(ALLOW, "POST")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics, /config, POST /shutdown, POST /reload\n"
                .into(),
        ),
    };
    if method == Method::HEAD {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

/// `/metrics`, rendered on the blocking pool: encoding every family is the costliest thing the
/// admin port does, and the proxy's own thread serves the data path.
async fn metrics(state: &AdminState, head: bool) -> Response<Full<Bytes>> {
    let registry = state.registry.clone();
    let body = tokio::task::spawn_blocking(move || crate::metrics::render(&registry))
        .await
        .unwrap_or_else(|e| format!("# metrics rendering failed: {e}\n"));
    let mut resp = text(StatusCode::OK, if head { String::new() } else { body })
        .with_header(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    if head {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

trait WithHeader {
    fn with_header(self, name: http::HeaderName, value: &'static str) -> Self;
}

impl WithHeader for Response<Full<Bytes>> {
    fn with_header(mut self, name: http::HeaderName, value: &'static str) -> Self {
        self.headers_mut()
            .insert(name, HeaderValue::from_static(value));
        self
    }
}

/// Loopback of the admin listener's family, for clients in this process.
pub fn loopback_of(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_loopback_may_shut_down() {
        assert!(may_shutdown("127.0.0.1:5000".parse().unwrap()));
        assert!(may_shutdown("[::1]:5000".parse().unwrap()));
        assert!(may_shutdown("[::ffff:127.0.0.1]:5000".parse().unwrap()));
        assert!(!may_shutdown("127.0.0.6:5000".parse().unwrap()));
        assert!(!may_shutdown("10.0.0.1:5000".parse().unwrap()));
        assert!(!may_shutdown("[fd00::1]:5000".parse().unwrap()));
    }

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let status = crate::lifecycle::parse_status(raw.as_bytes()).unwrap();
        let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let readiness = Arc::new(Readiness::new(false, false));
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("test_total", "a test counter").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(AdminState::new(
            Arc::clone(&readiness),
            registry,
            Box::new(|| "{\"admin\":\"x\"}".to_owned()),
            tx,
            None,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, state, cancel.clone()));

        assert_eq!(get(addr, "GET", "/live").await.0, 503);
        let (status, body) = get(addr, "GET", "/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: listeners: listeners not bound yet\n")
        );
        readiness.set_listening();
        assert_eq!(get(addr, "GET", "/live").await, (200, "live\n".into()));
        assert_eq!(get(addr, "GET", "/ready").await, (200, "ready\n".into()));
        let (status, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("test_total 1"), "{body}");
        assert_eq!(get(addr, "GET", "/config").await.1, "{\"admin\":\"x\"}");
        assert_eq!(get(addr, "GET", "/shutdown").await.0, 405);
        assert_eq!(get(addr, "POST", "/ready").await.0, 405);
        assert_eq!(get(addr, "GET", "/nope").await.0, 404);
        assert_eq!(get(addr, "GET", "/reload").await.0, 405);
        assert_eq!(
            get(addr, "POST", "/reload").await.0,
            404,
            "no reloader here"
        );
        // This test's own uid is the proxy's: allowed.
        assert_eq!(
            get(addr, "POST", "/shutdown").await,
            (202, "draining\n".into())
        );
        assert!(matches!(rx.recv().await, Some(Trigger::Admin(p)) if p.ip().is_loopback()));
        cancel.cancel();
    }

    /// Past [`MAX_ADMIN_CONNECTIONS`] open admin connections, new ones are reset at once; once
    /// some close, probes are answered again.
    #[tokio::test]
    async fn admin_connections_are_capped() {
        let readiness = Arc::new(Readiness::new(false, false));
        readiness.set_listening();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(AdminState::new(
            readiness,
            Registry::new(),
            Box::new(|| "{}".to_owned()),
            tx,
            None,
        ));
        let state_refused = state.refused.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, state, cancel.clone()));
        let guard = |f| tokio::time::timeout(Duration::from_secs(20), f);
        guard(async {
            // Hold every slot with a connection that has sent a partial request head.
            let mut held = Vec::new();
            for _ in 0..MAX_ADMIN_CONNECTIONS {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /live HTTP/1.1\r\n").await.unwrap();
                held.push(s);
            }
            // One more: reset without an answer (once the held ones are all accepted).
            let refused = loop {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let mut out = Vec::new();
                match s.read_to_end(&mut out).await {
                    Ok(_) if out.is_empty() => break true,
                    Err(_) => break true,
                    // Answered: a held connection was not accepted yet; try again.
                    Ok(_) => tokio::task::yield_now().await,
                }
            };
            assert!(refused);
            assert!(state_refused.get() >= 1, "counted");
            held.clear();
            // Slots free again (as the closed connections' tasks end).
            loop {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = s
                    .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut out = String::new();
                let _ = s.read_to_string(&mut out).await;
                if out.starts_with("HTTP/1.1 200") {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("test hung");
        cancel.cancel();
    }
}
