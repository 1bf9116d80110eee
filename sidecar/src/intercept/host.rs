//! Facts about the host the init step checks before touching the kernel: where cgroup v2 is
//! mounted, whether a directory is a pod cgroup we may attach to, bpffs, capabilities.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::error::InitError;
use sidecar_common::mountinfo;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mount points of cgroup2 filesystems, from /proc/self/mountinfo. On hybrid hosts (systemd's
/// "unified" layout) this is /sys/fs/cgroup/unified, on pure v2 hosts /sys/fs/cgroup.
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    cgroup2_mounts_with_root()
        .into_iter()
        .map(|(m, _)| m)
        .collect()
}

/// cgroup2 mounts with their mountinfo "root" field: "/" for a mount of our own cgroup
/// namespace's root, something else for a bind mount of a subtree or of the host's hierarchy.
fn cgroup2_mounts_with_root() -> Vec<(PathBuf, String)> {
    mountinfo::of_type("cgroup2")
        .into_iter()
        .map(|m| (m.mount_point, m.root))
        .collect()
}

// `f_type` is a C long: i64 here, i32 on 32-bit targets, hence the casts clippy calls redundant.
#[allow(clippy::unnecessary_cast)]
fn fs_magic(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0 as i64)
}

/// A validated pod cgroup: a cgroup2 directory that is not the root of the hierarchy.
#[derive(Debug, Clone)]
pub struct PodCgroup {
    pub path: PathBuf,
    /// The cgroup id (inode number of the directory), as `bpftool cgroup` and the kernel show it.
    pub id: u64,
}

pub fn pod_cgroup(path: &Path) -> Result<PodCgroup, InitError> {
    let mounts = cgroup2_mounts();
    let hint = match mounts.first() {
        Some(m) => format!("cgroup v2 is mounted at {} here", m.display()),
        None => {
            "no cgroup v2 filesystem is mounted here (mount -t cgroup2 none /sys/fs/cgroup)".into()
        }
    };
    let canonical = fs::canonicalize(path).map_err(|e| InitError::Cgroup {
        path: path.into(),
        problem: format!("cannot open it ({e})"),
        fix: format!("pass the pod's existing cgroup v2 directory; {hint}"),
    })?;
    let meta = fs::metadata(&canonical).map_err(|e| InitError::Cgroup {
        path: path.into(),
        problem: e.to_string(),
        fix: hint.clone(),
    })?;
    if !meta.is_dir() || fs_magic(&canonical) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(InitError::Cgroup {
            path: path.into(),
            problem: "is not a cgroup v2 directory".into(),
            fix: format!("pass a directory inside the cgroup v2 hierarchy; {hint}"),
        });
    }
    if mounts
        .iter()
        .any(|m| fs::canonicalize(m).ok().as_deref() == Some(&canonical))
    {
        return Err(InitError::Cgroup {
            path: path.into(),
            problem: "is the root of the cgroup v2 hierarchy: attaching there would intercept every process on the host".into(),
            fix: "pass the pod's own cgroup (a directory below the root)".into(),
        });
    }
    Ok(PodCgroup {
        path: canonical,
        id: meta.ino(),
    })
}

/// Whether `path` (or its nearest existing ancestor) is on a bpf filesystem.
pub fn on_bpffs(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.exists() {
            return fs_magic(dir) == Some(BPF_FS_MAGIC);
        }
        p = dir.parent();
    }
    false
}

/// Capabilities the init step needs, missing from the effective set. Loading needs CAP_BPF (or
/// CAP_SYS_ADMIN on older kernels); attaching cgroup programs needs CAP_NET_ADMIN; CAP_SYS_ADMIN
/// covers both.
pub fn missing_capabilities() -> Vec<&'static str> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let Some(eff) = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    }) else {
        return Vec::new(); // cannot tell: let the kernel decide and explain its refusal
    };
    let has = |cap: u32| eff >> cap & 1 == 1;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// A validated pod network namespace, kept open while the init step attaches to it.
