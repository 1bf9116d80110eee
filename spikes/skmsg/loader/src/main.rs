//! Spike loader: `spike-loader OBJECT CGROUP_V2_DIR PORT [BOUND]` loads the spike's programs,
//! attaches sock_ops to the cgroup and sk_msg to the sockhash (BOUND: 0 or absent, none; 1, the
//! peer's receive buffer; else that many bytes unread in the peer's redirect queue; a connection
//! that would go over goes back to TCP for good; `SPIKE_OFFSETS`: the offsets of
//! sock.sk_user_data, sk_psock.msg_tot_len and sock.sk_rcvbuf, by default kernel 6.18.44's from
//! `bpftool btf dump file /sys/kernel/btf/vmlinux format raw`), and prints its counters every 5 s until
//! killed (the links are not pinned: they go with the process).
use aya::maps::{Array, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use anyhow::Context;

#[repr(C)]
#[derive(Clone, Copy)]
struct Key { ns: u64, lip: u32, rip: u32, lport: u32, rport: u32 }
// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for Key {}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (obj, cgroup, port) = (&args[1], &args[2], args[3].parse::<u32>()?);
    let mut bpf = aya::Ebpf::load_file(obj).context("load")?;
    let mut cfg: Array<_, u32> = Array::try_from(bpf.map_mut("SPIKE_CFG").unwrap())?;
    cfg.set(0, port, 0)?;
    let bound = args.get(4).map(|l| l.parse::<u32>()).transpose()?.unwrap_or(0);
    cfg.set(4, bound, 0)?;
    let offsets = std::env::var("SPIKE_OFFSETS").unwrap_or_else(|_| "656,412,244".into());
    for (i, o) in offsets.split(',').enumerate() {
        cfg.set(5 + i as u32, o.parse::<u32>()?, 0)?;
    }
    let socks: SockHash<_, Key> = SockHash::try_from(bpf.take_map("SPIKE_SOCKS").unwrap())?;
    let msg: &mut SkMsg = bpf.program_mut("spike_msg").unwrap().try_into()?;
    msg.load()?;
    msg.attach(socks.fd()).context("attach sk_msg")?;
    let ops: &mut SockOps = bpf.program_mut("spike_ops").unwrap().try_into()?;
    ops.load()?;
    let cg = std::fs::File::open(cgroup)?;
    ops.attach(cg, CgroupAttachMode::Single).context("attach sockops")?;
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
