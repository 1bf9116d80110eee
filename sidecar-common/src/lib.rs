//! Types and constants shared by the eBPF programs (`sidecar-ebpf`) and the sidecar binary.
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel side and user side read the very
//! same bytes out of BPF maps. Conventions, fixed once so that both sides agree:
//! - IP addresses are 16-byte IPv6 addresses in network byte order, IPv4 as v4-mapped `::ffff:a.b.c.d`,
//!   so one map serves both families and a dual-stack socket's v4-mapped peer matches the IPv4 socket
//!   on the other end of the same connection.
//! - Ports are in host byte order.
#![no_std]

#[cfg(feature = "std")]
pub mod mountinfo;

/// Names of the `.rodata` globals the loader sets before loading (see `sidecar-ebpf`).
pub mod globals {
    /// `u32`: UID whose connections are never redirected (the proxy's own upstream connections).
    pub const PROXY_UID: &str = "PROXY_UID";
    /// `u32`: GID whose connections are never redirected (`u32::MAX` = no GID exclusion).
    pub const PROXY_GID: &str = "PROXY_GID";
    /// `u16`: the outbound listener port on loopback.
    pub const OUTBOUND_PORT: &str = "OUTBOUND_PORT";
    /// `u16`: the inbound listener port (sk_lookup steers captured SYNs to it).
    pub const INBOUND_PORT: &str = "INBOUND_PORT";
    /// `u16`: the admin port (never captured inbound).
    pub const ADMIN_PORT: &str = "ADMIN_PORT";
    /// `u32`: bit set of [`crate::flags`].
    pub const FLAGS: &str = "FLAGS";
    /// `u32`: the pod's first IPv4 address, network byte order (0: none): what `getsockname()`
    /// reports as the local address of an app socket redirected to the proxy.
    pub const POD_IP4: &str = "POD_IP4";
    /// `[u32; 4]`: the pod's first IPv6 address, network byte order (all zero: none).
    pub const POD_IP6: &str = "POD_IP6";
    /// `[u32; 6]`: byte offsets of `sock.sk_user_data`, `sk_psock.msg_tot_len`,
    /// `sock.sk_rcvbuf` (the in-pod redirect's bound), `sock.sk_socket`, `socket.file` and
    /// `file.f_flags` (whether the app's socket is non-blocking) in this kernel, from its BTF.
    pub const MSG_OFFSETS: &str = "MSG_OFFSETS";
}

/// Bits of the `FLAGS` global.
pub mod flags {
    /// Only ports present in the include-ports bitmap are redirected.
    pub const INCLUDE_PORTS: u32 = 1 << 0;
    /// Only destinations inside the include-CIDRs trie are redirected.
    pub const INCLUDE_CIDRS: u32 = 1 << 1;
    /// Emit aya-log debug records (costs a ring write per connect; off by default).
    pub const DEBUG_LOG: u32 = 1 << 2;
    /// Outbound fail-open: connect directly when no proxy listens on the outbound port.
    pub const FAIL_OPEN_OUTBOUND: u32 = 1 << 3;
    /// Inbound fail-open: deliver to the app when no proxy listens on the inbound port.
    pub const FAIL_OPEN_INBOUND: u32 = 1 << 4;
    /// Only ports present in the inbound include bitmap are captured.
    pub const INBOUND_INCLUDE_PORTS: u32 = 1 << 5;
    /// The in-pod leg of outbound connections goes socket to socket (`sc_msg_redirect`).
    pub const MSG_REDIRECT: u32 = 1 << 6;
}

