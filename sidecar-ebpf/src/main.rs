//! Kernel side of the sidecar: the programs `sidecar init` attaches to one pod's cgroup.
//!
//! Outbound flow (see ARCHITECTURE.md):
//! 1. `sc_connect4` / `sc_connect6` (cgroup/connect*): a TCP connect() by an application process is
//!    rewritten to the proxy's outbound listener on loopback; the original destination is saved under
//!    the socket cookie.
//! 2. `sc_sockops` (sock_ops, ACTIVE_ESTABLISHED): once the connection exists, the original destination
//!    is re-keyed by the connection's 4-tuple, because the proxy's accepted socket is a different socket
//!    (a different cookie) and the only thing the two ends share is the 4-tuple.
//! 3. `sc_getsockopt` (cgroup/getsockopt): the proxy calls getsockopt(SOL_IP/SOL_IPV6, SO_ORIGINAL_DST)
//!    as it would under iptables; we answer from the 4-tuple map.
//! 4. `sc_getpeername4/6` (cgroup/getpeername*): the application sees its real peer.
//!
//! Inbound flow: `sc_sockops` puts the proxy's inbound listener into a SOCKMAP when it calls
//! listen(); `sc_sk_lookup` (attached to the pod's network namespace) hands SYNs for the pod's
//! addresses and captured ports to that listener. The proxy reads the original destination with
//! getsockname(), as nothing was rewritten.
//!
//! The app's listeners are tracked (`APP_LISTENERS`, sockops LISTEN and close): inbound SYNs go to
//! the proxy only for ports where the app listens. `sc_post_bind4/6` keep the proxy's ports for
//! the proxy's uid/gid; `sc_getsockname4/6` report the pod's address as a redirected socket's
//! local one.
//!
//! In-pod redirect (`--msg-redirect`, off by default): `sc_sockops` also puts both ends of each
//! redirected outbound connection (the app's socket, the proxy's accepted one) into a SOCKHASH,
//! and `sc_msg_redirect` (sk_msg) moves each send straight into the peer's receive queue instead
//! of through loopback TCP, while the peer has less than its receive buffer unread; past that,
//! or when the peer is missing, the connection goes back to TCP for good (the byte order holds
//! only that way round).
//!
//! Fail modes are decided here, per connection: fail-open looks for the proxy's listener first
//! and leaves the connection alone when there is none.
//!
//! Scalars are `.rodata` globals set by the loader; every program reads them with `read_volatile`
//! because otherwise the compiler folds the default value in at build time.
#![no_std]
#![no_main]
// The fully ordered fetch-and-add the in-pod redirect needs (core's atomic types are not built
// for the BPF target).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, sk_action, BPF_ANY, BPF_F_CURRENT_NETNS, BPF_F_INGRESS,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{
        bpf_get_current_uid_gid, bpf_get_socket_cookie,
        generated::{
            bpf_map_delete_elem, bpf_probe_read_kernel, bpf_sk_lookup_tcp, bpf_sk_release,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
    EbpfContext,
};
use aya_log_ebpf::debug;
use sidecar_common::{
    flags, is_v4_mapped, maps::INBOUND_SLOT_V4, maps::INBOUND_SLOT_V6, stats, v4_mapped, ListenKey,
    MsgPeer, OrigDst, SockTuple, MSG_BLOCKING_APP, PORT_BITMAP_WORDS, SO_ORIGINAL_DST,
    SO_SIDECAR_MSG,
};

// ---- configuration (.rodata, set at load time) --------------------------------------------------

#[no_mangle]
static PROXY_UID: u32 = 1337;
#[no_mangle]
static PROXY_GID: u32 = 1337;
#[no_mangle]
static OUTBOUND_PORT: u16 = 15001;
#[no_mangle]
static INBOUND_PORT: u16 = 15006;
#[no_mangle]
static ADMIN_PORT: u16 = 15090;
#[no_mangle]
static FLAGS: u32 = 0;
/// The pod's first addresses (network byte order; 0 = none), for getsockname().
#[no_mangle]
static POD_IP4: u32 = 0;
#[no_mangle]
static POD_IP6: [u32; 4] = [0; 4];
/// Offsets of `sock.sk_user_data`, `sk_psock.msg_tot_len`, `sock.sk_rcvbuf`, `sock.sk_socket`,
/// `socket.file`, `file.f_flags` in the running kernel (the loader reads them from its BTF);
/// only read with `--msg-redirect`.
#[no_mangle]
static MSG_OFFSETS: [u32; 6] = [0; 6];

#[inline(always)]
fn cfg<T: Copy>(v: &'static T) -> T {
    // SAFETY: a valid reference to a static; volatile so the loader's value is read, not the default.
    unsafe { core::ptr::read_volatile(v) }
}

/// Reads a context field with a load at its fixed offset. The verifier rejects context accesses
/// through a computed pointer ("dereference of modified ctx ptr"), and LLVM happily turns two
/// branches reading different fields into one load through a selected pointer. So every field a
/// program needs is read unconditionally, once, with a volatile load, and the branches pick among
/// the values rather than among the addresses.
macro_rules! ctx_read {
    ($ptr:expr, $($field:tt)+) => {
        {
            #[allow(unused_unsafe)]
            // SAFETY: $ptr is the program's context (or a verifier-checked socket) pointer.
            let value = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) };
            value
        }
    };
}

// ---- maps ---------------------------------------------------------------------------------------

/// Original destination by socket cookie (written at connect, read by sockops and getpeername).
/// LRU so that a burst of connections can never make connect() fail; entries are also removed
/// when the socket closes (sockops STATE_CB).
#[map(name = "SC_ODST_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Original destination by connection 4-tuple (written by sockops, read by the proxy's getsockopt).
#[map(name = "SC_ODST_TUPLE")]
static ORIG_DST_BY_TUPLE: LruHashMap<SockTuple, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// The pod's own addresses: traffic to them is pod-local and never redirected.
#[map(name = "SC_POD_IPS")]
static POD_IPS: HashMap<[u32; 4], u8> = HashMap::with_max_entries(16, 0);

