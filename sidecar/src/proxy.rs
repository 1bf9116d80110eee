//! The userspace proxy: accepts captured connections (outbound on 15001, inbound on 15006) and
//! forwards them to their original destination, or, in reverse-proxy mode, every request to one
//! fixed `--target`. [`start`] is the programmatic entry used by `sidecar run`, tests and
//! benchmarks.
mod connect;
mod detect;
mod error;
mod forward;
mod pool;
#[cfg(test)]
mod tests;
mod transparent;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::Uri;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::lifecycle::{serve_until_drained, FirstRequest};
use crate::metrics::access::{Observer, UpstreamName};
use crate::metrics::conn::{ActiveConns, ConnGuard, CountedIo};
use crate::metrics::{DestinationMetrics, Dir, ProxyMetrics};
use crate::policy::{Policies, PolicyConfig};

pub use detect::{classify, Detection, H2_PREFACE};
pub use error::{ConnectError, Culprit, ProxyError};
pub use forward::{error_response, ProxyBody, X_FORWARDED_BY, X_SIDECAR_ATTEMPT, X_SIDECAR_ERROR};

pub use connect::INBOUND_PASSTHROUGH_V4;
pub use pool::DEFAULT_MAX_CONNECTIONS_PER_DESTINATION;

use connect::{Connector, Source, Stash};
use forward::{forward_h1, Chain, Route};
use pool::Pool;
pub(crate) use pool::PoolMetrics;
use transparent::Direction;

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
    /// Outbound listeners (redirected connections of the app), or the `--target` listeners.
    pub listen: Vec<ListenAddr>,
    /// Inbound listeners (connections to the app, steered by sk_lookup); unused with `--target`.
    pub inbound: Vec<ListenAddr>,
    /// `Some`: reverse-proxy mode, every request goes there. `None`: interception mode.
    pub target: Option<Target>,
    pub service_name: Option<String>,
    /// Connect and request timeouts, circuit breakers, retries: defaults and per destination.
    pub policy: PolicyConfig,
    pub detect_timeout: Duration,
    pub pool_idle_timeout: Duration,
}

impl ProxyConfig {
    /// Interception mode on `listen` (all required, outbound only) with default timeouts.
    pub fn new(listen: impl IntoIterator<Item = SocketAddr>) -> Self {
        ProxyConfig {
            listen: listen
                .into_iter()
                .map(|addr| ListenAddr {
                    addr,
                    required: true,
                })
                .collect(),
            inbound: Vec::new(),
            target: None,
            service_name: None,
            policy: PolicyConfig::default(),
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
        }
    }
}

/// Finds where a captured connection was going. The real ones are
/// [`crate::orig_dst::original_dst`] (outbound) and the local address (inbound); tests pass
/// their own.
pub type Resolver = Arc<dyn Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync>;

/// The kernel's answer to `SO_ORIGINAL_DST`.
pub fn original_dst_resolver() -> Resolver {
    Arc::new(crate::orig_dst::original_dst)
}

/// Inbound: sk_lookup hands the SYN to our listener unchanged, so the connection's own local
/// address is where the client was going.
pub fn local_addr_resolver() -> Resolver {
    Arc::new(TcpStream::local_addr)
}

/// Destination lookups for both directions.
#[derive(Clone)]
pub struct Resolvers {
    pub outbound: Resolver,
    pub inbound: Resolver,
}

impl Resolvers {
    /// What the kernel says: `SO_ORIGINAL_DST` outbound, the local address inbound.
    pub fn kernel() -> Self {
        Resolvers {
            outbound: original_dst_resolver(),
            inbound: local_addr_resolver(),
        }
    }
}

/// What the proxy records: metrics (registered by the caller, or nowhere) and the access log.
#[derive(Clone)]
pub struct Telemetry {
    pub metrics: Arc<ProxyMetrics>,
    /// One `access` log line per request.
    pub access_log: bool,
}

