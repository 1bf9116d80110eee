//! Interception mode, both directions: one captured connection from accept to close.
//!
//! Outbound connections were redirected by the connect hooks; their destination comes from
//! `SO_ORIGINAL_DST`. Inbound connections were steered to our listener by sk_lookup; their
//! destination is simply the socket's local address, and they go to the app from 127.0.0.6.
//!
//! The upstream connect starts the moment the connection is accepted, and the proxy then waits
//! for whichever side speaks first:
//! - the upstream (SMTP, MySQL, SSH, ...): opaque relay at once, no detection delay on any port;
//! - the client: classify its first bytes; HTTP is served with hyper (the connection already
//!   dialled goes to the HTTP client's pool), anything else is relayed opaquely.
//!
//! There is no timeout while neither side has said anything; only a partial client preface that
//! might still become HTTP waits (up to `detect_timeout`) for the rest.
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nix::sys::socket::{recv, MsgFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::connect::{dial, start_dial, Dialling, Predial};
use super::detect::{classify, Detection, MAX_DETECT_LEN};
use super::error::ConnectError;
use super::forward::{forward_h1, forward_h2, Chain, H2Upstream, Route};
use super::Egress;
use super::Shared;
use crate::lifecycle::{serve_until_drained, FirstRequest};
use crate::metrics::access::observe;
use crate::metrics::conn::{ConnGuard, CountedIo};
use crate::metrics::Dir;
use crate::policy::headers::ForwardedClient;
use crate::policy::idle::{self, Relayed};
use crate::policy::Destination;

/// The upstream side while detecting.
enum Upstream {
    Dialling(Dialling),
    Ready(TcpStream),
    /// Sent an HTTP/2 SETTINGS frame unprompted (Go and hyper h2c servers do): it now waits for
    /// the client's preface, so keep waiting for the client (bounded) instead of going opaque.
    SentH2Settings(TcpStream),
    /// The connect failed; the `x-sidecar-error` code of why (for the metrics of a reset).
    Failed(&'static str),
    /// Not dialled: the destination's circuit breaker is open. An HTTP client gets its 503
    /// without the upstream being touched; anything else is dialled once it shows what it is.
    Held,
}

enum Event {
    Cancelled,
    /// The client has `n` bytes waiting (0: it closed without sending anything).
    Client(io::Result<usize>),
    Connected(Result<TcpStream, ConnectError>),
    UpstreamSpoke,
    Deadline,
}

enum Decision {
    Opaque,
    Http1,
    Http2,
    /// The upstream cannot be reached and the client said nothing that we could answer.
    Reset,
}

/// Which way a captured connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From the app to the world (the 15001 listeners).
    Outbound,
    /// From the world to the app (the 15006 listeners); the port is the listener's own.
    Inbound { listener_port: u16 },
}

impl Direction {
    fn name(self) -> &'static str {
        self.dir().as_str()
    }

    pub(crate) fn dir(self) -> Dir {
        match self {
            Direction::Outbound => Dir::Outbound,
            Direction::Inbound { .. } => Dir::Inbound,
        }
    }
}

