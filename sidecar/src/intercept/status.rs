//! `sidecar status`: what is attached for one pod, the configuration in force, and the kernel
//! counters, read back from the pins (the kernel's truth, not what a config file says).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, PerCpuArray};
use clap::Args;
use object::{Object, ObjectSection, ObjectSymbol};
use serde::Serialize;
use sidecar_common::{flags, globals, maps, progs, stats};

use super::config::DEFAULT_PIN_ROOT;
use super::error::InitError;
use super::host::{pod_cgroup, resolve_cgroup};
use super::load::OBJECT;
use crate::pins::pod_dir as pin_dir;

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The pod's cgroup v2 directory (as given to `sidecar init`).
    #[arg(long, env = "SIDECAR_CGROUP")]
    pub cgroup: PathBuf,
    /// Pod id, if `sidecar init` was given one.
    #[arg(long, env = "SIDECAR_POD_ID")]
    pub pod_id: Option<String>,
    #[arg(long, env = "SIDECAR_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// The pod's network namespace: checks that the inbound program is attached to it (the link
    /// itself is found from the pins either way).
    #[arg(long, env = "SIDECAR_NETNS")]
    pub netns: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub programs: Vec<ProgramStatus>,
    pub config: BTreeMap<&'static str, String>,
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub attach: &'static str,
    pub link_id: u32,
    pub prog_id: u32,
    /// "cgroup <id>", "netns <inode>", or "detached" when the target is gone.
    pub target: String,
}

fn attach_point(name: &str) -> &'static str {
    match name {
        progs::CONNECT4 => "cgroup/connect4",
        progs::CONNECT6 => "cgroup/connect6",
        progs::SOCKOPS => "sock_ops",
        progs::GETSOCKOPT => "cgroup/getsockopt",
        progs::GETPEERNAME4 => "cgroup/getpeername4",
        progs::GETPEERNAME6 => "cgroup/getpeername6",
        progs::GETSOCKNAME4 => "cgroup/getsockname4",
        progs::GETSOCKNAME6 => "cgroup/getsockname6",
        progs::POST_BIND4 => "cgroup/post_bind4",
        progs::POST_BIND6 => "cgroup/post_bind6",
        progs::SK_LOOKUP => "sk_lookup (netns)",
        progs::MSG_REDIRECT => "sk_msg (sockhash)",
        _ => "?",
    }
}

fn read_map(dir: &Path, name: &str) -> Option<Map> {
    let data = MapData::from_pin(crate::pins::map(dir, name)).ok()?;
    Map::from_map_data(data).ok()
}

fn kernel_err(what: String) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> InitError {
    InitError::kernel(
        what,
        "run `sidecar status` as root (it reads pinned BPF objects)",
    )
}