/// 65536-bit port bitmaps (word = port / 64).
#[map(name = "SC_EXCL_PORTS")]
static EXCLUDE_PORTS: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);
#[map(name = "SC_INCL_PORTS")]
static INCLUDE_PORTS: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);

/// CIDR lists; IPv4 prefixes are stored v4-mapped (prefix length + 96).
#[map(name = "SC_EXCL_CIDRS")]
static EXCLUDE_CIDRS: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(1024, 1); // BPF_F_NO_PREALLOC
#[map(name = "SC_INCL_CIDRS")]
static INCLUDE_CIDRS: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(1024, 1);

/// The proxy's inbound listeners (slot 0: IPv4, slot 1: IPv6), filled by sockops on listen().
/// A closed socket leaves the map by itself, which is what makes the fail modes work.
#[map(name = "SC_IN_LISTEN")]
static INBOUND_LISTENERS: SockMap = SockMap::with_max_entries(2, 0);

/// Inbound port bitmaps (captured ports): excluded, and the optional include list.
#[map(name = "SC_IN_EXCL")]
static INBOUND_EXCLUDE_PORTS: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);
#[map(name = "SC_IN_INCL")]
static INBOUND_INCLUDE_PORTS: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);

/// The app's listening sockets (bound address and port -> how many), kept by sockops on
/// listen() and close, seeded by `init` with those that already listened: sk_lookup steers a
/// SYN to the proxy only where the app listens, so a closed port refuses at once.
#[map(name = "SC_APP_LISTEN")]
static APP_LISTENERS: HashMap<ListenKey, u32> = HashMap::with_max_entries(4096, 0);

/// Cookies of the proxy's listeners registered in INBOUND_LISTENERS (see on_listen).
#[map(name = "SC_IN_REG")]
static INBOUND_REGISTERED: HashMap<u64, u8> = HashMap::with_max_entries(16, 0);

/// The in-pod redirect's sockets, by their own 4-tuple (`client` = local end). Sized 1 unless
/// `--msg-redirect` (the loader sets the size).
#[map(name = "SC_MSG_SOCKS")]
static MSG_SOCKS: SockHash<SockTuple> = SockHash::with_max_entries(1, 0);

/// The same sockets -> their kernel address and whether they went back to TCP. Allocated per
/// entry (BPF_F_NO_PREALLOC), removed when the socket closes.
#[map(name = "SC_MSG_PEERS")]
static MSG_PEERS: HashMap<SockTuple, MsgPeer> = HashMap::with_max_entries(1, 1);

#[map(name = "SC_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

// ---- decisions shared by connect4 and connect6 --------------------------------------------------

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
const LOOPBACK4_BE: u32 = u32::from_be(0x7f00_0001);

#[inline(always)]
fn port_in(bitmap: &Array<u64>, port: u16) -> bool {
    match bitmap.get((port as u32) / 64) {
        Some(word) => (*word >> (port % 64)) & 1 == 1,
        None => false,
    }
}

#[inline(always)]
fn in_cidrs(trie: &LpmTrie<[u32; 4], u8>, ip: [u32; 4]) -> bool {
    trie.get(Key::new(128, ip)).is_some()
}

/// Why a connect is left alone, as a stats index; `None` = redirect it.
#[inline(always)]
fn skip_reason(ip: [u32; 4], port: u16) -> Option<u32> {
    let ids = bpf_get_current_uid_gid();
    let (uid, gid) = (ids as u32, (ids >> 32) as u32);
    if uid == cfg(&PROXY_UID) || gid == cfg(&PROXY_GID) {
        return Some(stats::SKIP_PROXY_UID);
    }
    // 0.0.0.0 and :: reach this host, as loopback does.
    if is_loopback(&ip) || is_unspecified(&ip) {
        return Some(stats::SKIP_LOOPBACK);
    }
    // SAFETY: read-only lookup; the value is not kept.
    if unsafe { POD_IPS.get(&ip) }.is_some() {
        return Some(stats::SKIP_POD_IP);
    }
    let f = cfg(&FLAGS);
    if f & flags::INCLUDE_PORTS != 0 && !port_in(&INCLUDE_PORTS, port) {
        return Some(stats::SKIP_NOT_INCLUDED_PORT);
    }
    if port_in(&EXCLUDE_PORTS, port) {
        return Some(stats::SKIP_EXCLUDED_PORT);
    }
    if f & flags::INCLUDE_CIDRS != 0 && !in_cidrs(&INCLUDE_CIDRS, ip) {
        return Some(stats::SKIP_NOT_INCLUDED_CIDR);
    }
    if in_cidrs(&EXCLUDE_CIDRS, ip) {
        return Some(stats::SKIP_EXCLUDED_CIDR);
    }
    None
}

#[inline(always)]
fn is_unspecified(ip: &[u32; 4]) -> bool {
    (is_v4_mapped(ip) && ip[3] == 0) || (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 0)
}

#[inline(always)]
fn is_loopback(ip: &[u32; 4]) -> bool {
    if is_v4_mapped(ip) {
        // 127.0.0.0/8: first byte of the network-order word.
        (ip[3] & 0xff) == 127
    } else {
        ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1)
    }
}

/// Saves the original destination under the socket cookie. False when it could not be saved, in
/// which case the connect is not rewritten: the proxy could never learn where it was going.
#[inline(always)]
fn save_orig(ctx: &SockAddrContext, ip: [u32; 4], port: u16) -> bool {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { ip, port, _pad: 0 };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        count(stats::MAP_ERROR);
        return false;
    }
    true
}

/// A connect whose original destination could not be saved: the proxy could never learn where it
/// was going. Fail-open lets it go direct; fail-closed refuses it (EPERM) rather than let it
/// out uncaptured.
#[inline(always)]
fn unsaved() -> i32 {
    if cfg(&FLAGS) & flags::FAIL_OPEN_OUTBOUND != 0 {
        1
    } else {
        count(stats::OUTBOUND_REFUSED);
        0
    }
}