/// Serves one accepted, captured connection; `conn` keeps its books until it closes.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    direction: Direction,
    client: TcpStream,
    peer: SocketAddr,
    conn: ConnGuard,
) {
    let resolver = match direction {
        Direction::Outbound => &shared.resolvers.outbound,
        Direction::Inbound { .. } => &shared.resolvers.inbound,
    };
    let dir = direction.name();
    let dst = match resolver(&client) {
        Ok(dst) => dst,
        Err(e) if crate::orig_dst::is_not_redirected(&e) => {
            // Someone dialled the outbound port directly: there is nowhere to forward to.
            warn!(dir, %peer, error = %e, "connection was not redirected (no original destination); closing");
            shared
                .telemetry
                .metrics
                .error(direction.dir(), "proxy-not-redirected");
            return;
        }
        Err(e) => {
            warn!(dir, %peer, error = %e, "cannot read the original destination; closing");
            shared
                .telemetry
                .metrics
                .error(direction.dir(), "proxy-no-original-destination");
            return;
        }
    };
    let dialled_directly =
        matches!(direction, Direction::Inbound { listener_port } if dst.port() == listener_port);
    if dialled_directly || shared.is_own_listener(dst) {
        warn!(dir, %peer, %dst, "destination is the proxy itself; closing to avoid a loop");
        shared
            .telemetry
            .metrics
            .error(direction.dir(), "proxy-loop");
        return;
    }
    let egress = shared.egress(direction);
    if let Err(e) = client.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY downstream");
    }

    // Policies (connect and idle timeouts now, breaker and the rest per request), resolved
    // once per connection.
    let dest = match direction {
        Direction::Outbound => {
            let label = || {
                let metrics = shared.telemetry.metrics.destination(Dir::Outbound, dst);
                Arc::clone(metrics.label())
            };
            shared.policies.outbound(dst, Some(&label))
        }
        Direction::Inbound { .. } => shared.policies.inbound(),
    };
    let mut deadline: Option<Instant> = None;
    let mut buf = [0u8; MAX_DETECT_LEN];
    // Most HTTP clients write their request right after connect(), so it is often already
    // waiting at accept. Then there is nothing to gain from dialling at once (the upstream cannot
    // have spoken first), and the keep-alive pool may hold an idle connection: no pre-dial,
    // which saves a connect and a close per client connection under connection churn.
    let http1_waiting = matches!(
        recv(client.as_raw_fd(), &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Ok(n) if n > 0 && matches!(classify(&buf[..n]), Detection::Http1)
    );
    // A destination the pool is talking HTTP/1 to has no greeting to wait for either: hold the
    // dial until the client speaks (or, for a client that stays silent for `detect_timeout`,
    // dial then, in case this is some other protocol after all).
    let mut dial_at_deadline = false;
    let mut upstream = if http1_waiting {
        Upstream::Held
    } else if dest.is_open() {
        // Server-speaks-first protocols would wait for a dial that never comes: bounded.
        deadline = Some(Instant::now() + shared.config.detect_timeout);
        Upstream::Held
    } else if egress.pool.speaks_http1(dst) {
        dial_at_deadline = true;
        deadline = Some(Instant::now() + shared.config.detect_timeout);
        Upstream::Held
    } else {
        Upstream::Dialling(start_dial(
            dst,
            dest.policy().connect_timeout,
            egress.source,
        ))
    };
    let mut seen = 0usize;
    let stop = shared.stop_token(direction.dir()).clone();
    let mut draining = false;
    let decision = loop {
        let event = tokio::select! {
            biased;
            // A drain closes a connection whose client has said nothing yet, like an idle
            // keep-alive connection, but only after `detect_timeout`: a connection accepted a
            // moment ago usually has its request on the way, and closing it would lose it.
            _ = stop.cancelled(), if seen == 0 && !draining => Event::Cancelled,
            // Upstream first: if both have spoken, opaque is always safe (and an h2 server's
            // SETTINGS frame is recognised below, so h2c is still detected).
            event = upstream_event(&mut upstream) => event,
            n = client_bytes(&client, &mut buf, seen) => Event::Client(n),
            _ = wait_until(deadline) => Event::Deadline,
        };
        match event {
            Event::Cancelled => {
                draining = true;
                let limit = Instant::now() + shared.config.detect_timeout;
                deadline = Some(deadline.map_or(limit, |d| d.min(limit)));
            }
            Event::Deadline if draining && seen == 0 => return,
            Event::Deadline if dial_at_deadline => {
                dial_at_deadline = false;
                upstream = Upstream::Dialling(start_dial(
                    dst,
                    dest.policy().connect_timeout,
                    egress.source,
                ));
                // A partial preface still gets its own `detect_timeout` from now.
                deadline = (seen > 0).then(|| Instant::now() + shared.config.detect_timeout);
            }
            Event::Client(Ok(0)) => break Decision::Opaque,
            Event::Client(Ok(n)) => {
                seen = n;
                match classify(&buf[..n]) {
                    Detection::Http1 => break Decision::Http1,
                    Detection::Http2 => break Decision::Http2,
                    Detection::Opaque => break Decision::Opaque,
                    Detection::NeedMore => {
                        deadline.get_or_insert(Instant::now() + shared.config.detect_timeout);
                    }
                }
            }
            Event::Client(Err(e)) => {
                debug!(%peer, %dst, error = %e, "client failed during detection");
                return;
            }
            Event::Connected(Ok(stream)) => upstream = Upstream::Ready(stream),
            Event::Connected(Err(e)) => {
                warn!(%peer, %dst, error = %e, "connect failed");
                if draining && seen == 0 {
                    // Nothing to answer, nowhere to go: do not wait out the grace period.
                    return reset(client);
                }
                upstream = Upstream::Failed(super::error::ProxyError::from(&e).code());
                // Give an HTTP client the chance to get a 502 that says why; anything else is
                // reset below, like the failed connect would have been without us.
                let limit = Instant::now() + shared.config.detect_timeout;
                deadline = Some(deadline.map_or(limit, |d| d.min(limit)));
            }
            Event::UpstreamSpoke => {
                upstream = match upstream {
                    Upstream::Ready(s) if starts_with_h2_settings(&s) => {
                        Upstream::SentH2Settings(s)
                    }
                    other => {
                        upstream = other;
                        break Decision::Opaque;
                    }
                };
                let limit = Instant::now() + shared.config.detect_timeout;
                deadline = Some(deadline.map_or(limit, |d| d.min(limit)));
            }
            Event::Deadline => {
                break match upstream {
                    Upstream::Failed(_) => Decision::Reset,
                    _ => Decision::Opaque,
                }
            }
        }
    };

    match decision {
        Decision::Reset => {
            let reason = match &upstream {
                Upstream::Failed(reason) => reason,
                _ => "proxy-reset",
            };
            shared.telemetry.metrics.error(direction.dir(), reason);
            reset(client)
        }
        Decision::Opaque => {
            opaque(&shared, direction, &dest, client, conn, upstream, peer, dst).await
        }
        Decision::Http1 | Decision::Http2 => {
            let authority = match Authority::from_maybe_shared(Bytes::from(dst.to_string())) {
                Ok(a) => a,
                // Not expected for a socket address; if it happens, stay out of the way.
                Err(_) => {
                    return opaque(&shared, direction, &dest, client, conn, upstream, peer, dst)
                        .await
                }
            };
            let predial = match upstream {
                Upstream::Ready(s) | Upstream::SentH2Settings(s) => Some(Predial::Ready(s)),
                Upstream::Dialling(f) => Some(Predial::Dialling(f)),
                Upstream::Failed(_) | Upstream::Held => None,
            };
            let client = CountedIo::new(client, conn);
            let conn = Conn {
                direction,
                peer,
                dst,
                authority,
                predial,
                dest,
            };
            if matches!(decision, Decision::Http2) {
                serve_h2(shared, conn, client).await;
            } else {
                serve_h1(shared, conn, client).await;
            }
        }
    }
}

