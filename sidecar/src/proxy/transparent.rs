//! Interception mode, both directions: one captured connection from accept to close.
//!
//! Outbound connections were redirected by the connect hooks; their destination comes from
//! `SO_ORIGINAL_DST`. Inbound connections were steered to our listener by sk_lookup; their
//! destination is simply the socket's local address, and they go to the app from 127.0.0.6.
//!
//! The upstream connect starts the moment the connection is accepted, and the proxy then waits
//! for whichever side speaks first ([`Detecting`]):
//! - the upstream (SMTP, MySQL, SSH, ...): opaque relay at once, no detection delay on any port;
//! - the client: classify its first bytes; HTTP/1 is served by the native engine ([`super::h1`]),
//!   h2c (and HTTP/1 under `--http1-engine hyper`) by hyper
//!   ([`super::serve`]); the connection already dialled goes to the HTTP client's pool; anything
//!   else is relayed opaquely.
//!
//! No detection timeout applies while neither side has said anything (a server that speaks
//! first gets all the time it needs); only a partial client preface that might still become HTTP
//! waits (up to `detect_timeout`) for the rest. A connection on which neither side says anything
//! for the destination's idle timeout (1 h by default) is closed, as an idle opaque one is.
//!
//! Mesh TLS ([`super::mesh`]): outbound, the dial is mesh TLS when the plan says so (the
//! detection above then runs over it unchanged). Inbound, with an identity configured, a client
//! whose first bytes are TLS has its first record read: a ClientHello offering the mesh ALPN is
//! terminated and detection starts again on the decrypted stream (the app connection dialled so
//! far is kept); any other TLS is the app's own and is relayed untouched. A strict port refuses
//! everything that did not arrive over mesh TLS (HTTP: 403, except probe paths; else a reset).
//!
//! A connection's task is a [`Connection`]: one phase at a time (detection, then what it
//! became), so that what every connection holds for its whole life is only the state of what it
//! is now.
//!
//! Size: about 1,400 lines: the detection state machine, its outcomes for both directions and
//! both kinds of client stream (plain, terminated mesh TLS), the inbound checks at those
//! outcomes (strict mTLS, authorization), and the connection's phases, kept in one place so the
//! transitions can be read together.
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::authorize::{self, Caller};
use super::config::Http1Engine;
use super::connect::{
    dial_conn, start_dial, Conn, Dialling, Mesh, Plan, Predial, Source, StashGuard,
};
use super::detect::{
    classify, client_bytes, client_hello, is_h2_settings_header, looks_like_tls, wait_until,
    Detection, Hello, MAX_DETECT_LEN,
};
use super::forward::error_response;
use super::forward::{forward_h1, forward_h2};
use super::h1::{self, Serve};
use super::h2::H2Upstream;
use super::mesh::Downstream;
use super::parked;
use super::route::{Origin, Resolved, Route, RouteKey};
use super::serve::{serve_http, Protocol};
use super::shared::{Direction, Shared, SilentDial};
use super::transcode::{self, Handled};
use crate::error::{Chain, ConnectError, ProxyError};
use crate::identity::{SpiffeId, MESH_ALPN};
use crate::metrics::access::Observer;
use crate::metrics::conn::{ConnGuard, CountedIo};
use crate::metrics::{Dir, MeshMode};
use crate::policy::headers::ForwardedClient;
use crate::policy::idle::{self, Relayed};
use crate::policy::{Destination, InboundMtls};

/// The upstream side while detecting.
enum Upstream {
    Dialling(Dialling),
    Ready(Conn),
    /// Sent an HTTP/2 SETTINGS frame unprompted (Go and hyper h2c servers do): it now waits for
    /// the client's preface, so keep waiting for the client (bounded) instead of going opaque.
    SentH2Settings(Conn),
    /// The connect failed, and why (for the metrics of a reset).
    Failed(ProxyError),
    /// Not dialled: the destination's circuit breaker is open. An HTTP client gets its 503
    /// without the upstream being touched; anything else is dialled once it shows what it is.
    Held,
}

enum Event {
    Cancelled,
    /// The client has `n` bytes waiting (0: it closed without sending anything).
    Client(io::Result<usize>),
    Connected(Result<Conn, ConnectError>),
    UpstreamSpoke,
    Deadline,
    Idle,
}

enum Decision {
    Opaque,
    Http(Protocol),
    /// Nothing can be answered and there is nowhere to go (the connect failed): reset the
    /// client, counting why.
    Reset(ProxyError),
    /// The client failed while we waited: just close.
    Close,
    /// Inbound: the client's first bytes are TLS (mesh TLS to terminate, or the app's own).
    Tls,
}

/// Serves one accepted, captured connection; `conn` keeps its books until it closes.
///
/// Every connection's task holds this future for its whole life, so it is kept to the state of
/// what the connection became: detection runs in a box of its own, freed once it has decided;
/// an opaque relay and a mesh TLS session are boxed too, so that an HTTP/1 connection (the
/// common case) carries only its own state. (And it is a block rather than an `async fn`, which
/// would keep its arguments twice in the future: as given, and moved into the body.)
pub(crate) fn serve(
    shared: Arc<Shared>,
    direction: Direction,
    client: TcpStream,
    peer: SocketAddr,
    conn: ConnGuard,
) -> impl Future<Output = ()> + Send {
    Connection {
        phase: Phase::Detecting {
            fut: Box::pin(detect(shared, direction, client, peer, conn)),
        },
        native: |engine, client| h1::serve::<CountedIo<TcpStream>>(engine, client, Serve::Parkable),
    }
}

