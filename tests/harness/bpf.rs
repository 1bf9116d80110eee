//! Looking at what is attached to a cgroup and pinned in bpffs, from outside the sidecar (bpftool),
//! so that tests check the kernel's view rather than the sidecar's own account of it.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Deserialize;

use crate::env::{DEFAULT_PIN_ROOT, NAME_PREFIX};

/// The attach types `sidecar init` must attach (short names; see `short_attach_type`).
pub const EXPECTED_ATTACH_TYPES: [&str; 10] = [
    "connect4",
    "connect6",
    "sock_ops",
    "getsockopt",
    "getpeername4",
    "getpeername6",
    "getsockname4",
    "getsockname6",
    "post_bind4",
    "post_bind6",
];

/// One program attached directly to a cgroup.
#[derive(Debug, Clone, Deserialize)]
pub struct AttachedProgram {
    pub id: u64,
    /// Short attach type name (`connect4`, `sock_ops`, ...), whichever naming bpftool used.
    pub attach_type: String,
    #[serde(default)]
    pub name: String,
}

/// bpftool built against libbpf >= 1.0 prints libbpf's names (`cgroup_inet4_connect`), older ones
/// print the short legacy names (`connect4`); tests compare short names.
pub fn short_attach_type(name: &str) -> String {
    let short = match name {
        "cgroup_inet4_connect" => "connect4",
        "cgroup_inet6_connect" => "connect6",
        "cgroup_sock_ops" => "sock_ops",
        "cgroup_getsockopt" => "getsockopt",
        "cgroup_setsockopt" => "setsockopt",
        "cgroup_inet4_getpeername" => "getpeername4",
        "cgroup_inet6_getpeername" => "getpeername6",
        "cgroup_inet4_getsockname" => "getsockname4",
        "cgroup_inet4_post_bind" => "post_bind4",
        "cgroup_inet6_post_bind" => "post_bind6",
        "cgroup_inet6_getsockname" => "getsockname6",
        "cgroup_udp4_sendmsg" => "sendmsg4",
        "cgroup_udp6_sendmsg" => "sendmsg6",
        "cgroup_udp4_recvmsg" => "recvmsg4",
        "cgroup_udp6_recvmsg" => "recvmsg6",
        "cgroup_inet_ingress" => "ingress",
        "cgroup_inet_egress" => "egress",
        "cgroup_inet_sock_create" => "sock_create",
        "cgroup_inet_sock_release" => "sock_release",
        "cgroup_device" => "device",
        "cgroup_sysctl" => "sysctl",
        other => other,
    };
    short.to_string()
}

/// Programs attached directly to `cgroup` (not inherited), as `bpftool -j cgroup show` reports them.
pub fn cgroup_programs(cgroup: &Path) -> Vec<AttachedProgram> {
    let output = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap_or_else(|e| {
            panic!("run bpftool ({e}): install it first: apt-get install -y bpftool")
        });
    if !output.status.success() {
        panic!(
            "bpftool cgroup show {} failed ({}): {}",
            cgroup.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    #[derive(Deserialize)]
    struct Raw {
        id: u64,
        attach_type: serde_json::Value,
        #[serde(default)]
        name: String,
    }
    let raw: Vec<Raw> = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("parse bpftool output {text:?}: {e}"));
    raw.into_iter()
        .map(|r| AttachedProgram {
            id: r.id,
            attach_type: match r.attach_type {
                serde_json::Value::String(s) => short_attach_type(&s),
                other => other.to_string(),
            },
            name: r.name,
        })
        .collect()
}

/// The pin directory `sidecar init` uses for `cgroup` with the default pin root and pod id:
/// /sys/fs/bpf/sidecar/cg<inode of the cgroup directory>.
pub fn default_pin_dir(cgroup: &Path) -> PathBuf {
    pin_dir_in(Path::new(DEFAULT_PIN_ROOT), cgroup)
}

/// The pin directory `sidecar init --pin-root <root>` uses for `cgroup` (default pod id).
pub fn pin_dir_in(root: &Path, cgroup: &Path) -> PathBuf {
    root.join(format!("cg{}", inode(cgroup)))
}

/// Inode number of a file: a cgroup directory's is its cgroup id, a namespace file's is the
/// namespace's inode (what bpftool and `sidecar status` print).
pub fn inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// One BPF link, as `bpftool -j link show` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Link {
    pub id: u64,
    pub prog_id: u64,
    /// "cgroup", "netns", ... (a bpftool older than the kernel prints a number for a link type
    /// it has no name for, such as 14, sockmap: `--msg-redirect`'s sk_msg link)
    #[serde(rename = "type", deserialize_with = "name_or_number")]
    pub kind: String,
    #[serde(default)]
    pub attach_type: String,
    /// For cgroup links; 0 once the cgroup is gone (the kernel detached the link).
    pub cgroup_id: Option<u64>,
    /// For netns links; 0 once the namespace is gone.
    pub netns_ino: Option<u64>,
}

fn name_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    })
}

/// Every BPF link on the machine (`bpftool -j link show`).
pub fn links() -> Vec<Link> {
    let output = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .unwrap_or_else(|e| {
            panic!("run bpftool ({e}): install it first: apt-get install -y bpftool")
        });
    if !output.status.success() {
        panic!(
            "bpftool link show failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("parse bpftool link output {text:?}: {e}"))
}

/// The sk_lookup links attached to the network namespace with inode `netns_ino`.
pub fn sk_lookup_links(netns_ino: u64) -> Vec<Link> {
    links()
        .into_iter()
        .filter(|l| l.attach_type == "sk_lookup" && l.netns_ino == Some(netns_ino))
        .collect()
}

/// True when bpftool shows the link `id` as detached (its cgroup or netns is gone), or no longer
/// shows it at all.
pub fn link_detached(id: u64) -> bool {
    match links().into_iter().find(|l| l.id == id) {
        None => true,
        Some(l) => l.cgroup_id == Some(0) || l.netns_ino == Some(0),
    }
}

static PIN_ROOTS: AtomicU32 = AtomicU32::new(0);

/// A private pin root on bpffs (`/sys/fs/bpf/sidecar-test-<pid>-<n>-pins`), for tests that must
/// know that nothing but their own commands garbage-collects in it: in the shared default root,
/// any concurrent `sidecar init` would. Removed with everything in it on drop; declare it before
/// the pods that use it, so that it is dropped after them.
pub struct PinRoot(PathBuf);

impl PinRoot {
    pub fn new() -> PinRoot {
        crate::env::require_bpffs();
        PinRoot(PathBuf::from("/sys/fs/bpf").join(format!(
            "{NAME_PREFIX}{}-{}-pins",
            std::process::id(),
            PIN_ROOTS.fetch_add(1, Ordering::SeqCst)
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a `--pin-root` argument.
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }

    /// Names in the pin root (empty when the root does not exist: the sidecar removes it when its
    /// last pod leaves).
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        PinRoot::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        // Unlinking a link pin drops the last reference to the link: the kernel detaches it.
        if self.0.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("cleanup: could not remove {}: {e}", self.0.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_bpftool_namings_map_to_short_names() {
        assert_eq!(short_attach_type("cgroup_inet4_connect"), "connect4");
        assert_eq!(short_attach_type("connect4"), "connect4");
        assert_eq!(
            short_attach_type("cgroup_inet6_getpeername"),
            "getpeername6"
        );
        assert_eq!(short_attach_type("sock_ops"), "sock_ops");
    }
}