pub fn collect(args: &StatusArgs) -> Result<Status, InitError> {
    let cgroup = pod_cgroup(&resolve_cgroup(&args.cgroup)?)?;
    // As `init` names it: the pod UID of a kubelet cgroup, else the given id, else the inode.
    let pod_id = super::host::pod_id_for(&cgroup, args.pod_id.as_deref())?;
    let dir = pin_dir(&args.pin_root, pod_id.as_deref(), cgroup.id);
    if !dir.is_dir() {
        return Err(InitError::Cgroup {
            path: cgroup.path,
            problem: format!("nothing of ours is pinned for it ({} does not exist)", dir.display()),
            fix: "run `sidecar init --cgroup <dir>` first (or pass the --pod-id/--pin-root it was given)".into(),
        });
    }
    let mut programs = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(InitError::io(format!("read {}", dir.display())))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    for entry in &entries {
        let Some(name) = crate::pins::program_of(entry) else {
            continue;
        };
        let fd = crate::bpf::obj_get(&dir.join(entry))
            .map_err(|e| kernel_err(format!("open {entry}"))(e.into()))?;
        let info = crate::bpf::link_info(fd.as_fd())
            .map_err(|e| kernel_err(format!("query {entry}"))(e.into()))?;
        let target = match info.target {
            crate::bpf::LinkTarget::Cgroup { cgroup_id: 0 }
            | crate::bpf::LinkTarget::Netns { netns_ino: 0 } => {
                "detached (target gone)".to_string()
            }
            crate::bpf::LinkTarget::Cgroup { cgroup_id } => format!("cgroup {cgroup_id}"),
            crate::bpf::LinkTarget::Netns { netns_ino } => format!("netns {netns_ino}"),
            crate::bpf::LinkTarget::Sockmap { map_id } => format!("sockhash {map_id}"),
            crate::bpf::LinkTarget::Other => "?".into(),
        };
        programs.push(ProgramStatus {
            name: name.to_string(),
            attach: attach_point(name),
            link_id: info.id,
            prog_id: info.prog_id,
            target,
        });
    }

    let mut counters = BTreeMap::new();
    if let Some(map) = read_map(&dir, maps::STATS) {
        let array: PerCpuArray<MapData, u64> = map
            .try_into()
            .map_err(|e: aya::maps::MapError| kernel_err("read SC_STATS".into())(e.into()))?;
        for (i, name) in stats::NAMES.iter().enumerate() {
            let total = array
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            counters.insert(*name, total);
        }
    }

    let mut config = BTreeMap::new();
    config.extend(rodata_config(&dir));
    if let Some(map) = read_map(&dir, maps::POD_IPS) {
        if let Ok(ips) = HashMap::<MapData, [u32; 4], u8>::try_from(map) {
            let mut list: Vec<String> = ips
                .keys()
                .flatten()
                .map(|k| key_ip(&k).to_string())
                .collect();
            list.sort();
            config.insert("pod_ips", list.join(","));
        }
    }
    for (key, name) in [
        ("exclude_outbound_ports", maps::EXCLUDE_PORTS),
        ("include_outbound_ports", maps::INCLUDE_PORTS),
        ("exclude_inbound_ports", maps::INBOUND_EXCLUDE_PORTS),
        ("include_inbound_ports", maps::INBOUND_INCLUDE_PORTS),
    ] {
        if let Some(map) = read_map(&dir, name) {
            if let Ok(bitmap) = Array::<MapData, u64>::try_from(map) {
                let words: Vec<u64> = (0..sidecar_common::PORT_BITMAP_WORDS)
                    .map(|i| bitmap.get(&i, 0).unwrap_or(0))
                    .collect();
                config.insert(key, port_ranges(&words));
            }
        }
    }
    for (key, name) in [
        ("exclude_outbound_cidrs", maps::EXCLUDE_CIDRS),
        ("include_outbound_cidrs", maps::INCLUDE_CIDRS),
    ] {
        if let Some(map) = read_map(&dir, name) {
            if let Ok(trie) = LpmTrie::<MapData, [u32; 4], u8>::try_from(map) {
                let mut list: Vec<String> = trie
                    .keys()
                    .flatten()
                    .map(|k| {
                        let ip = Ipv6Addr::from(key_bytes(&k.data()));
                        super::config::Cidr {
                            addr: ip,
                            len: k.prefix_len() as u8,
                        }
                        .to_string()
                    })
                    .collect();
                list.sort();
                config.insert(
                    key,
                    if list.is_empty() {
                        "-".into()
                    } else {
                        list.join(",")
                    },
                );
            }
        }
    }
    if let Some(path) = &args.netns {
        let inode = fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .map_err(InitError::io(format!("open netns {}", path.display())))?;
        let attached = programs
            .iter()
            .any(|p| p.target == format!("netns {inode}"));
        config.insert(
            "netns",
            format!(
                "{} (inode {inode}): {}",
                path.display(),
                if attached {
                    "inbound capture attached"
                } else {
                    "NOT attached: run `sidecar init --netns` for it"
                }
            ),
        );
    }
    Ok(Status {
        pin_dir: dir,
        cgroup: cgroup.path,
        cgroup_id: cgroup.id,
        programs,
        config,
        counters,
    })
}

