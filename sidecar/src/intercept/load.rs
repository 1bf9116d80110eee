//! The embedded eBPF object: loading it with the pod's configuration, filling its maps,
//! attaching each program to the pod's cgroup (or netns) and pinning the links and maps.
use std::{
    fs,
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapError},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use sidecar_common::{flags, globals, maps, progs};

use super::config::{FailMode, InitConfig};
use super::error::InitError;
use super::host::{self, PodCgroup};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded by build.rs (empty when it was not
/// built).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sidecar-ebpf.o"));

/// Programs in attach order: the bind guard first (no squatter can take a proxy port once
/// anything else is in place), sockops before anything redirects (every listener is seen).
pub const PROGRAMS: [&str; 10] = [
    progs::POST_BIND4,
    progs::POST_BIND6,
    progs::SOCKOPS,
    progs::CONNECT4,
    progs::CONNECT6,
    progs::GETSOCKOPT,
    progs::GETPEERNAME4,
    progs::GETPEERNAME6,
    progs::GETSOCKNAME4,
    progs::GETSOCKNAME6,
];

/// What a load kept from the previous set (a re-run of `init`), and what it could not.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    pub(crate) maps: Vec<&'static str>,
    /// Maps whose layout changed (a new version, or `--max-connections`): started afresh.
    pub(crate) not: Vec<&'static str>,
}

/// Key size, value size and entries a map of ours has with this configuration.
fn layout(name: &str, cfg: &InitConfig) -> Option<(u32, u32, u32)> {
    use sidecar_common::{ListenKey, OrigDst, SockTuple};
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Some(match name {
        maps::INBOUND_LISTENERS => (4, 4, 2),
        maps::INBOUND_REGISTERED => (8, 1, 16),
        maps::APP_LISTENERS => (size(size_of::<ListenKey>()), 4, 4096),
        maps::ORIG_DST_BY_COOKIE => (8, size(size_of::<OrigDst>()), cfg.max_connections),
        maps::ORIG_DST_BY_TUPLE => (
            size(size_of::<SockTuple>()),
            size(size_of::<OrigDst>()),
            cfg.max_connections,
        ),
        maps::STATS => (4, 8, sidecar_common::stats::COUNT),
        _ => return None,
    })
}

