//! Dialling upstreams, and handing a connection dialled during protocol detection to the HTTP
//! connection pool ([`super::pool`]) so that it is not wasted.
//!
//! In interception mode the proxy starts connecting to the original destination the moment it
//! accepts (so a server that speaks first is heard at once). When the client then turns out to
//! speak HTTP/1, that connection (ready, or still connecting) is parked in the [`Stash`] under its
//! destination; the pool's [`Connector`] takes from the stash before it dials. A parked entry is
//! removed again when the client connection that parked it ends ([`StashGuard`]), so nothing
//! lingers unused.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use nix::sys::socket::{recv, setsockopt, sockopt, MsgFlags};
use tokio::net::{TcpSocket, TcpStream};

pub(crate) use super::mesh::{Conn, Mesh, Plan};
use crate::error::ConnectError;
use crate::policy::PolicyStore;

/// A connect (and its mesh TLS handshake) that may still be in progress.
pub(crate) type Dialling = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

pub use crate::net::INBOUND_PASSTHROUGH_V4;

/// The source address of upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Whatever the kernel picks (outbound).
    Any,
    /// Inbound, to the app: from 127.0.0.6 for IPv4; for IPv6 (no spare loopback addresses) from
    /// the destination's own address, the pod's.
    Passthrough,
}

impl Source {
    fn local_for(self, dst: SocketAddr) -> Option<SocketAddr> {
        match (self, dst) {
            (Source::Any, _) => None,
            (Source::Passthrough, SocketAddr::V4(_)) => {
                Some(SocketAddr::new(INBOUND_PASSTHROUGH_V4.into(), 0))
            }
            // The scope too: a link-local destination is only bindable with its interface.
            (Source::Passthrough, SocketAddr::V6(v6)) => Some(SocketAddr::V6(
                std::net::SocketAddrV6::new(*v6.ip(), 0, 0, v6.scope_id()),
            )),
        }
    }
}

/// Connects to `addr` within `timeout`, with `TCP_NODELAY` set (we forward whole messages; Nagle
/// would only add latency to request/response traffic).
pub(crate) async fn dial(
    addr: SocketAddr,
    timeout: Duration,
    source: Source,
) -> Result<TcpStream, ConnectError> {
    let connect = async {
        match source.local_for(addr) {
            None => TcpStream::connect(addr).await,
            Some(local) => {
                let socket = match local {
                    SocketAddr::V4(_) => TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => TcpSocket::new_v6()?,
                };
                // Choose the source port at connect time, by 4-tuple: binding first would
                // otherwise use up one ephemeral port per connection whatever the destination.
                let _ = setsockopt(&socket, sockopt::IpBindAddressNoPort, &true);
                socket.bind(local)?;
                socket.connect(addr).await
            }
        }
    };
    let stream = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::from_io(addr, e)),
        Err(_) => return Err(ConnectError::Timeout(addr, timeout)),
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY upstream");
    }
    Ok(stream)
}

/// Dials `addr` per `plan`: plaintext, or mesh TLS (falling back to a fresh plaintext
/// connection where the plan allows).
pub(crate) async fn dial_conn(
    addr: SocketAddr,
    timeout: Duration,
    source: Source,
    plan: Plan,
    mesh: Arc<Mesh>,
) -> Result<Conn, ConnectError> {
    let tcp = dial(addr, timeout, source).await?;
    mesh.connect(tcp, addr, &plan, timeout, || dial(addr, timeout, source))
        .await
}

/// Starts dialling now; the returned future can be moved around (and parked) while in flight.
pub(crate) fn start_dial(
    addr: SocketAddr,
    timeout: Duration,
    source: Source,
    plan: &Plan,
    mesh: &Arc<Mesh>,
) -> Dialling {
    Box::pin(dial_conn(
        addr,
        timeout,
        source,
        plan.clone(),
        Arc::clone(mesh),
    ))
}

/// True if an idle connection still looks usable: no EOF and no unsolicited bytes waiting.
/// (An HTTP/1 server that sent something before our first request is closing or confused; a
/// mesh peer sends nothing unprompted either: no session tickets, see `identity::verify`.)
pub(crate) fn is_fresh(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        recv(
            stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Err(nix::errno::Errno::EAGAIN)
    )
}

/// An upstream connection made during detection, offered to whoever next dials its destination.
pub(crate) enum Predial {
    Ready(Conn),
    Dialling(Dialling),
}