/// Names of the maps in the eBPF object (kernel object names are limited to 15 bytes).
pub mod maps {
    pub const ORIG_DST_BY_COOKIE: &str = "SC_ODST_COOKIE";
    pub const ORIG_DST_BY_TUPLE: &str = "SC_ODST_TUPLE";
    pub const POD_IPS: &str = "SC_POD_IPS";
    pub const EXCLUDE_PORTS: &str = "SC_EXCL_PORTS";
    pub const INCLUDE_PORTS: &str = "SC_INCL_PORTS";
    pub const EXCLUDE_CIDRS: &str = "SC_EXCL_CIDRS";
    pub const INCLUDE_CIDRS: &str = "SC_INCL_CIDRS";
    pub const STATS: &str = "SC_STATS";
    pub const INBOUND_LISTENERS: &str = "SC_IN_LISTEN";
    pub const INBOUND_EXCLUDE_PORTS: &str = "SC_IN_EXCL";
    pub const INBOUND_INCLUDE_PORTS: &str = "SC_IN_INCL";
    /// The app's listening sockets ([`crate::ListenKey`] -> how many): inbound SYNs are steered
    /// to the proxy only for ports where the app listens, so a closed port refuses.
    pub const APP_LISTENERS: &str = "SC_APP_LISTEN";
    /// The socket cookies of the proxy's listeners registered in [`INBOUND_LISTENERS`]: a
    /// listener's close is counted (`inbound_listener_gone`) only if it was registered here.
    pub const INBOUND_REGISTERED: &str = "SC_IN_REG";
    /// The in-pod redirect's SOCKHASH: both ends of each redirected outbound connection (the
    /// app's socket and the proxy's accepted one), keyed by the socket's own 4-tuple
    /// ([`crate::SockTuple`] with `client` = the socket's local end).
    pub const MSG_SOCKS: &str = "SC_MSG_SOCKS";
    /// The same sockets ([`crate::SockTuple`], local end first) -> [`crate::MsgPeer`]: the
    /// kernel address the bound reads through, and whether the connection went back to TCP.
    pub const MSG_PEERS: &str = "SC_MSG_PEERS";
    /// Maps whose state a re-run of `init` keeps (it reuses the pinned ones): the proxy's
    /// registered listeners, the app's listeners, the original destinations of connections in
    /// flight, and the counters.
    pub const KEPT_ON_REINIT: [&str; 6] = [
        INBOUND_LISTENERS,
        INBOUND_REGISTERED,
        APP_LISTENERS,
        ORIG_DST_BY_COOKIE,
        ORIG_DST_BY_TUPLE,
        STATS,
    ];
    /// All of our maps, for `status` and for removal checks.
    pub const ALL: [&str; 15] = [
        ORIG_DST_BY_COOKIE,
        ORIG_DST_BY_TUPLE,
        POD_IPS,
        EXCLUDE_PORTS,
        INCLUDE_PORTS,
        EXCLUDE_CIDRS,
        INCLUDE_CIDRS,
        STATS,
        INBOUND_LISTENERS,
        INBOUND_EXCLUDE_PORTS,
        INBOUND_INCLUDE_PORTS,
        APP_LISTENERS,
        INBOUND_REGISTERED,
        MSG_SOCKS,
        MSG_PEERS,
    ];
    /// Slots of the inbound listener SOCKMAP.
    pub const INBOUND_SLOT_V4: u32 = 0;
    pub const INBOUND_SLOT_V6: u32 = 1;
}

/// Program names (function names in `sidecar-ebpf`). Every one starts with [`PROG_PREFIX`] so that
/// removal and `status` can tell ours from anybody else's.
pub mod progs {
    pub const PROG_PREFIX: &str = "sc_";
    pub const CONNECT4: &str = "sc_connect4";
    pub const CONNECT6: &str = "sc_connect6";
    pub const SOCKOPS: &str = "sc_sockops";
    pub const GETSOCKOPT: &str = "sc_getsockopt";
    pub const GETPEERNAME4: &str = "sc_getpeername4";
    pub const GETPEERNAME6: &str = "sc_getpeername6";
    pub const GETSOCKNAME4: &str = "sc_getsockname4";
    pub const GETSOCKNAME6: &str = "sc_getsockname6";
    pub const POST_BIND4: &str = "sc_post_bind4";
    pub const POST_BIND6: &str = "sc_post_bind6";
    /// Attached to the pod's network namespace, not its cgroup.
    pub const SK_LOOKUP: &str = "sc_sk_lookup";
    /// sk_msg, attached to the [`crate::maps::MSG_SOCKS`] sockhash (only with `--msg-redirect`).
    pub const MSG_REDIRECT: &str = "sc_msg_redirect";
}

