//! The individual checks of `sidecar doctor`, in the order they are printed.
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};

use super::model::{Check, DoctorArgs};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The oldest kernel with everything the programs use: bpf links for cgroups (5.7), CAP_BPF and
/// the getpeername hooks (5.8), sk_lookup (5.9); 5.10 is the LTS that has them all.
const MIN_KERNEL: (u32, u32) = (5, 10);

pub fn all(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = vec![kernel()];
    checks.extend(program_types());
    checks.push(helpers());
    checks.push(map_types());
    let root = cgroup2(args.cgroup_root.as_deref());
    let root_dir = root.1.clone();
    checks.push(root.0);
    checks.push(bpffs(&args.bpffs));
    checks.push(btf());
    checks.push(msg_redirect());
    checks.push(capabilities());
    checks.push(jit());
    checks.push(conflicts(root_dir.as_deref(), args.cgroup.as_deref()));
    if let Some(pod) = &args.cgroup {
        checks.push(proxy_identity(pod));
    }
    checks
}

/// The uid and gid the kernel hooks exempt (`sidecar init --proxy-uid`'s default).
const PROXY_ID: u32 = 1337;

/// Processes of the pod that run as the proxy's uid or gid but are not the proxy: their
/// connections are exempt from capture, like the proxy's own.
fn proxy_identity(pod: &Path) -> Check {
    let name = "proxy identity";
    let mut others = Vec::new();
    for pid in crate::intercept::pids_below(pod, 4096) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ids = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .map(|v| {
                    v.split_whitespace()
                        .filter_map(|n| n.parse::<u32>().ok())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let comm = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned();
        let proxy_like = ids("Uid:").contains(&PROXY_ID) || ids("Gid:").contains(&PROXY_ID);
        if proxy_like && comm != "sidecar" {
            others.push(format!("{comm} (pid {pid})"));
        }
    }
    if others.is_empty() {
        Check::pass(
            name,
            format!("no process of the pod but the proxy runs as uid or gid {PROXY_ID}"),
        )
    } else {
        Check::fail(
            name,
            format!(
                "{} run as uid or gid {PROXY_ID}, the proxy's: their connections are never captured",
                others.join(", ")
            ),
            "run the app's containers as another runAsUser and runAsGroup (sidecar inject refuses 1337)",
        )
    }
}

/// The running kernel's (major, minor) from its release string ("6.18.44-..."), if readable.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    parts.next().flatten().zip(parts.next().flatten())
}

fn kernel() -> Check {
    let release = match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => {
            return Check::fail(
                "kernel",
                format!("cannot read the kernel version: {e}"),
                "check /proc is mounted",
            )
        }
    };
    let version = match kernel_version(&release) {
        Some(version) => version,
        None => {
            return Check::warn(
                "kernel",
                format!("{release}: version not recognised"),
                "make sure the kernel is 5.10 or newer",
            )
        }
    };
    if version >= MIN_KERNEL {
        Check::pass("kernel", format!("{release} (5.10 or newer needed)"))
    } else {
        Check::fail(
            "kernel",
            format!("{release} is older than 5.10"),
            "use a node image with kernel 5.10 or newer (bpf links for cgroups, CAP_BPF, getpeername hooks, sk_lookup)",
        )
    }
}

fn probe_error(e: impl std::fmt::Display) -> (String, String) {
    (
        format!("cannot probe: {e}"),
        "run `sidecar doctor` as root, or in a container with the BPF, NET_ADMIN and SYS_ADMIN capabilities".into(),
    )
}

/// The program types the object contains, with what they are for.
fn program_types() -> Vec<Check> {
    [
        (
            ProgramType::CgroupSockAddr,
            "cgroup_sock_addr",
            "connect4/6, getpeername4/6: outbound redirect",
        ),
        (
            ProgramType::SockOps,
            "sock_ops",
            "original destination by 4-tuple, inbound listener",
        ),
        (
            ProgramType::CgroupSockopt,
            "cgroup_sockopt",
            "getsockopt: SO_ORIGINAL_DST",
        ),
        (ProgramType::SkLookup, "sk_lookup", "inbound capture"),
    ]
    .into_iter()
    .map(|(ty, name, purpose)| {
        let name = format!("program type {name}");
        match is_program_supported(ty) {
            Ok(true) => Check::pass(name, format!("supported; {purpose}")),
            Ok(false) => Check::fail(
                name,
                format!("not supported by this kernel (needed for {purpose})"),
                "use a kernel 5.10 or newer built with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
            ),
            Err(e) => {
                let (detail, fix) = probe_error(e);
                Check::fail(name, detail, fix)
            }
        }
    })
    .collect()
}

