//! The init step: load the embedded eBPF object, attach its programs to one pod's cgroup, pin the
//! links and maps under the pod's own bpffs directory, and exit; or remove exactly that again.
//!
//! Pin directory layout (`<pin root>/<pod id>/`): `link_<program>` for each cgroup link (the pin
//! is what keeps the attachment alive after this process exits) and `map_<map>` for each map (so
//! `sidecar status` can read them). A re-init builds the new set in a staging directory, swaps it
//! in, then detaches the old set, so there is never a moment without interception and never more
//! than one set once it returns.
mod config;
mod host;
mod status;
mod trace;

use std::{
    fs,
    io::{self, Write as _},
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapError},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
pub use config::{Cidr, ConfigErrors, FailMode, InitArgs, InitConfig, PortSet};
pub use host::{cgroup2_mounts, pod_cgroup, PodCgroup};
use sidecar_common::{flags, globals, maps, progs};
pub use status::{Status, StatusArgs};
pub use trace::{main as trace_main, TraceArgs};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded by build.rs (empty when it was not
/// built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sidecar-ebpf.o"));

/// Programs in attach order.
pub const PROGRAMS: [&str; 6] = [
    progs::CONNECT4,
    progs::CONNECT6,
    progs::SOCKOPS,
    progs::GETSOCKOPT,
    progs::GETPEERNAME4,
    progs::GETPEERNAME6,
];

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("cgroup {path}: {problem}\n  fix: {fix}")]
    Cgroup {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("network namespace {path}: {problem}\n  fix: {fix}")]
    Netns {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("missing capabilities: {missing}\n  fix: run `sidecar init` as root, or in a privileged init container with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN")]
    Capabilities { missing: String },
    #[error("this sidecar binary was built without its eBPF object\n  fix: run `cargo xtask build-ebpf`, then rebuild the sidecar")]
    NoObject,
    #[error("the kernel refused to {what}: {detail}\n  fix: {fix}")]
    Kernel {
        what: String,
        detail: String,
        fix: String,
    },
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
}

impl InitError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |error| InitError::Io { what, error }
    }

    fn kernel(
        what: impl Into<String>,
        fix: impl Into<String>,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        let (what, fix) = (what.into(), fix.into());
        move |source| {
            // The whole chain, so that errno and the verifier log reach the operator.
            let mut detail = source.to_string();
            let mut next = source.source();
            while let Some(s) = next {
                let text = s.to_string();
                if !detail.contains(&text) {
                    detail.push_str(": ");
                    detail.push_str(&text);
                }
                next = s.source();
            }
            InitError::Kernel { what, detail, fix }
        }
    }

    /// Exit code: 64 for bad usage (sysexits EX_USAGE), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            InitError::Config(_) | InitError::Cgroup { .. } | InitError::Netns { .. } => {
                crate::EXIT_USAGE
            }
            _ => 1,
        }
    }
}

/// `sidecar init` entry point.
pub fn main(args: InitArgs) -> ExitCode {
    let result = if args.remove {
        remove(&args)
    } else {
        install(&args)
    };
    match result {
        // Written without println!/eprintln!, which panic on a closed pipe: the work is done (or
        // rolled back) by now, and the exit code must say which.
        Ok(summary) => {
            let _ = writeln!(io::stdout(), "{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = match &e {
                // The shared report names the command itself.
                InitError::Config(report) => writeln!(io::stderr(), "{report}"),
                e => writeln!(io::stderr(), "sidecar init: error: {e}"),
            };
            ExitCode::from(e.exit_code())
        }
    }
}

/// Where this pod's pins live: `<pin root>/<pod id>`, the pod id defaulting to "cg<cgroup id>".
pub fn pin_dir(pin_root: &Path, pod_id: Option<&str>, cgroup_id: u64) -> PathBuf {
    match pod_id {
        Some(id) => pin_root.join(id),
        None => pin_root.join(format!("cg{cgroup_id}")),
    }
}

/// `sidecar status` entry point.
pub fn status_main(args: StatusArgs) -> ExitCode {
    status::main(args)
}

