//! `sidecar init` refuses to capture inbound traffic in the host's network namespace (a
//! hostNetwork pod): steering SYNs there would capture the whole node. It refuses both when handed
//! the host netns itself and when the pod's address is the node's (`--host-ip`), says why, and
//! leaves nothing attached or pinned.
//!
//! The host netns case hands the real host netns to init, as the issue asks. Should the refusal
//! ever be missing, the program would only act on SYNs to the fixture's pod addresses
//! (10.200.0.2, fd00:200::2), which the host does not have, and the pod's cleanup removes it.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

use sidecar_tests::bpf::{cgroup_programs, default_pin_dir, inode, sk_lookup_links};
use sidecar_tests::env::require_bpffs;
use sidecar_tests::{Pod, POD_IP4};

fn assert_refused(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        matches!(out.status.code(), Some(1) | Some(64)),
        "{what}: expected exit 1 or 64, got {} (101 would be a panic)\n--- stderr ---\n{stderr}",
        out.status
    );
    assert!(!stderr.trim().is_empty(), "{what}: no message on stderr");
    stderr.to_lowercase()
}

fn assert_nothing_attached(pod: &Pod) {
    let programs = cgroup_programs(pod.cgroup());
    assert!(
        programs.is_empty(),
        "programs were left attached: {programs:#?}"
    );
    let pin_dir = default_pin_dir(pod.cgroup());
    assert!(!pin_dir.exists(), "{} was left pinned", pin_dir.display());
}

fn sk_lookup_link_ids(netns_ino: u64) -> BTreeSet<u64> {
    sk_lookup_links(netns_ino).iter().map(|l| l.id).collect()
}

#[test]
fn host_network_namespace_is_refused() {
    require_bpffs();
    let mut pod = Pod::new();
    // The test process runs in the host's netns; /proc/self in the sidecar's own process (a
    // child of this one, not moved anywhere) is the same namespace.
    let host_ns = Path::new("/proc/self/ns/net");
    let host_ino = inode(host_ns);
    assert_ne!(
        host_ino,
        inode(&pod.netns_path()),
        "fixture: the pod netns is not the host's"
    );
    let before = sk_lookup_link_ids(host_ino);

    let out = pod.try_init(&["--netns", "/proc/self/ns/net"]);

    let stderr = assert_refused(&out, "host netns");
    assert!(
        stderr.contains("host") && stderr.contains("network namespace"),
        "says it is the host's network namespace:\n{stderr}"
    );
    assert!(
        stderr.contains("hostnetwork"),
        "says what that means for a pod (hostNetwork):\n{stderr}"
    );
    assert_nothing_attached(&pod);
    let after = sk_lookup_link_ids(host_ino);
    let new: Vec<_> = after.difference(&before).collect();
    assert!(
        new.is_empty(),
        "new sk_lookup links on the host netns: {new:?}"
    );
}

#[test]
fn pod_address_equal_to_the_node_address_is_refused_as_host_network() {
    require_bpffs();
    let mut pod = Pod::new();
    let netns = pod.netns_path().to_string_lossy().into_owned();

    let out = pod.try_init(&["--netns", &netns, "--host-ip", POD_IP4]);

    let stderr = assert_refused(&out, "--host-ip equal to a pod IP");
    assert!(
        stderr.contains("hostnetwork") && stderr.contains(POD_IP4),
        "names the address and says hostNetwork:\n{stderr}"
    );
    assert_nothing_attached(&pod);
    let left = sk_lookup_links(inode(&pod.netns_path()));
    assert!(left.is_empty(), "{left:#?}");
}
