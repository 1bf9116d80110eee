//! The upstream HTTP/1 connection pool: keep-alive connections per destination, with a cap.
//! Generic over what it keeps of a connection ([`Pooled`]): hyper's client sender (the hyper
//! engine, [`Pool::send`]) or the connection itself (the native engine checks one out, writes
//! and reads it, and hands it back when both messages were exactly framed).
//!
//! Each downstream connection resolves its destination's [`Host`] once; a request then checks
//! out a connection from it (no hashing, no allocation, no task per request): the most recently
//! used idle one, else a new one (the connection parked during detection first, see
//! [`super::connect`]) while the destination has fewer than `limit` connections, else it queues
//! until a connection or a slot is handed over. A connection goes back when its response body
//! has been read to the end ([`PooledBody`]); anything else (an error, a body the client gave
//! up on, an upgrade) closes it, and its slot goes to the next waiter.
//!
//! Invariants (all under the host's lock): `open` counts every connection of the host that is
//! idle, leased, being dialled or being handed to a waiter, and a new one is only counted while
//! `open < limit` (a lowered limit takes effect as connections close); a waiter is only queued
//! while nothing is idle; a freed slot or returned connection goes to the oldest waiter still
//! waiting, and a hand-over a waiter never takes passes it on (see [`Grant`]).
//! Idle connections older than the idle timeout are closed by the reaper (and skipped on
//! checkout).
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use super::connect::{Connector, Plan};
use super::mesh::Conn;
use crate::error::{Chain, ConnectError, Failed};
use crate::metrics::PoolMetrics;
use crate::policy::retry::UpstreamBody;

/// How often a request whose connection was closed before the request was written goes to
/// another connection (nothing was sent, so this is safe for any method).
const RESEND_UNSENT: usize = 3;

pub(crate) type Sender = SendRequest<UpstreamBody>;

/// What the pool keeps of one upstream connection.
pub(crate) trait Pooled: Sized + Send + 'static {
    /// Still usable, as far as can be told without waiting (the peer has not closed it).
    fn alive(&mut self) -> bool;
    /// How soon an idle connection the peer closed is noticed without a checkout: hyper's
    /// connections have a task that sees it at once; others only when the reaper looks.
    const REAP_EVERY: Duration = Duration::from_secs(30);
    /// Whether a connection handed back after an exact exchange goes to the idle list (or a
    /// waiter): [`Pooled::alive`] unless checking on checkout is enough.
    fn returned(&mut self) -> bool {
        self.alive()
    }
    /// Waits until it can take a request (hyper: its previous exchange is wound up); false if it
    /// cannot.
    fn ready(&mut self) -> impl Future<Output = bool> + Send;
    /// Sets a freshly opened connection up for `host` (hyper: the handshake and the
    /// connection's task).
    fn establish(
        stream: Conn,
        host: &Arc<Host<Self>>,
    ) -> impl Future<Output = Result<Self, Failed>> + Send;
}

impl Pooled for Sender {
    fn alive(&mut self) -> bool {
        !self.is_closed()
    }

    async fn ready(&mut self) -> bool {
        SendRequest::ready(self).await.is_ok()
    }

    async fn establish(stream: Conn, host: &Arc<Host<Self>>) -> Result<Self, Failed> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failed::from_error(&e))?;
        let owner = Arc::clone(host);
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(destination = %owner.key, error = %Chain(&e), "upstream connection ended");
            }
            // Closed while idle (the server's keep-alive timeout, a reset): free its slot now,
            // not when somebody next looks.
            owner.prune_closed();
        });
        Ok(sender)
    }
}

/// One direction's pool.
pub(crate) struct Pool<C: Pooled = Sender> {
    connector: Connector,
    idle_timeout: Duration,
    metrics: PoolMetrics,
    hosts: Mutex<HashMap<Key, Arc<Host<C>>>>,
}

/// A destination: an address (interception mode, and IP-literal targets) or a name; and
/// whether its connections are mesh TLS (never mixed in one host: a connection that fell back
/// to plaintext under a mesh host serves its one exchange and is closed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Addr(SocketAddr, bool),
    Name(Authority, bool),
}

impl Key {
    fn of(authority: &Authority, tls: bool) -> Key {
        match authority.as_str().parse() {
            Ok(addr) => Key::Addr(addr, tls),
            Err(_) => Key::Name(authority.clone(), tls),
        }
    }
}