/// A connection found to be HTTP, about to be served.
struct Conn {
    direction: Direction,
    peer: SocketAddr,
    dst: SocketAddr,
    authority: Authority,
    predial: Option<Predial>,
    dest: Arc<Destination>,
}

impl Shared {
    fn egress(&self, direction: Direction) -> &Egress {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound { .. } => &self.inbound,
        }
    }
}

async fn serve_h1(shared: Arc<Shared>, conn: Conn, client: CountedIo<TcpStream>) {
    let Conn {
        direction,
        peer,
        dst,
        authority,
        predial,
        dest,
    } = conn;
    debug!(dir = direction.name(), %peer, %dst, "http/1");
    // Parked until the pool's connector takes it; removed when this connection ends.
    let _parked = predial.map(|p| shared.egress(direction).stash.put(dst, p));
    let observer = shared.observer(direction.dir(), dst, peer);
    let route = Arc::new(route_for(
        &shared, direction, authority, dst, peer, dest, true,
    ));
    let first = Arc::new(FirstRequest::default());
    let svc_first = Arc::clone(&first);
    let svc_shared = Arc::clone(&shared);
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        svc_first.mark();
        let shared = Arc::clone(&svc_shared);
        let route = Arc::clone(&route);
        let observer = observer.clone();
        async move {
            let egress = shared.egress(direction);
            let resp = observe(&observer, req, |req| {
                forward_h1(&shared, egress, &route, req)
            });
            Ok::<_, std::convert::Infallible>(resp.await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades();
    tokio::pin!(conn);
    let stop = shared.stop_token(direction.dir());
    let limit = shared.config.detect_timeout;
    let result = serve_until_drained(conn.as_mut(), stop, &first, limit, |c| {
        c.graceful_shutdown()
    })
    .await;
    if let Err(e) = result {
        debug!(%peer, %dst, error = %Chain(&e), "http/1 connection ended with an error");
    }
}

async fn serve_h2(shared: Arc<Shared>, conn: Conn, client: CountedIo<TcpStream>) {
    let Conn {
        direction,
        peer,
        dst,
        authority,
        predial,
        dest,
    } = conn;
    debug!(dir = direction.name(), %peer, %dst, "h2c prior knowledge");
    let source = shared.egress(direction).source;
    let observer = shared.observer(direction.dir(), dst, peer);
    let route = route_for(&shared, direction, authority, dst, peer, dest, false);
    let upstream = Arc::new(H2Upstream::new(dst, route, source, predial));
    let first = Arc::new(FirstRequest::default());
    let svc_first = Arc::clone(&first);
    let svc_shared = Arc::clone(&shared);
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        svc_first.mark();
        let shared = Arc::clone(&svc_shared);
        let upstream = Arc::clone(&upstream);
        let observer = observer.clone();
        async move {
            let resp = observe(&observer, req, |req| forward_h2(&shared, &upstream, req));
            Ok::<_, std::convert::Infallible>(resp.await)
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(client), service);
    tokio::pin!(conn);
    let stop = shared.stop_token(direction.dir());
    let limit = shared.config.detect_timeout;
    let result = serve_until_drained(conn.as_mut(), stop, &first, limit, |c| {
        c.graceful_shutdown()
    })
    .await;
    if let Err(e) = result {
        debug!(%peer, %dst, error = %Chain(&e), "h2 connection ended with an error");
    }
}

/// Where the HTTP requests of one connection go, under which policies.
fn route_for(
    shared: &Shared,
    direction: Direction,
    authority: Authority,
    dst: SocketAddr,
    peer: SocketAddr,
    dest: Arc<Destination>,
    http1: bool,
) -> Route {
    let outbound = direction == Direction::Outbound;
    Route {
        upstream: http1.then(|| {
            let limit = dest.policy().max_connections;
            shared.egress(direction).pool.host(&authority, limit)
        }),
        authority,
        prefix: None,
        dest,
        // Name rules are for outbound traffic (the app's dependencies).
        by_name: outbound && shared.policies.has_name_rules(),
        default_port: dst.port(),
        // Inbound requests come from other hosts: say who the client was.
        forwarded_for: (!outbound).then(|| ForwardedClient::new(peer.ip())),
    }
}

/// Opaque TCP once the upstream connection is there; a failed connect resets the client.
// The connection's pieces are passed as they are: bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
async fn opaque(
    shared: &Shared,
    direction: Direction,
    dest: &Destination,
    client: TcpStream,
    conn: ConnGuard,
    upstream: Upstream,
    peer: SocketAddr,
    dst: SocketAddr,
) {
    let upstream = match upstream {
        Upstream::Ready(s) | Upstream::SentH2Settings(s) => s,
        Upstream::Dialling(f) => match f.await {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, %dst, error = %e, "connect failed");
                let reason = super::error::ProxyError::from(&e).code();
                shared.telemetry.metrics.error(direction.dir(), reason);
                return reset(client);
            }
        },
        Upstream::Failed(reason) => {
            shared.telemetry.metrics.error(direction.dir(), reason);
            return reset(client);
        }
        Upstream::Held => {
            let source = shared.egress(direction).source;
            match dial(dst, dest.policy().connect_timeout, source).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(%peer, %dst, error = %e, "connect failed");
                    let reason = super::error::ProxyError::from(&e).code();
                    shared.telemetry.metrics.error(direction.dir(), reason);
                    return reset(client);
                }
            }
        }
    };
    let idle = dest.policy().idle_timeout;
    relay(CountedIo::new(client, conn), upstream, peer, dst, idle).await;
}