/// The maps of the previous set to reuse: those of [`maps::KEPT_ON_REINIT`] pinned in
/// `previous` with the layout this load would create.
fn reusable(previous: Option<&Path>, cfg: &InitConfig) -> (Vec<(&'static str, PathBuf)>, Kept) {
    let mut reuse = Vec::new();
    let mut kept = Kept::default();
    let Some(previous) = previous else {
        return (reuse, kept);
    };
    for name in maps::KEPT_ON_REINIT {
        let path = crate::pins::map(previous, name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        if layout(name, cfg) == Some((info.key_size(), info.value_size(), info.max_entries())) {
            kept.maps.push(name);
            reuse.push((name, path));
        } else {
            kept.not.push(name);
        }
    }
    (reuse, kept)
}

/// Loads the object with `cfg`, attaches it to `cgroup` (and `netns`), pins everything in `dir`.
/// `previous`: the pin directory of the set being replaced (a re-run), whose stateful maps are
/// reused so that there is never a moment without the proxy's listener registered.
pub(crate) fn load_attach_pin(
    cfg: &InitConfig,
    cgroup: &PodCgroup,
    netns: Option<&host::PodNetns>,
    dir: &Path,
    previous: Option<&Path>,
    bpffs_hint: &str,
) -> Result<(Vec<PinnedLink>, Kept), InitError> {
    let load_fix = "run as root with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN on a kernel >= 5.10 with BTF; `sidecar doctor` checks the node";
    let mut flag_bits = 0u32;
    if cfg.include_ports.is_some() {
        flag_bits |= flags::INCLUDE_PORTS;
    }
    if cfg.include_cidrs.is_some() {
        flag_bits |= flags::INCLUDE_CIDRS;
    }
    if cfg.debug_log {
        flag_bits |= flags::DEBUG_LOG;
    }
    if cfg.fail_mode_outbound == FailMode::Open {
        flag_bits |= flags::FAIL_OPEN_OUTBOUND;
    }
    if cfg.fail_mode_inbound == FailMode::Open {
        flag_bits |= flags::FAIL_OPEN_INBOUND;
    }
    if cfg.include_inbound_ports.is_some() {
        flag_bits |= flags::INBOUND_INCLUDE_PORTS;
    }
    // The in-pod redirect: its bound reads kernel structures at offsets only this kernel's BTF
    // knows; its maps take room only when it is on.
    let (msg_offsets, msg_entries) = if cfg.msg_redirect {
        flag_bits |= flags::MSG_REDIRECT;
        let offsets = super::btf::msg_offsets(Path::new(super::btf::VMLINUX))?;
        (offsets, cfg.max_connections.saturating_mul(2))
    } else {
        ([0u32; 6], 1)
    };
    let gid = cfg.proxy_gid.unwrap_or(u32::MAX);
    let pod4 = cfg
        .pod_ips
        .iter()
        .find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(_) => None,
        })
        .unwrap_or(0);
    let pod6 = cfg
        .pod_ips
        .iter()
        .find(|ip| ip.is_ipv6())
        .map_or([0; 4], |ip| to_key(*ip));
    let (reuse, kept) = reusable(previous, cfg);
    let mut loader = EbpfLoader::new();
    for (name, path) in &reuse {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .override_global(globals::POD_IP4, &pod4, true)
        .override_global(globals::POD_IP6, &pod6, true)
        .override_global(globals::PROXY_UID, &cfg.proxy_uid, true)
        .override_global(globals::PROXY_GID, &gid, true)
        .override_global(globals::OUTBOUND_PORT, &cfg.outbound_port, true)
        .override_global(globals::INBOUND_PORT, &cfg.inbound_port, true)
        .override_global(globals::ADMIN_PORT, &cfg.admin_port, true)
        .override_global(globals::FLAGS, &flag_bits, true)
        .override_global(globals::MSG_OFFSETS, &msg_offsets, true)
        .map_max_entries(maps::MSG_SOCKS, msg_entries)
        .map_max_entries(maps::MSG_PEERS, msg_entries)
        .map_max_entries(maps::ORIG_DST_BY_COOKIE, cfg.max_connections)
        .map_max_entries(maps::ORIG_DST_BY_TUPLE, cfg.max_connections)
        .load(OBJECT)
        .map_err(|e: EbpfError| {
            InitError::kernel("load the eBPF object (maps)", load_fix)(e.into())
        })?;
    fill_maps(&mut ebpf, cfg)
        .map_err(|e| InitError::kernel("fill the configuration maps", load_fix)(e.into()))?;

    let cgroup_file = fs::File::open(&cgroup.path).map_err(InitError::io(format!(
        "open cgroup {}",
        cgroup.path.display()
    )))?;
    let mut pinned = Vec::new();
    for name in PROGRAMS {
        let path = crate::pins::link(dir, name);
        let pin = load_attach_pin_one(
            &mut ebpf,
            name,
            cgroup_file.as_fd(),
            &path,
            load_fix,
            bpffs_hint,
        )?;
        pinned.push(pin);
    }
    if cfg.msg_redirect {
        // Linked to the SOCKHASH (kernels >= 6.10), so that it is pinned, listed and removed
        // like the others.
        let socks = msg_socks_fd(&ebpf)?;
        let name = progs::MSG_REDIRECT;
        let path = crate::pins::link(dir, name);
        let pin = load_attach_pin_one(
            &mut ebpf,
            name,
            socks.as_fd(),
            &path,
            MSG_REDIRECT_FIX,
            bpffs_hint,
        )?;
        pinned.push(pin);
    }
    if let Some(ns) = netns {
        // The app's listeners from before this attach (sockops sees every later one): a fresh
        // map is seeded from the netns' socket table; a kept one is already right.
        if !kept.maps.contains(&maps::APP_LISTENERS) {
            seed_app_listeners(&mut ebpf, ns)?;
        }
        let name = progs::SK_LOOKUP;
        let path = crate::pins::link(dir, name);
        let pin = load_attach_pin_one(
            &mut ebpf,
            name,
            ns.file.as_fd(),
            &path,
            load_fix,
            bpffs_hint,
        )?;
        pinned.push(pin);
    }
    // Maps are pinned for `sidecar status`; `.rodata` as "rodata" (bpffs refuses '.' in names).
    for (name, map) in ebpf.maps() {
        let pin_name = match name {
            ".rodata" => crate::pins::RODATA,
            n if maps::ALL.contains(&n) => n,
            _ => continue,
        };
        let path = crate::pins::map(dir, pin_name);
        map.pin(&path).map_err(|e| {
            InitError::kernel(format!("pin {}", path.display()), bpffs_hint)(e.into())
        })?;
        // The proxy (UID 1337, no capabilities) exports the kernel counters: it may open this one
        // map read-only (kernels >= 6.5 allow that without CAP_BPF). Everything else stays 0600.
        if pin_name == maps::STATS {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o444))
                .map_err(InitError::io(format!("make {} readable", path.display())))?;
        }
    }
    // The proxy's readiness checks that the link pins exist (stat): the directories must be
    // searchable whatever the init step's umask.
    for d in [dir, dir.parent().unwrap_or(dir)] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))
            .map_err(InitError::io(format!("chmod 0755 {}", d.display())))?;
    }
    Ok((pinned, kept))
}