pin_project! {
    /// A captured connection's task (see [`serve`]): one phase at a time, so its size is the
    /// largest phase's, not their sum. `native` starts the HTTP/1 engine (a function, so that
    /// the engine's future type can be held without being named).
    struct Connection<M, H> {
        #[pin]
        phase: Phase<H>,
        native: M,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<H> {
        Detecting { fut: Pin<Box<dyn Future<Output = Detected> + Send>> },
        Native { #[pin] fut: H, parked: Option<StashGuard> },
        Boxed { fut: Pin<Box<dyn Future<Output = ()> + Send>> },
        Done,
    }
}

impl<M, H> Future for Connection<M, H>
where
    M: FnMut(h1::Client, CountedIo<TcpStream>) -> H,
    H: Future<Output = Option<h1::Idle<CountedIo<TcpStream>>>>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            match this.phase.as_mut().project() {
                PhaseProj::Detecting { fut } => {
                    let next = match ready!(fut.as_mut().poll(cx)) {
                        Detected::Plain(Next::Http(http)) => match serve_http_conn(http) {
                            Serving::Native {
                                engine,
                                client,
                                parked,
                            } => Phase::Native {
                                fut: (this.native)(engine, client),
                                parked,
                            },
                            Serving::Hyper(fut) => Phase::Boxed { fut },
                        },
                        // Boxed: a relay's state is only paid for by opaque connections.
                        Detected::Plain(Next::Opaque(opaque)) => Phase::Boxed {
                            fut: Box::pin(opaque.run()),
                        },
                        Detected::Plain(Next::Done) => Phase::Done,
                        // Boxed: a mesh TLS session is large (rustls' state, the decrypted
                        // stream's buffers), and only the connections that terminate one
                        // should carry it.
                        Detected::MeshTls(tls) => Phase::Boxed {
                            fut: Box::pin(tls.serve()),
                        },
                    };
                    this.phase.set(next);
                }
                PhaseProj::Native { fut, parked } => {
                    // Idle for `--park-idle-after`: parked (this task ends), with the
                    // connection dialled during its detection if nobody took it yet.
                    if let Some(idle) = ready!(fut.poll(cx)) {
                        parked::park(idle, parked.take());
                    }
                    this.phase.set(Phase::Done);
                }
                PhaseProj::Boxed { fut } => {
                    ready!(fut.as_mut().poll(cx));
                    this.phase.set(Phase::Done);
                }
                PhaseProj::Done => return Poll::Ready(()),
            }
        }
    }
}

/// A captured connection until detection has decided what it is.
enum Detected {
    Plain(Next<TcpStream>),
    /// Inbound mesh TLS, to terminate.
    MeshTls(MeshTls),
}

/// Finds out where `client` was going, under which policies, and what it speaks.
async fn detect(
    shared: Arc<Shared>,
    direction: Direction,
    mut client: TcpStream,
    peer: SocketAddr,
    conn: ConnGuard,
) -> Detected {
    let dst = match destination(&shared, direction, &client, peer) {
        Ok(dst) => dst,
        Err(err) => {
            shared.telemetry.metrics.error(direction.dir(), err);
            return Detected::Plain(Next::Done);
        }
    };
    if let Err(e) = client.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY downstream");
    }
    let ConnectionPolicies { dest, plan, gated } = connection_policies(&shared, direction, dst);
    let mut detecting = Detecting::start(&shared, direction, &mut client, dst, &dest, plan, gated);
    let decision = detecting.run(&mut client, peer).await;
    let accepted = Accepted {
        shared,
        direction,
        peer,
        dst,
        dest,
        conn,
    };
    let (decision, mode) = if !matches!(decision, Decision::Tls) {
        (decision, MeshMode::Plaintext)
    } else {
        // Inbound TLS: a sidecar's (terminate it), or the app's own (relay it untouched)?
        let timeout = accepted.shared.config.detect_timeout;
        if sniff_hello(&client, timeout).await != Hello::Mesh {
            (Decision::Opaque, MeshMode::Passthrough)
        } else {
            return Detected::MeshTls(MeshTls {
                accepted,
                client,
                detecting,
                peer,
                timeout,
            });
        }
    };
    // Detection is over: this connection no longer counts as a silent dial.
    detecting.silent = None;
    Detected::Plain(accepted.next(client, detecting, decision, mode))
}

/// An inbound client whose first TLS record offers mesh TLS.
struct MeshTls {
    accepted: Accepted,
    client: TcpStream,
    detecting: Detecting,
    peer: SocketAddr,
    timeout: Duration,
}

impl MeshTls {
    /// Terminates the session, and serves what the client says inside it.
    async fn serve(self) {
        let MeshTls {
            accepted,
            client,
            mut detecting,
            peer,
            timeout,
        } = self;
        let Some(mut tls) = accepted.shared.mesh.accept(client, peer, timeout).await else {
            return;
        };
        // Detect again on the decrypted stream, keeping the app connection dialled so far.
        detecting.restart();
        let decision = detecting.run(&mut tls, peer).await;
        detecting.silent = None;
        match accepted.next(tls, detecting, decision, MeshMode::Mtls) {
            Next::Http(http) => serve_http_conn(http).run().await,
            Next::Opaque(opaque) => opaque.run().await,
            Next::Done => {}
        }
    }
}

/// What a captured connection becomes once detection has decided.
enum Next<D> {
    Http(HttpConn<D>),
    Opaque(Opaque<D>),
    /// Refused or closed: nothing more to do.
    Done,
}

/// An opaque relay to start.
struct Opaque<D> {
    shared: Arc<Shared>,
    direction: Direction,
    dest: Resolved,
    plan: Plan,
    peer: SocketAddr,
    dst: SocketAddr,
    client: D,
    conn: ConnGuard,
    upstream: Upstream,
}

impl<D: Downstream> Opaque<D> {
    async fn run(self) {
        let ctx = OpaqueCtx {
            shared: &self.shared,
            direction: self.direction,
            dest: &self.dest,
            plan: self.plan,
            peer: self.peer,
            dst: self.dst,
        };
        ctx.run(self.client, self.conn, self.upstream).await;
    }
}

