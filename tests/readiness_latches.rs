//! `/ready` turns 200 only when every configured condition holds: the listeners are bound, the
//! pod's interception is attached (`--pin-dir`: the link pins `sidecar init` makes), and the app
//! answers its probe (`--app-probe`); it says which ones do not. `/live` only needs the
//! listeners. Without `--pin-dir` the interception is not checked, and `/config` says so.
#[path = "lifecycle_support.rs"]
mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use sidecar_tests::metrics::metrics;
use sidecar_tests::Pod;
use support::{admin_get, wait_for, Sidecar};

const WAIT: Duration = Duration::from_secs(20);

fn ready(pod: &Pod) -> (u16, String) {
    admin_get(pod, "/ready").unwrap_or_else(|e| panic!("GET /ready: {e}"))
}

#[test]
fn ready_only_after_init_listeners_and_app() {
    let mut pod = Pod::new();
    // Where `sidecar init` will pin for this pod (default pin root, pod id "cg<cgroup inode>").
    let inode = fs::metadata(pod.cgroup())
        .unwrap_or_else(|e| panic!("stat the pod cgroup: {e}"))
        .ino();
    let pin_dir = format!("/sys/fs/bpf/sidecar/cg{inode}");

    // Before the listeners: nothing answers at all, which a probe reads as not ready.
    assert!(admin_get(&pod, "/ready").is_err());

    let sidecar = Sidecar::start(
        &pod,
        "proxy",
        &[
            "--inbound",
            "none",
            "--pin-dir",
            &pin_dir,
            "--app-probe",
            "http://127.0.0.1:8080/healthz",
            "--app-probe-interval",
            "100ms",
        ],
    );
    assert_eq!(admin_get(&pod, "/live"), Ok((200, "live\n".into())));
    // Listeners bound; neither init nor the app.
    wait_for(WAIT, "both unmet conditions reported", || {
        let (status, body) = ready(&pod);
        status == 503
            && body.contains("interception: nothing attached")
            && body.contains("app: http://127.0.0.1:8080/healthz:")
    });

    pod.init(&[]);
    // `init` makes the stats map pin readable (0444) for the proxy; make it root-only again, as
    // on kernels before 6.5 where an unprivileged read-only open is refused anyway, to check
    // the proxy's behaviour when it cannot read the kernel counters.
    let stats = format!("{pin_dir}/map_SC_STATS");
    fs::set_permissions(&stats, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {stats}: {e}"));
    wait_for(WAIT, "interception seen once init has run", || {
        let (status, body) = ready(&pod);
        status == 503 && !body.contains("interception") && body.contains("app:")
    });

    let app = pod.app_http_server("127.0.0.1:8080", "app");
    wait_for(WAIT, "ready once the app answers", || {
        ready(&pod) == (200, "ready\n".into())
    });
    assert!(
        !app.requests().is_empty() && app.requests().iter().all(|r| r.path == "/healthz"),
        "the app was probed at its health path: {:?}",
        app.requests()
    );

    // The app going away makes the pod unready again.
    drop(app);
    wait_for(WAIT, "not ready once the app stops answering", || {
        let (status, body) = ready(&pod);
        status == 503 && body.contains("app:")
    });
    assert_eq!(admin_get(&pod, "/live"), Ok((200, "live\n".into())));

    let (status, config) = admin_get(&pod, "/config").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200);
    let config: serde_json::Value =
        serde_json::from_str(&config).unwrap_or_else(|e| panic!("/config is JSON ({e}): {config}"));
    assert_eq!(
        config["readiness"]["interception"],
        format!("required: link pins in {pin_dir}")
    );
    assert_eq!(
        config["readiness"]["app"],
        "required: http://127.0.0.1:8080/healthz"
    );

    // The stats map pin is root-only (above): the proxy cannot read it, exports no kernel
    // counters, and says why once.
    let text = metrics(&pod);
    assert!(!text.contains("sidecar_ebpf_events_total"), "{text}");
    wait_for(WAIT, "the reason is logged", || {
        sidecar.log().contains("kernel counters are not exported")
    });
    let _ = metrics(&pod);
    assert_eq!(
        sidecar
            .log()
            .matches("kernel counters are not exported")
            .count(),
        1,
        "logged once"
    );
}

#[test]
fn without_pin_dir_or_probe_only_the_listeners_count() {
    let pod = Pod::new();
    let _sidecar = Sidecar::start(&pod, "proxy", &["--inbound", "none"]);
    assert_eq!(admin_get(&pod, "/ready"), Ok((200, "ready\n".into())));
    let (_, config) = admin_get(&pod, "/config").unwrap_or_else(|e| panic!("{e}"));
    let config: serde_json::Value =
        serde_json::from_str(&config).unwrap_or_else(|e| panic!("/config is JSON ({e}): {config}"));
    assert_eq!(
        config["readiness"]["interception"],
        "not checked (no --pin-dir)"
    );
    assert_eq!(config["readiness"]["app"], "not checked (no --app-probe)");
    assert_eq!(config["ebpf_counters"], "not exported (no --pin-dir)");
    assert_eq!(
        config["admin"],
        serde_json::json!(["0.0.0.0:15090", "[::]:15090"])
    );
}