fn key_bytes(k: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (i, w) in k.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

fn key_ip(k: &[u32; 4]) -> IpAddr {
    let v6 = Ipv6Addr::from(key_bytes(k));
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// "22,9000-9010", or "-" when empty.
fn port_ranges(words: &[u64]) -> String {
    let mut out = Vec::new();
    let mut start: Option<u32> = None;
    for p in 0..=65536u32 {
        let set = p < 65536 && (words[(p / 64) as usize] >> (p % 64)) & 1 == 1;
        match (set, start) {
            (true, None) => start = Some(p),
            (false, Some(s)) => {
                out.push(if s == p - 1 {
                    s.to_string()
                } else {
                    format!("{s}-{}", p - 1)
                });
                start = None;
            }
            _ => {}
        }
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

/// The FLAGS global of the pod's programs, if readable.
pub(super) fn rodata_flags(dir: &Path) -> Option<u32> {
    let bytes = read_rodata(dir)?;
    let obj = object::File::parse(OBJECT).ok()?;
    let sym = obj.symbols().find(|s| s.name() == Ok(globals::FLAGS))?;
    let section = obj.section_by_index(sym.section_index()?).ok()?;
    let off = (sym.address() - section.address()) as usize;
    let b = bytes.get(off..off + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The scalar settings live in the programs' frozen `.rodata` map; their offsets come from the
/// symbol table of the embedded object (the same object `sidecar init` loaded, when the binaries
/// match).
fn rodata_config(dir: &Path) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    let Some(bytes) = read_rodata(dir) else {
        return out;
    };
    let Ok(obj) = object::File::parse(OBJECT) else {
        return out;
    };
    let read = |name: &str, size: usize| -> Option<u64> {
        let sym = obj.symbols().find(|s| s.name() == Ok(name))?;
        let section = obj.section_by_index(sym.section_index()?).ok()?;
        if section.name().ok()? != ".rodata" {
            return None;
        }
        let off = (sym.address() - section.address()) as usize;
        let b = bytes.get(off..off + size)?;
        Some(match size {
            2 => u64::from(u16::from_ne_bytes([b[0], b[1]])),
            _ => u64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        })
    };
    if let Some(v) = read(globals::PROXY_UID, 4) {
        out.insert("proxy_uid", v.to_string());
    }
    if let Some(v) = read(globals::PROXY_GID, 4) {
        out.insert(
            "proxy_gid",
            if v == u64::from(u32::MAX) {
                "none".into()
            } else {
                v.to_string()
            },
        );
    }
    for (key, name) in [
        ("outbound_port", globals::OUTBOUND_PORT),
        ("inbound_port", globals::INBOUND_PORT),
        ("admin_port", globals::ADMIN_PORT),
    ] {
        if let Some(v) = read(name, 2) {
            out.insert(key, v.to_string());
        }
    }
    if let Some(f) = read(globals::FLAGS, 4).map(|f| f as u32) {
        let mode = |bit| if f & bit != 0 { "open" } else { "closed" };
        out.insert("fail_mode_outbound", mode(flags::FAIL_OPEN_OUTBOUND).into());
        out.insert("fail_mode_inbound", mode(flags::FAIL_OPEN_INBOUND).into());
        out.insert("debug_log", (f & flags::DEBUG_LOG != 0).to_string());
        out.insert("msg_redirect", (f & flags::MSG_REDIRECT != 0).to_string());
    }
    out
}

fn read_rodata(dir: &Path) -> Option<Vec<u8>> {
    let data = MapData::from_pin(crate::pins::map(dir, crate::pins::RODATA)).ok()?;
    let info = data.info().ok()?;
    let fd = data.fd().as_fd();
    crate::bpf::map_lookup_u32_key(fd, 0, info_value_size(&info)?).ok()
}

fn info_value_size(info: &aya::maps::MapInfo) -> Option<usize> {
    Some(info.value_size() as usize)
}

impl Status {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "pins     {}", self.pin_dir.display());
        let _ = writeln!(
            s,
            "cgroup   {} (id {})",
            self.cgroup.display(),
            self.cgroup_id
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<17} {:<20} {:>6} {:>6}  TARGET",
            "PROGRAM", "ATTACH", "LINK", "PROG"
        );
        for p in &self.programs {
            let _ = writeln!(
                s,
                "{:<17} {:<20} {:>6} {:>6}  {}",
                p.name, p.attach, p.link_id, p.prog_id, p.target
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "{:<24} VALUE", "CONFIG");
        for (k, v) in &self.config {
            let _ = writeln!(s, "{k:<24} {}", if v.is_empty() { "-" } else { v });
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "{:<24} VALUE", "COUNTER");
        for (k, v) in &self.counters {
            let _ = writeln!(s, "{k:<24} {v}");
        }
        s
    }
}

pub fn main(args: StatusArgs) -> std::process::ExitCode {
    match collect(&args) {
        Ok(status) => {
            if args.json {
                match serde_json::to_string_pretty(&status) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("sidecar status: error: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", status.table());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sidecar status: error: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_compact() {
        let mut words = vec![0u64; 1024];
        for p in [22u32, 9000, 9001, 9002, 65535] {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        assert_eq!(port_ranges(&words), "22,9000-9002,65535");
        assert_eq!(port_ranges(&vec![0; 1024]), "-");
    }
}