/// Whether the proxy listens on loopback:OUTBOUND_PORT in this network namespace. `v6` selects
/// [::1], else 127.0.0.1. Only consulted in fail-open mode: it costs a socket lookup per connect.
#[inline(always)]
fn outbound_listener_present(ctx: &SockAddrContext, v6: bool) -> bool {
    // SAFETY: bpf_sock_tuple is plain data; an all-zero value is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let port = cfg(&OUTBOUND_PORT).to_be();
    let size = if v6 {
        // SAFETY: writing the ipv6 variant of a zeroed union.
        unsafe {
            tuple.__bindgen_anon_1.ipv6.daddr[3] = u32::from_be(1);
            tuple.__bindgen_anon_1.ipv6.dport = port;
            core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv6)
        }
    } else {
        // SAFETY: writing the ipv4 variant of a zeroed union.
        unsafe {
            tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK4_BE;
            tuple.__bindgen_anon_1.ipv4.dport = port;
            core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv4)
        }
    };
    // SAFETY: the tuple lives on our stack for the call; a socket returned is released at once.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut _);
    }
    true
}

// ---- cgroup/connect4, cgroup/connect6 ------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn sc_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; fields are verifier-checked.
    unsafe {
        // SOCK_STREAM is also SCTP's (and MPTCP's) type: only TCP is ours to redirect.
        if (*sa).type_ != SOCK_STREAM || (*sa).protocol != IPPROTO_TCP {
            count(stats::SKIP_NOT_TCP);
            return 1;
        }
        let ip = v4_mapped((*sa).user_ip4);
        let port = u16::from_be((*sa).user_port as u16);
        if let Some(reason) = skip_reason(ip, port) {
            count(reason);
            if cfg(&FLAGS) & flags::DEBUG_LOG != 0 {
                debug!(
                    &ctx,
                    "connect4 {:i}:{} left alone (reason {})",
                    u32::from_be(ip[3]),
                    port,
                    reason
                );
            }
            return 1;
        }
        if cfg(&FLAGS) & flags::FAIL_OPEN_OUTBOUND != 0 && !outbound_listener_present(&ctx, false) {
            count(stats::OUTBOUND_FAIL_OPEN);
            return 1;
        }
        if !save_orig(&ctx, ip, port) {
            return unsaved();
        }
        (*sa).user_ip4 = LOOPBACK4_BE;
        (*sa).user_port = cfg(&OUTBOUND_PORT).to_be() as u32;
        count(stats::REDIRECTED);
        if cfg(&FLAGS) & flags::DEBUG_LOG != 0 {
            debug!(
                &ctx,
                "connect4 {:i}:{} redirected to the outbound listener",
                u32::from_be(ip[3]),
                port
            );
        }
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn sc_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in sc_connect4. user_ip6 is read and written one 32-bit word at a time because the
    // verifier only allows 4-byte accesses to it.
    unsafe {
        if (*sa).type_ != SOCK_STREAM || (*sa).protocol != IPPROTO_TCP {
            count(stats::SKIP_NOT_TCP);
            return 1;
        }
        let ip = [
            ctx_read!(sa, user_ip6[0]),
            ctx_read!(sa, user_ip6[1]),
            ctx_read!(sa, user_ip6[2]),
            ctx_read!(sa, user_ip6[3]),
        ];
        let port = u16::from_be((*sa).user_port as u16);
        if let Some(reason) = skip_reason(ip, port) {
            count(reason);
            return 1;
        }
        if cfg(&FLAGS) & flags::FAIL_OPEN_OUTBOUND != 0
            && !outbound_listener_present(&ctx, !is_v4_mapped(&ip))
        {
            count(stats::OUTBOUND_FAIL_OPEN);
            return 1;
        }
        if !save_orig(&ctx, ip, port) {
            return unsaved();
        }
        if is_v4_mapped(&ip) {
            // A dual-stack socket going to an IPv4 peer: ::ffff:127.0.0.1 (the IPv4 listener).
            (*sa).user_ip6[3] = LOOPBACK4_BE;
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = 0;
            (*sa).user_ip6[3] = u32::from_be(1);
        }
        (*sa).user_port = cfg(&OUTBOUND_PORT).to_be() as u32;
    }
    count(stats::REDIRECTED);
    if cfg(&FLAGS) & flags::DEBUG_LOG != 0 {
        debug!(&ctx, "connect6 redirected to the outbound listener");
    }
    1
}

// ---- sock_ops -------------------------------------------------------------------------------------

#[sock_ops]
pub fn sc_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if cfg(&FLAGS) & flags::MSG_REDIRECT != 0 {
                on_passive_established(&ctx);
            }
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        // Only an app end of the in-pod redirect asks for it (msg_add), until its first send.
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => on_app_segment(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            // args[0] is the old state, args[1] the new one: forget the connection once it is
            // closed, and an app listener once it stops listening.
            if ctx.arg(1) == TCP_CLOSE {
                if ctx.arg(0) == TCP_LISTEN {
                    listener_closed(&ctx);
                } else {
                    forget(&ctx);
                }
            }
        }
        _ => {}
    }
    1
}

/// The 4-tuple of an application socket, as seen from the proxy's accepted socket: the app is the
/// client, the listener is the server.
#[inline(always)]
fn app_tuple(ctx: &SockOpsContext) -> Option<SockTuple> {
    let ops = ctx.ops;
    // All loads first, unconditionally (see ctx_read!).
    let family = ctx_read!(ops, family);
    let (l4, r4) = (ctx_read!(ops, local_ip4), ctx_read!(ops, remote_ip4));
    let l6 = [
        ctx_read!(ops, local_ip6[0]),
        ctx_read!(ops, local_ip6[1]),
        ctx_read!(ops, local_ip6[2]),
        ctx_read!(ops, local_ip6[3]),
    ];
    let r6 = [
        ctx_read!(ops, remote_ip6[0]),
        ctx_read!(ops, remote_ip6[1]),
        ctx_read!(ops, remote_ip6[2]),
        ctx_read!(ops, remote_ip6[3]),
    ];
    let local_port = ctx_read!(ops, local_port);
    let remote_port = ctx_read!(ops, remote_port);
    let (client_ip, server_ip) = match family {
        AF_INET => (v4_mapped(l4), v4_mapped(r4)),
        AF_INET6 => (l6, r6),
        _ => return None,
    };
    Some(SockTuple {
        client_ip,
        server_ip,
        client_port: local_port as u16,
        // sock_ops exposes remote_port in network byte order in the upper half on little endian;
        // u32::from_be puts the host-order port in the low 16 bits.
        server_port: u32::from_be(remote_port) as u16,
    })
}

