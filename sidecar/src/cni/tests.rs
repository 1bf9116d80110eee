use super::*;

fn env(command: &str, args: &str) -> CniEnv {
    CniEnv {
        command: command.into(),
        container_id: "c1".into(),
        netns: "/run/netns/x".into(),
        args: args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

const POD: &str =
    "K8S_POD_NAMESPACE=other;K8S_POD_NAME=p;K8S_POD_UID=0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";

#[test]
fn version_lists_what_is_supported() {
    let out = run(&env("VERSION", ""), r#"{"cniVersion":"1.0.0"}"#)
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("0.4.0")));
}

#[test]
fn pods_outside_the_served_namespaces_pass_through_untouched() {
    let conf = r#"{"cniVersion":"1.0.0","name":"net","type":"sidecar-cni",
        "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.2.3/24"}],"dns":{}},
        "sidecar":{"namespaces":["shop"]}}"#;
    let out = run(&env("ADD", POD), conf).unwrap().unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["ips"][0]["address"], "10.1.2.3/24",
        "prevResult is the result"
    );
    assert_eq!(run(&env("DEL", POD), conf).unwrap(), None);
    assert_eq!(run(&env("CHECK", POD), conf).unwrap(), None);
    // Not a Kubernetes pod at all.
    assert!(run(&env("ADD", ""), conf).unwrap().is_some());
}

#[test]
fn bad_input_is_a_cni_error_with_its_code() {
    let e = run(&env("ADD", POD), "{not json").unwrap_err();
    assert_eq!(e.code, 6);
    let e = run(
        &env("ADD", POD),
        r#"{"cniVersion":"1.0.0","name":"n","type":"sidecar-cni","sidecar":{"namespace":["x"]}}"#,
    )
    .unwrap_err();
    assert_eq!(e.code, 7, "{e:?}");
    assert!(
        e.details.contains("namespace"),
        "names the unknown key: {e:?}"
    );
    let e = run(
        &env("ADD", POD),
        r#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#,
    )
    .unwrap_err();
    assert_eq!(e.code, 1);
    let e = run(
        &env("ADD", POD),
        r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#,
    )
    .unwrap_err();
    assert_eq!(e.code, 7, "not chained: {e:?}");
    let e = run(
        &env("SPIN", POD),
        r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#,
    )
    .unwrap_err();
    assert_eq!(e.code, 4);
    let served = r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{},
        "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sidecar.mesh.dev/interception":"cni"}},
        "sidecar":{"namespaces":["other"],"cgroup_root":"/nonexistent-cgroup-root"}}"#;
    let e = run(&env("ADD", POD), served).unwrap_err();
    assert_eq!(e.code, 101, "{e:?}");
    let bad_flags = r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{},
        "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sidecar.mesh.dev/interception":"cni"}},
        "sidecar":{"namespaces":["other"],"init_args":["--no-such-flag"]}}"#;
    let e = run(&env("ADD", POD), bad_flags).unwrap_err();
    assert_eq!(e.code, 7, "{e:?}");
    assert!(e.details.contains("--no-such-flag"), "{e:?}");
}

/// A served pod's own annotations decide, as the runtime passes them.
fn served(annotations: Option<&str>, select: &str) -> String {
    let runtime = annotations
        .map(|a| format!(r#","runtimeConfig":{{"io.kubernetes.cri.pod-annotations":{a}}}"#))
        .unwrap_or_default();
    format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{{"ips":[]}}{runtime},
        "sidecar":{{"namespaces":["other"],"select":"{select}","cgroup_root":"/nonexistent-cgroup-root","init_args":["--exclude-inbound-ports","15021","--fail-mode-inbound=open"]}}}}"#
    )
}