impl Default for Telemetry {
    /// Metrics counted but exported nowhere; no access log.
    fn default() -> Self {
        Telemetry {
            metrics: ProxyMetrics::unregistered(),
            access_log: false,
        }
    }
}

/// One direction's way out: its HTTP/1 connection pool and the parked pre-dialled connections.
/// Inbound and outbound never share connections: inbound ones come from 127.0.0.6.
pub(crate) struct Egress {
    pub(crate) pool: Arc<Pool>,
    pub(crate) stash: Arc<Stash>,
    pub(crate) source: Source,
}

impl Egress {
    fn new(
        config: &ProxyConfig,
        source: Source,
        policies: &Arc<Policies>,
        metrics: PoolMetrics,
    ) -> Self {
        let stash = Arc::new(Stash::default());
        let connector = Connector {
            stash: Arc::clone(&stash),
            policies: Arc::clone(policies),
            source,
        };
        let pool = Pool::new(connector, config.pool_idle_timeout, metrics);
        Egress {
            pool,
            stash,
            source,
        }
    }
}

/// State shared by every connection of one proxy.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) resolvers: Resolvers,
    pub(crate) outbound: Egress,
    pub(crate) inbound: Egress,
    /// Every bound listener address, both directions (loop guard).
    pub(crate) listening: Vec<SocketAddr>,
    /// Stops everything (outbound, and inbound through its child token).
    pub(crate) cancel: CancellationToken,
    /// Stops the inbound side (and `--target` listeners) first when draining.
    pub(crate) inbound_cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    target_route: Option<Route>,
    /// Per-destination policies and their state (breakers, retry budgets).
    pub(crate) policies: Arc<Policies>,
    pub(crate) telemetry: Telemetry,
    /// Open downstream connections per direction (the drain waits on them).
    pub(crate) active: [Arc<ActiveConns>; 2],
    /// `--target` mode: the target's request metrics and name, resolved once.
    target_dest: Option<(Arc<DestinationMetrics>, Arc<str>)>,
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

    /// The token that stops connections of `dir`.
    pub(crate) fn stop_token(&self, dir: Dir) -> &CancellationToken {
        match dir {
            Dir::Inbound => &self.inbound_cancel,
            Dir::Outbound => &self.cancel,
        }
    }

    pub(crate) fn active(&self, dir: Dir) -> &Arc<ActiveConns> {
        match dir {
            Dir::Inbound => &self.active[0],
            Dir::Outbound => &self.active[1],
        }
    }

    /// How requests of one `--target` connection are recorded.
    fn target_observer(&self, peer: SocketAddr) -> Arc<Observer> {
        let (dest, upstream) = match &self.target_dest {
            Some((dest, name)) => (Arc::clone(dest), Arc::clone(name)),
            // Not reached: target connections only exist in `--target` mode.
            None => (
                self.telemetry.metrics.named_destination(Dir::Inbound, "-"),
                Arc::from("-"),
            ),
        };
        Arc::new(Observer {
            metrics: Arc::clone(&self.telemetry.metrics),
            dest,
            access_log: self.telemetry.access_log,
            peer,
            upstream: UpstreamName::Name(upstream),
        })
    }

    /// How requests of one connection to `dst` are recorded. Shared by the connection's
    /// requests: one reference count per request, no more.
    pub(crate) fn observer(&self, dir: Dir, dst: SocketAddr, peer: SocketAddr) -> Arc<Observer> {
        Arc::new(Observer {
            metrics: Arc::clone(&self.telemetry.metrics),
            dest: self.telemetry.metrics.destination(dir, dst),
            access_log: self.telemetry.access_log,
            peer,
            upstream: UpstreamName::Addr(dst),
        })
    }
}

/// A running proxy.
pub struct Proxy {
    local_addrs: Vec<SocketAddr>,
    inbound_addrs: Vec<SocketAddr>,
    cancel: CancellationToken,
    inbound_cancel: CancellationToken,
    tracker: TaskTracker,
    active: [Arc<ActiveConns>; 2],
}

