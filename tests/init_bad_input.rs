//! `sidecar init` refuses bad input with a message that names the problem and what to do, exits
//! non-zero (1, or 64 for bad usage; never a panic), and leaves nothing attached or pinned.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use sidecar_tests::bpf::{cgroup_programs, default_pin_dir};
use sidecar_tests::env::{cgroup2_mount, require_bpffs, DEFAULT_PIN_ROOT};
use sidecar_tests::{InitRunner, Pod};

/// Asserts a clean refusal and returns stderr in lower case for keyword checks.
fn assert_refused(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code();
    assert!(
        matches!(code, Some(1) | Some(64)),
        "{what}: expected exit 1 or 64, got {} (101 would be a panic)\n--- stderr ---\n{stderr}",
        out.status
    );
    assert!(!stderr.trim().is_empty(), "{what}: no message on stderr");
    stderr.to_lowercase()
}

fn assert_mentions_any(stderr: &str, words: &[&str], what: &str) {
    assert!(
        words.iter().any(|w| stderr.contains(&w.to_lowercase())),
        "{what}: stderr should mention one of {words:?}:\n{stderr}"
    );
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

#[test]
fn nonexistent_cgroup_is_refused() {
    require_bpffs();
    let mut pod = Pod::new();
    let missing = pod.cgroup().join("no-such-cgroup");
    let pod_id = format!("{}-missing", pod.name());

    let out = pod.try_init_with(&missing, &["--pod-id", &pod_id], InitRunner::Root);

    let stderr = assert_refused(&out, "nonexistent cgroup");
    assert_mentions_any(&stderr, &[&missing.to_string_lossy()], "names the path");
    assert_mentions_any(
        &stderr,
        &["does not exist", "no such", "not found", "doesn't exist"],
        "says it is missing",
    );
    assert_mentions_any(&stderr, &["cgroup"], "says what was expected");
    assert!(!missing.exists(), "init must not create the cgroup");
    let pin_dir = Path::new(DEFAULT_PIN_ROOT).join(&pod_id);
    assert!(!pin_dir.exists(), "{} was left pinned", pin_dir.display());
    assert_nothing_attached(&pod);
}

#[test]
fn cgroup2_root_is_refused() {
    require_bpffs();
    let mut pod = Pod::new();
    let cgroup = pod.cgroup().to_path_buf();
    let root_before = program_ids(cgroup2_mount());

    // Seen from inside a private cgroup namespace, the cgroup2 mount point IS the root; the kernel
    // object behind it is the pod's cgroup, so a missing refusal cannot touch the host's root.
    let out = pod.try_init_with(&cgroup, &[], InitRunner::CgroupNsRoot);

    let stderr = assert_refused(&out, "cgroup2 root");
    assert_mentions_any(&stderr, &["root"], "says it is the root cgroup");
    assert_mentions_any(
        &stderr,
        &["pod", "child", "sub"],
        "says to use the pod's own cgroup",
    );
    assert_nothing_attached(&pod);
    // Belt and braces: the host's real root gained nothing meanwhile.
    let root_after = program_ids(cgroup2_mount());
    let new: Vec<_> = root_after.difference(&root_before).collect();
    assert!(
        new.is_empty(),
        "new programs on the real cgroup2 root: {new:?}"
    );
}

fn program_ids(cgroup: &Path) -> BTreeSet<u64> {
    cgroup_programs(cgroup).iter().map(|p| p.id).collect()
}

#[test]
fn non_root_user_is_refused() {
    require_bpffs();
    let mut pod = Pod::new();
    let cgroup = pod.cgroup().to_path_buf();

    let out = pod.try_init_with(
        &cgroup,
        &[],
        InitRunner::User {
            uid: 65534,
            gid: 65534,
        },
    );

    let stderr = assert_refused(&out, "non-root user");
    assert_mentions_any(
        &stderr,
        &["root", "cap_bpf", "cap_sys_admin", "privilege"],
        "says which privilege is needed",
    );
    assert_nothing_attached(&pod);
}

#[test]
fn netns_that_is_not_a_namespace_file_is_refused() {
    require_bpffs();
    let mut pod = Pod::new();
    // A directory of ours: it opens fine, but it is not a namespace.
    let not_ns = pod.log_dir().to_string_lossy().into_owned();

    let out = pod.try_init(&["--netns", &not_ns]);

    let stderr = assert_refused(&out, "--netns that is not a namespace");
    assert_mentions_any(&stderr, &[&not_ns], "names the path");
    assert_mentions_any(&stderr, &["namespace"], "says a namespace was expected");
    assert_mentions_any(&stderr, &["/proc/", "/run/netns"], "says what to pass");
    assert_nothing_attached(&pod);
}

/// A temporary directory removed on drop, even when the test panics.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pin_root_outside_bpffs_is_a_kernel_refusal_that_leaves_nothing_attached() {
    require_bpffs();
    let mut pod = Pod::new();
    let pin_root = TempDir(std::env::temp_dir().join(format!("{}-pins", pod.name())));
    std::fs::create_dir_all(&pin_root.0)
        .unwrap_or_else(|e| panic!("create {}: {e}", pin_root.0.display()));
    let pin_root_arg = pin_root.0.to_string_lossy().into_owned();

    // /tmp is not a bpffs: the kernel refuses to pin there (after the programs were loaded, and
    // possibly attached: init must undo that).
    let out = pod.try_init(&["--pin-root", &pin_root_arg]);

    let stderr = assert_refused(&out, "pin root outside bpffs");
    assert_mentions_any(&stderr, &[&pin_root_arg], "names the pin root");
    assert_mentions_any(
        &stderr,
        &["bpf"],
        "says a bpffs is needed (e.g. mount -t bpf)",
    );
    let programs = cgroup_programs(pod.cgroup());
    assert!(
        programs.is_empty(),
        "programs were left attached: {programs:#?}"
    );
}