/// `what` (a program or map this binary expects) is not in the embedded eBPF object.
fn not_in_object(what: String) -> InitError {
    InitError::Kernel {
        what: format!("find {what} in the embedded object"),
        detail: "missing".into(),
        fix: "rebuild with `cargo xtask build-ebpf`: the object does not match this binary".into(),
    }
}

/// What to do when the kernel refuses the in-pod redirect's program.
const MSG_REDIRECT_FIX: &str = "--msg-redirect needs kernel >= 6.10 (sk_msg links), CAP_BPF and CAP_PERFMON, and a lockdown mode other than `confidentiality` (its bound reads kernel memory with bpf_probe_read_kernel); `sidecar doctor` checks the node. Drop the flag on this node";

/// A descriptor of the in-pod redirect's SOCKHASH, the target `sc_msg_redirect` links to.
fn msg_socks_fd(ebpf: &Ebpf) -> Result<std::os::fd::OwnedFd, InitError> {
    match ebpf.map(maps::MSG_SOCKS) {
        Some(aya::maps::Map::SockHash(data)) => data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| InitError::io(format!("open map {}", maps::MSG_SOCKS))(e)),
        _ => Err(not_in_object(format!("SOCKHASH {}", maps::MSG_SOCKS))),
    }
}

/// Puts the sockets listening in the pod's netns now into the app-listener map (only where the
/// key is absent: sockops, already attached, counts the ones it saw).
fn seed_app_listeners(ebpf: &mut Ebpf, ns: &host::PodNetns) -> Result<(), InitError> {
    let fix = "check that --netns names the pod's network namespace";
    let listening = host::listening_in(ns)
        .map_err(|e| InitError::kernel("read the pod's listening sockets", fix)(e.into()))?;
    let mut map: HashMap<_, sidecar_common::ListenKey, u32> = map_mut(ebpf, maps::APP_LISTENERS)
        .map_err(|e| InitError::kernel("open the app-listener map", fix)(e.into()))?;
    let mut counts: std::collections::HashMap<sidecar_common::ListenKey, u32> =
        std::collections::HashMap::new();
    for addr in listening {
        let key = sidecar_common::ListenKey {
            ip: to_key(addr.ip()),
            port: addr.port(),
            _pad: 0,
        };
        *counts.entry(key).or_default() += 1;
    }
    for (key, n) in counts {
        // BPF_NOEXIST: an entry sockops made meanwhile is right as it is.
        match map.insert(key, n, 1) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(InitError::kernel("seed the app-listener map", fix)(
                    e.into(),
                ));
            }
        }
    }
    Ok(())
}

