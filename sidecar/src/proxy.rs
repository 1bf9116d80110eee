//! The userspace proxy: accepts connections on the outbound listeners and forwards them, to
//! their original destination (interception mode) or to one fixed `--target` (reverse-proxy
//! mode). [`start`] is the programmatic entry used by `sidecar run`, tests and benchmarks.
mod connect;
mod detect;
mod error;
mod forward;
mod outbound;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::Uri;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub use detect::{classify, Detection, H2_PREFACE};
pub use error::{ConnectError, Culprit, ProxyError};
pub use forward::{error_response, ProxyBody, X_FORWARDED_BY, X_SIDECAR_ERROR};

use connect::{Connector, Stash};
use forward::{forward_h1, Chain, Route};

/// Connect timeout: an upstream that has not completed a handshake in 1 s on a cluster network is
/// almost certainly gone; failing fast lets the caller retry elsewhere.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time for the response head; 30 s as in the seed proxy. Bodies may stream for longer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a partial client preface ("GE") may take to become decidable. Real clients send a
/// request line in one segment, so this only matters for slow or odd peers.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle pooled upstream connections are closed after this; shorter than the common server-side
/// keep-alive timeouts (nginx 75 s, Go 90 s) so that we usually close first and rarely pick a
/// connection the server is just closing.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A listener address; `required: false` means "skip with a warning if it cannot be bound"
/// (the default `[::1]` on hosts with IPv6 disabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    pub required: bool,
}

/// A `--target` URL: plain `http://host[:port][/prefix]`.
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    authority: Authority,
    prefix: Option<Arc<str>>,
}

impl Target {
    /// Parses a target URL; the error says what to write instead.
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("not a URL ({e}); expected http://HOST[:PORT][/PATH]"))?;
        match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => {}
            Some(s) if *s == Scheme::HTTPS => {
                return Err(
                    "https targets are not supported (the proxy speaks plain HTTP to \
                            its target; TLS origination is out of scope): use http://"
                        .to_owned(),
                )
            }
            _ => return Err("expected http://HOST[:PORT][/PATH]".to_owned()),
        }
        let Some(authority) = uri.authority() else {
            return Err("missing host; expected http://HOST[:PORT][/PATH]".to_owned());
        };
        if authority.as_str().contains('@') {
            return Err("user information in the target URL is not supported".to_owned());
        }
        if uri.query().is_some() {
            return Err("a query string in the target URL is not supported".to_owned());
        }
        let authority = match authority.port_u16() {
            Some(_) => authority.clone(),
            // Pool keys and Host fallbacks carry an explicit port.
            None => Authority::from_maybe_shared(Bytes::from(format!("{}:80", authority.host())))
                .map_err(|e| format!("bad host: {e}"))?,
        };
        let path = uri.path().trim_end_matches('/');
        Ok(Target {
            url: url.to_owned(),
            authority,
            prefix: (!path.is_empty()).then(|| Arc::from(path)),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }
}

/// Everything the proxy needs; `sidecar run` builds it from flags and environment.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: Vec<ListenAddr>,
    /// `Some`: reverse-proxy mode, every request goes there. `None`: interception mode.
    pub target: Option<Target>,
    pub service_name: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub detect_timeout: Duration,
    pub pool_idle_timeout: Duration,
}

impl ProxyConfig {
    /// Interception mode on `listen` (all required) with default timeouts.
    pub fn new(listen: impl IntoIterator<Item = SocketAddr>) -> Self {
        ProxyConfig {
            listen: listen
                .into_iter()
                .map(|addr| ListenAddr {
                    addr,
                    required: true,
                })
                .collect(),
            target: None,
            service_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
        }
    }
}

/// Finds where a redirected connection was going. The real one is
/// [`crate::orig_dst::original_dst`]; tests pass their own.
pub type Resolver = Arc<dyn Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync>;

/// The kernel's answer to `SO_ORIGINAL_DST`.
pub fn original_dst_resolver() -> Resolver {
    Arc::new(crate::orig_dst::original_dst)
}

/// State shared by every connection of one proxy.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) resolver: Resolver,
    pub(crate) client: Client<Connector, Incoming>,
    pub(crate) stash: Arc<Stash>,
    pub(crate) listening: Vec<SocketAddr>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    target_route: Option<Route>,
}

impl Shared {
    /// Loop guard: a connection "originally" to our own listener would come straight back.
    pub(crate) fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let dst_ip = dst.ip().to_canonical();
        self.listening.iter().any(|l| {
            l.port() == dst.port()
                && (l.ip().to_canonical() == dst_ip
                    || (l.ip().is_unspecified()
                        && (dst_ip.is_loopback() || dst_ip.is_unspecified())))
        })
    }
}

/// A running proxy.
pub struct Proxy {
    local_addrs: Vec<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Proxy {
    /// The addresses actually bound (port 0 resolved), in configuration order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Stops accepting, lets in-flight connections finish (HTTP connections close once their
    /// current requests are answered) for up to `drain`. Returns false if the deadline cut some
    /// connections short; the caller then drops them by leaving the runtime.
    pub async fn shutdown(self, drain: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Binds the listeners and starts serving on the current tokio runtime.
///
/// An address with `required: false` that cannot be bound is skipped with a warning; any other
/// bind failure is an error naming the address. `resolver` is ignored in `--target` mode.
pub async fn start(config: ProxyConfig, resolver: Resolver) -> io::Result<Proxy> {
    let mut listeners = Vec::with_capacity(config.listen.len());
    for listen in &config.listen {
        match TcpListener::bind(listen.addr).await {
            Ok(listener) => listeners.push(listener),
            Err(e) if !listen.required => {
                warn!(addr = %listen.addr, error = %e, "optional listener not bound (IPv6 disabled?); continuing without it");
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", listen.addr),
                ))
            }
        }
    }
    if listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no outbound listener could be bound",
        ));
    }
    let local_addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<io::Result<Vec<_>>>()?;

    let stash = Arc::new(Stash::default());
    let connector = Connector {
        stash: Arc::clone(&stash),
        connect_timeout: config.connect_timeout,
    };
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .build(connector);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let target_route = config.target.as_ref().map(|t| Route {
        authority: t.authority.clone(),
        prefix: t.prefix.clone(),
    });
    let shared = Arc::new(Shared {
        config,
        resolver,
        client,
        stash,
        listening: local_addrs.clone(),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
        target_route,
    });
    for listener in listeners {
        tracker.spawn(accept_loop(listener, Arc::clone(&shared)));
    }
    Ok(Proxy {
        local_addrs,
        cancel,
        tracker,
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let conn_shared = Arc::clone(&shared);
                if shared.target_route.is_some() {
                    shared
                        .tracker
                        .spawn(serve_target(conn_shared, stream, peer));
                } else {
                    shared
                        .tracker
                        .spawn(outbound::serve(conn_shared, stream, peer));
                }
            }
            Err(e) if is_per_connection_error(&e) => {
                debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) => {
                // Out of file descriptors or memory: accepting again at once would spin. Back off
                // briefly (rate limiting, not synchronisation) and let connections finish.
                warn!(error = %e, "accept failed; retrying shortly");
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// `--target` mode: HTTP/1 and h2c (auto-detected by hyper-util), every request to the target.
async fn serve_target(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    if let Err(e) = client.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY downstream");
    }
    let svc_shared = Arc::clone(&shared);
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let shared = Arc::clone(&svc_shared);
        async move {
            let response = match &shared.target_route {
                Some(route) => forward_h1(&shared, route, req).await,
                None => error_response(ProxyError::ProxyBadRequest),
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %Chain(&*e), "connection ended with an error");
    }
}