#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let orig = match unsafe { ORIG_DST_BY_COOKIE.get(&cookie) } {
        Some(orig) => *orig,
        None => return, // not one of ours (the proxy's own connections land here too)
    };
    let Some(tuple) = app_tuple(ctx) else { return };
    if ORIG_DST_BY_TUPLE.insert(&tuple, &orig, 0).is_err() {
        count(stats::MAP_ERROR);
        return;
    }
    count(stats::TUPLE_SAVED);
    // Ask for state callbacks on this socket only, so both entries go when it closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if cfg(&FLAGS) & flags::MSG_REDIRECT != 0 {
        msg_add(ctx, &tuple, true);
    }
}

/// Whether the app's socket file is O_NONBLOCK as it connects. Only such sockets join the in-pod
/// redirect: for a socket in a SOCKHASH, the kernel's blocking receive (`tcp_bpf_recvmsg`)
/// returns EAGAIN when woken by anything but data (send space freed by an ACK, a reset), which a
/// blocking reader never expects; an event-driven one reads readiness, not the wake-up.
/// `sk` is the socket's address as a plain number (the verifier allows no arithmetic on the
/// context's socket pointer).
#[inline(always)]
fn is_nonblocking(sk: u64) -> bool {
    const O_NONBLOCK: u32 = 0o4000;
    let socket = kread::<u64>(sk + u64::from(cfg(&MSG_OFFSETS[3])));
    if socket == 0 {
        return false;
    }
    let file = kread::<u64>(socket + u64::from(cfg(&MSG_OFFSETS[4])));
    if file == 0 {
        return false;
    }
    kread::<u32>(file + u64::from(cfg(&MSG_OFFSETS[5]))) & O_NONBLOCK != 0
}

/// The proxy accepted a connection on its outbound listener: when the app's end joined the in-pod
/// redirect (it established first), the proxy's end joins it too.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    // The accepted socket's own tuple: local = the outbound listener, remote = the app.
    let Some(own) = app_tuple(ctx) else { return };
    if own.client_port != cfg(&OUTBOUND_PORT) {
        return;
    }
    let app = reversed(&own);
    // SAFETY: read-only lookup; the value is not kept.
    if unsafe { MSG_PEERS.get(&app) }.is_none() {
        return;
    }
    // Its entry must go when it closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    msg_add(ctx, &own, false);
}

/// The other end's key: its local end is our remote one.
#[inline(always)]
fn reversed(t: &SockTuple) -> SockTuple {
    SockTuple {
        client_ip: t.server_ip,
        server_ip: t.client_ip,
        client_port: t.server_port,
        server_port: t.client_port,
    }
}

/// Puts the socket behind `ctx` (own tuple `key`) into the in-pod redirect: first its address
/// (what the peer's bound check reads), then the SOCKHASH (which attaches `sc_msg_redirect`).
/// `app`: the app's end, which joins only when non-blocking.
#[inline(always)]
fn msg_add(ctx: &SockOpsContext, key: &SockTuple, app: bool) {
    let ops = ctx.ops;
    // The socket's kernel address (a privileged loader may keep pointers in maps); only ever
    // read with bpf_probe_read_kernel, which faults safely on a stale one.
    let sk = ctx_read!(ops, __bindgen_anon_2.sk) as u64;
    if sk == 0 {
        return;
    }
    let peer = MsgPeer {
        sk,
        to_tcp: 0,
        redirected: 0,
        app: u32::from(app),
        leave: 0,
    };
    if MSG_PEERS.insert(key, &peer, BPF_ANY as u64).is_err() {
        count(stats::MAP_ERROR);
        return;
    }
    // Read back from the map, the address is a number the bound and this check can add to.
    // SAFETY: a map value, copied at once.
    let sk = unsafe { MSG_PEERS.get(key) }.map_or(0, |p| p.sk);
    if app && !is_nonblocking(sk) {
        let _ = MSG_PEERS.remove(key);
        count(stats::MSG_SKIP_BLOCKING);
        return;
    }
    let mut k = *key;
    // SAFETY: `ops` is this program's context, a full socket at ESTABLISHED.
    if MSG_SOCKS
        .update(&mut k, unsafe { &mut *ops }, BPF_ANY as u64)
        .is_ok()
    {
        count(stats::MSG_SOCKET_ADDED);
        if app {
            // Told of each segment it sends until its first send decided (on_app_segment).
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
    } else {
        // Full, or the socket is already in another set's SOCKHASH (a re-run of init, for a
        // moment): it stays on TCP.
        let _ = MSG_PEERS.remove(key);
    }
}

/// A listening socket's bound address and port (the app-listener map's key), and its family.
#[inline(always)]
fn listen_key(ctx: &SockOpsContext) -> (ListenKey, u32) {
    let ops = ctx.ops;
    // All loads first, unconditionally (see ctx_read!).
    let family = ctx_read!(ops, family);
    let port = ctx_read!(ops, local_port);
    let l4 = ctx_read!(ops, local_ip4);
    let l6 = [
        ctx_read!(ops, local_ip6[0]),
        ctx_read!(ops, local_ip6[1]),
        ctx_read!(ops, local_ip6[2]),
        ctx_read!(ops, local_ip6[3]),
    ];
    let ip = if family == AF_INET6 {
        l6
    } else {
        v4_mapped(l4)
    };
    let key = ListenKey {
        ip,
        port: port as u16,
        _pad: 0,
    };
    (key, family)
}

/// A listening socket: the proxy's inbound listener goes into the SOCKMAP the sk_lookup program
/// reads (only the proxy's uid or gid can bind that port: see `sc_post_bind4`); any other is an
/// app listener, counted in APP_LISTENERS (and watched, so that its close is seen too).
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let (key, family) = listen_key(ctx);
    if key.port == cfg(&INBOUND_PORT) {
        let slot = if family == AF_INET6 {
            INBOUND_SLOT_V6
        } else {
            INBOUND_SLOT_V4
        };
        // SAFETY: ops is the sock_ops context of a listening TCP socket, as the helper requires.
        if unsafe { INBOUND_LISTENERS.update(slot, ctx.ops, 0) }.is_ok() {
            count(stats::INBOUND_LISTENER_SEEN);
            // Its close is counted too: seen minus gone is how many are registered now.
            // SAFETY: the helper only reads the socket behind the context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = INBOUND_REGISTERED.insert(&cookie, &1, 0);
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        } else {
            count(stats::MAP_ERROR);
        }
        return;
    }
    match APP_LISTENERS.get_ptr_mut(&key) {
        // SAFETY: a pointer to a map value, used at once. listen() and close() of one port are
        // rare; a lost race only miscounts sockets sharing a port (SO_REUSEPORT).
        Some(n) => unsafe { *n += 1 },
        None => {
            if APP_LISTENERS.insert(&key, &1, 0).is_err() {
                count(stats::MAP_ERROR);
                return;
            }
        }
    }
    count(stats::APP_LISTENER_SEEN);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// A listener closed: the proxy's inbound one (counted), or an app's (forgotten).
#[inline(always)]
fn listener_closed(ctx: &SockOpsContext) {
    let (key, _) = listen_key(ctx);
    if key.port == cfg(&INBOUND_PORT) {
        // Only one registered in these maps: a listener of a set since replaced by a fresh one
        // (init --remove, then init) was never in this map.
        // SAFETY: the helper only reads the socket behind the context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if INBOUND_REGISTERED.remove(&cookie).is_ok() {
            count(stats::INBOUND_LISTENER_GONE);
        }
        return;
    }
    if let Some(n) = APP_LISTENERS.get_ptr_mut(&key) {
        // SAFETY: the pointer is to a map value, used at once.
        unsafe {
            if *n > 1 {
                *n -= 1;
                return;
            }
        }
        let _ = APP_LISTENERS.remove(&key);
    }
}

