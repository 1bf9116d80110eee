//! `sidecar status` reports what the kernel has: every program with its link and program ids and
//! its attach point (the pod's cgroup, the pod's netns), the configuration read back from the
//! loaded programs, and the counters, which move with the traffic the test makes. Its account is
//! checked against bpftool's, not only against itself.
use std::collections::BTreeSet;

use sidecar_tests::bpf::{cgroup_programs, inode, links};
use sidecar_tests::Pod;

const CGROUP_PROGRAMS: [&str; 10] = [
    "sc_connect4",
    "sc_connect6",
    "sc_sockops",
    "sc_getsockopt",
    "sc_getpeername4",
    "sc_getpeername6",
    "sc_getsockname4",
    "sc_getsockname6",
    "sc_post_bind4",
    "sc_post_bind6",
];

#[test]
fn status_lists_programs_with_their_attach_points_and_the_config_in_force() {
    let mut pod = Pod::new();
    pod.init_with_netns(&[
        "--exclude-inbound-ports",
        "9000,9100-9102",
        "--fail-mode-outbound",
        "open",
    ]);
    let cgroup_id = inode(pod.cgroup());
    let netns_ino = inode(&pod.netns_path());

    let status = pod.status();

    assert_eq!(status.cgroup_id, cgroup_id);
    let names: BTreeSet<&str> = status.programs.iter().map(|p| p.name.as_str()).collect();
    let redirect = sidecar_tests::env::msg_redirect_everywhere();
    let expected: BTreeSet<&str> = CGROUP_PROGRAMS
        .into_iter()
        .chain(["sc_sk_lookup"])
        .chain(redirect.then_some("sc_msg_redirect"))
        .collect();
    assert_eq!(names, expected, "{:#?}", status.programs);
    for name in CGROUP_PROGRAMS {
        assert_eq!(
            status.program(name).target,
            format!("cgroup {cgroup_id}"),
            "{name} is attached to the pod's cgroup"
        );
    }
    let sk_lookup = status.program("sc_sk_lookup");
    assert_eq!(
        sk_lookup.target,
        format!("netns {netns_ino}"),
        "sk_lookup is attached to the pod's netns"
    );
    assert!(sk_lookup.attach.contains("sk_lookup"), "{sk_lookup:?}");

    // The kernel's view (bpftool) agrees on every link and program id.
    let kernel_links = links();
    for program in &status.programs {
        let link = kernel_links
            .iter()
            .find(|l| l.id == program.link_id)
            .unwrap_or_else(|| panic!("bpftool shows no link {}: {program:?}", program.link_id));
        assert_eq!(link.prog_id, program.prog_id, "{program:?} vs {link:?}");
        if program.name == "sc_sk_lookup" {
            assert_eq!(link.netns_ino, Some(netns_ino), "{link:?}");
        } else if program.name == "sc_msg_redirect" {
            assert!(program.target.starts_with("sockhash "), "{program:?}");
        } else {
            assert_eq!(link.cgroup_id, Some(cgroup_id), "{link:?}");
        }
    }
    let on_cgroup: BTreeSet<u64> = cgroup_programs(pod.cgroup()).iter().map(|p| p.id).collect();
    let reported: BTreeSet<u64> = status
        .programs
        .iter()
        .filter(|p| p.name != "sc_sk_lookup" && p.name != "sc_msg_redirect")
        .map(|p| p.prog_id)
        .collect();
    assert_eq!(
        reported, on_cgroup,
        "program ids: sidecar status vs bpftool cgroup show"
    );

    for (key, value) in [
        ("fail_mode_outbound", "open"),
        ("fail_mode_inbound", "closed"),
        ("exclude_inbound_ports", "9000,9100-9102"),
        ("inbound_port", "15006"),
        ("outbound_port", "15001"),
        ("admin_port", "15090"),
        ("proxy_uid", "1337"),
        ("pod_ips", "10.200.0.2,fd00:200::2"),
    ] {
        assert_eq!(status.config(key), value, "config {key}");
    }
}

#[test]
fn status_counters_move_with_the_traffic_and_show_in_the_table() {
    let mut pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    let probes = pod.app_http_server("0.0.0.0:9000", "kubelet-probes");
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&["--exclude-inbound-ports", "9000"]);
    pod.start_proxy(&[]);
    let before = pod.status().counters;

    let outbound = pod.app_http("10.200.0.1:8080");
    let loopback = pod.app_http("127.0.0.1:8080");
    let excluded = pod.remote_http("10.200.0.2:9000");

    assert_eq!(outbound.header("x-upstream"), Some("alpha"), "{outbound:?}");
    assert_eq!(
        alpha.only_request().header("x-forwarded-by"),
        Some("sidecar")
    );
    assert_eq!(loopback.status, 200, "{loopback:?}");
    assert_eq!(excluded.status, 200, "{excluded:?}");
    assert_eq!(probes.requests().len(), 1);
    assert_eq!(app.only_request().header("x-forwarded-by"), None);

    let after = pod.status().counters;
    let moved = after.since(&before);
    for (name, expected) in [
        // app -> alpha: rewritten to the proxy, keyed by 4-tuple, answered to the proxy's
        // SO_ORIGINAL_DST, and the app's getpeername() shown the original destination.
        ("redirected", 1),
        ("tuple_saved", 1),
        ("sockopt_hit", 1),
        // app -> 127.0.0.1:8080.
        ("skip_loopback", 1),
        // remote -> pod:9000 (excluded).
        ("inbound_skip_port", 1),
        ("inbound_redirected", 0),
        ("map_error", 0),
    ] {
        assert_eq!(
            moved.get(name),
            expected,
            "counter {name} moved by {}; all that moved: {:?}",
            moved.get(name),
            moved.nonzero()
        );
    }
    assert!(
        moved.get("peername_rewritten") >= 1 && moved.get("skip_proxy_uid") >= 1,
        "the app's getpeername() and the proxy's own connect to alpha: {:?}",
        moved.nonzero()
    );

    let table = pod.status_table();
    for name in CGROUP_PROGRAMS.into_iter().chain(["sc_sk_lookup"]) {
        assert!(table.contains(name), "table lacks {name}:\n{table}");
    }
    for (name, value) in &after.0 {
        let shown = table.lines().any(|l| {
            l.split_whitespace().collect::<Vec<_>>() == [name.as_str(), &value.to_string()]
        });
        assert!(shown, "table lacks the line `{name} {value}`:\n{table}");
    }
}
