//! `sidecar init` is idempotent (running it again, as a restarted init container would, leaves
//! exactly one program per attach type on the pod cgroup), and `sidecar init --remove` detaches all
//! of them and removes the pod's pin directory.
use std::collections::BTreeMap;

use sidecar_tests::bpf::{cgroup_programs, default_pin_dir, EXPECTED_ATTACH_TYPES};
use sidecar_tests::Pod;

#[test]
fn init_twice_attaches_each_program_once_and_remove_leaves_nothing() {
    let mut pod = Pod::new();
    let pin_dir = default_pin_dir(pod.cgroup());

    pod.init(&[]);
    pod.init(&[]);

    let programs = cgroup_programs(pod.cgroup());
    let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
    for program in &programs {
        *per_type.entry(program.attach_type.as_str()).or_default() += 1;
    }
    for attach_type in EXPECTED_ATTACH_TYPES {
        assert_eq!(
            per_type.get(attach_type).copied().unwrap_or(0),
            1,
            "after two inits, exactly one {attach_type} program on {}: {programs:#?}",
            pod.cgroup().display()
        );
    }
    for (attach_type, count) in &per_type {
        assert_eq!(
            *count, 1,
            "{attach_type} attached {count} times: {programs:#?}"
        );
    }
    assert!(
        pin_dir.is_dir(),
        "init pins under {} (pin root + cg<cgroup inode>)",
        pin_dir.display()
    );

    let removed = pod.remove();
    assert!(
        removed.status.success(),
        "init --remove failed ({}): {}",
        removed.status,
        String::from_utf8_lossy(&removed.stderr)
    );
    let left = cgroup_programs(pod.cgroup());
    assert!(
        left.is_empty(),
        "programs left on the cgroup after --remove: {left:#?}"
    );
    assert!(
        !pin_dir.exists(),
        "pin dir {} still exists after --remove",
        pin_dir.display()
    );
}