/// Reads the client's first TLS record (bounded by `timeout` and one record's size): does it
/// offer mesh TLS?
async fn sniff_hello(client: &TcpStream, timeout: Duration) -> Hello {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 5];
    let mut seen = 0;
    loop {
        match client_hello(&buf[..seen], MESH_ALPN) {
            Hello::NeedMore(n) => {
                buf.resize(n, 0);
                match tokio::time::timeout_at(deadline, client_bytes(client, &mut buf, seen)).await
                {
                    Ok(Ok(n)) if n > seen => seen = n,
                    _ => return Hello::Other,
                }
            }
            answer => return answer,
        }
    }
}

/// A captured connection whose destination and policies are known.
struct Accepted {
    shared: Arc<Shared>,
    direction: Direction,
    peer: SocketAddr,
    dst: SocketAddr,
    dest: Resolved,
    conn: ConnGuard,
}

impl Accepted {
    /// Acts on detection's decision for `client`, which arrived as `mode`: counts it, refuses
    /// what must be refused, and says what the connection becomes.
    fn next<D: Downstream>(
        self,
        client: D,
        detecting: Detecting,
        decision: Decision,
        mode: MeshMode,
    ) -> Next<D> {
        let Accepted {
            shared,
            direction,
            peer,
            dst,
            dest,
            conn,
        } = self;
        let dir = direction.dir();
        let strict = matches!(direction, Direction::Inbound { .. })
            && mode != MeshMode::Mtls
            && shared.policies.load().config().inbound.mtls_for(dst.port()) == InboundMtls::Strict;
        match decision {
            Decision::Close | Decision::Tls => return Next::Done,
            Decision::Reset(err) => {
                shared.telemetry.metrics.error(dir, err);
                reset(client.tcp(), dir);
                return Next::Done;
            }
            _ => {}
        }
        if matches!(direction, Direction::Inbound { .. }) {
            shared.telemetry.metrics.mtls.connection(dir, mode);
        }
        let plan = detecting.plan;
        let caller = matches!(direction, Direction::Inbound { .. }).then(|| Caller {
            id: client.peer_id().cloned(),
            ip: peer.ip().to_canonical(),
            port: dst.port(),
        });
        match decision {
            Decision::Opaque if strict => {
                debug!(%peer, %dst, "plaintext to a strict port; reset");
                shared
                    .telemetry
                    .metrics
                    .error(dir, ProxyError::InboundMtlsRequired);
                reset(client.tcp(), dir);
                Next::Done
            }
            Decision::Opaque
                if caller
                    .as_ref()
                    .and_then(|c| authorize::connection(&shared, c))
                    .is_some_and(|d| !d.allowed) =>
            {
                shared
                    .telemetry
                    .metrics
                    .error(dir, ProxyError::InboundAuthzDenied);
                reset(client.tcp(), dir);
                Next::Done
            }
            Decision::Opaque => Next::Opaque(Opaque {
                shared,
                direction,
                dest,
                plan,
                peer,
                dst,
                client,
                conn,
                upstream: detecting.upstream,
            }),
            Decision::Http(protocol) => {
                let authority = match Authority::from_maybe_shared(Bytes::from(dst.to_string())) {
                    Ok(a) => a,
                    // Not expected for a socket address; if it happens, stay out of the way.
                    Err(_) => {
                        return Next::Opaque(Opaque {
                            shared,
                            direction,
                            dest,
                            plan,
                            peer,
                            dst,
                            client,
                            conn,
                            upstream: detecting.upstream,
                        });
                    }
                };
                let predial = match detecting.upstream {
                    Upstream::Ready(s) | Upstream::SentH2Settings(s) => Some(Predial::Ready(s)),
                    Upstream::Dialling(f) => Some(Predial::Dialling(f)),
                    Upstream::Failed(_) | Upstream::Held => None,
                };
                if direction == Direction::Outbound {
                    let mode = if plan.is_tls() {
                        MeshMode::Mtls
                    } else {
                        MeshMode::Plaintext
                    };
                    shared.telemetry.metrics.mtls.connection(dir, mode);
                }
                let client_id = client.peer_id().cloned();
                Next::Http(HttpConn {
                    shared,
                    protocol,
                    client: CountedIo::new(client, conn),
                    caller,
                    direction,
                    peer,
                    dst,
                    authority,
                    predial,
                    dest,
                    plan,
                    client_id,
                    strict,
                })
            }
            Decision::Close | Decision::Tls | Decision::Reset(_) => Next::Done,
        }
    }
}

/// Where a captured connection was going: the kernel's answer, unless that is the proxy itself.
fn destination(
    shared: &Shared,
    direction: Direction,
    client: &TcpStream,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    let dir = direction.name();
    let resolver = match direction {
        Direction::Outbound => &shared.resolvers.outbound,
        Direction::Inbound { .. } => &shared.resolvers.inbound,
    };
    let dst = match resolver(client) {
        Ok(dst) => dst,
        Err(e) if crate::orig_dst::is_not_redirected(&e) => {
            // Someone dialled the outbound port directly: there is nowhere to forward to.
            warn!(dir, %peer, error = %e, "connection was not redirected (no original destination); closing");
            return Err(ProxyError::ProxyNotRedirected);
        }
        Err(e) => {
            warn!(dir, %peer, error = %e, "cannot read the original destination; closing");
            return Err(ProxyError::ProxyNoOriginalDestination);
        }
    };
    let dialled_directly =
        matches!(direction, Direction::Inbound { listener_port } if dst.port() == listener_port);
    if dialled_directly || shared.is_own_listener(dst) {
        warn!(dir, %peer, %dst, "destination is the proxy itself; closing to avoid a loop");
        return Err(ProxyError::ProxyLoop);
    }
    Ok(dst)
}

