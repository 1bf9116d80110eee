//! Pins never outlive their pod for long: `init --remove` detaches the netns link along with the
//! cgroup ones, and when a pod disappears without it (the kubelet deletes the netns and the cgroup;
//! nothing runs `--remove`), the next `sidecar init` on the node, or `sidecar cleanup`, removes
//! that pod's pins once the kernel has detached its links.
//!
//! The kernel detaches the links of a deleted cgroup or netns asynchronously; the tests wait for
//! bpftool to show that (the links report cgroup id / netns inode 0) before running the
//! collector once. The garbage-collection tests use a private pin root, so that no other test's
//! `sidecar init` can collect the stale pins first.
use std::path::Path;
use std::time::Duration;

use sidecar_tests::bpf::{
    cgroup_programs, default_pin_dir, inode, link_detached, links, pin_dir_in, sk_lookup_links,
    PinRoot,
};
use sidecar_tests::env::{run_sidecar, DEFAULT_PIN_ROOT};
use sidecar_tests::{assert_eventually, Pod};

/// How long the kernel may take to detach the links of a deleted cgroup or netns (deferred work;
/// normally well under a second).
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);

const LINK_PINS: [&str; 11] = [
    "link_sc_connect4",
    "link_sc_connect6",
    "link_sc_getpeername4",
    "link_sc_getpeername6",
    "link_sc_getsockname4",
    "link_sc_getsockname6",
    "link_sc_getsockopt",
    "link_sc_post_bind4",
    "link_sc_post_bind6",
    "link_sc_sk_lookup",
    "link_sc_sockops",
];

/// The link pins of one pod's set: LINK_PINS, and the sk_msg link when the suite runs with
/// the in-pod redirect on.
fn expected_link_pins() -> Vec<&'static str> {
    let mut pins = LINK_PINS.to_vec();
    if sidecar_tests::env::msg_redirect_everywhere() {
        pins.push("link_sc_msg_redirect");
        pins.sort_unstable();
    }
    pins
}

/// The pod's links as the kernel lists them: (cgroup link ids, netns link ids).
fn kernel_links_of(cgroup_id: u64, netns_ino: u64) -> (Vec<u64>, Vec<u64>) {
    let all = links();
    (
        all.iter()
            .filter(|l| l.cgroup_id == Some(cgroup_id))
            .map(|l| l.id)
            .collect(),
        all.iter()
            .filter(|l| l.netns_ino == Some(netns_ino))
            .map(|l| l.id)
            .collect(),
    )
}

fn wait_detached(ids: &[u64], what: &str) {
    assert_eventually!(
        DETACH_TIMEOUT,
        ids.iter().all(|id| link_detached(*id)),
        "the kernel did not detach the {what} links {ids:?} within {DETACH_TIMEOUT:?}: {:#?}",
        links()
    );
}

