//! Spike loader: `spike-loader OBJECT CGROUP_V2_DIR PORT` loads the spike's programs, attaches
//! sock_ops to the cgroup and sk_msg to the sockhash, and prints its counters every 5 s until
//! killed (the links are not pinned: they go with the process).
use aya::maps::{Array, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use anyhow::Context;

#[repr(C)]
#[derive(Clone, Copy)]
struct Key { lip: u32, rip: u32, lport: u32, rport: u32 }
// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for Key {}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (obj, cgroup, port) = (&args[1], &args[2], args[3].parse::<u32>()?);
    let mut bpf = aya::Ebpf::load_file(obj).context("load")?;
    let mut cfg: Array<_, u32> = Array::try_from(bpf.map_mut("SPIKE_CFG").unwrap())?;
    cfg.set(0, port, 0)?;
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
        eprintln!("inserted {} redirect-misses {}", cfg.get(&1, 0)?, cfg.get(&2, 0)?);
    }
}
