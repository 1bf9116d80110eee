//! A parked HTTP/1 client connection (see `park.rs` for the set): what it keeps while it has
//! no task (the engine's client state, the plain socket, the connection's books and the
//! connection dialled during its detection if nobody took it), and how it is served again.
//! Its route and observer, its own alone, are kept by value in its slot: what the connection
//! held on the heap is freed when it parks, and allocated again when it wakes.
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::connect::StashGuard;
use super::h1::{self, Serve};
use super::mesh::Conn;
use super::park::{Parker, Sleeper};
use super::pool::{Host, Pool};
use super::route::Route;
use super::shared::Shared;
use crate::error::ProxyError;
use crate::metrics::access::Observer;
use crate::metrics::conn::{ConnGuard, CountedIo};
use crate::metrics::Dir;

/// A value behind an `Arc`, taken out of it when nothing else holds it.
enum Held<T> {
    Alone(T),
    Shared(Arc<T>),
}

impl<T> Held<T> {
    fn new(arc: Arc<T>) -> Held<T> {
        match Arc::try_unwrap(arc) {
            Ok(value) => Held::Alone(value),
            Err(arc) => Held::Shared(arc),
        }
    }

    fn into_arc(self) -> Arc<T> {
        match self {
            Held::Alone(value) => Arc::new(value),
            Held::Shared(arc) => arc,
        }
    }
}

/// What a parked connection keeps: its engine state ([`h1::Client`], field by field), its
/// socket and books, when its next head is due, and its detection's stashed connection.
pub(crate) struct Dormant {
    shared: Arc<Shared>,
    route: Held<Route>,
    observer: Held<Observer>,
    pool: Arc<Pool<Conn>>,
    host: Arc<Host<Conn>>,
    stop: CancellationToken,
    strict: bool,
    caller: Option<Box<super::authorize::Caller>>,
    dir: Dir,
    transcode: Option<Box<h1::Transcoding>>,
    tcp: std::net::TcpStream,
    conn: ConnGuard,
    deadline: Instant,
    stash: Option<StashGuard>,
}

/// Parks `idle` (the caller's task then ends), or serves it again at once in a new task if it
/// cannot be parked. `stash`: the connection dialled during its detection, kept until it ends.
pub(crate) fn park(idle: h1::Idle<CountedIo<TcpStream>>, stash: Option<StashGuard>) {
    let h1::Idle {
        client,
        io,
        deadline,
    } = idle;
    let (tcp, conn) = io.into_parts();
    let tcp = match tcp.into_std() {
        Ok(tcp) => tcp,
        Err(e) => {
            // Closed with it: the client sees a close between requests, as after the timeout.
            debug!(error = %e, "cannot take an idle connection out of the reactor: closed");
            return;
        }
    };
    let h1::Client {
        shared,
        route,
        observer,
        pool,
        host,
        stop,
        strict,
        caller,
        dir,
        transcode,
    } = client;
    let dormant = Dormant {
        shared: Arc::clone(&shared),
        route: Held::new(route),
        observer: Held::new(observer),
        pool,
        host,
        stop,
        strict,
        caller,
        dir,
        transcode,
        tcp,
        conn,
        deadline,
        stash,
    };
    match shared.parker.as_deref().and_then(Parker::<Dormant>::of) {
        Some(parker) => parker.park(dormant),
        // Not reached: the engine parks only when there is a parked set.
        None => dormant.wake(),
    }
}

impl Sleeper for Dormant {
    fn fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }

    fn dir(&self) -> Dir {
        self.dir
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn wake(self) {
        let Dormant {
            shared,
            route,
            observer,
            pool,
            host,
            stop,
            strict,
            caller,
            dir,
            transcode,
            tcp,
            conn,
            deadline,
            stash,
        } = self;
        let tracker = shared.tracker.clone();
        let client = h1::Client {
            shared,
            route: route.into_arc(),
            observer: observer.into_arc(),
            pool,
            host,
            stop,
            strict,
            caller,
            dir,
            transcode,
        };
        // Tracked like every connection's task: the drain waits for it.
        tracker.spawn(async move {
            let tcp = match TcpStream::from_std(tcp) {
                Ok(tcp) => tcp,
                Err(e) => {
                    debug!(error = %e, "cannot return a parked connection to the reactor: closed");
                    return;
                }
            };
            let io = CountedIo::new(tcp, conn);
            if let Some(idle) = h1::serve(client, io, Serve::Resumed(deadline)).await {
                park(idle, stash);
            }
        });
    }

    fn expire(self) {
        // What the engine does when a head does not come in time: count it and close.
        self.shared
            .telemetry
            .metrics
            .error(self.dir, ProxyError::DownstreamHeaderTimeout);
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
    }
}