impl Predial {
    /// Resolves to a usable connection, or `None` if it turned out stale (dial afresh then).
    /// `server_may_speak`: the protocol lets the server send first (HTTP/2 SETTINGS), so waiting
    /// bytes do not make the connection stale.
    pub(crate) async fn into_stream(
        self,
        server_may_speak: bool,
    ) -> Result<Option<Conn>, ConnectError> {
        match self {
            Predial::Ready(s) if server_may_speak || is_fresh(s.tcp()) => Ok(Some(s)),
            Predial::Ready(_) => Ok(None),
            Predial::Dialling(f) => f.await.map(Some),
        }
    }
}

#[derive(Default)]
struct StashInner {
    next_id: u64,
    by_dst: HashMap<SocketAddr, Vec<(u64, Predial)>>,
    /// Where each parked entry is, so that its guard needs only the id (the guard lives as long
    /// as the client connection, in every connection's task).
    dst_of: HashMap<u64, SocketAddr>,
}

/// Parked pre-dialled connections, by destination.
#[derive(Default)]
pub(crate) struct Stash {
    inner: Mutex<StashInner>,
}

impl Stash {
    fn lock(&self) -> std::sync::MutexGuard<'_, StashInner> {
        // A panic while holding this lock cannot leave the map inconsistent (each operation is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parks `predial` for `dst` until taken or until the returned guard is dropped.
    pub(crate) fn put(self: &Arc<Self>, dst: SocketAddr, predial: Predial) -> StashGuard {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.by_dst.entry(dst).or_default().push((id, predial));
        inner.dst_of.insert(id, dst);
        StashGuard {
            stash: Arc::clone(self),
            id,
        }
    }

    /// Takes the most recently parked connection for `dst`, if any.
    pub(crate) fn take(&self, dst: SocketAddr) -> Option<Predial> {
        let mut inner = self.lock();
        let list = inner.by_dst.get_mut(&dst)?;
        let taken = list.pop();
        if list.is_empty() {
            inner.by_dst.remove(&dst);
        }
        let (id, predial) = taken?;
        inner.dst_of.remove(&id);
        Some(predial)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let inner = self.lock();
        let parked = inner.by_dst.values().map(Vec::len).sum();
        assert_eq!(
            parked,
            inner.dst_of.len(),
            "the stash's index is out of step"
        );
        parked
    }
}

/// Removes its parked connection (closing it) if nobody took it.
pub(crate) struct StashGuard {
    stash: Arc<Stash>,
    id: u64,
}

impl Drop for StashGuard {
    fn drop(&mut self) {
        let removed = {
            let mut inner = self.stash.lock();
            // Absent once taken.
            let Some(dst) = inner.dst_of.remove(&self.id) else {
                return;
            };
            let Some(list) = inner.by_dst.get_mut(&dst) else {
                return;
            };
            let removed = list
                .iter()
                .position(|(id, _)| *id == self.id)
                .map(|i| list.swap_remove(i));
            if list.is_empty() {
                inner.by_dst.remove(&dst);
            }
            removed
        };
        // Dropped outside the lock: closing a socket is a syscall.
        drop(removed);
    }
}

/// An IP literal with its port; an IPv6 link-local one may carry its zone (`fe80::1%2`, the
/// interface index, as `getsockname()` gives it for an inbound connection).
fn ip_literal(literal: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    let (ip, zone) = literal.split_once('%')?;
    let ip: std::net::Ipv6Addr = ip.parse().ok()?;
    let zone: u32 = zone.trim_start_matches("25").parse().ok()?;
    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
        ip, port, 0, zone,
    )))
}

/// How the pool opens connections: the connection parked during detection first, else a dial
/// (resolving names only in `--target` mode; interception mode always has an IP literal).
pub(crate) struct Connector {
    pub(crate) stash: Arc<Stash>,
    /// Where the connect timeout of a destination comes from.
    pub(crate) policies: Arc<PolicyStore>,
    pub(crate) source: Source,
    pub(crate) mesh: Arc<Mesh>,
}

