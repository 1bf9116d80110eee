//! Unit tests of [`super`] (`inject/pod.rs`).
use super::*;

#[test]
fn quantities() {
    assert_eq!(quantity("250m"), Some(0.25));
    assert_eq!(quantity("1"), Some(1.0));
    assert_eq!(quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
    assert_eq!(quantity("1e3"), Some(1000.0));
    assert_eq!(quantity("1.5Gi"), Some(1.5 * 1024f64.powi(3)));
    assert_eq!(quantity("lots"), None);
    assert_eq!(quantity("10MB"), None);
    assert_eq!(quantity("-1"), None);
}

#[test]
fn value_checks() {
    assert!(check(Kind::Ports, "22, 9000-9010").is_ok());
    assert!(check(Kind::Ports, "0").is_err());
    assert!(check(Kind::Ports, "9010-9000").is_err());
    assert!(check(Kind::Ports, "http").is_err());
    assert!(check(Kind::Cidrs, "10.0.0.0/8,fd00::/8").is_ok());
    assert!(check(Kind::Cidrs, "10.0.0.0/33").is_err());
    assert!(check(Kind::FailMode, "open").is_ok());
    assert!(check(Kind::FailMode, "Open").is_err());
    assert!(check(Kind::AppProbe, "http://127.0.0.1:8080/healthz").is_ok());
    assert!(check(Kind::AppProbe, "tcp://127.0.0.1:5432").is_ok());
    assert!(check(Kind::AppProbe, "127.0.0.1:8080").is_err());
    assert!(check(Kind::AppProbe, "http://127.0.0.1/healthz").is_err());
}

#[test]
fn proxy_pin_dir_is_the_pod_uid_below_the_mounted_pin_root() {
    let annotations = Annotations::new(Vec::new());
    let s = Settings::from_annotations(&annotations, "sidecar:test", "web").unwrap();
    let proxy = proxy_container(&s);
    let env = proxy.get("env").and_then(Node::items).unwrap();
    let names: Vec<_> = env
        .iter()
        .filter_map(|e| e.get("name").and_then(Node::as_str))
        .collect();
    // $(POD_UID) is only expanded when POD_UID comes first.
    let uid = names.iter().position(|n| *n == "POD_UID").unwrap();
    let dir = names.iter().position(|n| *n == "SIDECAR_PIN_DIR").unwrap();
    assert!(uid < dir, "{names:?}");
    assert_eq!(
        env[dir].get("value").and_then(Node::as_str),
        Some("/host/sys/fs/bpf/sidecar/$(POD_UID)")
    );
    let mount = &proxy.get("volumeMounts").and_then(Node::items).unwrap()[0];
    assert_eq!(
        mount.get("mountPath").and_then(Node::as_str),
        Some(PROXY_PIN_ROOT_MOUNT)
    );
    assert!(mount.get("readOnly").is_some_and(Node::is_true));
    assert!(!names.contains(&"SIDECAR_APP_PROBE"));
}

/// `sidecar.mesh.dev/config-map`: the ConfigMap is mounted as a directory (never `subPath`, which
/// the kubelet does not update) and `SIDECAR_CONFIG` points into it; re-injecting without the
/// annotation removes the volume again.
#[test]
fn a_config_map_is_mounted_as_a_directory() {
    let pod = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n{annotations}spec:\n  containers:\n  - name: app\n    image: app:1\n"
        )
    };
    let with = crate::inject::inject(
        &pod("  annotations:\n    sidecar.mesh.dev/config-map: web-policy\n"),
        "sidecar:test",
    )
    .unwrap();
    let out = &with.output;
    assert!(
        out.contains("name: SIDECAR_CONFIG\n")
            && out.contains("value: /etc/sidecar/config/policy.toml"),
        "{out}"
    );
    assert!(
        out.contains("configMap:\n") && out.contains("name: web-policy"),
        "{out}"
    );
    assert!(out.contains("mountPath: /etc/sidecar/config"), "{out}");
    let proxy = proxy_container(&Settings {
        config_map: Some("web-policy".into()),
        ..Settings::from_annotations(&Annotations::new(Vec::new()), "sidecar:test", "web").unwrap()
    });
    let mounts = proxy.get("volumeMounts").and_then(Node::items).unwrap();
    let config = mounts
        .iter()
        .find(|m| m.get("name").and_then(Node::as_str) == Some(CONFIG_VOLUME))
        .unwrap();
    assert!(config.get("subPath").is_none(), "a directory mount");

    // Re-injected without the annotation: no volume, no variable.
    let without = out.replace("    sidecar.mesh.dev/config-map: web-policy\n", "");
    let again = crate::inject::inject(&without, "sidecar:test").unwrap();
    assert!(!again.output.contains("sidecar-config"), "{}", again.output);
    assert!(!again.output.contains("SIDECAR_CONFIG"), "{}", again.output);

    let bad = crate::inject::inject(
        &pod("  annotations:\n    sidecar.mesh.dev/config-map: Web_Policy\n"),
        "sidecar:test",
    )
    .unwrap_err();
    assert!(
        bad.iter()
            .any(|e| e.contains("config-map") && e.contains("object name")),
        "{bad:?}"
    );
}

