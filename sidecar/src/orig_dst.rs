//! Recovering a redirected connection's original destination with `SO_ORIGINAL_DST`.
//!
//! Under iptables this is answered by conntrack; here our cgroup/getsockopt eBPF program answers
//! the very same call from its 4-tuple map, so the proxy works unchanged under either.
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the value 80; only the level differs.
pub const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the client originally dialled before it was redirected to us.
///
/// Errors with `ENOENT` / `ENOPROTOOPT` when the connection was not redirected (someone dialled
/// the proxy port directly); see [`is_not_redirected`]. Where conntrack tracks loopback it may
/// instead answer with the proxy's own address: callers must refuse that (loop guard).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    match stream.local_addr()? {
        SocketAddr::V4(_) => ipv4(fd),
        // A dual-stack socket accepting IPv4: the redirect happened in IPv4, ask that level first.
        SocketAddr::V6(local) if local.ip().to_ipv4_mapped().is_some() => {
            ipv4(fd).or_else(|_| ipv6(fd))
        }
        SocketAddr::V6(_) => ipv6(fd),
    }
}

/// True for the errors that mean "this connection was not redirected".
pub fn is_not_redirected(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT))
}

fn ipv4(fd: RawFd) -> io::Result<SocketAddr> {
    let sin: libc::sockaddr_in = get_original_dst(fd, libc::SOL_IP)?;
    if libc::c_int::from(sin.sin_family) != libc::AF_INET {
        return Err(bad_family(sin.sin_family.into()));
    }
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )))
}

fn ipv6(fd: RawFd) -> io::Result<SocketAddr> {
    let sin6: libc::sockaddr_in6 = get_original_dst(fd, libc::SOL_IPV6)?;
    if libc::c_int::from(sin6.sin6_family) != libc::AF_INET6 {
        return Err(bad_family(sin6.sin6_family.into()));
    }
    Ok(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        sin6.sin6_flowinfo,
        sin6.sin6_scope_id,
    )))
}

/// Whether a reset of this accepted outbound connection may not reach the app: its end went
/// through the in-pod redirect (`sidecar init --msg-redirect`) and its socket is blocking now,
/// so a reader parked in the kernel's redirect path would wake to EAGAIN, not ECONNRESET. Asked
/// of our cgroup/getsockopt program (`SO_SIDECAR_MSG`); any error (no program, not intercepted)
/// means no.
pub fn reset_may_not_reach_app(stream: &TcpStream) -> bool {
    let level = match stream.local_addr() {
        Ok(SocketAddr::V4(_)) => libc::SOL_IP,
        Ok(SocketAddr::V6(_)) => libc::SOL_IPV6,
        Err(_) => return false,
    };
    let mut value: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable u32 for the call and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            sidecar_common::SO_SIDECAR_MSG,
            (&mut value as *mut u32).cast(),
            &mut len,
        )
    };
    rc == 0 && len as usize == size_of::<u32>() && value & sidecar_common::MSG_BLOCKING_APP != 0
}

fn bad_family(family: libc::c_int) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("SO_ORIGINAL_DST answered with address family {family}"),
    )
}

/// The C address structs `SO_ORIGINAL_DST` can fill in.
trait RawSockaddr: Sized {}
impl RawSockaddr for libc::sockaddr_in {}
impl RawSockaddr for libc::sockaddr_in6 {}

/// `getsockopt(fd, level, SO_ORIGINAL_DST)` into a `T`, with exactly `size_of::<T>()` bytes
/// offered: what both the kernel and any reasonable eBPF getsockopt hook expect.
fn get_original_dst<T: RawSockaddr>(fd: RawFd, level: libc::c_int) -> io::Result<T> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable buffer of `len` bytes for the duration of the call, and
    // the kernel writes at most `len` bytes into it. `T` is only ever `sockaddr_in` or
    // `sockaddr_in6` (see `RawSockaddr`), plain C structs of integers for which the all-zero
    // starting state and any bytes the kernel writes are valid values, so `assume_init` is sound
    // whether or not the call succeeded.
    let (rc, value) = unsafe {
        let mut value = MaybeUninit::<T>::zeroed();
        let rc = libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            value.as_mut_ptr().cast(),
            &mut len,
        );
        (rc, value.assume_init())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<T>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST answered with {len} bytes"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn accepted_pair(bind: &str) -> Option<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind(bind).await.ok()?;
        let addr = listener.local_addr().ok()?;
        let client = TcpStream::connect(addr).await.ok()?;
        let (server, _) = listener.accept().await.ok()?;
        Some((client, server))
    }

    #[tokio::test]
    async fn direct_ipv4_connection_is_not_redirected() {
        let (_client, server) = accepted_pair("127.0.0.1:0").await.expect("loopback works");
        assert_direct(&server);
    }

    #[tokio::test]
    async fn direct_ipv6_connection_is_not_redirected() {
        // Hosts with IPv6 disabled cannot run this case.
        let Some((_client, server)) = accepted_pair("[::1]:0").await else {
            return;
        };
        assert_direct(&server);
    }

    /// A direct connection either has no original destination (no conntrack entry: ENOENT, or no
    /// conntrack at all: ENOPROTOOPT) or, where conntrack tracks loopback, the unchanged
    /// destination: our own address. The latter is why the proxy has a loop guard.
    fn assert_direct(server: &TcpStream) {
        match original_dst(server) {
            Ok(dst) => assert_eq!(dst, server.local_addr().unwrap()),
            Err(err) => assert!(is_not_redirected(&err), "unexpected error: {err:?}"),
        }
    }
}