/// Port bitmaps are arrays of `u64` words: port `p` is bit `p % 64` of word `p / 64`.
pub const PORT_BITMAP_WORDS: u32 = 65536 / 64;

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`: the getsockopt optname iptables' REDIRECT answers.
pub const SO_ORIGINAL_DST: i32 = 80;

/// A getsockopt(SOL_IP or SOL_IPV6) the proxy asks of an accepted outbound connection before it
/// resets it; our cgroup/getsockopt program answers a `u32`: [`MSG_BLOCKING_APP`] when the app's
/// end went through the in-pod redirect and its socket is blocking now (a reset may reach a
/// reader parked in the kernel's redirect path as EAGAIN: close with FIN instead), else 0.
/// Unanswered (no program, ENOPROTOOPT) means 0.
pub const SO_SIDECAR_MSG: i32 = 0x5343_4d00;
/// See [`SO_SIDECAR_MSG`].
pub const MSG_BLOCKING_APP: u32 = 1;

/// Key of the original-destination map keyed by connection. `client` is the application's socket
/// (source of the redirected connection), `server` is the proxy's listener address it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockTuple {
    pub client_ip: [u32; 4],
    pub server_ip: [u32; 4],
    pub client_port: u16,
    pub server_port: u16,
}

/// Where the application meant to connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// IPv6 or v4-mapped address, network byte order.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A socket of the in-pod redirect ([`maps::MSG_PEERS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MsgPeer {
    /// The socket's `struct sock` address, read (never written) by the sender's bound check.
    pub sk: u64,
    /// Non-zero once this socket's sends went back to TCP, for good (the byte order holds only
    /// that way round). Set by its own sends, or by the app end's first send (atomically; 64
    /// bits because the BPF target has fully ordered atomics of that width only).
    pub to_tcp: u64,
    /// Non-zero once a send of this socket went down the redirect path (set atomically before
    /// the `to_tcp` check: the app end may leave only if the proxy end never started one).
    pub redirected: u64,
    /// Non-zero on the app's end until its first send (which checks whether it is blocking).
    pub app: u32,
    /// Non-zero once the app's end found itself blocking with nothing redirected either way:
    /// sock_ops takes both ends out of the SOCKHASH as its first segment of data goes out.
    pub leave: u32,
}

/// Key of the app-listener map: a listening socket's bound address (all zero for IPv6 any,
/// v4-mapped 0.0.0.0 for IPv4 any) and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenKey {
    /// IPv6 or v4-mapped address, network byte order.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Index of each counter in the per-CPU `SC_STATS` array.
