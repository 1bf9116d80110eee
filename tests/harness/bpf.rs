//! Looking at what is attached to a cgroup and pinned in bpffs, from outside the sidecar (bpftool),
//! so that tests check the kernel's view rather than the sidecar's own account of it.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::env::DEFAULT_PIN_ROOT;

/// The attach types `sidecar init` must attach (short names; see `short_attach_type`).
pub const EXPECTED_ATTACH_TYPES: [&str; 6] = [
    "connect4",
    "connect6",
    "sock_ops",
    "getsockopt",
    "getpeername4",
    "getpeername6",
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
    let ino = std::fs::metadata(cgroup)
        .unwrap_or_else(|e| panic!("stat {}: {e}", cgroup.display()))
        .ino();
    Path::new(DEFAULT_PIN_ROOT).join(format!("cg{ino}"))
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
