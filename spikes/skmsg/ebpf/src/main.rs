//! Spike (not part of the product): the in-pod leg of a proxied connection moved from socket to
//! socket by an `sk_msg` program, without the TCP/IP stack. See README.md next to this crate.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{sk_action, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_ANY},
    helpers::generated::{bpf_get_netns_cookie, bpf_probe_read_kernel},
    macros::{map, sk_msg, sock_ops},
    maps::{Array, LruHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Key {
    /// The network namespace's cookie: loopback 4-tuples repeat across pods.
    ns: u64,
    lip: u32,
    rip: u32,
    lport: u32,
    rport: u32,
}

#[map(name = "SPIKE_SOCKS")]
static SOCKS: SockHash<Key> = SockHash::with_max_entries(65536, 0);

/// [0] = the proxy port to accelerate, [1] = inserted count, [2] = redirect misses,
/// [3] = connections that went back to TCP for good because their peer had too much unread,
/// [4] = the bound: 0 none (the first spike), 1 the peer's `sk_rcvbuf`, else that many bytes,
/// [5] = offsetof(struct sock, sk_user_data), [6] = offsetof(struct sk_psock, msg_tot_len),
/// [7] = offsetof(struct sock, sk_rcvbuf) (the loader reads them from the kernel's BTF)
#[map(name = "SPIKE_CFG")]
static CFG: Array<u32> = Array::with_max_entries(8, 0);

/// A socket in SOCKS (by its 4-tuple) -> its `struct sock` address, recorded by sock_ops: an
/// sk_msg program cannot release what a sockhash lookup returns, so it reads the peer's redirect
/// queue through this (with bpf_probe_read_kernel, which faults safely on a stale address).
#[map(name = "SPIKE_SKADDR")]
static SKADDR: LruHashMap<Key, u64> = LruHashMap::with_max_entries(65536, 0);

/// Connections (by their own 4-tuple) that went back to TCP for good.
#[map(name = "SPIKE_OFF")]
static OFF: LruHashMap<Key, u32> = LruHashMap::with_max_entries(65536, 0);

fn cfg(i: u32) -> u32 {
    CFG.get(i).copied().unwrap_or(0)
}

/// Reads a `T` from kernel memory at `addr` (0 on a fault).
fn kread<T: Copy + Default>(addr: u64) -> T {
    let mut v = T::default();
    // SAFETY: the helper copies at most size_of::<T>() bytes into `v` and faults safely.
    unsafe {
        bpf_probe_read_kernel(
            &mut v as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
            addr as *const _,
        )
    };
    v
}

/// Whether the peer (the socket at `key`) may take `size` more redirected bytes: what waits in
/// its redirect queue (`psock->msg_tot_len`) plus `size` stays within the bound.
fn peer_has_room(key: &Key, size: u64) -> bool {
    let mode = cfg(4);
    if mode == 0 {
        return true;
    }
    // SAFETY: a map value, read once.
    let Some(&base) = (unsafe { SKADDR.get(key) }) else { return false };
    let psock = kread::<u64>(base + cfg(5) as u64) & !7; // the low bits are SK_USER_DATA_* flags
    if psock == 0 {
        return false;
    }
    let queued = kread::<u32>(psock + cfg(6) as u64) as u64;
    let limit = if mode == 1 { kread::<i32>(base + cfg(7) as u64).max(0) as u64 } else { mode as u64 };
    queued + size <= limit
}

/// A context field, read with one volatile load (see `ctx_read!` in sidecar-ebpf).
macro_rules! rd {
    ($ptr:expr, $($field:tt)+) => {{
        // SAFETY: $ptr is the program's context pointer.
        let value = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) };
        value
    }};
}

fn bump(i: u32) {
    if let Some(p) = CFG.get_ptr_mut(i) {
        // SAFETY: an element of an array map, valid for the program's run.
        unsafe { *p += 1 };
    }
}

#[sock_ops]
pub fn spike_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    let ops = ctx.ops;
    let family = rd!(ops, family);
    let lip = rd!(ops, local_ip4);
    let rip = rd!(ops, remote_ip4);
    let lport = rd!(ops, local_port);
    let rport = u32::from_be(rd!(ops, remote_port));
    if family != 2 {
        return 1;
    }
    let port = match CFG.get(0) {
        Some(p) => *p,
        None => return 1,
    };
    if lport != port && rport != port {
        return 1;
    }
    // SAFETY: `ops` is the program's context.
    let ns = unsafe { bpf_get_netns_cookie(ops as *mut _) };
    let mut key = Key { ns, lip, rip, lport, rport };
    // A new connection on a reused 4-tuple starts redirected again.
    let _ = OFF.remove(&key);
    let sk = rd!(ops, __bindgen_anon_2.sk) as u64;
    if sk == 0 || SKADDR.insert(&key, &sk, BPF_ANY as u64).is_err() {
        return 1;
    }
    // SAFETY: `ops` is the program's context.
    if SOCKS.update(&mut key, unsafe { &mut *ops }, BPF_ANY as u64).is_ok() {
        bump(1);
    }
    1
}

#[sk_msg]
pub fn spike_msg(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let lip = rd!(msg, local_ip4);
    let rip = rd!(msg, remote_ip4);
    let lport = rd!(msg, local_port);
    let rport = u32::from_be(rd!(msg, remote_port));
    // SAFETY: `msg` is the program's context.
    let ns = unsafe { bpf_get_netns_cookie(msg as *mut _) };
    let own = Key { ns, lip, rip, lport, rport };
    // SAFETY: a map value, read once.
    if unsafe { OFF.get(&own) }.is_some() {
        return sk_action::SK_PASS;
    }
    // The peer's key: its local end is our remote one.
    let mut key = Key { ns, lip: rip, rip: lip, lport: rport, rport: lport };
    if !peer_has_room(&key, rd!(msg, size) as u64) {
        // From here on this connection goes through TCP, for good: the peer reads its redirect
        // queue before its TCP receive queue, so the byte order holds this way round (and
        // would not the other way).
        let _ = OFF.insert(&own, &1, BPF_ANY as u64);
        bump(3);
        return sk_action::SK_PASS;
    }
    // On a miss the helper returns SK_DROP and sets no redirect: pass the message to TCP, and
    // keep the connection there (a later redirect could overtake what TCP still carries).
    if SOCKS.redirect_msg(&ctx, &mut key, BPF_F_INGRESS as u64) != sk_action::SK_PASS as i64 {
        let _ = OFF.insert(&own, &1, BPF_ANY as u64);
        bump(2);
    }
    sk_action::SK_PASS
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