/// `sidecar cleanup`: node-level garbage collection of pins left by pods that are gone.
#[derive(clap::Args, Debug, Clone)]
pub struct CleanupArgs {
    #[arg(long, env = "SIDECAR_PIN_ROOT", default_value = config::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Repeat every DURATION (e.g. 10m) until SIGTERM/SIGINT, for a node DaemonSet; default: once.
    #[arg(long, env = "SIDECAR_CLEANUP_INTERVAL", value_name = "DURATION")]
    pub interval: Option<String>,
}

fn cleanup_once(pin_root: &Path) {
    let removed = collect_garbage(pin_root);
    let mut out = io::stdout().lock();
    for dir in &removed {
        let _ = writeln!(
            out,
            "sidecar cleanup: removed stale pins of a pod that is gone: {}",
            dir.display()
        );
    }
    let _ = writeln!(
        out,
        "sidecar cleanup: {} stale pod pin director{} removed",
        removed.len(),
        if removed.len() == 1 { "y" } else { "ies" }
    );
}

pub fn cleanup_main(args: CleanupArgs) -> ExitCode {
    if let Err(e) = check_privileges() {
        let _ = writeln!(io::stderr(), "sidecar cleanup: error: {e}");
        return ExitCode::from(e.exit_code());
    }
    let Some(interval) = &args.interval else {
        cleanup_once(&args.pin_root);
        return ExitCode::SUCCESS;
    };
    let period = match crate::units::parse_duration(interval) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            let report = crate::config_errors::ConfigErrors {
                command: "cleanup",
                errors: vec![crate::config_errors::ConfigError {
                    key: "--interval".into(),
                    value: interval.clone(),
                    problem: "expected a duration such as 30s or 10m".to_owned(),
                }],
            };
            let _ = writeln!(io::stderr(), "{report}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    let runtime = match crate::cli::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "sidecar cleanup: error: cannot start the runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let Ok(mut signals) = crate::cli::Signals::new() else {
            return ExitCode::FAILURE;
        };
        loop {
            cleanup_once(&args.pin_root);
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = signals.next() => return ExitCode::SUCCESS,
            }
        }
    })
}

/// `--cgroup auto` means "the parent of my own cgroup" (the init container's pod).
pub fn resolve_cgroup(arg: &Path) -> Result<PathBuf, InitError> {
    if arg == Path::new("auto") {
        host::auto_pod_cgroup()
    } else {
        Ok(arg.to_path_buf())
    }
}

fn check_privileges() -> Result<(), InitError> {
    let missing = host::missing_capabilities();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(InitError::Capabilities {
            missing: missing.join(", "),
        })
    }
}

/// Loads, attaches and pins; returns a one-line summary.
pub fn install(args: &InitArgs) -> Result<String, InitError> {
    let cfg = InitConfig::from_args(args)?;
    let cgroup = pod_cgroup(&resolve_cgroup(&args.cgroup)?)?;
    let netns = match &cfg.netns {
        Some(path) => Some(host::pod_netns(path)?),
        None => None,
    };
    check_privileges()?;
    if OBJECT.is_empty() {
        return Err(InitError::NoObject);
    }
    let collected = collect_garbage(&args.pin_root);
    let final_dir = pin_dir(&args.pin_root, args.pod_id.as_deref(), cgroup.id);
    let pod_name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = args
        .pin_root
        .join(format!("_staging_{}_{pod_name}", std::process::id()));
    let bpffs_hint = if host::on_bpffs(&args.pin_root) {
        "check that the pin root is writable".to_string()
    } else {
        format!(
            "{} is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or pass --pin-root below a bpffs mount",
            args.pin_root.display()
        )
    };
    let created_root = !args.pin_root.exists();
    create_dir_all_racy(&staging).map_err(InitError::io(format!(
        "create pin directory {}",
        staging.display()
    )))?;
    let result = load_attach_pin(&cfg, &cgroup, netns.as_ref(), &staging, &bpffs_hint);
    let links = match result {
        Ok(links) => links,
        Err(e) => {
            // Nothing of this attempt may stay: unpinning drops the last reference to each link.
            let _ = remove_pins(&staging);
            if created_root {
                let _ = fs::remove_dir(&args.pin_root);
            }
            return Err(e);
        }
    };
    // Swap the new set in, then detach the old one.
    let old = args
        .pin_root
        .join(format!("_old_{}_{pod_name}", std::process::id()));
    let replaced = final_dir.exists();
    if replaced {
        fs::rename(&final_dir, &old).map_err(InitError::io(format!(
            "move old pins {} aside",
            final_dir.display()
        )))?;
    }
    if let Err(e) = fs::rename(&staging, &final_dir) {
        if replaced {
            let _ = fs::rename(&old, &final_dir);
        }
        let _ = remove_pins(&staging);
        return Err(InitError::io(format!(
            "move new pins to {}",
            final_dir.display()
        ))(e));
    }
    if replaced {
        remove_pins(&old)?;
    }
    let mut summary = format!(
        "sidecar init: {} {} programs on cgroup {} (id {}){}, pins in {}",
        if replaced { "replaced" } else { "attached" },
        links.len(),
        cgroup.path.display(),
        cgroup.id,
        match &netns {
            Some(ns) => format!(" and netns {} (inode {})", ns.path.display(), ns.inode),
            None => String::new(),
        },
        final_dir.display()
    );
    for dir in collected {
        summary.push_str(&format!(
            "\nsidecar init: removed stale pins of a pod that is gone: {}",
            dir.display()
        ));
    }
    Ok(summary)
}

