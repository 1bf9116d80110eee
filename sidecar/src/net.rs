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
            Some(SocketAddr::from((std::net::Ipv6Addr::from(bytes), port)))
        }
        _ => None,
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