impl Proxy {
    /// The outbound (or `--target`) addresses actually bound (port 0 resolved), in
    /// configuration order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The inbound addresses actually bound.
    pub fn inbound_addrs(&self) -> &[SocketAddr] {
        &self.inbound_addrs
    }

    /// Stops accepting, lets in-flight connections finish (HTTP connections close once their
    /// current requests are answered) for up to `drain`. Returns false if the deadline cut some
    /// connections short; the caller then drops them by leaving the runtime.
    pub async fn shutdown(self, drain: Duration) -> bool {
        self.stop_all();
        tokio::time::timeout(drain, self.wait_all()).await.is_ok()
    }

    /// First step of a drain: the inbound (and `--target`) listeners accept what the kernel has
    /// already queued, then close; their HTTP connections finish the request in progress (a
    /// connection that has not sent one yet gets `--detect-timeout` to do so) and close.
    /// Outbound goes on.
    pub fn stop_inbound(&self) {
        self.inbound_cancel.cancel();
    }

    /// Stops both directions the same way.
    pub fn stop_all(&self) {
        self.cancel.cancel();
    }

    /// Open downstream connections of `dir`.
    pub fn active(&self, dir: Dir) -> &ActiveConns {
        match dir {
            Dir::Inbound => &self.active[0],
            Dir::Outbound => &self.active[1],
        }
    }

    /// Waits until every connection task has ended (call after a stop).
    pub async fn wait_all(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Binds the listeners and starts serving on the current tokio runtime; outbound destinations
/// come from `resolver`, inbound ones from the local address.
///
/// An address with `required: false` that cannot be bound is skipped with a warning; any other
/// bind failure is an error naming the address. Resolvers are unused in `--target` mode.
pub async fn start(config: ProxyConfig, resolver: Resolver) -> io::Result<Proxy> {
    start_with_resolvers(
        config,
        Resolvers {
            outbound: resolver,
            inbound: local_addr_resolver(),
        },
    )
    .await
}

/// [`start`] with both directions' destination lookups given (tests emulate sk_lookup so).
pub async fn start_with_resolvers(config: ProxyConfig, resolvers: Resolvers) -> io::Result<Proxy> {
    start_observed(config, resolvers, Telemetry::default()).await
}

/// [`start_with_resolvers`], recording into `telemetry` (what `sidecar run` uses).
pub async fn start_observed(
    config: ProxyConfig,
    resolvers: Resolvers,
    telemetry: Telemetry,
) -> io::Result<Proxy> {
    let outbound_listeners = bind_all(&config.listen)?;
    if outbound_listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no outbound listener could be bound",
        ));
    }
    let inbound_listeners = if config.target.is_some() {
        Vec::new()
    } else {
        bind_all(&config.inbound)?
    };
    let local_addrs = addrs_of(&outbound_listeners)?;
    let inbound_addrs = addrs_of(&inbound_listeners)?;

    let cancel = CancellationToken::new();
    let inbound_cancel = cancel.child_token();
    let tracker = TaskTracker::new();
    let active = [
        Arc::new(ActiveConns::default()),
        Arc::new(ActiveConns::default()),
    ];
    let target_dest = config.target.as_ref().map(|t| {
        let name: Arc<str> = t.authority.as_str().into();
        (
            telemetry.metrics.named_destination(Dir::Inbound, &name),
            name,
        )
    });
    let policies = Arc::new(Policies::new(&config.policy));
    let target_route = config.target.as_ref().map(|t| {
        let label = || match &target_dest {
            Some((metrics, _)) => Arc::clone(metrics.label()),
            None => Arc::from(t.authority.as_str()),
        };
        Route {
            authority: t.authority.clone(),
            prefix: t.prefix.clone(),
            dest: policies.target(t.authority.as_str(), Some(&label)),
            by_name: policies.has_name_rules(),
            default_port: t.authority.port_u16().unwrap_or(80),
            forwarded_for: None,
            upstream: None,
        }
    });
    let outbound = Egress::new(
        &config,
        Source::Any,
        &policies,
        telemetry.metrics.pool(Dir::Outbound),
    );
    let inbound = Egress::new(
        &config,
        Source::Passthrough,
        &policies,
        telemetry.metrics.pool(Dir::Inbound),
    );
    let target_route = target_route.map(|r| Route {
        upstream: Some(
            outbound
                .pool
                .host(&r.authority, r.dest.policy().max_connections),
        ),
        ..r
    });
    let shared = Arc::new(Shared {
        outbound,
        inbound,
        policies,
        config,
        resolvers,
        listening: local_addrs.iter().chain(&inbound_addrs).copied().collect(),
        cancel: cancel.clone(),
        inbound_cancel: inbound_cancel.clone(),
        tracker: tracker.clone(),
        target_route,
        telemetry,
        active: active.clone(),
        target_dest,
    });
    let outbound_kind = if shared.target_route.is_some() {
        Kind::Target
    } else {
        Kind::Transparent(Direction::Outbound)
    };
    for listener in outbound_listeners {
        tracker.spawn(accept_loop(listener, outbound_kind, Arc::clone(&shared)));
    }
    for (listener, addr) in inbound_listeners.into_iter().zip(&inbound_addrs) {
        let kind = Kind::Transparent(Direction::Inbound {
            listener_port: addr.port(),
        });
        tracker.spawn(accept_loop(listener, kind, Arc::clone(&shared)));
    }
    Ok(Proxy {
        local_addrs,
        inbound_addrs,
        cancel,
        inbound_cancel,
        tracker,
        active,
    })
}