#[derive(Debug)]
pub struct PodNetns {
    pub path: PathBuf,
    pub file: fs::File,
    pub inode: u64,
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

pub fn pod_netns(path: &Path) -> Result<PodNetns, InitError> {
    let file = fs::File::open(path).map_err(|e| InitError::Netns {
        path: path.into(),
        problem: format!("cannot open it ({e})"),
        fix: "pass the pod's network namespace, e.g. /proc/<pid of a pod process>/ns/net or /run/netns/<name>".into(),
    })?;
    #[allow(clippy::unnecessary_cast)] // see fs_magic
    let is_nsfs = nix::sys::statfs::fstatfs(&file)
        .map(|s| s.filesystem_type().0 as i64 == NSFS_MAGIC)
        .unwrap_or(false);
    let inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
    if !is_nsfs {
        return Err(InitError::Netns {
            path: path.into(),
            problem: "is not a namespace file".into(),
            fix: "pass /proc/<pid>/ns/net or a bind mount of it (/run/netns/<name>)".into(),
        });
    }
    // NS_GET_NSTYPE: a UTS or mount namespace file is a namespace file too.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on a file we own; it only returns a value.
    let kind = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(InitError::Netns {
            path: path.into(),
            problem: "is a namespace file, but not of a network namespace".into(),
            fix: "pass the pod's network namespace: /proc/<pid>/ns/net (not ns/uts, ns/mnt...)"
                .into(),
        });
    }
    // The host's namespace: recent kernels give init_net the fixed inode PROC_NET_INIT_INO; older
    // ones do not, but then the host's PID 1 lives there (visible when the init step runs in the
    // host PID namespace). Inside a pod without hostPID neither applies, and --host-ip catches
    // hostNetwork instead.
    const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;
    let pid1 = fs::metadata("/proc/1/ns/net").map(|m| m.ino()).ok();
    let pid1_is_host_init = fs::read_to_string("/proc/1/cgroup")
        .map(|c| c.lines().any(|l| l == "0::/init.scope"))
        .unwrap_or(false);
    if inode == PROC_NET_INIT_INO || (pid1_is_host_init && pid1 == Some(inode)) {
        return Err(InitError::Netns {
            path: path.into(),
            problem: "is the host's network namespace (a hostNetwork pod?): capturing there would steer the whole node's traffic".into(),
            fix: "run the sidecar only in pods with their own network namespace (hostNetwork: false)".into(),
        });
    }
    Ok(PodNetns {
        path: path.into(),
        file,
        inode,
    })
}

/// `--cgroup auto`: the pod cgroup is the parent of the cgroup this process (the init container)
/// runs in. With a private cgroup namespace (the default for containers on cgroup v2) our own path
/// reads "/", so the init container's cgroup is found by inode in the host's hierarchy, which the
/// init container must mount (hostPath /sys/fs/cgroup).
pub fn auto_pod_cgroup() -> Result<PathBuf, InitError> {
    let not_found = |problem: String| {
        InitError::Cgroup {
        path: "auto".into(),
        problem,
        fix: "mount the host's cgroup v2 hierarchy into the init container (hostPath /sys/fs/cgroup), or pass --cgroup <the pod's cgroup directory>".into(),
    }
    };
    let own = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        })
        .ok_or_else(|| {
            not_found(
                "this process is not in a cgroup v2 hierarchy (/proc/self/cgroup has no 0:: line)"
                    .into(),
            )
        })?;
    let mounts = cgroup2_mounts();
    let rel = own.trim_start_matches('/');
    let own_inode = mounts
        .iter()
        .find_map(|m| fs::metadata(m.join(rel)).ok().map(|md| md.ino()))
        .ok_or_else(|| {
            not_found(format!(
                "cannot find our own cgroup {own} under any cgroup v2 mount"
            ))
        })?;
    for mount in &mounts {
        if let Some(dir) = find_inode(mount, own_inode, 16) {
            if dir != *mount {
                if let Some(parent) = dir.parent() {
                    return Ok(parent.to_path_buf());
                }
            }
        }
    }
    Err(not_found(format!(
        "our own cgroup (inode {own_inode}) is the root of every cgroup v2 mount visible here"
    )))
}