#[inline(always)]
fn forget(ctx: &SockOpsContext) {
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
    if let Some(tuple) = app_tuple(ctx) {
        let _ = ORIG_DST_BY_TUPLE.remove(&tuple);
        // The SOCKHASH drops a closed socket by itself; its address must go too.
        let _ = MSG_PEERS.remove(&tuple);
    }
}

/// An app end of the in-pod redirect sends a TCP segment (the handshake's last ACK, its first
/// data if that went by TCP, a FIN). If its first send found it blocking with nothing redirected
/// either way (`leave`), both ends leave the SOCKHASH now, inside that send: nothing waits in
/// either redirect queue, and by the time the send returns the app's socket is a plain TCP
/// socket again, as a blocking reader needs. Once the first send decided, the callbacks stop.
#[inline(always)]
fn on_app_segment(ctx: &SockOpsContext) {
    let Some(own) = app_tuple(ctx) else { return };
    // SAFETY: a map value, copied at once.
    let Some(me) = (unsafe { MSG_PEERS.get(&own) }).copied() else {
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        return;
    };
    if me.app != 0 {
        return; // not sent anything yet (this is the handshake's ACK)
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    if me.leave == 0 {
        return;
    }
    for key in [own, reversed(&own)] {
        // SAFETY: the map's definition and a key on our stack; sock_ops may delete from a
        // SOCKHASH (the kernel unlinks the socket and gives it back its TCP handlers once the
        // send in progress lets go of it).
        unsafe {
            bpf_map_delete_elem(
                &MSG_SOCKS as *const SockHash<SockTuple> as *mut _,
                &key as *const SockTuple as *const _,
            )
        };
    }
    count(stats::MSG_LEFT);
}

// ---- sk_msg: the in-pod redirect ----------------------------------------------------------------

/// Reads a `T` from kernel memory at `addr` (zero when the read faults).
#[inline(always)]
fn kread<T: Copy + Default>(addr: u64) -> T {
    let mut v = T::default();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `v` and faults safely.
    unsafe {
        bpf_probe_read_kernel(
            &mut v as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
            addr as *const _,
        )
    };
    v
}

/// Every send of a socket in `MSG_SOCKS`: straight into the peer's receive queue while the peer
/// has room, else by TCP from then on.
#[sk_msg]
pub fn sc_msg_redirect(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    // All loads first, unconditionally (see ctx_read!).
    let family = ctx_read!(msg, family);
    let (l4, r4) = (ctx_read!(msg, local_ip4), ctx_read!(msg, remote_ip4));
    let l6 = [
        ctx_read!(msg, local_ip6[0]),
        ctx_read!(msg, local_ip6[1]),
        ctx_read!(msg, local_ip6[2]),
        ctx_read!(msg, local_ip6[3]),
    ];
    let r6 = [
        ctx_read!(msg, remote_ip6[0]),
        ctx_read!(msg, remote_ip6[1]),
        ctx_read!(msg, remote_ip6[2]),
        ctx_read!(msg, remote_ip6[3]),
    ];
    let local_port = ctx_read!(msg, local_port);
    let remote_port = ctx_read!(msg, remote_port);
    let size = ctx_read!(msg, size);
    let (local, remote) = if family == AF_INET {
        (v4_mapped(l4), v4_mapped(r4))
    } else {
        (l6, r6)
    };
    let own = SockTuple {
        client_ip: local,
        server_ip: remote,
        client_port: local_port as u16,
        // As in sock_ops: network byte order in the upper half.
        server_port: u32::from_be(remote_port) as u16,
    };
    let Some(me) = MSG_PEERS.get_ptr_mut(&own) else {
        return sk_action::SK_PASS;
    };
    let mut peer_key = reversed(&own);
    // SAFETY: a map value, valid for the program's run.
    if unsafe { (*me).app } != 0 {
        // SAFETY: as above; only this socket's own sends write `app`.
        unsafe { (*me).app = 0 };
        if !is_nonblocking(unsafe { (*me).sk }) {
            return first_send_blocking(me, &peer_key);
        }
    }
    // Marked before the check, atomically: see first_send_blocking.
    // SAFETY: as above.
    unsafe { fetch_or(&mut (*me).redirected, 1) };
    // SAFETY: as above.
    if unsafe { fetch_or(&mut (*me).to_tcp, 0) } != 0 {
        return sk_action::SK_PASS;
    }
    let why = match peer_room(&peer_key, u64::from(size)) {
        Room::Yes => {
            // On a miss the helper sets no redirect: the message goes by TCP.
            if MSG_SOCKS.redirect_msg(&ctx, &mut peer_key, BPF_F_INGRESS as u64)
                == sk_action::SK_PASS as i64
            {
                count(stats::MSG_REDIRECTED);
                return sk_action::SK_PASS;
            }
            stats::MSG_PEER_MISSING
        }
        Room::Full => stats::MSG_BACK_TO_TCP,
        Room::Gone => stats::MSG_PEER_MISSING,
    };
    // From here on this connection's sends go by TCP: the peer reads its redirect queue before
    // its TCP receive queue, so the byte order holds this way round, and a later redirect could
    // overtake what TCP still carries.
    // SAFETY: as above.
    unsafe { fetch_or(&mut (*me).to_tcp, 1) };
    count(why);
    sk_action::SK_PASS
}

/// ORs `bits` into a map value's field and returns what it held, as one fully ordered BPF
/// atomic (`BPF_ATOMIC | BPF_FETCH`; the only fetching kind LLVM emits for this target without
/// alu32); `bits = 0` is a fully ordered load.
///
/// # Safety
/// `field` points into a map value that lives for the program's run.
#[inline(always)]
unsafe fn fetch_or(field: *mut u64, bits: u64) -> u64 {
    use core::intrinsics::{atomic_or, AtomicOrdering};
    // SAFETY: aligned, in a live map value; the caller's contract.
    let old = unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(field, bits) };
    // Used, so that LLVM keeps the fetching (ordered) form: a plain BPF atomic add is relaxed on
    // some architectures (arm64).
    core::hint::black_box(old)
}