impl Connector {
    /// A connection to `authority`, per `plan` (mesh TLS or plaintext).
    pub(crate) async fn open(
        &self,
        authority: &Authority,
        plan: &Plan,
    ) -> Result<Conn, ConnectError> {
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        let connect_timeout = match self.source {
            Source::Any => self.policies.load().connect_timeout(host, port),
            // Inbound goes to the app: destination rules are for outbound traffic.
            Source::Passthrough => self.policies.load().defaults().connect_timeout,
        };
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Some(addr) = ip_literal(literal, port) {
            if let Some(predial) = self.stash.take(addr) {
                if let Some(stream) = predial.into_stream(false).await? {
                    return Ok(stream);
                }
            }
            let mesh = Arc::clone(&self.mesh);
            return dial_conn(addr, connect_timeout, self.source, plan.clone(), mesh).await;
        }
        let addrs = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ConnectError::Resolve(host.to_owned(), e))?;
        let mut last = None;
        for addr in addrs {
            match dial(addr, connect_timeout, self.source).await {
                // `--target` mode by name: never mesh TLS (it is for intercepted destinations).
                Ok(s) => return Ok(Conn::Plain(s)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ConnectError::Resolve(
                host.to_owned(),
                io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn stash_guard_removes_untaken_entry() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let stash = Arc::new(Stash::default());
        let s = dial(dst, Duration::from_secs(5), Source::Any)
            .await
            .unwrap();
        let guard = stash.put(dst, Predial::Ready(Conn::Plain(s)));
        assert_eq!(stash.len(), 1);
        drop(guard);
        assert_eq!(stash.len(), 0);
    }

    /// Two clients' connections parked for one destination: the newest is taken, then each
    /// guard goes. The guard of the taken one must not remove the other's (the index finds an
    /// entry by its id, and forgets it once taken).
    #[tokio::test]
    async fn guards_of_one_destination_remove_only_their_own_entry() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let stash = Arc::new(Stash::default());
        let mut guards = Vec::new();
        for _ in 0..2 {
            let s = dial(dst, Duration::from_secs(5), Source::Any)
                .await
                .unwrap();
            guards.push(stash.put(dst, Predial::Ready(Conn::Plain(s))));
        }
        assert_eq!(stash.len(), 2);
        let _taken = stash.take(dst).expect("parked");
        assert_eq!(stash.len(), 1);
        let older = guards.remove(0);
        drop(guards); // the taken entry's guard: nothing left to remove
        assert_eq!(stash.len(), 1, "the other client's entry stays");
        drop(older);
        assert_eq!(stash.len(), 0);
    }

    #[tokio::test]
    async fn taken_entry_outlives_guard() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let stash = Arc::new(Stash::default());
        let guard = stash.put(
            dst,
            Predial::Dialling(start_dial(
                dst,
                Duration::from_secs(5),
                Source::Any,
                &Plan::Plain,
                &Mesh::disabled(),
            )),
        );
        let taken = stash.take(dst).expect("parked");
        drop(guard);
        let stream = taken.into_stream(false).await.unwrap();
        assert!(stream.is_some());
    }

    #[tokio::test]
    async fn stale_connection_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let client = dial(dst, Duration::from_secs(5), Source::Any)
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        assert!(is_fresh(&client));
        server.write_all(b"bye").await.unwrap();
        // Wait until the bytes are visible, without sleeping.
        client.readable().await.unwrap();
        assert!(!is_fresh(&client));
    }

    #[tokio::test]
    async fn passthrough_connections_come_from_127_0_0_6() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let _client = dial(dst, Duration::from_secs(5), Source::Passthrough)
            .await
            .unwrap();
        let (_server, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), IpAddr::from(INBOUND_PASSTHROUGH_V4));
    }

    #[tokio::test]
    async fn refused_dial_is_classified() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        drop(listener);
        let err = dial(dst, Duration::from_secs(5), Source::Any)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectError::Refused(a) if a == dst),
            "{err:?}"
        );
    }
}
#[cfg(test)]
mod zone_tests {
    /// An inbound link-local destination keeps its zone through the pool's authority.
    #[test]
    fn link_local_literals_keep_their_zone() {
        let a = http::uri::Authority::from_static("[fe80::1%2]:8080");
        let lit = a.host().trim_start_matches('[').trim_end_matches(']');
        assert_eq!(
            super::ip_literal(lit, 8080),
            Some("[fe80::1%2]:8080".parse().unwrap())
        );
        assert_eq!(
            super::ip_literal("10.0.0.1", 80),
            Some("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(super::ip_literal("fe80::1%eth0", 80), None);
        assert_eq!(super::ip_literal("svc.local", 80), None);
    }
}