/// The policies of a connection (connect and idle timeouts now, breaker and the rest per
/// request), its mesh plan and whether authorization gates it, resolved once under the
/// generation in force.
fn connection_policies(
    shared: &Shared,
    direction: Direction,
    dst: SocketAddr,
) -> ConnectionPolicies {
    let policies = shared.policies.load();
    let (dest, plan, gated) = match direction {
        Direction::Outbound => {
            let label = || {
                let metrics = shared.telemetry.metrics.destination(Dir::Outbound, dst);
                Arc::clone(metrics.label())
            };
            let dest = policies.outbound(dst, Some(&label));
            let plan = shared
                .mesh
                .plan(dst, dest.policy(), &policies.config().mesh);
            (dest, plan, false)
        }
        // To the app, on this host: never mesh TLS.
        // A port that can refuse a client (authorization, strict mTLS) never dials the app
        // for one it has not decided on.
        Direction::Inbound { .. } => {
            let inbound = &policies.config().inbound;
            let gated = inbound.authz.gates(dst.port())
                || inbound.mtls_for(dst.port()) == InboundMtls::Strict;
            (policies.inbound(), Plan::Plain, gated)
        }
    };
    ConnectionPolicies {
        dest: Resolved {
            dest,
            generation: policies.generation(),
        },
        plan,
        gated,
    }
}

/// What one connection runs under, all from one generation of the policies.
struct ConnectionPolicies {
    dest: Resolved,
    /// How the upstream is dialled (outbound: mesh TLS or plaintext).
    plan: Plan,
    /// Inbound: authorization or strict mTLS applies to the port (the app is dialled only after
    /// a decision).
    gated: bool,
}

/// Detection in progress: the upstream side, the client bytes peeked so far, and the deadline
/// (only set while a partial preface, a drain, a failed dial or a held dial is pending).
struct Detecting {
    upstream: Upstream,
    /// How the upstream is dialled (mesh TLS or plaintext).
    plan: Plan,
    mesh: Arc<Mesh>,
    /// Inbound with an identity configured: TLS first bytes end detection ([`Decision::Tls`]).
    sniff_tls: bool,
    deadline: Option<Instant>,
    buf: [u8; MAX_DETECT_LEN],
    seen: usize,
    /// The dial is held until the client speaks or `detect_timeout` passes.
    dial_at_deadline: bool,
    draining: bool,
    stop: CancellationToken,
    detect_timeout: Duration,
    dst: SocketAddr,
    connect_timeout: Duration,
    source: Source,
    /// Inbound: absolute-form requests are HTTP (see [`classify`]).
    inbound: bool,
    /// The destination's idle timeout, and when it runs out if nobody speaks.
    idle: Duration,
    idle_deadline: Instant,
    /// Inbound: the count of silent dials, and this connection's share of it while it has one.
    silent_dials: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// Counts a silent client not dialled at once.
    deferred: prometheus::IntCounter,
    silent: Option<SilentDial>,
    /// Inbound, authorization or strict mTLS applies to the port: the app is dialled only after a
    /// decision (a silent client is decided after `detect_timeout`, as plaintext).
    gated: bool,
}

impl Detecting {
    /// Starts dialling at once, unless there is nothing to gain from it.
    fn start(
        shared: &Shared,
        direction: Direction,
        client: &mut TcpStream,
        dst: SocketAddr,
        dest: &Destination,
        plan: Plan,
        gated: bool,
    ) -> Detecting {
        let egress = shared.egress(direction);
        let inbound = matches!(direction, Direction::Inbound { .. });
        let detect_timeout = shared.config.detect_timeout;
        let connect_timeout = dest.policy().connect_timeout;
        let mut buf = [0u8; MAX_DETECT_LEN];
        // Most HTTP clients write their request right after connect(), so it is often already
        // waiting at accept. Then there is nothing to gain from dialling at once (the upstream
        // cannot have spoken first), and the keep-alive pool may hold an idle connection: no
        // pre-dial, which saves a connect and a close per client connection under churn.
        let waiting = client.peek_now(&mut buf);
        let http1_waiting =
            waiting > 0 && matches!(classify(&buf[..waiting], inbound), Detection::Http1);
        let mesh = Arc::clone(&shared.mesh);
        let mut deadline = None;
        // A destination the pool is talking HTTP/1 to has no greeting to wait for either: hold
        // the dial until the client speaks (or, for a client that stays silent for
        // `detect_timeout`, dial then, in case this is some other protocol after all).
        let mut dial_at_deadline = false;
        let silent_dials = inbound.then(|| Arc::clone(&shared.inbound_silent_dials));
        let deferred = shared
            .telemetry
            .metrics
            .conns(direction.dir())
            .silent_dials_deferred
            .clone();
        let mut silent = None;
        let upstream = if gated {
            dial_at_deadline = true;
            deadline = Some(Instant::now() + detect_timeout);
            Upstream::Held
        } else if http1_waiting {
            Upstream::Held
        } else if dest.is_open() {
            // Server-speaks-first protocols would wait for a dial that never comes: bounded.
            deadline = Some(Instant::now() + detect_timeout);
            Upstream::Held
        } else if egress.pool.speaks_http1(dst, plan.is_tls())
            || egress.raw.speaks_http1(dst, plan.is_tls())
            || (inbound && shared.has_transcode_upstream(dst))
        {
            // (A transcoded gRPC port's calls share one HTTP/2 connection to the app: a
            // client's own dial would only be closed again.)
            dial_at_deadline = true;
            deadline = Some(Instant::now() + detect_timeout);
            Upstream::Held
        } else if let Some(count) = &silent_dials {
            match SilentDial::try_take(count) {
                Some(share) => {
                    silent = Some(share);
                    Upstream::Dialling(start_dial(
                        dst,
                        connect_timeout,
                        egress.source,
                        &plan,
                        &mesh,
                    ))
                }
                // Too many silent clients dialled already: this one waits until it speaks.
                None => {
                    deferred.inc();
                    Upstream::Held
                }
            }
        } else {
            Upstream::Dialling(start_dial(
                dst,
                connect_timeout,
                egress.source,
                &plan,
                &mesh,
            ))
        };
        Detecting {
            upstream,
            plan,
            mesh,
            sniff_tls: inbound && shared.config.identity.is_some(),
            deadline,
            buf,
            seen: 0,
            dial_at_deadline,
            draining: false,
            stop: shared.stop_token(direction.dir()).clone(),
            detect_timeout,
            dst,
            connect_timeout,
            source: egress.source,
            inbound,
            idle: dest.policy().idle_timeout,
            idle_deadline: Instant::now() + dest.policy().idle_timeout,
            silent_dials,
            deferred,
            silent,
            gated,
        }
    }