/// The connections of one destination.
pub(crate) struct Host<C: Pooled = Sender> {
    key: Authority,
    /// The destination policy's `max_connections`, as of the latest downstream connection.
    limit: AtomicUsize,
    idle_timeout: Duration,
    metrics: PoolMetrics,
    state: Mutex<HostState<C>>,
    /// Mesh TLS or not (part of the key), and how to dial, as of the latest downstream
    /// connection (the identity in force then).
    tls: bool,
    plan: Mutex<Plan>,
}

impl<C: Pooled> std::fmt::Debug for Host<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("key", &self.key).finish()
    }
}

struct HostState<C: Pooled> {
    /// Most recently returned last.
    idle: Vec<Idle<C>>,
    open: usize,
    waiters: VecDeque<oneshot::Sender<Grant<C>>>,
}

impl<C: Pooled> Default for HostState<C> {
    fn default() -> Self {
        HostState {
            idle: Vec::new(),
            open: 0,
            waiters: VecDeque::new(),
        }
    }
}

struct Idle<C: Pooled> {
    sender: C,
    since: Instant,
}

/// What a queued request is handed. Both carry their own clean-up: a grant dropped unreceived
/// (the waiter gave up just after it was sent) passes the connection or slot on, so neither can
/// leak.
enum Grant<C: Pooled> {
    /// A connection that just became free (a lease marked done: dropped, it goes back).
    Conn(Lease<C>),
    /// A slot under the limit: dial a new connection.
    Slot(Slot<C>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few pushes and pops that cannot panic half-way.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<C: Pooled> Pool<C> {
    pub(crate) fn new(
        connector: Connector,
        idle_timeout: Duration,
        metrics: PoolMetrics,
    ) -> Arc<Pool<C>> {
        let pool = Arc::new(Pool {
            connector,
            idle_timeout,
            metrics,
            hosts: Mutex::new(HashMap::new()),
        });
        // Closes idle connections past their timeout and forgets unused hosts; ends with the pool.
        let weak = Arc::downgrade(&pool);
        let period = idle_timeout.clamp(Duration::from_millis(100), C::REAP_EVERY);
        tokio::spawn(reap(weak, period));
        pool
    }

    /// True if `dst` has pooled HTTP/1 connections open: it speaks HTTP/1, so a new client
    /// connection to it has no server greeting to wait for.
    pub(crate) fn speaks_http1(&self, dst: SocketAddr, tls: bool) -> bool {
        let host = lock(&self.hosts).get(&Key::Addr(dst, tls)).cloned();
        host.is_some_and(|h| lock(&h.state).open > 0)
    }

    /// The pool's entry for `authority`, with at most `limit` connections (the destination
    /// policy's; call once per downstream connection, not per request).
    pub(crate) fn host(&self, authority: &Authority, limit: usize, plan: Plan) -> Arc<Host<C>> {
        let tls = plan.is_tls();
        let key = Key::of(authority, tls);
        let limit = limit.max(1);
        let mut hosts = lock(&self.hosts);
        if let Some(host) = hosts.get(&key) {
            host.limit.store(limit, Ordering::Relaxed);
            *lock(&host.plan) = plan;
            return Arc::clone(host);
        }
        let host = Arc::new(Host {
            key: authority.clone(),
            limit: AtomicUsize::new(limit),
            idle_timeout: self.idle_timeout,
            metrics: self.metrics.clone(),
            state: Mutex::new(HostState::default()),
            tls,
            plan: Mutex::new(plan),
        });
        hosts.insert(key, Arc::clone(&host));
        host
    }

    /// A ready connection of `host`: idle, new, or handed over after queueing.
    pub(crate) async fn checkout(&self, host: &Arc<Host<C>>) -> Result<Lease<C>, Failed> {
        let mut waited = false;
        loop {
            let next = {
                let mut state = lock(&host.state);
                match state.pop_idle(host.idle_timeout, &host.metrics) {
                    Some(sender) => Next::Idle(sender),
                    None if state.open < host.limit.load(Ordering::Relaxed) => {
                        state.open += 1;
                        host.metrics.open.inc();
                        Next::Dial
                    }
                    None => {
                        if state.waiters.len() >= 64 {
                            state.waiters.retain(|w| !w.is_closed());
                        }
                        let (tx, rx) = oneshot::channel();
                        state.waiters.push_back(tx);
                        Next::Wait(rx)
                    }
                }
            };
            let mut lease = match next {
                Next::Idle(sender) => Lease::new(host, sender),
                Next::Dial => return Box::pin(self.dial(Slot(Some(Arc::clone(host))))).await,
                Next::Wait(rx) => {
                    if !waited {
                        waited = true;
                        host.metrics.waits.inc();
                    }
                    match rx.await {
                        Ok(Grant::Conn(mut lease)) => {
                            lease.done = false;
                            lease
                        }
                        Ok(Grant::Slot(slot)) => return Box::pin(self.dial(slot)).await,
                        // Not reached: waiters are only dropped with the host, which we hold.
                        Err(_) => continue,
                    }
                }
            };
            // Ready at once, unless its previous response is still being wound up.
            let ready = lease
                .sender
                .as_mut()
                .expect("a lease holds its connection")
                .ready()
                .await;
            if ready {
                return Ok(lease);
            }
            // Closed while idle: dropping the lease frees its slot; take the next one.
        }
    }

    /// Dials a new connection into the slot the caller holds (freed again on failure, or if
    /// the caller gives up while dialling). Callers box this future: it is large (connect,
    /// name lookup, handshake) and rare with a warm pool, and every request's future would
    /// otherwise carry (and move) its space.
    async fn dial(&self, slot: Slot<C>) -> Result<Lease<C>, Failed> {
        let host = Arc::clone(slot.0.as_ref().expect("an armed slot"));
        let plan = lock(&host.plan).clone();
        let stream = self
            .connector
            .open(&host.key, &plan)
            .await
            .map_err(|e: ConnectError| Failed::connect(&e))?;
        let reusable = stream.is_mesh() == host.tls;
        let sender = C::establish(stream, &host).await?;
        let mut lease = slot.fill(sender);
        lease.reusable = reusable;
        Ok(lease)
    }
}

impl Pool<Sender> {
    /// Sends `req` on a connection of `host`; the response body hands the connection back.
    pub(crate) async fn send(
        &self,
        host: &Arc<Host>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, Failed> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut lease = self.checkout(host).await?;
            let sender = lease.sender.as_mut().expect("a lease holds its connection");
            match sender.try_send_request(req).await {
                Ok(resp) if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                    // The connection becomes the tunnel's: never back to the pool.
                    return Ok(resp.map(|body| PooledBody {
                        inner: body,
                        lease: Some(lease),
                    }));
                }
                Ok(resp) => return Ok(resp.map(|body| PooledBody::new(body, lease))),
                Err(mut e) => {
                    // The lease is dropped unreturned: the connection closes, its slot moves on.
                    match e.take_message() {
                        Some(unsent) if tries < RESEND_UNSENT => {
                            debug!(destination = %host.key, error = %Chain(e.error()), "connection closed before the request was written; sending on another");
                            req = unsent;
                        }
                        _ => return Err(Failed::from_error(e.error())),
                    }
                }
            }
        }
    }
}

