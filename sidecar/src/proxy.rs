//! The userspace proxy: accepts captured connections (outbound on 15001, inbound on 15006) and
//! forwards them to their original destination, or, in reverse-proxy mode, every request to one
//! fixed `--target`. [`start`] is the programmatic entry used by `sidecar run`, tests and
//! benchmarks.
//!
//! This file is the top of the proxy: it binds, accepts and hands each connection to
//! [`transparent`] (interception, both directions) or [`target`]. Below it, in the order they may
//! import each other (never upwards; the tidy test checks): `serve` (hyper, once) > `forward`
//! (one request) > `shared` > `route` > `pool` > `connect` > `detect`, `config`.
mod authorize;
mod config;
mod connect;
mod detect;
#[cfg(test)]
mod drain_tests;
#[cfg(test)]
mod flow_tests;
mod forward;
mod h1;
#[cfg(test)]
mod h1_differential_tests;
#[cfg(test)]
mod h1_tests;
mod h2;
#[cfg(test)]
mod h2_abuse_tests;
mod mesh;
mod park;
#[cfg(test)]
mod park_tests;
mod parked;
mod pool;
mod route;
mod serve;
mod shared;
mod shares;
#[cfg(test)]
mod smuggling_tests;
mod target;
#[cfg(test)]
mod tests;
mod transcode;
mod transparent;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::lifecycle::Drainable;
use crate::metrics::conn::{ActiveConns, ConnGuard};
use crate::metrics::Dir;
use crate::net::{addrs_of, bind_all};
use crate::policy::PolicyStore;

pub use config::{
    local_addr_resolver, original_dst_resolver, Http1Engine, HttpLimits, ListenAddr, ProxyConfig,
    Resolver, Resolvers, Target, Telemetry, DEFAULT_DETECT_TIMEOUT, DEFAULT_H2_IDLE_TIMEOUT,
    DEFAULT_H2_KEEPALIVE, DEFAULT_H2_MAX_CONCURRENT_STREAMS, DEFAULT_HEADER_TIMEOUT,
    DEFAULT_INBOUND_MAX_CONNECTIONS, DEFAULT_MAX_DOWNSTREAM_CONNECTIONS, DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_POOL_IDLE_TIMEOUT,
};
pub use connect::INBOUND_PASSTHROUGH_V4;
pub use detect::{
    classify, client_hello, Detection, Hello, H2_PREFACE, MAX_DETECT_LEN, MAX_HELLO_RECORD,
};
pub use forward::{error_response, ProxyBody};
pub use h1::fuzzing as h1_fuzzing;

use connect::{Mesh, Plan, Source};
use route::{Origin, Route};
use shared::{Direction, Egress, Shared};

/// A running proxy.
pub struct Proxy {
    local_addrs: Vec<SocketAddr>,
    inbound_addrs: Vec<SocketAddr>,
    cancel: CancellationToken,
    inbound_cancel: CancellationToken,
    tracker: TaskTracker,
    active: [Arc<ActiveConns>; 2],
    max_connections: usize,
    policies: Arc<PolicyStore>,
    /// What its connections share (the engine tests serve a scripted client with it).
    #[cfg(test)]
    shared: Arc<Shared>,
}

impl Proxy {
    /// The policies in force; a reload replaces them here ([`PolicyStore::replace`]) and every
    /// request started afterwards runs under the new ones.
    pub fn policies(&self) -> &Arc<PolicyStore> {
        &self.policies
    }

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

    /// `Err` while inbound (or `--target`) is at its connection limit and refusing new clients:
    /// what `/ready` reports, so that the pod is taken out of its Service's endpoints.
    pub fn inbound_load(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let active = Arc::clone(&self.active[0]);
        let max = self.max_connections;
        move || {
            let open = active.get();
            if open >= max {
                Err(format!(
                    "overloaded: {open} inbound connections, the limit (--max-downstream-connections); new ones are refused"
                ))
            } else {
                Ok(())
            }
        }
    }