    /// Starts over on the decrypted stream of a terminated mesh connection (the upstream
    /// dialled so far is kept); TLS inside it is the app's own.
    fn restart(&mut self) {
        self.seen = 0;
        self.buf = [0u8; MAX_DETECT_LEN];
        self.sniff_tls = false;
        self.draining = false;
        self.deadline = None;
        self.idle_deadline = Instant::now() + self.idle;
        if self.gated {
            self.dial_at_deadline = true;
            self.deadline = Some(Instant::now() + self.detect_timeout);
        }
    }

    /// Brings the deadline forward to at most `detect_timeout` from now.
    fn at_most_detect_timeout(&mut self) {
        let limit = Instant::now() + self.detect_timeout;
        self.deadline = Some(self.deadline.map_or(limit, |d| d.min(limit)));
    }

    /// Waits until it is clear what the connection is.
    async fn run<D: Downstream>(&mut self, client: &mut D, peer: SocketAddr) -> Decision {
        let dst = self.dst;
        loop {
            let seen = self.seen;
            let event = tokio::select! {
                biased;
                // A drain closes a connection whose client has said nothing yet, like an idle
                // keep-alive connection, but only after `detect_timeout`: a connection accepted a
                // moment ago usually has its request on the way, and closing it would lose it.
                _ = self.stop.cancelled(), if seen == 0 && !self.draining => Event::Cancelled,
                // Upstream first: if both have spoken, opaque is always safe (and an h2 server's
                // SETTINGS frame is recognised below, so h2c is still detected).
                event = upstream_event(&mut self.upstream) => event,
                n = client.peek_more(&mut self.buf, seen) => Event::Client(n),
                _ = wait_until(self.deadline) => Event::Deadline,
                // Neither side has said anything for the idle timeout: the same bound as an
                // opaque connection on which nothing moves.
                _ = tokio::time::sleep_until(self.idle_deadline), if seen == 0 => Event::Idle,
            };
            match event {
                Event::Idle => {
                    debug!(%peer, %dst, idle = ?self.idle, "nothing said by either side; closed");
                    return Decision::Close;
                }
                Event::Cancelled => {
                    self.draining = true;
                    self.at_most_detect_timeout();
                }
                Event::Deadline if self.draining && self.seen == 0 => return Decision::Close,
                Event::Deadline if self.dial_at_deadline && self.gated => {
                    // Decided (and dialled) once detection ends: a silent client now, as
                    // opaque; a partial preface gets its own `detect_timeout`.
                    self.dial_at_deadline = false;
                    if self.seen == 0 {
                        return Decision::Opaque;
                    }
                    self.deadline = Some(Instant::now() + self.detect_timeout);
                }
                Event::Deadline if self.dial_at_deadline => {
                    self.dial_at_deadline = false;
                    if self.seen == 0 {
                        if let Some(count) = &self.silent_dials {
                            match SilentDial::try_take(count) {
                                Some(share) => self.silent = Some(share),
                                // Too many silent clients dialled: wait for this one to speak.
                                None => {
                                    self.deferred.inc();
                                    self.deadline = None;
                                    continue;
                                }
                            }
                        }
                    }
                    self.upstream = Upstream::Dialling(start_dial(
                        dst,
                        self.connect_timeout,
                        self.source,
                        &self.plan,
                        &self.mesh,
                    ));
                    // A partial preface still gets its own `detect_timeout` from now.
                    self.deadline = (self.seen > 0).then(|| Instant::now() + self.detect_timeout);
                }
                Event::Client(Ok(0)) => return Decision::Opaque,
                Event::Client(Ok(n)) => {
                    self.seen = n;
                    if self.sniff_tls && looks_like_tls(&self.buf[..n]) {
                        return Decision::Tls;
                    }
                    match classify(&self.buf[..n], self.inbound) {
                        Detection::Http1 => return Decision::Http(Protocol::Http1),
                        Detection::Http2 => return Decision::Http(Protocol::Http2),
                        Detection::Opaque => return Decision::Opaque,
                        Detection::NeedMore => {
                            let limit = Instant::now() + self.detect_timeout;
                            self.deadline.get_or_insert(limit);
                        }
                    }
                }
                Event::Client(Err(e)) => {
                    debug!(%peer, %dst, error = %e, "client failed during detection");
                    return Decision::Close;
                }
                Event::Connected(Ok(stream)) => self.upstream = Upstream::Ready(stream),
                Event::Connected(Err(e)) => {
                    let err = connect_failed(peer, dst, &e);
                    if self.draining && self.seen == 0 {
                        // Nothing to answer, nowhere to go: do not wait out the grace period.
                        return Decision::Reset(err);
                    }
                    self.upstream = Upstream::Failed(err);
                    // Give an HTTP client the chance to get a 502 that says why; anything else
                    // is reset, like the failed connect would have been without us.
                    self.at_most_detect_timeout();
                }
                Event::UpstreamSpoke => {
                    match std::mem::replace(&mut self.upstream, Upstream::Held) {
                        Upstream::Ready(mut s) => {
                            if sent_h2_settings(&mut s) {
                                self.upstream = Upstream::SentH2Settings(s);
                            } else {
                                self.upstream = Upstream::Ready(s);
                                return Decision::Opaque;
                            }
                        }
                        other => {
                            self.upstream = other;
                            return Decision::Opaque;
                        }
                    }
                    self.at_most_detect_timeout();
                }
                Event::Deadline => {
                    return match self.upstream {
                        Upstream::Failed(err) => Decision::Reset(err),
                        _ => Decision::Opaque,
                    }
                }
            }
        }
    }
}