fn helpers() -> Check {
    let needed = [
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "get_socket_cookie",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_uid_gid,
            "get_current_uid_gid",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_lookup_tcp,
            "sk_lookup_tcp",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_release,
            "sk_release",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "get_socket_cookie",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_sock_map_update,
            "sock_map_update",
        ),
        (
            ProgramType::SkLookup,
            BpfHelper::BPF_FUNC_sk_assign,
            "sk_assign",
        ),
    ];
    let mut missing = Vec::new();
    for (ty, helper, name) in needed {
        match is_helper_supported(ty, helper) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{name} in {ty:?}")),
            Err(e) => {
                let (detail, fix) = probe_error(e);
                return Check::fail("helpers", detail, fix);
            }
        }
    }
    if missing.is_empty() {
        Check::pass(
            "helpers",
            format!("all {} helper uses available", needed.len()),
        )
    } else {
        Check::fail(
            "helpers",
            format!("missing: {}", missing.join(", ")),
            "use a kernel 5.10 or newer",
        )
    }
}

fn map_types() -> Check {
    let needed = [
        (MapType::Array, "array"),
        (MapType::Hash, "hash"),
        (MapType::LruHash, "lru_hash"),
        (MapType::LpmTrie, "lpm_trie"),
        (MapType::PerCpuArray, "percpu_array"),
        (MapType::SockMap, "sockmap"),
    ];
    let mut missing = Vec::new();
    for (ty, name) in needed {
        match is_map_supported(ty) {
            Ok(true) => {}
            Ok(false) => missing.push(name),
            Err(e) => {
                let (detail, fix) = probe_error(e);
                return Check::fail("map types", detail, fix);
            }
        }
    }
    if missing.is_empty() {
        Check::pass("map types", needed.map(|(_, n)| n).join(", "))
    } else {
        Check::fail(
            "map types",
            format!("missing: {}", missing.join(", ")),
            "use a kernel 5.10 or newer",
        )
    }
}

// The field is i64 on x86_64 and aarch64 glibc, i32 elsewhere: the cast is not always a no-op.
#[allow(clippy::unnecessary_cast)]
fn fs_magic(path: &Path) -> io::Result<i64> {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64)
        .map_err(io::Error::from)
}

/// The cgroup v2 check, and the hierarchy's root for the conflict check.
fn cgroup2(given: Option<&Path>) -> (Check, Option<PathBuf>) {
    const NAME: &str = "cgroup v2";
    let Some(root) = given else {
        let mounts = crate::intercept::cgroup2_mounts();
        return match mounts.first() {
            None => (
                Check::fail(
                    NAME,
                    "no cgroup2 filesystem is mounted",
                    "boot the node with cgroup v2 (systemd.unified_cgroup_hierarchy=1; Kubernetes 1.25+ supports it), or mount it: mount -t cgroup2 none /sys/fs/cgroup",
                ),
                None,
            ),
            Some(m) if m == Path::new("/sys/fs/cgroup") => {
                (Check::pass(NAME, format!("mounted at {} (unified)", m.display())), Some(m.clone()))
            }
            Some(m) => (
                Check::warn(
                    NAME,
                    format!("mounted at {} (hybrid: cgroup v1 controllers at /sys/fs/cgroup)", m.display()),
                    "fine for `sidecar init --cgroup DIR`; in Kubernetes pods get their own cgroup v2 directories only on cgroup v2 nodes: boot with systemd.unified_cgroup_hierarchy=1",
                ),
                Some(m.clone()),
            ),
        };
    };
    let fix = format!(
        "mount the node's cgroup v2 hierarchy at {} (in a pod: a hostPath volume of /sys/fs/cgroup), or pass --cgroup-root with where it is",
        root.display()
    );
    match fs_magic(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => (
            Check::fail(NAME, format!("{} does not exist", root.display()), fix),
            None,
        ),
        Err(e) => (
            Check::fail(NAME, format!("{}: {e}", root.display()), fix),
            None,
        ),
        Ok(CGROUP2_SUPER_MAGIC) => (
            Check::pass(NAME, format!("{} is a cgroup2 filesystem", root.display())),
            Some(root.into()),
        ),
        Ok(magic) => (
            Check::fail(
                NAME,
                format!(
                    "{} is not a cgroup2 filesystem ({})",
                    root.display(),
                    fs_name(magic)
                ),
                fix,
            ),
            None,
        ),
    }
}