/// The app end's first send, and its socket is blocking (it was not at connect: a connect with
/// a timeout): the connection goes back to TCP both ways, and, if the proxy end never started a
/// redirect, both ends leave the SOCKHASH as this send's first segment goes out
/// (on_app_segment). The proxy end marks
/// `redirected` before it checks `to_tcp`, and this sets its `to_tcp` before it reads that
/// mark, both with fully ordered atomics: either the mark shows a send that may have gone
/// through, or that send saw `to_tcp` and went by TCP.
#[inline(always)]
fn first_send_blocking(me: *mut MsgPeer, peer_key: &SockTuple) -> u32 {
    count(stats::MSG_SKIP_BLOCKING);
    // SAFETY: a map value, valid for the program's run.
    unsafe { fetch_or(&mut (*me).to_tcp, 1) };
    let clean = match MSG_PEERS.get_ptr_mut(peer_key) {
        // SAFETY: as above.
        Some(peer) => unsafe {
            fetch_or(&mut (*peer).to_tcp, 1);
            fetch_or(&mut (*peer).redirected, 0) == 0
        },
        None => true,
    };
    if clean {
        // SAFETY: as above.
        unsafe { (*me).leave = 1 };
    } else {
        count(stats::MSG_BLOCKING_KEPT);
    }
    sk_action::SK_PASS
}

enum Room {
    Yes,
    /// The peer has its receive buffer's worth unread already.
    Full,
    /// The peer is not (or no longer) in the redirect.
    Gone,
}

/// Whether the peer (`key`) may take `size` more redirected bytes: what waits in its redirect
/// queue (`psock->msg_tot_len`) plus `size` within its receive buffer (`sk_rcvbuf`), as TCP
/// would bound it.
#[inline(always)]
fn peer_room(key: &SockTuple, size: u64) -> Room {
    // SAFETY: a map value, copied at once.
    let Some(sk) = (unsafe { MSG_PEERS.get(key) }).map(|p| p.sk) else {
        return Room::Gone;
    };
    let [user_data, msg_tot_len, rcvbuf] = [
        cfg(&MSG_OFFSETS[0]),
        cfg(&MSG_OFFSETS[1]),
        cfg(&MSG_OFFSETS[2]),
    ];
    // The low bits of sk_user_data are SK_USER_DATA_* flags.
    let psock = kread::<u64>(sk + u64::from(user_data)) & !7;
    if psock == 0 {
        return Room::Gone;
    }
    let queued = u64::from(kread::<u32>(psock + u64::from(msg_tot_len)));
    let limit = kread::<i32>(sk + u64::from(rcvbuf)).max(0) as u64;
    if queued + size <= limit {
        Room::Yes
    } else {
        Room::Full
    }
}

// ---- cgroup/getsockopt: SO_ORIGINAL_DST -------------------------------------------------------------