/// A connection found to be HTTP, about to be served.
struct HttpConn<D> {
    shared: Arc<Shared>,
    protocol: Protocol,
    client: CountedIo<D>,
    /// Inbound: who calls, for authorization.
    caller: Option<Caller>,
    direction: Direction,
    peer: SocketAddr,
    dst: SocketAddr,
    authority: Authority,
    predial: Option<Predial>,
    dest: Resolved,
    plan: Plan,
    /// The client's SPIFFE ID (inbound mesh TLS): `x-forwarded-client-cert`, the access log.
    client_id: Option<SpiffeId>,
    /// Plaintext to a strict port: only probe paths are served.
    strict: bool,
}

impl<D> HttpConn<D> {
    /// The connection's observer (metrics, access log) and its client as its route sees it.
    fn observe(&self) -> (Arc<Observer>, RouteClient) {
        debug!(dir = self.direction.name(), peer = %self.peer, dst = %self.dst, protocol = ?self.protocol, "http");
        let observer = self.shared.observer(
            self.direction.dir(),
            self.dst,
            self.client_id.as_ref().map(|id| Arc::from(id.as_str())),
        );
        let client = RouteClient {
            peer: self.peer,
            id: self.client_id.clone(),
            plan: self.plan.clone(),
        };
        (observer, client)
    }
}

/// How a captured HTTP connection is served, decided before anything is awaited.
enum Serving<D> {
    /// The native HTTP/1 engine, whose future the connection's task holds inline.
    Native {
        engine: h1::Client,
        client: CountedIo<D>,
        /// The connection dialled during detection, parked until the pool's connector takes it;
        /// removed when this connection ends.
        parked: Option<StashGuard>,
    },
    /// hyper (h2c, `--http1-engine hyper`), boxed: its state is only paid for by the
    /// connections that use it.
    Hyper(Pin<Box<dyn Future<Output = ()> + Send>>),
}

impl<D: Downstream> Serving<D> {
    async fn run(self) {
        match self {
            Serving::Native {
                engine,
                client,
                parked,
            } => {
                // A mesh TLS session (its state is not the socket's): never parked.
                h1::serve(engine, client, Serve::Whole).await;
                drop(parked);
            }
            Serving::Hyper(fut) => fut.await,
        }
    }
}

/// Serves a captured HTTP connection: HTTP/1 through the direction's pool (the pre-dialled
/// connection parked for it), h2c over one upstream h2 connection of its own.
fn serve_http_conn<D: Downstream>(conn: HttpConn<D>) -> Serving<D> {
    let native = conn.protocol == Protocol::Http1
        && conn.shared.config.http.http1_engine == Http1Engine::Native;
    if !native {
        return Serving::Hyper(Box::pin(serve_hyper_conn(conn)));
    }
    let (observer, route_client) = conn.observe();
    let HttpConn {
        shared,
        client,
        caller,
        direction,
        peer,
        dst,
        authority,
        predial,
        dest,
        strict,
        ..
    } = conn;
    // Shared with the other connections whose routes are the same (plaintext, no client
    // identity in the forwarding headers), as of the same policy generation.
    let key = match direction {
        _ if route_client.plan.is_tls() || route_client.id.is_some() => None,
        Direction::Outbound => Some(RouteKey::Outbound(dst)),
        Direction::Inbound { .. } => Some(RouteKey::Inbound(dst, route_client.peer.ip())),
    };
    let make = || {
        route_for(
            &shared,
            direction,
            authority,
            dst,
            route_client,
            dest.clone(),
            false,
        )
    };
    let route = match key {
        Some(key) => shared.routes.share(
            key,
            |r| r.generation == dest.generation && Arc::ptr_eq(&r.dest, &dest.dest),
            make,
        ),
        None => Arc::new(make()),
    };
    let egress = shared.egress(direction);
    let limit_conns = pool_limit(&shared, direction, &route.dest);
    let host = egress
        .raw
        .host(&route.authority, limit_conns, route.plan.clone());
    // A transcoded gRPC port: REST calls go over the port's shared HTTP/2 connection, and the
    // connection dialled during detection is offered to it (the app's gRPC one).
    let (transcode, parked) = if transcoding(&shared, direction, dst) {
        let upstream = shared.transcode_upstream_of(dst, &route);
        if let Some(p) = predial {
            upstream.offer_now(p);
        }
        let port = dst.port();
        (Some(h1::Transcoding { upstream, port }), None)
    } else {
        (None, predial.map(|p| egress.stash.put(dst, p)))
    };
    let engine = h1::Client {
        pool: Arc::clone(&egress.raw),
        host,
        route,
        observer,
        peer: peer.into(),
        strict,
        dir: direction.dir(),
        // Every captured inbound connection has a caller, and only those are transcoded.
        inbound: caller.map(|caller| Box::new(h1::Inbound { caller, transcode })),
        shared: Arc::clone(&shared),
    };
    Serving::Native {
        engine,
        client,
        parked,
    }
}

/// Whether `dst` is an inbound port whose REST calls are transcoded to gRPC.
fn transcoding(shared: &Shared, direction: Direction, dst: SocketAddr) -> bool {
    direction != Direction::Outbound
        && shared
            .policies
            .load()
            .config()
            .transcoder(dst.port())
            .is_some()
}