fn find_inode(dir: &Path, inode: u64, depth: u32) -> Option<PathBuf> {
    let md = fs::symlink_metadata(dir).ok()?;
    if md.ino() == inode {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Some(found) = find_inode(&entry.path(), inode, depth - 1) {
                return Some(found);
            }
        }
    }
    None
}

/// `--cgroup auto` means "the parent of my own cgroup" (the init container's pod).
pub fn resolve_cgroup(arg: &Path) -> Result<PathBuf, InitError> {
    if arg == Path::new("auto") {
        auto_pod_cgroup()
    } else {
        Ok(arg.to_path_buf())
    }
}

/// Fails with what to do unless the process has what the init step needs.
pub fn check_privileges() -> Result<(), InitError> {
    let missing = missing_capabilities();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(InitError::Capabilities {
            missing: missing.join(", "),
        })
    }
}

/// The sockets listening in `ns` now (TCP, both families), from its socket table: read from a
/// thread that joins the namespace (this process stays where it is).
pub fn listening_in(ns: &PodNetns) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let fd = ns.file.try_clone()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let mut found = Vec::new();
                for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
                    match fs::read_to_string(table) {
                        Ok(text) => found.extend(crate::net::listening_sockets(&text)),
                        // No IPv6 in the namespace: no tcp6 table.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(found)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the netns reader panicked")))
    })
}

/// The processes (pids) in `cgroup` and every cgroup below it; at most `limit` cgroups are read
/// (a pod has a handful).
pub fn pids_below(cgroup: &Path, limit: usize) -> Vec<String> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = dirs.pop() {
        seen += 1;
        if seen > limit {
            break;
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().map(str::to_owned));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

/// The network namespaces (inodes) of the processes in `cgroup` and below it, this process
/// excepted (an init container runs inside the pod's cgroup).
pub fn netns_below(cgroup: &Path, limit: usize) -> std::collections::BTreeSet<u64> {
    let own = std::process::id().to_string();
    pids_below(cgroup, limit)
        .into_iter()
        .filter(|pid| *pid != own)
        // A process may exit meanwhile: it has no namespace to count.
        .filter_map(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).ok())
        .map(|meta| meta.ino())
        .collect()
}

/// Refuses a cgroup that is not one pod's: its processes are in several network namespaces (a
/// parent of pods, such as `kubepods.slice`), or, with `--netns`, in another one than that.
pub fn check_one_pod(cgroup: &PodCgroup, netns: Option<&PodNetns>) -> Result<(), InitError> {
    let found = netns_below(&cgroup.path, 4096);
    if found.len() > 1 {
        return Err(InitError::Cgroup {
            path: cgroup.path.clone(),
            problem: format!(
                "holds processes of {} network namespaces: it is not one pod's cgroup (a parent of several pods, such as kubepods.slice?)",
                found.len()
            ),
            fix: "pass the pod's own cgroup (--cgroup auto from the pod's init container finds it)"
                .into(),
        });
    }
    if let (Some(ns), Some(other)) = (netns, found.first()) {
        if *other != ns.inode {
            return Err(InitError::Cgroup {
                path: cgroup.path.clone(),
                problem: format!(
                    "its processes are in network namespace {other}, not in --netns {} ({})",
                    ns.path.display(),
                    ns.inode
                ),
                fix: "pass the cgroup and the network namespace of the same pod".into(),
            });
        }
    }
    Ok(())
}