#[cgroup_sockopt(getsockopt)]
pub fn sc_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: the context pointer is valid; pointer fields are checked by the verifier, and every
    // write into optval is preceded by the bounds check against optval_end it requires.
    unsafe {
        let level = (*so).level;
        let optname = (*so).optname;
        // Only SOL_IP/SOL_IPV6 + SO_ORIGINAL_DST or SO_SIDECAR_MSG; every other call passes
        // through untouched.
        if (optname != SO_ORIGINAL_DST && optname != SO_SIDECAR_MSG)
            || (level != SOL_IP && level != SOL_IPV6)
        {
            return 1;
        }
        // Already answered (by conntrack, or by another copy of us during a re-init): leave it.
        if (*so).retval == 0 {
            return 1;
        }
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 1;
        }
        // All loads first, unconditionally (see ctx_read!).
        let family = ctx_read!(sk, family);
        let (src4, dst4) = (ctx_read!(sk, src_ip4), ctx_read!(sk, dst_ip4));
        let src6 = [
            ctx_read!(sk, src_ip6[0]),
            ctx_read!(sk, src_ip6[1]),
            ctx_read!(sk, src_ip6[2]),
            ctx_read!(sk, src_ip6[3]),
        ];
        let dst6 = [
            ctx_read!(sk, dst_ip6[0]),
            ctx_read!(sk, dst_ip6[1]),
            ctx_read!(sk, dst_ip6[2]),
            ctx_read!(sk, dst_ip6[3]),
        ];
        let (client_ip, server_ip) = match family {
            AF_INET => (v4_mapped(dst4), v4_mapped(src4)),
            AF_INET6 => (dst6, src6),
            _ => return 1,
        };
        let tuple = SockTuple {
            client_ip,
            server_ip,
            client_port: u16::from_be(ctx_read!(sk, dst_port)),
            server_port: ctx_read!(sk, src_port) as u16,
        };
        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let optval_end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if optname == SO_SIDECAR_MSG {
            // `tuple` is the app's end, local end first: its in-pod redirect entry's key.
            let blocking = MSG_PEERS
                .get(&tuple)
                .is_some_and(|app| !is_nonblocking(app.sk));
            if optval.add(4) > optval_end {
                return 1;
            }
            *(optval as *mut u32) = if blocking { MSG_BLOCKING_APP } else { 0 };
            // Two separate 4-byte stores (LLVM would merge adjacent ones into an 8-byte store
            // the verifier refuses on this context).
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*so).optlen), 4);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*so).retval), 0);
            return 1;
        }
        let orig = match ORIG_DST_BY_TUPLE.get(&tuple) {
            Some(orig) => *orig,
            None => {
                count(stats::SOCKOPT_MISS);
                return 1;
            }
        };
        if level == SOL_IP {
            if !is_v4_mapped(&orig.ip) {
                count(stats::SOCKOPT_MISS);
                return 1;
            }
            // struct sockaddr_in: family(2) port(2, be) addr(4, be) zero(8)
            if optval.add(16) > optval_end {
                return 1;
            }
            let out = optval as *mut [u32; 4];
            (*out)[0] = (AF_INET as u32) | ((orig.port.to_be() as u32) << 16);
            (*out)[1] = orig.ip[3];
            (*out)[2] = 0;
            (*out)[3] = 0;
            (*so).optlen = 16;
        } else {
            // struct sockaddr_in6: family(2) port(2) flowinfo(4) addr(16) scope_id(4)
            if optval.add(28) > optval_end {
                return 1;
            }
            let out = optval as *mut [u32; 7];
            (*out)[0] = (AF_INET6 as u32) | ((orig.port.to_be() as u32) << 16);
            (*out)[1] = 0;
            (*out)[2] = orig.ip[0];
            (*out)[3] = orig.ip[1];
            (*out)[4] = orig.ip[2];
            (*out)[5] = orig.ip[3];
            (*out)[6] = 0;
            (*so).optlen = 28;
        }
        (*so).retval = 0;
    }
    count(stats::SOCKOPT_HIT);
    1
}

// ---- cgroup/getpeername4, cgroup/getpeername6 ---------------------------------------------------------

