//! Listening sockets, the same for every listener of the process (proxy and admin): bound with
//! `SO_REUSEADDR`, IPv6 ones `V6ONLY`, and optional addresses that may be skipped. Imports
//! nothing from the crate.
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
                    format!("cannot listen on {}: {e}{}", l.addr, bind_hint(&e)),
                ))
            }
        }
    }
    Ok(listeners)
}

/// An IPv6 link-local address without its zone (an inbound connection from a global address to
/// the pod's link-local one has no interface bound, so `getsockname()` gives scope 0) gets the
/// index of the interface that holds it: it cannot be dialled, nor bound, without one.
pub fn with_link_scope(addr: SocketAddr) -> SocketAddr {
    let SocketAddr::V6(v6) = addr else {
        return addr;
    };
    if v6.scope_id() != 0 || (v6.ip().segments()[0] & 0xffc0) != 0xfe80 {
        return addr;
    }
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return addr;
    };
    for interface in interfaces {
        let held = interface
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in6())
            .is_some_and(|a| a.ip() == *v6.ip());
        if held {
            if let Ok(index) = nix::net::if_::if_nametoindex(interface.interface_name.as_str()) {
                return SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, index));
            }
        }
    }
    addr
}

/// What an EPERM from bind(2) means in a pod set up by `sidecar init`: its bind guard keeps the
/// proxy's ports for the proxy's uid and gid.
pub fn bind_hint(e: &io::Error) -> String {
    if e.raw_os_error() != Some(libc::EPERM) {
        return String::new();
    }
    format!(
        ": in a pod set up by `sidecar init`, only the proxy's uid or gid (--proxy-uid, \
         --proxy-gid; 1337 by default) may bind the proxy's ports, and this process runs as \
         uid {} gid {}: run it as that uid (runAsUser: 1337 in Kubernetes), or re-run init \
         with --proxy-uid {}",
        nix::unistd::getuid(),
        nix::unistd::getgid(),
        nix::unistd::getuid()
    )
}
pub fn addrs_of(listeners: &[TcpListener]) -> io::Result<Vec<SocketAddr>> {
    listeners.iter().map(TcpListener::local_addr).collect()
}

/// The uid that owns the TCP socket at `local` connected to `remote`, from the kernel's socket
/// table of this network namespace (`/proc/net/tcp`, `/proc/net/tcp6`): who is on the other
/// end of a loopback connection. `None` if no such socket is listed (it has closed).
pub fn tcp_socket_uid(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
    let table = match local {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    Ok(find_socket_uid(
        &std::fs::read_to_string(table)?,
        local,
        remote,
    ))
}

/// [`tcp_socket_uid`] on the table's text.
fn find_socket_uid(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (parse_proc_addr(l)? == local && parse_proc_addr(r)? == remote)
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// The listening sockets (state `0A`) of a `/proc/net/tcp` or `tcp6` table: their bound address
/// and port.
pub fn listening_sockets(table: &str) -> Vec<SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(3) == Some(&"0A"))
                .then(|| parse_proc_addr(fields.get(1)?))
                .flatten()
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word as the kernel
/// holds it in memory (network byte order), printed as a native integer; the port in hex.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    match ip.len() {
        8 => Some(SocketAddr::from((Ipv4Addr::from(word(0)?), port))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(SocketAddr::from((Ipv6Addr::from(bytes), port)))
        }
        _ => None,
    }
}

/// Where the start-up self-test connects: TEST-NET-1 (RFC 5737), never routed. Only its
/// redirection matters; the connection attempt itself is abandoned at once.
pub const SELF_TEST_DESTINATION: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 9));

/// Whether this process's own outbound connections are captured (redirected to one of
/// `listeners`, the proxy's): a non-blocking connect to [`SELF_TEST_DESTINATION`], then the
/// kernel's socket table says where the socket really goes (`getsockname`/`getpeername` may be
/// rewritten by the interception; `/proc/net/tcp` is not). `Some(listener)` when captured.
pub fn own_connections_captured(listeners: &[SocketAddr]) -> io::Result<Option<SocketAddr>> {
    use std::os::fd::AsRawFd as _;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = nix::sys::socket::SockaddrIn::from(match SELF_TEST_DESTINATION {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => unreachable!("an IPv4 constant"),
    });
    match nix::sys::socket::connect(socket.as_raw_fd(), &addr) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        // Refused at once (fail-closed with no listener, or no route): not redirected to us.
        Err(_) => return Ok(None),
    }
    let local: nix::sys::socket::SockaddrIn = nix::sys::socket::getsockname(socket.as_raw_fd())?;
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let port = local.port();
    let remote = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let l = parse_proc_addr(fields.get(1)?)?;
        (l.port() == port)
            .then(|| parse_proc_addr(fields.get(2)?))
            .flatten()
    });
    Ok(remote.filter(|r| {
        listeners
            .iter()
            .any(|l| l.port() == r.port() && (l.ip() == r.ip() || l.ip().is_unspecified()))
    }))
}

/// An IP prefix, IPv4 held v4-mapped so that one trie serves both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv6Addr,
    /// Prefix length in the 128-bit space (IPv4 /n becomes /96+n).
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| {
            format!("{s:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, fd00::/8)")
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(l) if l <= max => l,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(match ip {
            IpAddr::V4(v4) => Cidr {
                addr: mask(v4.to_ipv6_mapped(), 96 + len),
                len: 96 + len,
            },
            IpAddr::V6(v6) => Cidr {
                addr: mask(v6, len),
                len,
            },
        })
    }

    /// True if `ip` (either family) is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v6 = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        mask(v6, self.len) == self.addr
    }
}

fn mask(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    let bits = u128::from(addr);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    Ipv6Addr::from(bits & mask)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr.to_ipv4_mapped() {
            Some(v4) if self.len >= 96 => write!(f, "{v4}/{}", self.len - 96),
            _ => write!(f, "{}/{}", self.addr, self.len),
        }
    }
}

#[cfg(test)]
mod socket_table_tests {
    use super::*;

    #[test]
    fn the_peer_socket_is_found_with_its_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let uid = tcp_socket_uid(server.peer_addr().unwrap(), server.local_addr().unwrap())
            .unwrap()
            .expect("the client's socket is listed");
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
        drop(client);

        let v6 = std::net::TcpListener::bind("[::1]:0");
        if let Ok(listener) = v6 {
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            let uid =
                tcp_socket_uid(server.peer_addr().unwrap(), server.local_addr().unwrap()).unwrap();
            assert_eq!(uid, Some(nix::unistd::geteuid().as_raw()));
        }
    }

    #[test]
    fn table_lines_parse() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:D431 0100007F:3B0A 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 20 4 30 10 -1\n";
        if cfg!(target_endian = "little") {
            let local: SocketAddr = "127.0.0.1:54321".parse().unwrap();
            let remote: SocketAddr = "127.0.0.1:15114".parse().unwrap();
            assert_eq!(find_socket_uid(table, local, remote), Some(1000));
            assert_eq!(find_socket_uid(table, remote, local), None);
        }
        assert_eq!(parse_proc_addr("nonsense"), None);
        let listening = "  sl  local_address rem_address   st\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n   1: 0100007F:D431 0100007F:3B0A 01 0\n";
        assert_eq!(
            listening_sockets(listening),
            vec!["0.0.0.0:8080".parse::<SocketAddr>().unwrap()]
        );
    }
}