    /// Waits until every connection task has ended (call after a stop).
    pub async fn wait_all(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The proxy reports to the drain (`crate::lifecycle`), which never imports it.
impl Drainable for Proxy {
    fn stop_inbound(&self) {
        Proxy::stop_inbound(self);
    }

    fn stop_all(&self) {
        Proxy::stop_all(self);
    }

    fn active(&self, dir: Dir) -> &ActiveConns {
        Proxy::active(self, dir)
    }

    fn wait_all(&self) -> impl std::future::Future<Output = ()> + '_ {
        Proxy::wait_all(self)
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
    if config.refuse_if_captured && config.target.is_none() {
        refuse_if_captured(&local_addrs)?;
    }

    let cancel = CancellationToken::new();
    let inbound_cancel = cancel.child_token();
    let tracker = TaskTracker::new();
    let active = [
        // In `Dir::index` order, as `Shared::active` reads them.
        Arc::new(ActiveConns::new(&telemetry.metrics, Dir::Inbound)),
        Arc::new(ActiveConns::new(&telemetry.metrics, Dir::Outbound)),
    ];
    let target_dest = config.target.as_ref().map(|t| {
        let name: Arc<str> = t.authority.as_str().into();
        (
            telemetry.metrics.named_destination(Dir::Inbound, &name),
            name,
        )
    });
    let policies = Arc::new(PolicyStore::new(&config.policy));
    let target_route = config.target.as_ref().map(|t| {
        let label = || match &target_dest {
            Some((metrics, _)) => Arc::clone(metrics.label()),
            None => Arc::from(t.authority.as_str()),
        };
        let current = policies.load();
        Route {
            authority: t.authority.clone(),
            prefix: t.prefix.clone(),
            dest: current.target(t.authority.as_str(), Some(&label)),
            generation: current.generation(),
            origin: Origin::Target,
            by_name: true,
            default_port: t.authority.port_u16().unwrap_or(80),
            forwarded_for: None,
            upstream: None,
            // `--target` mode is a reverse proxy to a named service: no mesh TLS.
            plan: Plan::Plain,
        }
    });
    let mesh = Arc::new(Mesh::new(
        config.identity.clone(),
        telemetry.metrics.mtls.clone(),
    ));
    let outbound = Egress::new(
        &config,
        Source::Any,
        &policies,
        telemetry.metrics.pool(Dir::Outbound),
        &mesh,
    );
    let inbound = Egress::new(
        &config,
        Source::Passthrough,
        &policies,
        telemetry.metrics.pool(Dir::Inbound),
        &mesh,
    );
    let target_route = target_route.map(|r| Route {
        upstream: Some(outbound.pool.host(
            &r.authority,
            r.dest.policy().max_connections,
            Plan::Plain,
        )),
        ..r
    });
    let max_connections = config.max_connections;
    let parker = config.http.park_idle_after.and_then(|after| {
        let gauges =
            [Dir::Inbound, Dir::Outbound].map(|dir| telemetry.metrics.conns(dir).parked.clone());
        park::Parker::<parked::Dormant>::new(after, gauges)
            .map(|p| Box::new(p) as Box<dyn park::ParkSet>)
            .map_err(|e| {
                warn!(
                    error = %e,
                    "cannot create the epoll instance for parked connections: idle keep-alive \
                     connections stay in full (--park-idle-after has no effect); check the \
                     process's open-file limit"
                );
            })
            .ok()
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
        mesh,
        active: active.clone(),
        overloaded: Default::default(),
        inbound_silent_dials: Default::default(),
        target_dest,
        transcode_upstreams: Default::default(),
        parker,
        routes: Default::default(),
        observers: Default::default(),
    });
    if shared.parker.is_some() {
        let watcher = Arc::clone(&shared);
        let stops = [Dir::Inbound, Dir::Outbound].map(|dir| watcher.stop_token(dir).clone());
        tracker.spawn(async move {
            if let Some(parker) = &watcher.parker {
                parker.watch(stops).await;
            }
        });
    }
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
        max_connections,
        policies: Arc::clone(&shared.policies),
        #[cfg(test)]
        shared: Arc::clone(&shared),
    })
}

/// The start-up self-test: a proxy whose own upstream connections are redirected to itself would
/// loop on every request until it ran out of descriptors. Nothing has been accepted yet.
fn refuse_if_captured(listeners: &[SocketAddr]) -> io::Result<()> {
    match crate::net::own_connections_captured(listeners) {
        Ok(None) => Ok(()),
        Ok(Some(listener)) => {
            let uid = nix::unistd::getuid();
            let gid = nix::unistd::getgid();
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "this proxy's own connections are captured: a test connection to {} was \
                     redirected to its own listener {listener}, so every request would loop back \
                     into it. It runs as uid {uid} gid {gid}, which `sidecar init` did not exempt: \
                     run it as the proxy uid init was given (--proxy-uid, 1337 by default; \
                     runAsUser/runAsGroup in Kubernetes), or re-run init with --proxy-uid {uid}",
                    crate::net::SELF_TEST_DESTINATION
                ),
            ))
        }
        // Not knowing is not a reason to refuse: the loop guard still stands.
        Err(e) => {
            tracing::warn!(error = %e, "start-up self-test not run (is /proc mounted?)");
            Ok(())
        }
    }
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

/// Starts serving one accepted connection, or refuses it (a reset, counted) when its direction
/// already has `max_connections` open: new clients are turned away at once instead of every
/// client slowing down, and the app's own traffic (the other direction) is not affected.
fn spawn_conn(shared: &Arc<Shared>, kind: Kind, stream: TcpStream, peer: SocketAddr) {
    let dir = kind.dir();
    if shared.active(dir).get() >= shared.config.max_connections {
        shared.telemetry.metrics.conns(dir).refused.inc();
        if !shared
            .overloaded(dir)
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            warn!(
                direction = dir.as_str(),
                max = shared.config.max_connections,
                "at the connection limit (--max-downstream-connections): refusing new connections"
            );
        }
        mesh::reset_client(&stream, dir);
        return;
    }
    if shared
        .overloaded(dir)
        .swap(false, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::info!(direction = dir.as_str(), "below the connection limit again");
    }
    let conn = ConnGuard::open(shared.active(dir));
    let conn_shared = Arc::clone(shared);
    match kind {
        Kind::Target => shared
            .tracker
            .spawn(target::serve(conn_shared, stream, peer, conn)),
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