#[inline(always)]
fn orig_for(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the helper only reads the socket; the value is copied out at once.
    unsafe {
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        ORIG_DST_BY_COOKIE.get(&cookie).copied()
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn sc_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_for(&ctx) {
        if is_v4_mapped(&orig.ip) {
            // SAFETY: context fields, verifier-checked.
            unsafe {
                (*ctx.sock_addr).user_ip4 = orig.ip[3];
                (*ctx.sock_addr).user_port = orig.port.to_be() as u32;
            }
            count(stats::PEERNAME_REWRITTEN);
        }
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sc_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_for(&ctx) {
        // SAFETY: context fields, verifier-checked; 4-byte writes only.
        unsafe {
            (*ctx.sock_addr).user_ip6[0] = orig.ip[0];
            (*ctx.sock_addr).user_ip6[1] = orig.ip[1];
            (*ctx.sock_addr).user_ip6[2] = orig.ip[2];
            (*ctx.sock_addr).user_ip6[3] = orig.ip[3];
            (*ctx.sock_addr).user_port = orig.port.to_be() as u32;
        }
        count(stats::PEERNAME_REWRITTEN);
    }
    1
}

// ---- cgroup/getsockname4, cgroup/getsockname6 -------------------------------------------------------
//
// A redirected app socket is connected to the proxy on loopback; without a sidecar (and under
// iptables REDIRECT) its local address would be the pod's. Report that.

#[cgroup_sock_addr(getsockname4)]
pub fn sc_getsockname4(ctx: SockAddrContext) -> i32 {
    let pod4 = cfg(&POD_IP4);
    if pod4 != 0 && orig_for(&ctx).is_some() {
        // SAFETY: context field, verifier-checked.
        unsafe { (*ctx.sock_addr).user_ip4 = pod4 };
        count(stats::SOCKNAME_REWRITTEN);
    }
    1
}

#[cgroup_sock_addr(getsockname6)]
pub fn sc_getsockname6(ctx: SockAddrContext) -> i32 {
    let Some(orig) = orig_for(&ctx) else {
        return 1;
    };
    let pod4 = cfg(&POD_IP4);
    let pod6 = cfg(&POD_IP6);
    let ip = if is_v4_mapped(&orig.ip) {
        if pod4 == 0 {
            return 1;
        }
        v4_mapped(pod4)
    } else {
        if pod6 == [0; 4] {
            return 1;
        }
        pod6
    };
    // SAFETY: context fields, verifier-checked; 4-byte writes only.
    unsafe {
        (*ctx.sock_addr).user_ip6[0] = ip[0];
        (*ctx.sock_addr).user_ip6[1] = ip[1];
        (*ctx.sock_addr).user_ip6[2] = ip[2];
        (*ctx.sock_addr).user_ip6[3] = ip[3];
    }
    count(stats::SOCKNAME_REWRITTEN);
    1
}

// ---- cgroup/post_bind4, cgroup/post_bind6 ------------------------------------------------------------
//
// The proxy's ports belong to the proxy: a TCP bind to the outbound, inbound or admin port by
// any other uid and gid in the pod fails with EPERM. A squatter can never receive captured
// connections, nor answer the kubelet's probes in the proxy's place.

#[inline(always)]
fn may_bind(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    let protocol = ctx_read!(sk, protocol);
    let port = ctx_read!(sk, src_port);
    if protocol != IPPROTO_TCP
        || (port != cfg(&OUTBOUND_PORT) as u32
            && port != cfg(&INBOUND_PORT) as u32
            && port != cfg(&ADMIN_PORT) as u32)
    {
        return 1;
    }
    let ids = bpf_get_current_uid_gid();
    let (uid, gid) = (ids as u32, (ids >> 32) as u32);
    if uid == cfg(&PROXY_UID) || gid == cfg(&PROXY_GID) {
        return 1;
    }
    count(stats::BIND_REFUSED);
    0
}

#[cgroup_sock(post_bind4)]
pub fn sc_post_bind4(ctx: SockContext) -> i32 {
    may_bind(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn sc_post_bind6(ctx: SockContext) -> i32 {
    may_bind(&ctx)
}

// ---- sk_lookup: inbound ---------------------------------------------------------------------------

const IPPROTO_TCP: u32 = 6;
const EEXIST: i32 = 17;
/// Source of the proxy's own connections to the app (Istio's inbound passthrough address).
const PASSTHROUGH4_BE: u32 = u32::from_be(0x7f00_0006);

/// Whether an app socket listens where a SYN for `local`:`port` would be delivered: on that
/// address, on the family's any-address, or (IPv4) on the IPv6 any-address (dual-stack).
#[inline(always)]
fn app_listens(local: [u32; 4], port: u16, v4: bool) -> bool {
    let at = |ip: [u32; 4]| {
        // SAFETY: read-only lookup; the value is not kept.
        unsafe { APP_LISTENERS.get(&ListenKey { ip, port, _pad: 0 }) }.is_some()
    };
    at(local) || at([0; 4]) || (v4 && at(v4_mapped(0)))
}

#[sk_lookup]
pub fn sc_sk_lookup(ctx: SkLookupContext) -> u32 {
    let lk = ctx.lookup;
    // All loads first, unconditionally (see ctx_read!).
    let family = ctx_read!(lk, family);
    let protocol = ctx_read!(lk, protocol);
    let (local4, remote4) = (ctx_read!(lk, local_ip4), ctx_read!(lk, remote_ip4));
    let local6 = [
        ctx_read!(lk, local_ip6[0]),
        ctx_read!(lk, local_ip6[1]),
        ctx_read!(lk, local_ip6[2]),
        ctx_read!(lk, local_ip6[3]),
    ];
    let remote6 = [
        ctx_read!(lk, remote_ip6[0]),
        ctx_read!(lk, remote_ip6[1]),
        ctx_read!(lk, remote_ip6[2]),
        ctx_read!(lk, remote_ip6[3]),
    ];
    let port = ctx_read!(lk, local_port) as u16;
    if protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let (local, remote) = if family == AF_INET {
        (v4_mapped(local4), v4_mapped(remote4))
    } else {
        (local6, remote6)
    };
    // SYNs for every address of the pod (its listed IPs, secondary and link-local ones alike);
    // never the proxy's passthrough connections (from 127.0.0.6), loopback, or the pod talking
    // to itself (from one of its own addresses).
    // SAFETY: read-only lookups; values are not kept.
    if is_loopback(&local)
        || is_loopback(&remote)
        || (family == AF_INET && remote4 == PASSTHROUGH4_BE)
        || remote == local
        || unsafe { POD_IPS.get(&remote) }.is_some()
    {
        return sk_action::SK_PASS;
    }
    let f = cfg(&FLAGS);
    if port == cfg(&INBOUND_PORT)
        || port == cfg(&OUTBOUND_PORT)
        || port == cfg(&ADMIN_PORT)
        || port_in(&INBOUND_EXCLUDE_PORTS, port)
        || (f & flags::INBOUND_INCLUDE_PORTS != 0 && !port_in(&INBOUND_INCLUDE_PORTS, port))
    {
        count(stats::INBOUND_SKIP_PORT);
        return sk_action::SK_PASS;
    }
    // Where the app does not listen, the SYN is left to the kernel's own lookup, which finds
    // nothing and answers RST: a closed port refuses at once, as without a sidecar.
    if !app_listens(local, port, family == AF_INET) {
        count(stats::INBOUND_NO_LISTENER);
        return sk_action::SK_PASS;
    }
    // An IPv4 SYN may go to a dual-stack IPv6 listener when there is no IPv4 one.
    let primary = if family == AF_INET {
        INBOUND_SLOT_V4
    } else {
        INBOUND_SLOT_V6
    };
    let mut result = INBOUND_LISTENERS.redirect_sk_lookup(&ctx, primary, 0);
    if family == AF_INET && matches!(result, Err(e) if e != -EEXIST) {
        result = INBOUND_LISTENERS.redirect_sk_lookup(&ctx, INBOUND_SLOT_V6, 0);
    }
    match result {
        Ok(()) => {
            count(stats::INBOUND_REDIRECTED);
            return sk_action::SK_PASS;
        }
        // Another program already chose a socket: our previous set, still attached for a
        // moment while `init` replaces it (it steers to the same listener, from the same map).
        Err(e) if e == -EEXIST => return sk_action::SK_PASS,
        Err(_) => {}
    }
    if f & flags::FAIL_OPEN_INBOUND != 0 {
        count(stats::INBOUND_FAIL_OPEN);
        sk_action::SK_PASS
    } else {
        // The lookup fails: the client gets a RST (connection refused), as with iptables and no
        // proxy.
        count(stats::INBOUND_REFUSED);
        sk_action::SK_DROP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