fn link_pins(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link_"))
        .collect();
    names.sort();
    names
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn remove_detaches_the_netns_link_too_and_a_new_init_starts_clean() {
    let mut pod = Pod::new();
    let pin_dir = default_pin_dir(pod.cgroup());
    let netns_ino = inode(&pod.netns_path());
    pod.init_with_netns(&[]);
    assert_eq!(sk_lookup_links(netns_ino).len(), 1, "{:#?}", links());

    let removed = pod.remove();

    assert!(
        removed.status.success(),
        "init --remove failed ({}): {}",
        removed.status,
        String::from_utf8_lossy(&removed.stderr)
    );
    let left = sk_lookup_links(netns_ino);
    assert!(
        left.is_empty(),
        "the netns link is detached synchronously: {left:#?}"
    );
    assert_eq!(cgroup_programs(pod.cgroup()).len(), 0);
    assert!(!pin_dir.exists(), "{} is left", pin_dir.display());

    pod.init_with_netns(&[]);

    assert_eq!(sk_lookup_links(netns_ino).len(), 1, "{:#?}", links());
    assert_eq!(cgroup_programs(pod.cgroup()).len(), 10);
    assert_eq!(
        link_pins(&pin_dir),
        expected_link_pins(),
        "exactly one set of pins"
    );
    // No half-done staging or old set of this pod is left in the pin root.
    let pod_dir_name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let leftovers: Vec<String> = std::fs::read_dir(DEFAULT_PIN_ROOT)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let ours: Vec<&String> = leftovers
        .iter()
        .filter(|n| n.starts_with('_') && pod_dir_name.as_ref().is_some_and(|p| n.ends_with(p)))
        .collect();
    assert!(ours.is_empty(), "staging/old sets left: {ours:?}");
}

#[test]
fn a_new_init_removes_the_pins_of_a_pod_whose_netns_and_cgroup_are_gone() {
    let pins = PinRoot::new();
    let root = pins.arg();
    let mut gone = Pod::new();
    gone.init_with_netns(&["--pin-root", &root]);
    let stale = pin_dir_in(pins.path(), gone.cgroup());
    let (cgroup_links, netns_links) =
        kernel_links_of(inode(gone.cgroup()), inode(&gone.netns_path()));
    assert_eq!((cgroup_links.len(), netns_links.len()), (10, 1));

    // The pod goes away the way the kubelet removes it: nobody runs `init --remove`.
    gone.delete_netns();
    gone.delete_cgroup();
    wait_detached(&cgroup_links, "deleted cgroup's");
    wait_detached(&netns_links, "deleted netns's");
    assert!(
        stale.is_dir(),
        "nothing collected {} yet: pins outlive the pod",
        stale.display()
    );

    let mut next = Pod::new();
    let out = next.init_with_netns(&["--pin-root", &root]);

    assert!(
        !stale.exists(),
        "init left the stale pins {}; it said:\n{}",
        stale.display(),
        stdout_of(&out)
    );
    assert!(
        stdout_of(&out).contains(&stale.to_string_lossy().into_owned()),
        "init names what it collected:\n{}",
        stdout_of(&out)
    );
    let fresh = pin_dir_in(pins.path(), next.cgroup());
    let fresh_name = fresh.file_name().map(|n| n.to_string_lossy().into_owned());
    assert_eq!(
        pins.entries(),
        Vec::from_iter(fresh_name),
        "only the new pod's pins are left in {root}"
    );
    assert_eq!(link_pins(&fresh), expected_link_pins());
}

#[test]
fn cleanup_removes_the_pins_of_a_pod_whose_netns_is_gone_and_detaches_its_cgroup_programs() {
    let pins = PinRoot::new();
    let root = pins.arg();
    let mut pod = Pod::new();
    pod.init_with_netns(&["--pin-root", &root]);
    let stale = pin_dir_in(pins.path(), pod.cgroup());
    let (_, netns_links) = kernel_links_of(inode(pod.cgroup()), inode(&pod.netns_path()));
    assert_eq!(netns_links.len(), 1);

    // The pod sandbox's netns is gone; its cgroup is still there.
    pod.delete_netns();
    wait_detached(&netns_links, "deleted netns's");
    let out = run_sidecar(&["cleanup", "--pin-root", &root]);

    assert!(out.status.success(), "sidecar cleanup failed: {out:?}");
    assert!(
        stdout_of(&out).contains(&stale.to_string_lossy().into_owned()),
        "cleanup names what it removed:\n{}",
        stdout_of(&out)
    );
    assert!(!stale.exists(), "{} is left", stale.display());
    let left = cgroup_programs(pod.cgroup());
    assert!(
        left.is_empty(),
        "unpinning released the cgroup links too: {left:#?}"
    );
}

#[test]
fn cleanup_removes_the_pins_of_a_pod_whose_cgroup_is_gone_and_detaches_its_netns_link() {
    let pins = PinRoot::new();
    let root = pins.arg();
    let mut pod = Pod::new();
    pod.init_with_netns(&["--pin-root", &root]);
    let stale = pin_dir_in(pins.path(), pod.cgroup());
    let netns_ino = inode(&pod.netns_path());
    let (cgroup_links, _) = kernel_links_of(inode(pod.cgroup()), netns_ino);
    assert_eq!(cgroup_links.len(), 10);

    pod.delete_cgroup();
    wait_detached(&cgroup_links, "deleted cgroup's");
    let out = run_sidecar(&["cleanup", "--pin-root", &root]);

    assert!(out.status.success(), "sidecar cleanup failed: {out:?}");
    assert!(
        !stale.exists(),
        "{} is left:\n{}",
        stale.display(),
        stdout_of(&out)
    );
    let left = sk_lookup_links(netns_ino);
    assert!(
        left.is_empty(),
        "unpinning released the link of the still-existing netns: {left:#?}"
    );
}