fn bpffs(path: &Path) -> Check {
    const NAME: &str = "bpffs";
    let fix = format!(
        "mount it: mount -t bpf bpf {p} (at boot: an fstab line `bpffs {p} bpf defaults 0 0`); in a pod: a hostPath volume of the node's /sys/fs/bpf",
        p = path.display()
    );
    match fs_magic(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Check::fail(NAME, format!("{} does not exist", path.display()), fix)
        }
        Err(e) => Check::fail(NAME, format!("{}: {e}", path.display()), fix),
        Ok(BPF_FS_MAGIC) => Check::pass(NAME, format!("{} is a bpf filesystem", path.display())),
        Ok(magic) => Check::fail(
            NAME,
            format!(
                "{} is not a bpf filesystem ({}): pins would not outlive `sidecar init`",
                path.display(),
                fs_name(magic)
            ),
            fix,
        ),
    }
}

fn fs_name(magic: i64) -> String {
    match magic {
        0x0102_1994 => "tmpfs".into(),
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x6265_6572 => "sysfs".into(),
        0x9fa0 => "proc".into(),
        0x2762_5a9d => "cgroup v1".into(),
        0x6367_7270 => "cgroup2".into(),
        other => format!("filesystem type {other:#x}"),
    }
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::pass("kernel BTF", "/sys/kernel/btf/vmlinux present")
    } else {
        Check::warn(
            "kernel BTF",
            "/sys/kernel/btf/vmlinux missing",
            "the programs load without it; bpftool prints maps as raw bytes. Kernels built with CONFIG_DEBUG_INFO_BTF have it",
        )
    }
}

/// `sidecar init --msg-redirect` (optional): kernel >= 6.10 for its sk_msg link, the offsets
/// its bound reads from BTF, a lockdown mode that allows reading them. Only a warning when
/// missing: nothing uses it unless asked.
fn msg_redirect() -> Check {
    const NAME: &str = "in-pod redirect (init --msg-redirect, optional)";
    let fix = "leave `--msg-redirect` off on this node (everything else works without it)";
    let version = nix::sys::utsname::uname()
        .ok()
        .and_then(|u| kernel_version(&u.release().to_string_lossy()));
    if version.is_some_and(|v| v < (6, 10)) {
        return Check::warn(NAME, "kernel older than 6.10 (no sk_msg links)", fix);
    }
    match crate::intercept::msg_redirect_support() {
        Ok(found) => Check::pass(NAME, format!("available: {found}")),
        Err(why) => Check::warn(NAME, why, fix),
    }
}

fn capabilities() -> Check {
    const NAME: &str = "capabilities";
    const CAPS: [(u32, &str); 3] = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let effective = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    });
    let Some(effective) = effective else {
        return Check::fail(
            NAME,
            "cannot read CapEff from /proc/self/status",
            "check /proc is mounted",
        );
    };
    let missing: Vec<&str> = CAPS
        .iter()
        .filter(|(bit, _)| effective >> bit & 1 == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        Check::pass(NAME, "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN")
    } else {
        Check::fail(
            NAME,
            format!("missing {}", missing.join(", ")),
            "run as root; in Kubernetes the init container adds BPF, NET_ADMIN and SYS_ADMIN (sidecar inject does this)",
        )
    }
}

fn jit() -> Check {
    match fs::read_to_string("/proc/sys/net/core/bpf_jit_enable").map(|s| s.trim().to_owned()) {
        Ok(v) if v == "0" => Check::warn(
            "bpf JIT",
            "disabled: programs are interpreted, every connect() costs more",
            "sysctl -w net.core.bpf_jit_enable=1",
        ),
        Ok(v) => Check::pass("bpf JIT", format!("enabled ({v})")),
        // Kernels built with CONFIG_BPF_JIT_ALWAYS_ON may hide the knob.
        Err(_) => Check::pass("bpf JIT", "no knob (always on, or not configurable)"),
    }
}

// ---- programs already attached to the hooks we use ----------------------------------------------

