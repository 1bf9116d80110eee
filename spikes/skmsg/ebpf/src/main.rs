//! Spike (not part of the product): the in-pod leg of a proxied connection moved from socket to
//! socket by an `sk_msg` program, without the TCP/IP stack. See README.md next to this crate.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{sk_action, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_ANY},
    macros::{map, sk_msg, sock_ops},
    maps::{Array, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Key {
    lip: u32,
    rip: u32,
    lport: u32,
    rport: u32,
}

#[map(name = "SPIKE_SOCKS")]
static SOCKS: SockHash<Key> = SockHash::with_max_entries(65536, 0);

/// [0] = the proxy port to accelerate, [1] = inserted count, [2] = redirect misses
#[map(name = "SPIKE_CFG")]
static CFG: Array<u32> = Array::with_max_entries(4, 0);

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
    let mut key = Key { lip, rip, lport, rport };
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
    // The peer's key: its local end is our remote one.
    let mut key = Key { lip: rip, rip: lip, lport: rport, rport: lport };
    // On a miss the helper returns SK_DROP and sets no redirect: pass the message to TCP.
    if SOCKS.redirect_msg(&ctx, &mut key, BPF_F_INGRESS as u64) != sk_action::SK_PASS as i64 {
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