enum Next<C: Pooled> {
    Idle(C),
    Dial,
    Wait(oneshot::Receiver<Grant<C>>),
}

impl<C: Pooled> HostState<C> {
    /// The most recently used idle connection that is still open and within its idle time;
    /// stale ones are closed on the way (their slots are reused by this caller's own dial or
    /// handed to waiters by the caller's next step, so no waiter exists here: waiters only
    /// queue while nothing is idle).
    fn pop_idle(&mut self, idle_timeout: Duration, metrics: &PoolMetrics) -> Option<C> {
        while let Some(mut idle) = self.idle.pop() {
            if idle.since.elapsed() < idle_timeout && idle.sender.alive() {
                return Some(idle.sender);
            }
            self.open -= 1;
            metrics.open.dec();
        }
        None
    }

    /// Closes the idle connections that are closed already or `expired`, freeing their slots
    /// (no waiter exists while anything is idle, so the count just drops); returns how many.
    fn close_idle(&mut self, metrics: &PoolMetrics, expired: impl Fn(&Idle<C>) -> bool) -> usize {
        let before = self.idle.len();
        self.idle
            .retain_mut(|idle| !expired(idle) && idle.sender.alive());
        let gone = before - self.idle.len();
        self.open -= gone;
        metrics.open.sub(gone as i64);
        gone
    }
}

