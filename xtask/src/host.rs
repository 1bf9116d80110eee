//! Checks on the running kernel and our privileges: what the privileged tests and the demo need
//! (root with CAP_BPF/CAP_SYS_ADMIN/CAP_NET_ADMIN, a cgroup2 mount, bpffs at /sys/fs/bpf).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Ctx};
use crate::say;

pub const BPFFS: &str = "/sys/fs/bpf";

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

pub struct Identity {
    pub euid: u32,
    pub cap_eff: u64,
}

/// Effective UID and capabilities from /proc/self/status (no libc dependency needed).
pub fn identity() -> Result<Identity> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("/proc/self/status has no {name} line"))
    };
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = field("Uid:")?
        .split_whitespace()
        .nth(1)
        .context("malformed Uid: line in /proc/self/status")?
        .parse()
        .context("malformed Uid: line in /proc/self/status")?;
    let cap_eff = u64::from_str_radix(field("CapEff:")?, 16)
        .context("malformed CapEff: line in /proc/self/status")?;
    Ok(Identity { euid, cap_eff })
}

/// Fails loudly unless we are root with the capabilities the eBPF tests need. Never a skip: a
/// privileged test suite that "passes" without running is worse than a red build.
pub fn require_privileges(purpose: &str) -> Result<()> {
    let id = identity()?;
    if id.euid != 0 {
        bail!(
            "{purpose} needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN): it loads eBPF programs, \
             creates cgroups and network namespaces. You are uid {}. Run it as root, e.g. \
             `sudo -E env \"PATH=$PATH\" cargo xtask ...`. Nothing was skipped: this is a failure.",
            id.euid
        );
    }
    // Kernels before 5.8 have no CAP_BPF (CAP_SYS_ADMIN covers it there).
    let last_cap: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_BPF);
    let mut needed = vec![
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ];
    if last_cap >= CAP_BPF {
        needed.push((CAP_BPF, "CAP_BPF"));
    }
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(bit, _)| id.cap_eff & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{purpose}: running as root but without {} (CapEff {:016x}); a restricted container? \
             Run with those capabilities (e.g. a privileged container).",
            missing.join(", "),
            id.cap_eff
        );
    }
    say!("check privileges: root with CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN: ok");
    Ok(())
}

use sidecar_common::mountinfo::{self, Mount};

fn mounts() -> Result<Vec<Mount>> {
    mountinfo::read().context("cannot read /proc/self/mountinfo")
}

/// The first cgroup2 mount (on hybrid hosts it is /sys/fs/cgroup/unified, on unified hosts
/// /sys/fs/cgroup): the tests find it the same way.
pub fn require_cgroup2() -> Result<PathBuf> {
    match mounts()?.into_iter().find(|m| m.fs_type == "cgroup2") {
        Some(m) => {
            say!("check cgroup v2: mounted at {}", m.mount_point.display());
            Ok(m.mount_point)
        }
        None => bail!(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo): the sidecar attaches its \
             programs to a cgroup v2 directory. Boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) \
             or mount it: `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`."
        ),
    }
}

/// Whether the mount visible at `path` (the last one stacked there) is of type `fs_type`.
fn mounted_as(path: &Path, fs_type: &str) -> Result<bool> {
    Ok(mounts()?
        .iter()
        .rev()
        .find(|m| m.mount_point == path)
        .is_some_and(|m| m.fs_type == fs_type))
}

/// bpffs at /sys/fs/bpf (the sidecar pins its links and maps there); mounts it if absent, which a
/// fresh machine needs.
pub fn ensure_bpffs(ctx: &Ctx) -> Result<()> {
    let path = Path::new(BPFFS);
    if mounted_as(path, "bpf")? {
        say!("check bpffs at {BPFFS}: mounted");
        return Ok(());
    }
    say!("check bpffs at {BPFFS}: not mounted -> mounting it");
    if !ctx.is_root {
        bail!("bpffs is not mounted at {BPFFS} and mounting it needs root: run as root, or `sudo mount -t bpf bpf {BPFFS}`");
    }
    if !path.is_dir() {
        fs::create_dir_all(path).with_context(|| format!("cannot create {BPFFS}"))?;
    }
    cmd::run(
        ctx.cmd("mount").args(["-t", "bpf", "bpf", BPFFS]),
        "mount bpffs",
        Some("check that the kernel has CONFIG_BPF_SYSCALL and that this is not a restricted container"),
    )?;
    if !mounted_as(path, "bpf")? {
        bail!("`mount -t bpf bpf {BPFFS}` succeeded but /proc/self/mountinfo shows no bpf mount there");
    }
    Ok(())
}

/// Everything the privileged tests and the demo need from the host, checked before minutes of
/// building so that a wrong environment fails fast.
pub fn require_privileged_host(ctx: &Ctx, purpose: &str) -> Result<()> {
    require_privileges(purpose)?;
    require_cgroup2()?;
    ensure_bpffs(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_identity() {
        let id = identity().unwrap();
        // Whatever we run as, the parse must give a plausible uid.
        assert!(id.euid < u32::MAX);
    }
}