fn bind_all(listen: &[ListenAddr]) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(listen.len());
    for l in listen {
        match bind(l.addr) {
            Ok(listener) => listeners.push(listener),
            Err(e) if !l.required => {
                warn!(addr = %l.addr, error = %e, "optional listener not bound (IPv6 disabled?); continuing without it");
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", l.addr),
                ))
            }
        }
    }
    Ok(listeners)
}

/// Binds with `SO_REUSEADDR` (restart while old connections linger in TIME_WAIT) and, for IPv6,
/// `IPV6_V6ONLY`, so that `[::]:15006` and `0.0.0.0:15006` can both be bound.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let socket = TcpSocket::new_v6()?;
            setsockopt(&socket, sockopt::Ipv6V6Only, &true)?;
            socket
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // The kernel caps this at net.core.somaxconn.
    socket.listen(4096)
}

fn addrs_of(listeners: &[TcpListener]) -> io::Result<Vec<SocketAddr>> {
    listeners.iter().map(TcpListener::local_addr).collect()
}

/// What a listener's connections are.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Transparent(Direction),
    Target,
}

impl Kind {
    /// `--target` mode fronts one service: it counts, and drains, as inbound.
    fn dir(self) -> Dir {
        match self {
            Kind::Transparent(direction) => direction.dir(),
            Kind::Target => Dir::Inbound,
        }
    }
}

/// Starts serving one accepted connection.
fn spawn_conn(shared: &Arc<Shared>, kind: Kind, stream: TcpStream, peer: SocketAddr) {
    let dir = kind.dir();
    let conn = ConnGuard::open(&shared.telemetry.metrics, dir, shared.active(dir));
    let conn_shared = Arc::clone(shared);
    match kind {
        Kind::Target => shared
            .tracker
            .spawn(serve_target(conn_shared, stream, peer, conn)),
        Kind::Transparent(direction) => shared.tracker.spawn(transparent::serve(
            conn_shared,
            direction,
            stream,
            peer,
            conn,
        )),
    };
}