pub mod stats {
    pub const REDIRECTED: u32 = 0;
    pub const SKIP_PROXY_UID: u32 = 1;
    pub const SKIP_LOOPBACK: u32 = 2;
    pub const SKIP_POD_IP: u32 = 3;
    pub const SKIP_EXCLUDED_PORT: u32 = 4;
    pub const SKIP_NOT_INCLUDED_PORT: u32 = 5;
    pub const SKIP_EXCLUDED_CIDR: u32 = 6;
    pub const SKIP_NOT_INCLUDED_CIDR: u32 = 7;
    pub const SKIP_NOT_TCP: u32 = 8;
    pub const MAP_ERROR: u32 = 9;
    pub const SOCKOPT_HIT: u32 = 10;
    pub const SOCKOPT_MISS: u32 = 11;
    pub const PEERNAME_REWRITTEN: u32 = 12;
    pub const TUPLE_SAVED: u32 = 13;
    /// Outbound connect left alone because no proxy listened (fail-open).
    pub const OUTBOUND_FAIL_OPEN: u32 = 14;
    /// Inbound SYN steered to the proxy's inbound listener.
    pub const INBOUND_REDIRECTED: u32 = 15;
    /// Inbound SYN not captured: proxy/excluded/not-included port.
    pub const INBOUND_SKIP_PORT: u32 = 16;
    /// Inbound SYN delivered to the app because no proxy listened (fail-open).
    pub const INBOUND_FAIL_OPEN: u32 = 17;
    /// Inbound SYN refused because no proxy listened (fail-closed).
    pub const INBOUND_REFUSED: u32 = 18;
    /// The proxy's inbound listener was registered (sockops LISTEN).
    pub const INBOUND_LISTENER_SEEN: u32 = 19;
    /// A process other than the proxy's uid/gid tried to bind a proxy port; refused (EPERM).
    pub const BIND_REFUSED: u32 = 20;
    /// Inbound SYN to a port where the app does not listen: not steered, so it is refused as
    /// without a sidecar.
    pub const INBOUND_NO_LISTENER: u32 = 21;
    /// Outbound connect refused (fail-closed) because its original destination could not be
    /// saved: it would otherwise have gone out uncaptured.
    pub const OUTBOUND_REFUSED: u32 = 22;
    /// getsockname() of a redirected app socket answered with the pod's address.
    pub const SOCKNAME_REWRITTEN: u32 = 23;
    /// An app listening socket was registered (sockops LISTEN).
    pub const APP_LISTENER_SEEN: u32 = 24;
    /// One of the proxy's registered inbound listeners closed: `inbound_listener_seen` minus
    /// this is how many are registered now (what `/ready` checks).
    pub const INBOUND_LISTENER_GONE: u32 = 25;
    /// A socket went into the in-pod redirect (an app's redirected connection, or the proxy's
    /// end of one).
    pub const MSG_SOCKET_ADDED: u32 = 26;
    /// A send went socket to socket.
    pub const MSG_REDIRECTED: u32 = 27;
    /// A connection's sends went back to TCP for good because the peer had a receive buffer's
    /// worth unread (the bound).
    pub const MSG_BACK_TO_TCP: u32 = 28;
    /// A send found no peer to go to (not yet, or no longer, in the map): it went by TCP, and so
    /// does the rest of that connection's sends.
    pub const MSG_PEER_MISSING: u32 = 29;
    /// An app's connection kept out of the redirect because its socket was blocking, at connect
    /// or at its first send (see `sidecar-ebpf`: the kernel's blocking receive on a socket in a
    /// SOCKHASH is not safe).
    pub const MSG_SKIP_BLOCKING: u32 = 30;
    /// A connection's two sockets left the SOCKHASH (their app end was blocking at its first
    /// send, before anything was redirected): plain TCP again.
    pub const MSG_LEFT: u32 = 31;
    /// An app end found blocking at its first send after the proxy had already redirected to it
    /// (a server-first protocol): it stays in the SOCKHASH, both directions on TCP.
    pub const MSG_BLOCKING_KEPT: u32 = 32;
    /// Number of counters (size of the array).
    pub const COUNT: u32 = 33;
    /// Counter names, indexed like the constants above (stable: they are metric label values).
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "skip_proxy_uid",
        "skip_loopback",
        "skip_pod_ip",
        "skip_excluded_port",
        "skip_not_included_port",
        "skip_excluded_cidr",
        "skip_not_included_cidr",
        "skip_not_tcp",
        "map_error",
        "sockopt_hit",
        "sockopt_miss",
        "peername_rewritten",
        "tuple_saved",
        "outbound_fail_open",
        "inbound_redirected",
        "inbound_skip_port",
        "inbound_fail_open",
        "inbound_refused",
        "inbound_listener_seen",
        "bind_refused",
        "inbound_no_listener",
        "outbound_refused",
        "sockname_rewritten",
        "app_listener_seen",
        "inbound_listener_gone",
        "msg_socket_added",
        "msg_redirected",
        "msg_back_to_tcp",
        "msg_peer_missing",
        "msg_skip_blocking",
        "msg_left",
        "msg_blocking_kept",
    ];
}

/// IPv4 address (network byte order, as the kernel stores it) to the v4-mapped form used in keys.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4_be]
}

/// Whether a 16-byte key address is v4-mapped.
#[inline(always)]
pub const fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], Copy, no padding-dependent invariants: every bit pattern is valid.
    unsafe impl aya::Pod for super::SockTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MsgPeer {}
}