/// Serves a captured HTTP connection with hyper: h2c, or HTTP/1 under `--http1-engine hyper`
/// (a transcoded gRPC port's included).
async fn serve_hyper_conn<D: Downstream>(conn: HttpConn<D>) {
    let (observer, route_client) = conn.observe();
    let HttpConn {
        shared,
        protocol,
        client,
        caller,
        direction,
        peer,
        dst,
        authority,
        predial,
        dest,
        strict,
        ..
    } = conn;
    let stop = shared.stop_token(direction.dir()).clone();
    let limit = shared.config.detect_timeout;
    let svc_shared = Arc::clone(&shared);
    let result = match protocol {
        Protocol::Http1 => {
            let transcoding = transcoding(&shared, direction, dst);
            let route = Arc::new(route_for(
                &shared,
                direction,
                authority,
                dst,
                route_client,
                dest,
                true,
            ));
            let (h2, _parked) = if transcoding {
                // Boxed: the connection's own future stays the size of a plain one.
                let h2 = Box::pin(shared.transcode_upstream(dst, &route, predial)).await;
                (Some(h2), None)
            } else {
                // Parked until the pool's connector takes it; removed when this connection ends.
                let parked = predial.map(|p| shared.egress(direction).stash.put(dst, p));
                (None, parked)
            };
            let caller = caller.map(Arc::new);
            let forward = move |req: http::Request<hyper::body::Incoming>| {
                let shared = Arc::clone(&svc_shared);
                let route = Arc::clone(&route);
                let caller = caller.clone();
                let h2 = h2.clone();
                async move {
                    let allowed = match admit(&shared, strict, caller.as_deref(), &req) {
                        Ok(allowed) => allowed,
                        Err(refusal) => return *refusal,
                    };
                    let req = match transcoder_for(&shared, dst, h2.as_deref()) {
                        // Boxed: only transcoded requests carry the transcoding future; every
                        // connection's request slot stays the size of a plain exchange.
                        Some((t, h2)) => {
                            match Box::pin(transcode::handle(&shared, &t, &route, h2, req)).await {
                                Handled::Pass(req) => req,
                                Handled::Answer(mut resp) => {
                                    if let Some(allowed) = allowed {
                                        allowed.mark(&mut resp);
                                    }
                                    return resp;
                                }
                            }
                        }
                        None => req,
                    };
                    let mut resp = forward_h1(&shared, shared.egress(direction), &route, req).await;
                    if let Some(allowed) = allowed {
                        allowed.mark(&mut resp);
                    }
                    resp
                }
            };
            // Boxed: hyper's server state is only paid for by the connections that use it (the
            // native engine's connections keep this future small).
            Box::pin(serve_http(
                client,
                protocol,
                &shared.config.http,
                &stop,
                limit,
                observer,
                peer,
                forward,
            ))
            .await
        }
        Protocol::Http2 => {
            let source = shared.egress(direction).source;
            let route = route_for(
                &shared,
                direction,
                authority,
                dst,
                route_client,
                dest,
                false,
            );
            let mesh = Arc::clone(&shared.mesh);
            let upstream = Arc::new(H2Upstream::new(dst, route, source, predial, mesh));
            let caller = caller.map(Arc::new);
            let forward = move |req: http::Request<hyper::body::Incoming>| {
                let shared = Arc::clone(&svc_shared);
                let upstream = Arc::clone(&upstream);
                let caller = caller.clone();
                async move {
                    let allowed = match admit(&shared, strict, caller.as_deref(), &req) {
                        Ok(allowed) => allowed,
                        Err(refusal) => return *refusal,
                    };
                    let inbound = direction != Direction::Outbound;
                    let h2 = inbound.then_some(&*upstream);
                    let req = match transcoder_for(&shared, dst, h2) {
                        Some((t, h2)) => {
                            let route = h2.route();
                            match Box::pin(transcode::handle(&shared, &t, route, h2, req)).await {
                                Handled::Pass(req) => req,
                                Handled::Answer(mut resp) => {
                                    if let Some(allowed) = allowed {
                                        allowed.mark(&mut resp);
                                    }
                                    return resp;
                                }
                            }
                        }
                        None => req,
                    };
                    let mut resp = forward_h2(&shared, &upstream, req).await;
                    if let Some(allowed) = allowed {
                        allowed.mark(&mut resp);
                    }
                    resp
                }
            };
            // Boxed: hyper's server state is only paid for by the connections that use it (the
            // native engine's connections keep this future small).
            Box::pin(serve_http(
                client,
                protocol,
                &shared.config.http,
                &stop,
                limit,
                observer,
                peer,
                forward,
            ))
            .await
        }
    };
    if let Err(e) = result {
        debug!(%peer, %dst, error = %Chain(&e), "http connection ended with an error");
        if let Some(err) = ProxyError::of_downstream(&e) {
            shared.telemetry.metrics.error(direction.dir(), err);
        }
    }
}

/// The transcoder of an inbound port and the HTTP/2 upstream its calls take, when the port has
/// one in force and the connection has an upstream for it (`h2`: none for ports that were not
/// transcoded when the connection began).
fn transcoder_for<'a>(
    shared: &Shared,
    dst: SocketAddr,
    h2: Option<&'a H2Upstream>,
) -> Option<(Arc<crate::transcode::Transcoder>, &'a H2Upstream)> {
    let h2 = h2?;
    let policies = shared.policies.load();
    let transcoder = policies.config().transcoder(dst.port())?;
    Some((Arc::clone(transcoder), h2))
}

/// Whether an inbound request may go to the app: a strict port's plaintext refusal first (probe
/// paths excepted), then authorization. `Ok` carries the deciding rule to mark the answer with.
fn admit(
    shared: &Shared,
    strict: bool,
    caller: Option<&Caller>,
    req: &http::Request<hyper::body::Incoming>,
) -> Result<Option<authorize::Allowed>, Box<http::Response<super::forward::ProxyBody>>> {
    if strict && !authorize::is_probe(shared, req) {
        return Err(Box::new(error_response(ProxyError::InboundMtlsRequired)));
    }
    match caller {
        Some(caller) => authorize::request(shared, caller, req),
        None => Ok(None),
    }
}