/// Opaque TCP: bytes that were only peeked are still in the client socket, so the relay sends
/// them like everything else. Half-closes are propagated; nothing moving for `idle` closes both.
async fn relay(
    mut client: CountedIo<TcpStream>,
    mut upstream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    idle: Duration,
) {
    debug!(%peer, %dst, "opaque tcp");
    match idle::copy_bidirectional(&mut client, &mut upstream, idle).await {
        Relayed::Done(Ok((up, down))) => {
            debug!(%peer, %dst, bytes_up = up, bytes_down = down, "tcp closed")
        }
        Relayed::Done(Err(e)) => debug!(%peer, %dst, error = %e, "tcp relay ended with an error"),
        Relayed::Idle => debug!(%peer, %dst, ?idle, "tcp connection idle; closed"),
    }
}

/// Closes with RST so that the client sees a failure (as it would have without us), not an
/// orderly end of stream.
fn reset(client: TcpStream) {
    if let Err(e) = client.set_zero_linger() {
        debug!(error = %e, "cannot set SO_LINGER 0");
    }
    drop(client);
}

async fn upstream_event(upstream: &mut Upstream) -> Event {
    match upstream {
        Upstream::Dialling(dialling) => Event::Connected(dialling.await),
        Upstream::Ready(stream) => {
            // Data, EOF and errors all mean "the server acted first": relay opaquely.
            let mut byte = [0u8; 1];
            let _ = stream.peek(&mut byte).await;
            Event::UpstreamSpoke
        }
        Upstream::SentH2Settings(_) | Upstream::Failed(_) | Upstream::Held => {
            std::future::pending().await
        }
    }
}

