//! State shared by every connection of one proxy, and each direction's way out.
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{ProxyConfig, Resolvers, Telemetry};
use super::connect::{Connector, Mesh, Predial, Source, Stash};
use super::h2::H2Upstream;
use super::mesh::Conn;
use super::park::ParkSet;
use super::pool::Pool;
use super::route::{Origin, Route, Routes};
use super::shares::Shares;
use crate::metrics::access::{Observer, UpstreamName};
use crate::metrics::conn::ActiveConns;
use crate::metrics::{DestinationMetrics, Dir, PoolMetrics};
use crate::policy::{Destination, PolicyStore};

/// Inbound connections whose client has said nothing yet that may be dialled to the app at
/// once (for a server that speaks first). Past it, a silent client's connection is dialled only
/// once the client speaks: a flood of silent connections cannot become as many connections to
/// the app (nginx and Envoy never dial before the client speaks; a server-first protocol beyond
/// this many waiting clients at once is the price).
pub(crate) const MAX_INBOUND_SILENT_DIALS: usize = 256;

/// One silent inbound connection dialled to the app (counted while detection lasts).
pub(crate) struct SilentDial(Arc<std::sync::atomic::AtomicUsize>);

impl SilentDial {
    pub(crate) fn try_take(count: &Arc<std::sync::atomic::AtomicUsize>) -> Option<SilentDial> {
        use std::sync::atomic::Ordering;
        let mut now = count.load(Ordering::Acquire);
        loop {
            if now >= MAX_INBOUND_SILENT_DIALS {
                return None;
            }
            match count.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(SilentDial(Arc::clone(count))),
                Err(actual) => now = actual,
            }
        }
    }
}

impl Drop for SilentDial {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
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
    pub(crate) fn name(self) -> &'static str {
        self.dir().as_str()
    }

    pub(crate) fn dir(self) -> Dir {
        match self {
            Direction::Outbound => Dir::Outbound,
            Direction::Inbound { .. } => Dir::Inbound,
        }
    }
}

/// One direction's way out: its HTTP/1 connection pool and the parked pre-dialled connections.
/// Inbound and outbound never share connections: inbound ones come from 127.0.0.6.
pub(crate) struct Egress {
    pub(crate) pool: Arc<Pool>,
    /// The native HTTP/1 engine's pool: the connections themselves (same limits and metrics).
    pub(crate) raw: Arc<Pool<Conn>>,
    pub(crate) stash: Arc<Stash>,
    pub(crate) source: Source,
}