/// On stop: accepts what the kernel has already queued (those clients have completed their
/// handshake; closing the listener would reset them), then closes the listener, after which the
/// kernel refuses new connections.
fn accept_backlog(listener: TcpListener, kind: Kind, shared: &Arc<Shared>) {
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot take over the listener to drain its backlog");
            return;
        }
    };
    let mut accepted = 0usize;
    loop {
        // The listener is non-blocking: WouldBlock means the queue is empty.
        match listener.accept() {
            Ok((stream, peer)) => {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream));
                match stream {
                    Ok(stream) => {
                        accepted += 1;
                        spawn_conn(shared, kind, stream, peer);
                    }
                    Err(e) => debug!(%peer, error = %e, "cannot register a queued connection"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if is_per_connection_error(&e) => continue,
            Err(e) => {
                warn!(error = %e, "accepting the backlog failed; closing the listener");
                break;
            }
        }
    }
    if accepted > 0 {
        debug!(
            accepted,
            "accepted the listener's backlog before closing it"
        );
    }
}

async fn accept_loop(listener: TcpListener, kind: Kind, shared: Arc<Shared>) {
    let stop = shared.stop_token(kind.dir()).clone();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return accept_backlog(listener, kind, &shared),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => spawn_conn(&shared, kind, stream, peer),
            Err(e) if is_per_connection_error(&e) => {
                debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) => {
                // Out of file descriptors or memory: accepting again at once would spin. Back off
                // briefly (rate limiting, not synchronisation) and let connections finish.
                warn!(error = %e, "accept failed; retrying shortly");
                tokio::select! {
                    _ = stop.cancelled() => break,
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

/// `--target` mode: HTTP/1 and h2c (told apart by the first bytes), every request to the target.
async fn serve_target(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, conn: ConnGuard) {
    if let Err(e) = client.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY downstream");
    }
    let stop = &shared.inbound_cancel;
    let limit = shared.config.detect_timeout;
    let Some(h2) = sniff_h2(&client, stop, limit).await else {
        return;
    };
    let observer = shared.target_observer(peer);
    // A reverse proxy in front of one service: its requests come from other hosts.
    let route = shared
        .target_route
        .as_ref()
        .map(|r| Arc::new(r.for_client(peer)));
    let first = Arc::new(FirstRequest::default());
    let svc_first = Arc::clone(&first);
    let svc_shared = Arc::clone(&shared);
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        svc_first.mark();
        let shared = Arc::clone(&svc_shared);
        let observer = observer.clone();
        let route = route.clone();
        async move {
            let response = crate::metrics::access::observe(&observer, req, |req| async {
                match &route {
                    Some(route) => forward_h1(&shared, &shared.outbound, route, req).await,
                    None => error_response(ProxyError::ProxyBadRequest),
                }
            })
            .await;
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let io = TokioIo::new(CountedIo::new(client, conn));
    let result = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(io, service);
        tokio::pin!(conn);
        serve_until_drained(conn.as_mut(), stop, &first, limit, |c| {
            c.graceful_shutdown()
        })
        .await
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        serve_until_drained(conn.as_mut(), stop, &first, limit, |c| {
            c.graceful_shutdown()
        })
        .await
    };
    if let Err(e) = result {
        debug!(%peer, error = %Chain(&e), "connection ended with an error");
    }
}

/// Waits for a `--target` client's first bytes: `Some(true)` for the HTTP/2 prior-knowledge
/// preface, `Some(false)` for anything else (HTTP/1; hyper answers garbage with 400), `None`
/// if the client closed, or said nothing until `limit` after a drain began. A partial preface
/// gets `limit` to complete. (hyper-util's auto builder does the same, but carries both
/// protocols' connection state in every connection.)
async fn sniff_h2(client: &TcpStream, stop: &CancellationToken, limit: Duration) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled(), if deadline.is_none() && seen == 0 => {
                deadline = Some(tokio::time::Instant::now() + limit);
            }
            n = transparent::client_bytes(client, &mut buf, seen) => match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    seen = n;
                    if !H2_PREFACE.starts_with(&buf[..n]) {
                        return Some(false);
                    }
                    if n == H2_PREFACE.len() {
                        return Some(true);
                    }
                    deadline.get_or_insert(tokio::time::Instant::now() + limit);
                }
            },
            _ = transparent::wait_until(deadline) => return (seen > 0).then_some(false),
        }
    }
}