/// Loads one program, attaches it through a bpf_link to `target` (the pod's cgroup, its netns for
/// sk_lookup, the SOCKHASH for the in-pod redirect) and pins the link at `path`.
fn load_attach_pin_one(
    ebpf: &mut Ebpf,
    name: &str,
    target: BorrowedFd<'_>,
    path: &Path,
    load_fix: &str,
    bpffs_hint: &str,
) -> Result<PinnedLink, InitError> {
    let attach_err =
        |e: ProgramError| InitError::kernel(format!("load and attach {name}"), load_fix)(e.into());
    let pin_err = |e: Box<dyn std::error::Error + Send + Sync>| {
        InitError::kernel(format!("pin {}", path.display()), bpffs_hint)(e)
    };
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| not_in_object(format!("program {name}")))?;
    // Cgroup bpf_links always behave as BPF_F_ALLOW_MULTI (the kernel rejects any flag on link
    // creation): other agents' programs on the same cgroup keep working, and a re-init can attach
    // the new set before detaching the old. `Single` is aya's name for "no flags".
    let mode = CgroupAttachMode::Single;
    // The same steps for every program type aya attaches to a cgroup with a pinnable link.
    macro_rules! cgroup_link {
        ($program:ty) => {{
            let p: &mut $program = program.try_into().map_err(attach_err)?;
            p.load().map_err(attach_err)?;
            let id = p.attach(target, mode).map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| pin_err(e.into()))?
        }};
    }
    let link: FdLink = match name {
        progs::SOCKOPS => {
            cgroup_link!(SockOps)
        }
        progs::POST_BIND4 | progs::POST_BIND6 => {
            cgroup_link!(CgroupSock)
        }
        // aya 0.14 attaches these but cannot turn their links into pinnable ones (nor link an
        // sk_msg program at all): create and pin the link directly.
        progs::GETSOCKOPT | progs::SK_LOOKUP | progs::MSG_REDIRECT => {
            // Loads the program as its type and gives its descriptor.
            macro_rules! loaded {
                ($program:ty) => {{
                    let p: &mut $program = program.try_into().map_err(attach_err)?;
                    p.load().map_err(attach_err)?;
                    p.fd().map_err(attach_err)?.as_fd()
                }};
            }
            let (prog_fd, attach_type) = match name {
                progs::GETSOCKOPT => (loaded!(CgroupSockopt), crate::bpf::BPF_CGROUP_GETSOCKOPT),
                progs::SK_LOOKUP => (loaded!(SkLookup), crate::bpf::BPF_SK_LOOKUP),
                _ => (loaded!(SkMsg), crate::bpf::BPF_SK_MSG_VERDICT),
            };
            let link = crate::bpf::link_create(prog_fd, target, attach_type)
                .map_err(|e| InitError::kernel(format!("attach {name}"), load_fix)(e.into()))?;
            crate::bpf::obj_pin(link.as_fd(), path).map_err(|e| pin_err(e.into()))?;
            return PinnedLink::from_pin(path).map_err(|e| pin_err(e.into()));
        }
        _ => {
            cgroup_link!(CgroupSockAddr)
        }
    };
    link.pin(path).map_err(|e| pin_err(e.into()))
}

fn to_key(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    // Network byte order in memory, as the kernel stores addresses.
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn fill_maps(ebpf: &mut Ebpf, cfg: &InitConfig) -> Result<(), MapError> {
    let mut pod_ips: HashMap<_, [u32; 4], u8> = map_mut(ebpf, maps::POD_IPS)?;
    for ip in &cfg.pod_ips {
        pod_ips.insert(to_key(*ip), 1, 0)?;
    }
    let sets = [
        (maps::EXCLUDE_PORTS, Some(&cfg.exclude_ports)),
        (maps::INCLUDE_PORTS, cfg.include_ports.as_ref()),
        (
            maps::INBOUND_EXCLUDE_PORTS,
            Some(&cfg.exclude_inbound_ports),
        ),
        (
            maps::INBOUND_INCLUDE_PORTS,
            cfg.include_inbound_ports.as_ref(),
        ),
    ];
    for (name, set) in sets {
        let Some(set) = set else { continue };
        let mut bitmap: Array<_, u64> = map_mut(ebpf, name)?;
        for (i, word) in set.0.iter().enumerate().filter(|(_, w)| **w != 0) {
            bitmap.set(i as u32, word, 0)?;
        }
    }
    let tries = [
        (maps::EXCLUDE_CIDRS, Some(&cfg.exclude_cidrs)),
        (maps::INCLUDE_CIDRS, cfg.include_cidrs.as_ref()),
    ];
    for (name, cidrs) in tries {
        let Some(cidrs) = cidrs else { continue };
        let mut trie: LpmTrie<_, [u32; 4], u8> = map_mut(ebpf, name)?;
        for c in cidrs {
            trie.insert(
                &Key::new(u32::from(c.len), to_key(IpAddr::V6(c.addr))),
                1,
                0,
            )?;
        }
    }
    Ok(())
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T, MapError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or_else(|| MapError::InvalidName {
        name: name.to_string(),
    })?;
    T::try_from(map)
}