#[test]
fn served_pods_are_chosen_by_their_annotations() {
    // Not annotated, or opted out: passed through (no cgroup looked for, so no error 101).
    for a in [
        r#"{}"#,
        r#"{"sidecar.mesh.dev/interception":"init"}"#,
        r#"{"sidecar.mesh.dev/interception":"cni","sidecar.mesh.dev/inject":"false"}"#,
        "null",
    ] {
        let out = run(&env("ADD", POD), &served(Some(a), "annotation"));
        assert!(out.is_ok(), "{a}: {out:?}");
        assert!(run(&env("CHECK", POD), &served(Some(a), "annotation")).is_ok());
    }
    // Annotated: taken (here it then finds no cgroup).
    let yes = r#"{"sidecar.mesh.dev/interception":"cni"}"#;
    let e = run(&env("ADD", POD), &served(Some(yes), "annotation")).unwrap_err();
    assert_eq!(e.code, 101, "{e:?}");
    // A runtime that passes no annotations: said so, with what to do.
    let e = run(&env("ADD", POD), &served(None, "annotation")).unwrap_err();
    assert_eq!(e.code, 7, "{e:?}");
    assert!(
        e.details.contains("io.kubernetes.cri.pod-annotations"),
        "{e:?}"
    );
    assert!(e.details.contains("select"), "{e:?}");
    // ...unless every pod of the namespace is taken.
    let e = run(&env("ADD", POD), &served(None, "namespace")).unwrap_err();
    assert_eq!(e.code, 101, "{e:?}");
    let e = run(&env("ADD", POD), &served(Some("{}"), "namespace")).unwrap_err();
    assert_eq!(e.code, 101, "{e:?}");
    // A bad value is refused, naming the annotation, as the injector would.
    let bad = r#"{"sidecar.mesh.dev/interception":"cni","sidecar.mesh.dev/exclude-inbound-ports":"22,http"}"#;
    let e = run(&env("ADD", POD), &served(Some(bad), "annotation")).unwrap_err();
    assert_eq!(e.code, 7, "{e:?}");
    assert!(
        e.details.contains("sidecar.mesh.dev/exclude-inbound-ports"),
        "{e:?}"
    );
    let e = run(&env("ADD", POD), r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{},"sidecar":{"select":"all"}}"#).unwrap_err();
    assert_eq!(e.code, 7, "{e:?}");
}

#[test]
fn a_pods_annotations_win_over_the_nodes_init_args() {
    let settings = Settings {
        init_args: [
            "--exclude-inbound-ports",
            "15021",
            "--fail-mode-inbound=open",
            "--exclude-outbound-ports",
            "25",
        ]
        .map(String::from)
        .to_vec(),
        ..Settings::default()
    };
    let pod = [
        (
            "--exclude-inbound-ports".to_owned(),
            "22,9000-9001".to_owned(),
        ),
        ("--fail-mode-inbound".to_owned(), "closed".to_owned()),
    ];
    let args = init_args(&settings, Path::new("/c"), "u", None, &[], false, &pod).unwrap();
    assert_eq!(args.exclude_inbound_ports, ["22", "9000-9001"]);
    assert_eq!(args.fail_mode_inbound, intercept::FailMode::Closed);
    assert_eq!(
        args.exclude_outbound_ports,
        ["25"],
        "the node's other flags stay"
    );
    let node = init_args(&settings, Path::new("/c"), "u", None, &[], false, &[]).unwrap();
    assert_eq!(node.exclude_inbound_ports, ["15021"]);
    assert_eq!(node.fail_mode_inbound, intercept::FailMode::Open);
}

#[test]
fn pod_cgroups_are_found_under_both_drivers() {
    let root = std::env::temp_dir().join(format!("cni-cg-{}", std::process::id()));
    let uid = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";
    let systemd = root.join(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0.slice",
    );
    std::fs::create_dir_all(&systemd).unwrap();
    assert_eq!(find_pod_cgroup(&root, uid), Some(systemd));
    let _ = std::fs::remove_dir_all(&root);
    let cgroupfs = root.join(format!("kubepods/besteffort/pod{uid}"));
    std::fs::create_dir_all(&cgroupfs).unwrap();
    assert_eq!(find_pod_cgroup(&root, uid), Some(cgroupfs));
    assert_eq!(
        find_pod_cgroup(&root, "ffffffff-4f50-6172-8394-a5b6c7d8e9f0"),
        None
    );
    let _ = std::fs::remove_dir_all(&root);
}