/// `fs::create_dir_all`, tolerating a concurrent `remove` of another pod that deletes the shared,
/// momentarily empty pin root between our two mkdirs.
fn create_dir_all_racy(dir: &Path) -> io::Result<()> {
    match fs::create_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir),
        other => other,
    }
}

fn load_attach_pin(
    cfg: &InitConfig,
    cgroup: &PodCgroup,
    netns: Option<&host::PodNetns>,
    dir: &Path,
    bpffs_hint: &str,
) -> Result<Vec<PinnedLink>, InitError> {
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
    let gid = cfg.proxy_gid.unwrap_or(u32::MAX);
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::PROXY_UID, &cfg.proxy_uid, true)
        .override_global(globals::PROXY_GID, &gid, true)
        .override_global(globals::OUTBOUND_PORT, &cfg.outbound_port, true)
        .override_global(globals::INBOUND_PORT, &cfg.inbound_port, true)
        .override_global(globals::ADMIN_PORT, &cfg.admin_port, true)
        .override_global(globals::FLAGS, &flag_bits, true)
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
    if let Some(ns) = netns {
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
    Ok(pinned)
}

/// Loads one program, attaches it through a bpf_link to `target` (the pod's cgroup, or its netns
/// for sk_lookup) and pins the link at `path`.
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
    let program = ebpf.program_mut(name).ok_or_else(|| InitError::Kernel {
        what: format!("find program {name} in the embedded object"),
        detail: "missing".into(),
        fix: "rebuild with `cargo xtask build-ebpf`: the object does not match this binary".into(),
    })?;
    // Cgroup bpf_links always behave as BPF_F_ALLOW_MULTI (the kernel rejects any flag on link
    // creation): other agents' programs on the same cgroup keep working, and a re-init can attach
    // the new set before detaching the old. `Single` is aya's name for "no flags".
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match name {
        progs::SOCKOPS => {
            let p: &mut SockOps = program.try_into().map_err(attach_err)?;
            p.load().map_err(attach_err)?;
            let id = p.attach(target, mode).map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| pin_err(e.into()))?
        }
        // aya 0.14 attaches these two but cannot turn their links into pinnable ones: create and
        // pin the link directly.
        progs::GETSOCKOPT | progs::SK_LOOKUP => {
            let (prog_fd, attach_type) = if name == progs::GETSOCKOPT {
                let p: &mut CgroupSockopt = program.try_into().map_err(attach_err)?;
                p.load().map_err(attach_err)?;
                (
                    p.fd().map_err(attach_err)?.as_fd(),
                    crate::bpf::BPF_CGROUP_GETSOCKOPT,
                )
            } else {
                let p: &mut SkLookup = program.try_into().map_err(attach_err)?;
                p.load().map_err(attach_err)?;
                (
                    p.fd().map_err(attach_err)?.as_fd(),
                    crate::bpf::BPF_SK_LOOKUP,
                )
            };
            let link = crate::bpf::link_create(prog_fd, target, attach_type)
                .map_err(|e| InitError::kernel(format!("attach {name}"), load_fix)(e.into()))?;
            crate::bpf::obj_pin(link.as_fd(), path).map_err(|e| pin_err(e.into()))?;
            return PinnedLink::from_pin(path).map_err(|e| pin_err(e.into()));
        }
        _ => {
            let p: &mut CgroupSockAddr = program.try_into().map_err(attach_err)?;
            p.load().map_err(attach_err)?;
            let id = p.attach(target, mode).map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| pin_err(e.into()))?
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

