//! A parked HTTP/1 client connection (see `park.rs` for the set): what it keeps while it has
//! no task (the engine's client state, the plain socket, the connection's books and the
//! connection dialled during its detection if nobody took it), and how it is served again.
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::connect::StashGuard;
use super::h1::{self, Serve};
use super::park::{Parker, Sleeper};
use crate::error::ProxyError;
use crate::metrics::conn::{ConnGuard, CountedIo};
use crate::metrics::Dir;

/// What a parked connection keeps: its engine state (its route and observer shared with the
/// other connections to its destination, see `shares.rs`), its socket and books, when its next
/// head is due, and its detection's stashed connection.
pub(crate) struct Dormant {
    client: h1::Client,
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
    let shared = Arc::clone(&client.shared);
    let dormant = Dormant {
        client,
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
        self.client.dir
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn wake(self) {
        let Dormant {
            client,
            tcp,
            conn,
            deadline,
            stash,
        } = self;
        let tracker = client.shared.tracker.clone();
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
        self.client
            .shared
            .telemetry
            .metrics
            .error(self.client.dir, ProxyError::DownstreamHeaderTimeout);
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
    }
}