/// The attach points our programs use (enum bpf_attach_type), with names as bpftool prints them.
const OUR_HOOKS: [(u32, &str); 10] = [
    (3, "sock_ops"),
    (10, "connect4"),
    (11, "connect6"),
    (12, "post_bind4"),
    (13, "post_bind6"),
    (21, "getsockopt"),
    (29, "getpeername4"),
    (30, "getpeername6"),
    (31, "getsockname4"),
    (32, "getsockname6"),
];
const BPF_F_ALLOW_OVERRIDE: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// Our programs' names start with this (see sidecar-ebpf): they are never conflicts.
const OUR_PREFIX: &str = "sc_";

/// The cgroups whose programs also run for a pod: the root, the kubepods slices (ancestors of
/// every pod on a Kubernetes node), and the ancestors of `--cgroup`.
fn cgroups_to_check(root: &Path, pod: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    let kubepods = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("kubepods"))
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for level1 in kubepods(root) {
        dirs.extend(kubepods(&level1));
        dirs.push(level1);
    }
    if let Some(pod) = pod.and_then(|p| fs::canonicalize(p).ok()) {
        let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        for dir in pod.ancestors().take_while(|d| d.starts_with(&root)) {
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    dirs
}

fn conflicts(root: Option<&Path>, pod: Option<&Path>) -> Check {
    const NAME: &str = "other programs";
    let Some(root) = root else {
        return Check::warn(
            NAME,
            "not checked: no cgroup v2 hierarchy",
            "fix the cgroup v2 check first",
        );
    };
    let names: HashMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_owned()))
        .collect();
    let mut blocking = Vec::new();
    let mut replaced = Vec::new();
    let mut alongside = Vec::new();
    let mut checked = 0;
    for dir in cgroups_to_check(root, pod) {
        let Ok(fd) = fs::File::open(&dir).map(OwnedFd::from) else {
            continue;
        };
        for (attach_type, hook) in OUR_HOOKS {
            let (flags, ids) = match crate::bpf::prog_query(fd.as_fd(), attach_type) {
                Ok(r) => r,
                // EINVAL: a hook this kernel does not have; the program type check reports that.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
                Err(e) => {
                    return Check::warn(
                        NAME,
                        format!("not checked: querying {} failed: {e}", dir.display()),
                        "run `sidecar doctor` as root",
                    )
                }
            };
            checked += 1;
            for id in ids {
                let name = names.get(&id).map(String::as_str).unwrap_or("?");
                if name.starts_with(OUR_PREFIX) {
                    continue;
                }
                let what = format!("{hook} {name} (id {id}) on {}", dir.display());
                if flags & BPF_F_ALLOW_MULTI != 0 {
                    alongside.push(what);
                } else if flags & BPF_F_ALLOW_OVERRIDE != 0 {
                    replaced.push(what);
                } else {
                    blocking.push(what);
                }
            }
        }
    }
    if !blocking.is_empty() {
        return Check::fail(
            NAME,
            format!("attached without BPF_F_ALLOW_MULTI, so the kernel refuses ours below them: {}", blocking.join("; ")),
            "find their owner with `bpftool cgroup tree` and have it attach with BPF_F_ALLOW_MULTI (or as a bpf link)",
        );
    }
    if !replaced.is_empty() || !alongside.is_empty() {
        let mut detail = Vec::new();
        if !alongside.is_empty() {
            detail.push(format!("run after ours: {}", alongside.join("; ")));
        }
        if !replaced.is_empty() {
            detail.push(format!(
                "overridable, so ours replaces them in the pod: {}",
                replaced.join("; ")
            ));
        }
        return Check::warn(
            NAME,
            detail.join(". "),
            "usually harmless (after our rewrite they see a loopback destination); check they do not also answer SO_ORIGINAL_DST or rewrite getpeername",
        );
    }
    Check::pass(
        NAME,
        format!("none on our hooks ({checked} cgroup hooks checked)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_paths_are_named() {
        let (check, root) = cgroup2(Some(Path::new("/nonexistent/cgroup")));
        assert_eq!(check.status, super::super::Status::Fail);
        assert!(
            check.detail.contains("/nonexistent/cgroup does not exist"),
            "{}",
            check.detail
        );
        assert!(root.is_none());
        let check = bpffs(Path::new("/proc"));
        assert_eq!(check.status, super::super::Status::Fail);
        assert!(
            check.detail.contains("/proc is not a bpf filesystem"),
            "{}",
            check.detail
        );
    }
}
