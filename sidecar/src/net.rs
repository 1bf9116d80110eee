//! Listening sockets, the same for every listener of the process (proxy and admin): bound with
//! `SO_REUSEADDR`, IPv6 ones `V6ONLY`, and optional addresses that may be skipped. Imports
//! nothing from the crate.
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket};
use tracing::warn;

/// Istio's inbound passthrough source: the app sees connections from the proxy coming from here,
/// which tells them apart from its own loopback traffic (and keeps inbound capture off them).
pub const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// A listener address; `required: false` means "skip with a warning if it cannot be bound"
/// (the default `[::1]` on hosts with IPv6 disabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    pub required: bool,
}

/// Binds with `SO_REUSEADDR` (restart while old connections linger in TIME_WAIT) and, for IPv6,
/// `IPV6_V6ONLY`, so that `[::]:15006` and `0.0.0.0:15006` can both be bound.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
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
pub fn bind_all(listen: &[ListenAddr]) -> io::Result<Vec<TcpListener>> {
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
pub fn addrs_of(listeners: &[TcpListener]) -> io::Result<Vec<SocketAddr>> {
    listeners.iter().map(TcpListener::local_addr).collect()
}
