//! Spike loader: `spike-loader OBJECT CGROUP_V2_DIR PORT [BOUND]` loads the spike's programs,
//! attaches sock_ops to the cgroup and sk_msg to the sockhash (BOUND: 0 or absent, none; 1, the
//! peer's receive buffer; else that many bytes unread in the peer's redirect queue; a connection
//! that would go over goes back to TCP for good; `SPIKE_OFFSETS`: the offsets of
//! sock.sk_user_data, sk_psock.msg_tot_len and sock.sk_rcvbuf, by default read from the kernel's
//! BTF, /sys/kernel/btf/vmlinux, by `btf_member_offset` below), and prints its counters every 5 s until
//! killed (the links are not pinned: they go with the process).
use anyhow::Context;
use aya::maps::{Array, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};

#[repr(C)]
#[derive(Clone, Copy)]
struct Key {
    ns: u64,
    lip: u32,
    rip: u32,
    lport: u32,
    rport: u32,
}
// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for Key {}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (obj, cgroup, port) = (&args[1], &args[2], args[3].parse::<u32>()?);
    let mut bpf = aya::Ebpf::load_file(obj).context("load")?;
    let mut cfg: Array<_, u32> = Array::try_from(bpf.map_mut("SPIKE_CFG").unwrap())?;
    cfg.set(0, port, 0)?;
    let bound = args
        .get(4)
        .map(|l| l.parse::<u32>())
        .transpose()?
        .unwrap_or(0);
    cfg.set(4, bound, 0)?;
    let offsets: Vec<u32> = match std::env::var("SPIKE_OFFSETS") {
        Ok(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        Err(_) => {
            let btf = std::fs::read("/sys/kernel/btf/vmlinux").context("read the kernel's BTF")?;
            let mut found = Vec::new();
            for (strukt, member) in [
                ("sock", "sk_user_data"),
                ("sk_psock", "msg_tot_len"),
                ("sock", "sk_rcvbuf"),
            ] {
                found.push(
                    btf_member_offset(&btf, strukt, member)
                        .with_context(|| format!("no {strukt}.{member} in the kernel's BTF"))?,
                );
            }
            found
        }
    };
    eprintln!(
        "offsets: sock.sk_user_data {}, sk_psock.msg_tot_len {}, sock.sk_rcvbuf {}",
        offsets[0], offsets[1], offsets[2]
    );
    for (i, o) in offsets.iter().enumerate() {
        cfg.set(5 + i as u32, *o, 0)?;
    }
    let socks: SockHash<_, Key> = SockHash::try_from(bpf.take_map("SPIKE_SOCKS").unwrap())?;
    let msg: &mut SkMsg = bpf.program_mut("spike_msg").unwrap().try_into()?;
    msg.load()?;
    msg.attach(socks.fd()).context("attach sk_msg")?;
    let ops: &mut SockOps = bpf.program_mut("spike_ops").unwrap().try_into()?;
    ops.load()?;
    let cg = std::fs::File::open(cgroup)?;
    ops.attach(cg, CgroupAttachMode::Single)
        .context("attach sockops")?;
    eprintln!("attached; ctrl-c to stop");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(5));
        let cfg: Array<_, u32> = Array::try_from(bpf.map("SPIKE_CFG").unwrap())?;
        eprintln!(
            "inserted {} redirect-misses {} back-to-tcp {}",
            cfg.get(&1, 0)?,
            cfg.get(&2, 0)?,
            cfg.get(&3, 0)?
        );
    }
}

/// The byte offset of `member` in the first struct named `strukt` of a raw BTF blob (the format
/// of /sys/kernel/btf/vmlinux: a header, then types, then strings; see the kernel's
/// Documentation/bpf/btf.rst). `None` when either is missing or the member is a bitfield.
fn btf_member_offset(btf: &[u8], strukt: &str, member: &str) -> Option<u32> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?))
    };
    if btf.get(0..2)? != [0x9f, 0xeb] {
        return None; // not little-endian BTF
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let name = |off: u32| -> Option<&[u8]> {
        let rest = strings.get(off as usize..)?;
        Some(&rest[..rest.iter().position(|b| *b == 0)?])
    };
    let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
    while at + 12 <= end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
            _ => 0,                       // PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG
        };
        if kind == 4 && name(name_off)? == strukt.as_bytes() {
            for m in 0..vlen {
                let base = at + 12 + m * 12;
                if name(u32_at(base)?)? == member.as_bytes() {
                    let offset = u32_at(base + 8)?;
                    let (bits, bitfield) = if kind_flag == 1 {
                        (offset & 0xff_ffff, offset >> 24)
                    } else {
                        (offset, 0)
                    };
                    return (bitfield == 0 && bits % 8 == 0).then_some(bits / 8);
                }
            }
            return None;
        }
        at += 12 + extra;
    }
    None
}