/// True if the upstream's first bytes are an HTTP/2 frame header of a SETTINGS frame
/// (type 4, no flags, stream 0): the server connection preface of RFC 9113 3.4.
fn starts_with_h2_settings(stream: &TcpStream) -> bool {
    let mut head = [0u8; 9];
    match recv(
        stream.as_raw_fd(),
        &mut head,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(9) => is_h2_settings_header(&head),
        _ => false,
    }
}

pub(super) fn is_h2_settings_header(head: &[u8; 9]) -> bool {
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    // SETTINGS payloads are 6-byte entries; 16384 is the smallest maximum frame size.
    head[3] == 4 && head[4] == 0 && head[5..9] == [0, 0, 0, 0] && length % 6 == 0 && length <= 16384
}

/// Waits until the client has more than `seen` bytes waiting (or closed), and peeks them.
///
/// `peek` alone cannot wait for *more* data: with bytes already waiting the socket stays
/// readable and peek returns at once. Inside `async_io`, "no new bytes" is reported as
/// `WouldBlock`, which clears tokio's readiness only if no new readiness event arrived since the
/// check, so no wake-up can be lost.
pub(super) async fn client_bytes(
    client: &TcpStream,
    buf: &mut [u8],
    seen: usize,
) -> io::Result<usize> {
    client
        .async_io(Interest::READABLE, || {
            let n = recv(
                client.as_raw_fd(),
                buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            if n == 0 || n > seen {
                Ok(n)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        })
        .await
}

pub(super) async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