impl<C: Pooled> Host<C> {
    /// Takes back a connection whose exchange completed: to the oldest waiter, else idle.
    fn put_back(self: &Arc<Self>, mut sender: C) {
        if !sender.returned() {
            return self.free_slot();
        }
        let mut state = lock(&self.state);
        let mut grant = Grant::Conn(Lease {
            host: Arc::clone(self),
            sender: Some(sender),
            done: true,
            reusable: true,
        });
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(grant) {
                Ok(()) => return,
                Err(back) => grant = back,
            }
        }
        if let Grant::Conn(mut lease) = grant {
            // Disarmed: its drop does nothing.
            if let Some(sender) = lease.sender.take() {
                state.idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    /// A connection of this host is gone (or a dial failed): its slot goes to the oldest
    /// waiter, else the count drops.
    fn free_slot(self: &Arc<Self>) {
        let mut state = lock(&self.state);
        let mut grant = Grant::Slot(Slot(Some(Arc::clone(self))));
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(grant) {
                Ok(()) => return,
                Err(back) => grant = back,
            }
        }
        if let Grant::Slot(mut slot) = grant {
            // Disarmed: its drop does nothing.
            slot.0 = None;
        }
        state.open -= 1;
        self.metrics.open.dec();
    }

    /// Forgets idle connections that have closed.
    fn prune_closed(&self) {
        lock(&self.state).close_idle(&self.metrics, |_| false);
    }
}

/// A slot held while dialling; freed if the dial fails or is abandoned.
struct Slot<C: Pooled>(Option<Arc<Host<C>>>);

impl<C: Pooled> Slot<C> {
    fn fill(mut self, sender: C) -> Lease<C> {
        let host = self.0.take().expect("filled once");
        Lease {
            host,
            sender: Some(sender),
            done: false,
            reusable: true,
        }
    }
}

impl<C: Pooled> Drop for Slot<C> {
    fn drop(&mut self) {
        if let Some(host) = self.0.take() {
            host.free_slot();
        }
    }
}

/// A connection checked out for one exchange. Dropped with `done` set (the response was read
/// to its end), the connection goes back to the pool; otherwise it is closed.
pub(crate) struct Lease<C: Pooled = Sender> {
    host: Arc<Host<C>>,
    sender: Option<C>,
    done: bool,
    /// False for a connection not of its host's kind (a plaintext fallback under a mesh host):
    /// closed after its exchange instead of going back.
    reusable: bool,
}

impl<C: Pooled> Lease<C> {
    fn new(host: &Arc<Host<C>>, sender: C) -> Lease<C> {
        Lease {
            host: Arc::clone(host),
            sender: Some(sender),
            done: false,
            reusable: true,
        }
    }
}

impl<C: Pooled> Lease<C> {
    /// The connection (the native engine reads and writes it directly).
    pub(crate) fn conn(&mut self) -> &mut C {
        self.sender.as_mut().expect("a lease holds its connection")
    }

    /// Both messages of the exchange were exactly framed and wholly transferred: the
    /// connection goes back to the pool (or to a waiter) when the lease is dropped.
    pub(crate) fn finish(&mut self) {
        self.done = true;
    }
}

impl<C: Pooled> Drop for Lease<C> {
    fn drop(&mut self) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        if self.done && self.reusable {
            self.host.put_back(sender);
        } else {
            // Dropping the last sender closes the connection once its task sees it.
            drop(sender);
            self.host.free_slot();
        }
    }
}

/// A pooled connection's response body: hands the connection back once read to the end.
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl PooledBody {
    fn new(inner: Incoming, lease: Lease) -> Self {
        let mut body = PooledBody {
            inner,
            lease: Some(lease),
        };
        // Bodiless answers (HEAD, 204, 304, `content-length: 0`) are never polled.
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    /// A body not from the pool (HTTP/2 upstreams).
    pub(crate) fn unpooled(inner: Incoming) -> Self {
        PooledBody { inner, lease: None }
    }

    fn finish(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.done = true;
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            // An error: the lease is dropped unfinished, closing the connection.
            Poll::Ready(Some(Err(_))) => drop(this.lease.take()),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Every `period`: closes idle connections past the idle timeout and forgets hosts nobody uses.
async fn reap<C: Pooled>(pool: Weak<Pool<C>>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut closed = 0usize;
        let mut hosts = lock(&pool.hosts);
        hosts.retain(|_, host| {
            let mut state = lock(&host.state);
            let timeout = host.idle_timeout;
            closed += state.close_idle(&host.metrics, |idle| idle.since.elapsed() >= timeout);
            // Only the map holds it: no downstream connection, lease or dial refers to it.
            !(state.open == 0 && state.waiters.is_empty() && Arc::strong_count(host) == 1)
        });
        drop(hosts);
        if closed > 0 {
            debug!(closed, "closed idle upstream connections");
        }
    }
}

#[cfg(test)]
mod tests;