/// The Kubernetes pod UID in a pod cgroup's path: `pod<uid>` (cgroupfs driver) or
/// `kubepods-<qos>-pod<uid with '_'>.slice` (systemd driver). `None` elsewhere.
pub fn pod_uid_of(cgroup: &Path) -> Option<String> {
    cgroup.components().rev().find_map(|c| {
        let name = c.as_os_str().to_str()?;
        let name = name.strip_suffix(".slice").unwrap_or(name);
        let uid = name.rsplit_once("pod").map(|(_, uid)| uid)?;
        let uid = uid.replace('_', "-");
        let is_uuid = uid.len() == 36
            && uid.char_indices().all(|(i, ch)| {
                if [8, 13, 18, 23].contains(&i) {
                    ch == '-'
                } else {
                    ch.is_ascii_hexdigit()
                }
            });
        is_uuid.then_some(uid)
    })
}

/// The pod id (name of the pin directory) of `cgroup`: the pod UID in its path when there is one.
/// A `--pod-id` / `SIDECAR_POD_ID` that names another pod is refused: a pod's manifest sets that
/// variable, and with another pod's UID it would replace (detach) that pod's interception.
pub fn pod_id_for(cgroup: &PodCgroup, given: Option<&str>) -> Result<Option<String>, InitError> {
    match (given, pod_uid_of(&cgroup.path)) {
        (Some(given), Some(uid)) if given != uid => Err(InitError::Cgroup {
            path: cgroup.path.clone(),
            problem: format!(
                "is the cgroup of pod {uid}, but --pod-id / SIDECAR_POD_ID says {given}"
            ),
            fix: "leave --pod-id unset (it is read from the cgroup), or set it to this pod's UID"
                .into(),
        }),
        (_, Some(uid)) => Ok(Some(uid)),
        (given, None) => Ok(given.map(str::to_owned)),
    }
}

/// Refuses to replace a pin directory whose programs are attached to another cgroup: it is
/// another pod's interception.
pub fn check_pins_are_ours(dir: &Path, cgroup: &PodCgroup) -> Result<(), InitError> {
    for prog in [
        sidecar_common::progs::CONNECT4,
        sidecar_common::progs::SOCKOPS,
    ] {
        let Ok(fd) = crate::bpf::obj_get(&crate::pins::link(dir, prog)) else {
            continue;
        };
        let Ok(info) = crate::bpf::link_info(std::os::fd::AsFd::as_fd(&fd)) else {
            continue;
        };
        if let crate::bpf::LinkTarget::Cgroup { cgroup_id } = info.target {
            // 0: the cgroup is gone; its pins are stale, not anybody's.
            if cgroup_id != 0 && cgroup_id != cgroup.id {
                return Err(InitError::Cgroup {
                    path: cgroup.path.clone(),
                    problem: format!(
                        "pin directory {} holds the interception of another cgroup (id {cgroup_id}); refusing to replace it",
                        dir.display()
                    ),
                    fix: "--pod-id must name this pod (leave it unset: it comes from the cgroup)"
                        .into(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let info = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
28 1 0:26 / /mnt/with\\040space rw - cgroup2 none rw";
        let cgroup2: Vec<_> = mountinfo::parse(info)
            .into_iter()
            .filter(|m| m.fs_type == "cgroup2")
            .map(|m| (m.mount_point, m.root))
            .collect();
        assert_eq!(
            cgroup2,
            vec![
                (PathBuf::from("/sys/fs/cgroup/unified"), "/".to_string()),
                (PathBuf::from("/mnt/with space"), "/".to_string())
            ]
        );
    }

    #[test]
    fn pod_uids_come_from_the_cgroup_path() {
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert_eq!(
            pod_uid_of(Path::new(&format!(
                "/sys/fs/cgroup/kubepods/burstable/pod{uid}"
            ))),
            Some(uid.to_owned())
        );
        assert_eq!(
            pod_uid_of(Path::new(&format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ))),
            Some(uid.to_owned())
        );
        assert_eq!(pod_uid_of(Path::new("/sys/fs/cgroup/kubepods.slice")), None);
        assert_eq!(
            pod_uid_of(Path::new("/sys/fs/cgroup/sidecar-test-1-0")),
            None
        );
    }
}