/// An app container running as the proxy's uid or gid (its own setting or the pod's) is refused.
#[test]
fn app_containers_may_not_run_as_the_proxy() {
    let pod = |security: &str, container: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n{security}  containers:\n  - name: app\n    image: app:1\n{container}"
        )
    };
    let refused = crate::inject::inject(
        &pod("  securityContext:\n    runAsGroup: 1337\n", ""),
        "sidecar:test",
    )
    .unwrap_err();
    assert!(
        refused
            .iter()
            .any(|e| e.contains("container app runs as gid 1337")),
        "{refused:?}"
    );
    let refused = crate::inject::inject(
        &pod("", "    securityContext:\n      runAsUser: 1337\n"),
        "sidecar:test",
    )
    .unwrap_err();
    assert!(
        refused
            .iter()
            .any(|e| e.contains("uid 1337") && e.contains("runAsUser")),
        "{refused:?}"
    );
    // The container's own setting wins over the pod's.
    assert!(crate::inject::inject(
        &pod(
            "  securityContext:\n    runAsUser: 1337\n",
            "    securityContext:\n      runAsUser: 1000\n"
        ),
        "sidecar:test"
    )
    .is_ok());
}

/// `identity: csi-spiffe` mounts a csi-driver-spiffe volume (files owned by the proxy's group),
/// `identity-secret` a TLS Secret; either sets `SIDECAR_IDENTITY_DIR` in the proxy only.
#[test]
fn the_identity_volume_is_mounted_in_the_proxy_only() {
    let pod = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n{annotations}spec:\n  containers:\n  - name: app\n    image: app:1\n"
        )
    };
    let csi = crate::inject::inject(
        &pod("    sidecar.mesh.dev/identity: csi-spiffe\n"),
        "sidecar:test",
    )
    .unwrap()
    .output;
    assert!(csi.contains("driver: spiffe.csi.cert-manager.io"), "{csi}");
    assert!(
        csi.contains("csi.cert-manager.io/fs-group: \"1337\""),
        "{csi}"
    );
    assert!(
        csi.contains("name: SIDECAR_IDENTITY_DIR\n")
            && csi.contains(&format!("value: {IDENTITY_MOUNT}")),
        "{csi}"
    );
    assert_eq!(
        csi.matches(&format!("mountPath: {IDENTITY_MOUNT}")).count(),
        1
    );
    let secret = crate::inject::inject(
        &pod("    sidecar.mesh.dev/identity-secret: web-tls\n"),
        "sidecar:test",
    )
    .unwrap()
    .output;
    assert!(secret.contains("secretName: web-tls"), "{secret}");
    // Re-injected without it: gone.
    let without = secret.replace("    sidecar.mesh.dev/identity-secret: web-tls\n", "");
    let again = crate::inject::inject(&without, "sidecar:test")
        .unwrap()
        .output;
    assert!(!again.contains(IDENTITY_VOLUME), "{again}");
    assert!(!again.contains("SIDECAR_IDENTITY_DIR"), "{again}");
    for bad in [
        "    sidecar.mesh.dev/identity: spire\n",
        "    sidecar.mesh.dev/identity: csi-spiffe\n    sidecar.mesh.dev/identity-secret: web-tls\n",
    ] {
        let errors = crate::inject::inject(&pod(bad), "sidecar:test").unwrap_err();
        assert!(errors.iter().any(|e| e.contains("identity")), "{errors:?}");
    }
}