/// Detaches and unpins everything of ours in `dir`, then removes the directory. Links are opened
/// before they are unpinned so that the detach happens when we close them, synchronously, rather
/// than whenever the kernel's deferred release runs.
fn remove_pins(dir: &Path) -> Result<usize, InitError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(InitError::io(format!("read {}", dir.display()))(e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if crate::pins::is_link(&name) {
            if crate::pins::program_of(&name).is_none() {
                continue; // not ours: never touch it
            }
            match PinnedLink::from_pin(&path) {
                Ok(link) => {
                    let fd_link = link
                        .unpin()
                        .map_err(InitError::io(format!("unpin {}", path.display())))?;
                    drop(fd_link);
                }
                // A pin we cannot open is still ours to delete (e.g. a half-written staging dir).
                Err(_) => fs::remove_file(&path)
                    .map_err(InitError::io(format!("remove {}", path.display())))?,
            }
            removed += 1;
        } else if crate::pins::map_of(&name).is_some() {
            fs::remove_file(&path).map_err(InitError::io(format!("remove {}", path.display())))?;
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(InitError::io(format!(
                "remove {} (something else is pinned there?)",
                dir.display()
            ))(e))
        }
    }
    // The shared root goes when the last pod leaves, so no empty directory is left behind; only on
    // bpffs, where it can only be ours or another agent's pin tree, never a user's directory.
    if let Some(root) = dir.parent().filter(|r| host::on_bpffs(r)) {
        let _ = fs::remove_dir(root);
    }
    Ok(removed)
}

/// Removes pin directories of pods that are gone: a cgroup link whose cgroup was deleted reports
/// cgroup id 0, a netns link whose namespace was deleted reports inode 0 (the kernel detached
/// them; only our pins kept them in memory). Also removes staging directories left by an init
/// that died half-way. Returns what it removed; failures are left for the next run.
pub fn collect_garbage(pin_root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(pin_root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = if let Some(rest) = name
            .strip_prefix("_staging_")
            .or_else(|| name.strip_prefix("_old_"))
        {
            // "<pid>_<pod>": stale when that init process no longer runs.
            let pid = rest.split('_').next().unwrap_or_default();
            !Path::new("/proc").join(pid).exists()
        } else {
            pod_is_gone(&dir)
        };
        if stale && remove_pins(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

fn pod_is_gone(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        if !crate::pins::is_link(&name) {
            return false;
        }
        let Ok(fd) = crate::bpf::obj_get(&e.path()) else {
            return false;
        };
        matches!(
            crate::bpf::link_info(fd.as_fd()),
            Ok(crate::bpf::LinkInfo {
                target: crate::bpf::LinkTarget::Cgroup { cgroup_id: 0 },
                ..
            }) | Ok(crate::bpf::LinkInfo {
                target: crate::bpf::LinkTarget::Netns { netns_ino: 0 },
                ..
            })
        )
    })
}

/// `sidecar init --remove`: detaches and unpins this pod's programs. Removing twice is fine.
pub fn remove(args: &InitArgs) -> Result<String, InitError> {
    check_privileges()?;
    let dir = match &args.pod_id {
        // With an explicit pod id the cgroup may already be gone (garbage collection).
        Some(id) => pin_dir(&args.pin_root, Some(id), 0),
        None => pin_dir(
            &args.pin_root,
            None,
            pod_cgroup(&resolve_cgroup(&args.cgroup)?)?.id,
        ),
    };
    let removed = remove_pins(&dir)?;
    Ok(if removed == 0 {
        format!(
            "sidecar init --remove: nothing of ours pinned in {}",
            dir.display()
        )
    } else {
        format!(
            "sidecar init --remove: detached {removed} programs, removed {}",
            dir.display()
        )
    })
}