/// Who the client of an HTTP connection is, and how its upstream connections are made.
struct RouteClient {
    peer: SocketAddr,
    id: Option<SpiffeId>,
    plan: Plan,
}

/// Where the HTTP requests of one connection go, under which policies.
fn route_for(
    shared: &Shared,
    direction: Direction,
    authority: Authority,
    dst: SocketAddr,
    client: RouteClient,
    dest: Resolved,
    http1: bool,
) -> Route {
    let outbound = direction == Direction::Outbound;
    let RouteClient { peer, id, plan } = client;
    let forwarded_for = (!outbound).then(|| {
        let client = ForwardedClient::new(peer.ip());
        Box::new(match &id {
            Some(id) => {
                let own = shared.mesh.own_id();
                client.with_client_cert(own.as_ref().map(SpiffeId::as_str), id.as_str())
            }
            None => client,
        })
    });
    Route {
        upstream: http1.then(|| {
            let limit = pool_limit(shared, direction, &dest);
            shared
                .egress(direction)
                .pool
                .host(&authority, limit, plan.clone())
        }),
        authority,
        prefix: None,
        dest: dest.dest,
        generation: dest.generation,
        origin: if outbound {
            Origin::Outbound(dst)
        } else {
            Origin::Inbound
        },
        // Name rules are for outbound traffic (the app's dependencies).
        by_name: outbound,
        default_port: dst.port(),
        // Inbound requests come from other hosts: say who the client was.
        forwarded_for,
        plan,
    }
}

/// The most upstream connections a destination's pool entry may have. Inbound has its own pool,
/// and its own limit: all of its clients share the app.
fn pool_limit(shared: &Shared, direction: Direction, dest: &Destination) -> usize {
    if direction == Direction::Outbound {
        dest.policy().max_connections
    } else {
        shared.config.inbound_max_connections
    }
}

/// What an opaque relay needs to know about its connection.
struct OpaqueCtx<'a> {
    shared: &'a Shared,
    direction: Direction,
    dest: &'a Destination,
    plan: Plan,
    peer: SocketAddr,
    dst: SocketAddr,
}

impl OpaqueCtx<'_> {
    /// Opaque TCP once the upstream connection is there; a failed connect resets the client.
    async fn run<D: Downstream>(self, client: D, conn: ConnGuard, upstream: Upstream) {
        let OpaqueCtx {
            shared,
            direction,
            dest,
            plan,
            peer,
            dst,
        } = self;
        let connected = match upstream {
            Upstream::Ready(s) | Upstream::SentH2Settings(s) => Ok(s),
            Upstream::Dialling(f) => f.await.map_err(|e| connect_failed(peer, dst, &e)),
            Upstream::Failed(err) => Err(err),
            Upstream::Held => {
                let source = shared.egress(direction).source;
                let mesh = Arc::clone(&shared.mesh);
                dial_conn(dst, dest.policy().connect_timeout, source, plan, mesh)
                    .await
                    .map_err(|e| connect_failed(peer, dst, &e))
            }
        };
        match connected {
            Ok(upstream) => {
                if direction == Direction::Outbound {
                    let mode = if upstream.is_mesh() {
                        MeshMode::Mtls
                    } else {
                        MeshMode::Plaintext
                    };
                    shared
                        .telemetry
                        .metrics
                        .mtls
                        .connection(Dir::Outbound, mode);
                }
                let idle = dest.policy().idle_timeout;
                relay(CountedIo::new(client, conn), upstream, peer, dst, idle).await;
            }
            Err(err) => {
                shared.telemetry.metrics.error(direction.dir(), err);
                reset(client.tcp(), direction.dir());
            }
        }
    }
}

fn connect_failed(peer: SocketAddr, dst: SocketAddr, e: &ConnectError) -> ProxyError {
    warn!(%peer, %dst, error = %e, "connect failed");
    ProxyError::from(e)
}

/// Opaque TCP: bytes that were only peeked are still in the client socket, so the relay sends
/// them like everything else. Half-closes are propagated; nothing moving for `idle` closes both.
async fn relay<D: Downstream>(
    mut client: CountedIo<D>,
    mut upstream: Conn,
    peer: SocketAddr,
    dst: SocketAddr,
    idle: Duration,
) {
    debug!(%peer, %dst, "opaque tcp");
    match idle::copy_bidirectional(&mut client, &mut upstream, idle).await {
        Relayed::Done(Ok((up, down))) => {
            debug!(%peer, %dst, bytes_up = up, bytes_down = down, "tcp closed");
        }
        Relayed::Done(Err(e)) => debug!(%peer, %dst, error = %e, "tcp relay ended with an error"),
        Relayed::Idle => debug!(%peer, %dst, ?idle, "tcp connection idle; closed"),
    }
}

/// Closes with RST so that the client sees a failure (as it would have without us), not an
/// orderly end of stream.
fn reset(client: &TcpStream, dir: Dir) {
    super::mesh::reset_client(client, dir);
}

/// True if the upstream's first bytes are an HTTP/2 SETTINGS frame header (RFC 9113 3.4).
fn sent_h2_settings(conn: &mut Conn) -> bool {
    let head = conn.first_bytes();
    <[u8; 9]>::try_from(head.as_slice()).is_ok_and(|h| is_h2_settings_header(&h))
}

async fn upstream_event(upstream: &mut Upstream) -> Event {
    match upstream {
        Upstream::Dialling(dialling) => Event::Connected(dialling.await),
        Upstream::Ready(stream) => {
            // Data, EOF and errors all mean "the server acted first": relay opaquely.
            stream.spoke().await;
            Event::UpstreamSpoke
        }
        Upstream::SentH2Settings(_) | Upstream::Failed(_) | Upstream::Held => {
            std::future::pending().await
        }
    }
}