impl Egress {
    pub(crate) fn new(
        config: &ProxyConfig,
        source: Source,
        policies: &Arc<PolicyStore>,
        metrics: PoolMetrics,
        mesh: &Arc<Mesh>,
    ) -> Self {
        let stash = Arc::new(Stash::default());
        let connector = || Connector {
            stash: Arc::clone(&stash),
            policies: Arc::clone(policies),
            source,
            mesh: Arc::clone(mesh),
        };
        let pool = Pool::new(connector(), config.pool_idle_timeout, metrics.clone());
        let raw = Pool::new(connector(), config.pool_idle_timeout, metrics);
        Egress {
            pool,
            raw,
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
    pub(crate) target_route: Option<Route>,
    /// Per-destination policies and their state (breakers, retry budgets): the generation in
    /// force, swapped whole on reload.
    pub(crate) policies: Arc<PolicyStore>,
    pub(crate) telemetry: Telemetry,
    /// Mesh TLS: the identity, and peers found not to be sidecars.
    pub(crate) mesh: Arc<Mesh>,
    /// Open downstream connections per direction (the drain waits on them).
    pub(crate) active: [Arc<ActiveConns>; 2],
    /// Inbound connections dialled to the app while their client has said nothing yet (see
    /// [`MAX_INBOUND_SILENT_DIALS`]).
    pub(crate) inbound_silent_dials: Arc<std::sync::atomic::AtomicUsize>,
    /// Per direction: at the connection limit (refusing) since the last accepted connection.
    pub(crate) overloaded: [std::sync::atomic::AtomicBool; 2],
    /// `--target` mode: the target's request metrics and name, resolved once.
    pub(crate) target_dest: Option<(Arc<DestinationMetrics>, Arc<str>)>,
    /// Transcoded gRPC ports: one HTTP/2 connection to the app per original destination,
    /// multiplexing the calls of every HTTP/1 client (bounded by the configured ports).
    pub(crate) transcode_upstreams: std::sync::Mutex<HashMap<SocketAddr, Arc<H2Upstream>>>,
    /// Idle kept-alive connections without a task (`--park-idle-after`; `None`: never).
    pub(crate) parker: Option<Box<dyn ParkSet>>,
    /// The open connections' routes, shared by those whose routes are the same.
    pub(crate) routes: Routes,
    /// The open connections' observers, shared by those on one destination.
    pub(crate) observers: Shares<ObserverKey, Observer>,
}

/// What makes two connections' observers the same (see [`Shared::observer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ObserverKey {
    /// A captured connection of this direction to this destination.
    Conn(Dir, SocketAddr),
    /// A `--target` connection.
    Target,
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

    pub(crate) fn overloaded(&self, dir: Dir) -> &std::sync::atomic::AtomicBool {
        match dir {
            Dir::Inbound => &self.overloaded[0],
            Dir::Outbound => &self.overloaded[1],
        }
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

    /// How requests of `--target` connections are recorded (one observer for them all).
    pub(crate) fn target_observer(&self) -> Arc<Observer> {
        self.observers.share(
            ObserverKey::Target,
            |_| true,
            || {
                let (dest, upstream) = match &self.target_dest {
                    Some((dest, name)) => (Arc::clone(dest), Arc::clone(name)),
                    // Not reached: target connections only exist in `--target` mode.
                    None => (
                        self.telemetry.metrics.named_destination(Dir::Inbound, "-"),
                        Arc::from("-"),
                    ),
                };
                Observer {
                    metrics: Arc::clone(&self.telemetry.metrics),
                    dest,
                    access_log: self.telemetry.access_log,
                    peer_id: None,
                    upstream: UpstreamName::Name(upstream),
                }
            },
        )
    }

    /// How requests of connections to `dst` are recorded: one observer for those of a
    /// direction, unless the client has a mesh identity (which its access log lines name).
    /// Shared by a connection's requests: one reference count per request, no more.
    pub(crate) fn observer(
        &self,
        dir: Dir,
        dst: SocketAddr,
        peer_id: Option<Arc<str>>,
    ) -> Arc<Observer> {
        let alone = peer_id.is_some();
        let make = || Observer {
            metrics: Arc::clone(&self.telemetry.metrics),
            dest: self.telemetry.metrics.destination(dir, dst),
            access_log: self.telemetry.access_log,
            peer_id,
            upstream: UpstreamName::Addr(dst),
        };
        if alone {
            return Arc::new(make());
        }
        // The destination's metrics, once made, stay the same (see `ProxyMetrics::destination`).
        self.observers
            .share(ObserverKey::Conn(dir, dst), |_| true, make)
    }
}

impl Shared {
    /// The destination (breaker, budget, timeouts) of one request on `route`, under the
    /// policies in force when it starts: it keeps them to its end, even across a reload.
    /// `authority` (the request's) is asked only when name rules could match it.
    pub(crate) fn destination<'a>(
        &self,
        route: &Route,
        authority: impl FnOnce() -> Option<Cow<'a, str>>,
    ) -> Arc<Destination> {
        let policies = self.policies.load();
        let label = || match (route.origin, &self.target_dest) {
            (Origin::Outbound(dst), _) => Arc::clone(
                self.telemetry
                    .metrics
                    .destination(Dir::Outbound, dst)
                    .label(),
            ),
            (_, Some((metrics, _))) => Arc::clone(metrics.label()),
            (_, None) => Arc::from(route.authority.as_str()),
        };
        route.destination(&policies, authority, &label)
    }

    /// The shared HTTP/2 connection to the transcoded gRPC app at `dst` (made on first use
    /// from `route`: its connect timeout and plan; a later connection's `predial` seeds it when
    /// it has none open).
    pub(crate) async fn transcode_upstream(
        &self,
        dst: SocketAddr,
        route: &Route,
        predial: Option<Predial>,
    ) -> Arc<H2Upstream> {
        let upstream = self.transcode_upstream_of(dst, route);
        if let Some(predial) = predial {
            upstream.offer(predial).await;
        }
        upstream
    }

    /// The shared HTTP/2 upstream of transcoded port `dst` (made on first use; it dials when
    /// a call needs it).
    pub(crate) fn transcode_upstream_of(&self, dst: SocketAddr, route: &Route) -> Arc<H2Upstream> {
        let mut map = self
            .transcode_upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(dst).or_insert_with(|| {
            let route = Route {
                upstream: None,
                forwarded_for: None,
                ..route.clone()
            };
            Arc::new(H2Upstream::new(
                dst,
                route,
                self.inbound.source,
                None,
                Arc::clone(&self.mesh),
            ))
        }))
    }

    /// Whether `dst` is a transcoded gRPC port with its shared HTTP/2 connection made.
    pub(crate) fn has_transcode_upstream(&self, dst: SocketAddr) -> bool {
        self.transcode_upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&dst)
    }

    /// The way out of connections going `direction`.
    pub(crate) fn egress(&self, direction: Direction) -> &Egress {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound { .. } => &self.inbound,
        }
    }
}