#[test]
fn cni_interception_injects_only_the_proxy() {
    let pod = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n{annotations}spec:\n  containers:\n  - name: app\n    image: app:1\n"
        )
    };
    let out = crate::inject::inject(
        &pod("    sidecar.mesh.dev/interception: cni\n"),
        "sidecar:test",
    )
    .unwrap()
    .output;
    assert!(out.contains("name: sidecar-proxy"), "{out}");
    assert!(!out.contains("sidecar-init"), "no init container: {out}");
    assert!(
        !out.contains("SYS_ADMIN"),
        "no privileges in the pod: {out}"
    );
    assert!(
        !out.contains("path: /sys/fs/cgroup"),
        "no cgroup tree: {out}"
    );
    assert!(
        out.contains("path: /sys/fs/bpf"),
        "the pin root stays, for /ready: {out}"
    );
    // Re-injecting an init-mode pod in cni mode drops its init container.
    let init = crate::inject::inject(
        &pod("    sidecar.mesh.dev/inject: \"true\"\n"),
        "sidecar:test",
    )
    .unwrap()
    .output;
    assert!(init.contains("sidecar-init"));
    let again = crate::inject::inject(
        &init.replace(
            "sidecar.mesh.dev/inject: \"true\"",
            "sidecar.mesh.dev/interception: cni",
        ),
        "sidecar:test",
    )
    .unwrap()
    .output;
    assert!(!again.contains("sidecar-init"), "{again}");
    assert!(!again.contains("path: /sys/fs/cgroup"), "{again}");
    // Init settings in cni mode are kept on the pod: the node's plugin reads them from there.
    let with_ports = crate::inject::inject(
        &pod("    sidecar.mesh.dev/interception: cni\n    sidecar.mesh.dev/exclude-inbound-ports: \"22\"\n"),
        "sidecar:test",
    )
    .unwrap()
    .output;
    assert!(
        with_ports.contains("sidecar.mesh.dev/exclude-inbound-ports: \"22\""),
        "{with_ports}"
    );
    assert!(!with_ports.contains("sidecar-init"), "{with_ports}");
    // ...and checked by the same table the plugin uses.
    let errors = crate::inject::inject(
        &pod("    sidecar.mesh.dev/interception: cni\n    sidecar.mesh.dev/exclude-inbound-ports: \"ssh\"\n"),
        "sidecar:test",
    )
    .unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("exclude-inbound-ports")),
        "{errors:?}"
    );
    let plugin = pod_interception(
        [
            ("sidecar.mesh.dev/interception", "cni"),
            ("sidecar.mesh.dev/exclude-inbound-ports", " 22 "),
            ("sidecar.mesh.dev/proxy-cpu-limit", "1"),
            ("other/annotation", "x"),
        ]
        .into_iter(),
    )
    .unwrap();
    assert!(plugin.cni && !plugin.opted_out);
    assert_eq!(
        plugin.init_flags,
        [("--exclude-inbound-ports".to_owned(), "22".to_owned())]
    );
    // On/off annotations reach init as `true` / `false`, whatever word the pod used.
    let plugin =
        pod_interception([("sidecar.mesh.dev/msg-redirect", "Enabled")].into_iter()).unwrap();
    assert_eq!(
        plugin.init_flags,
        [("--msg-redirect".to_owned(), "true".to_owned())]
    );
    let out = crate::inject::inject(
        &pod("    sidecar.mesh.dev/msg-redirect: disabled\n"),
        "sidecar:test",
    )
    .unwrap()
    .output;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let at = lines
        .iter()
        .position(|l| *l == "- name: SIDECAR_MSG_REDIRECT")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(lines[at + 1], "value: \"false\"", "{out}");
    let errors = pod_interception([("sidecar.mesh.dev/fail-mode-inbound", "maybe")].into_iter())
        .unwrap_err();
    assert!(
        errors[0].contains("sidecar.mesh.dev/fail-mode-inbound"),
        "{errors:?}"
    );
    let errors = crate::inject::inject(
        &pod("    sidecar.mesh.dev/interception: ebpf\n"),
        "sidecar:test",
    )
    .unwrap_err();
    assert!(errors.iter().any(|e| e.contains("\"init\"")), "{errors:?}");
}
