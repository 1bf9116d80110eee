//! The lifecycle commands against a running sidecar: `sidecar wait-ready` returns once the
//! sidecar is ready (and gives up at its timeout, saying why), `sidecar shutdown` makes it drain
//! and exit (and succeeds when it is already gone, as a Job's last step wants); and the sidecar
//! exits on its own when the app does (`--exit-with-app PID|PIDFILE`) or when the app's
//! shutdown file appears (`--shutdown-file`).
#[path = "lifecycle_support.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use sidecar_tests::Pod;
use support::{admin_get, sidecar_in_pod, wait_for, PodProcess, Sidecar};

const EXIT: Duration = Duration::from_secs(15);

#[test]
fn wait_ready_returns_once_the_app_is_ready() {
    let pod = Pod::new();
    let _sidecar = Sidecar::start(
        &pod,
        "proxy",
        &[
            "--inbound",
            "none",
            "--app-probe",
            "tcp://127.0.0.1:8080",
            "--app-probe-interval",
            "100ms",
        ],
    );
    let mut waiter = PodProcess::sidecar(&pod, &["wait-ready", "--timeout", "60s"]);
    wait_for(
        Duration::from_secs(20),
        "the sidecar reports the app",
        || {
            admin_get(&pod, "/ready")
                .is_ok_and(|(status, body)| status == 503 && body.contains("app:"))
        },
    );
    assert!(
        waiter.try_status().is_none(),
        "wait-ready must wait while not ready"
    );

    let _app = pod.app_http_server("127.0.0.1:8080", "app");
    let (status, _, stderr) = waiter.wait(Duration::from_secs(30));
    assert!(status.success(), "wait-ready: {status}: {stderr}");
    assert!(stderr.contains("is ready"), "{stderr}");
}

#[test]
fn wait_ready_gives_up_at_its_timeout() {
    let pod = Pod::new();
    let _sidecar = Sidecar::start(
        &pod,
        "proxy",
        &["--inbound", "none", "--app-probe", "tcp://127.0.0.1:8080"],
    );
    let (status, _, stderr) = sidecar_in_pod(&pod, &["wait-ready", "--timeout", "1s"], EXIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not ready after") && stderr.contains("app: tcp://127.0.0.1:8080"),
        "{stderr}"
    );
}

#[test]
fn shutdown_command_stops_the_sidecar() {
    let pod = Pod::new();
    let mut sidecar = Sidecar::start(&pod, "proxy", &["--inbound", "none"]);
    // Another uid in the pod (root here) is refused: only the proxy's own uid may stop it.
    let (status, _, stderr) = sidecar_in_pod(&pod, &["shutdown"], EXIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("own uid (1337)"), "{stderr}");
    assert!(sidecar.try_status().is_none(), "still running");
    let (status, _, stderr) = PodProcess::sidecar_as_proxy(&pod, &["shutdown"]).wait(EXIT);
    assert!(status.success(), "sidecar shutdown: {status}: {stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
    let exit = sidecar.wait_exit(EXIT);
    assert!(exit.success(), "exit status {exit}:\n{}", sidecar.log());

    // Already gone: still a success, so a Job's `app; sidecar shutdown` does not fail for it.
    let (status, _, stderr) = sidecar_in_pod(&pod, &["shutdown"], EXIT);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("already stopped"), "{stderr}");
}

#[test]
fn exits_with_the_app_process() {
    let pod = Pod::new();
    let app = PodProcess::spawn(&pod, Path::new("/bin/sleep"), &["300"]);
    let pid = app.pid().to_string();
    let mut sidecar = Sidecar::start(
        &pod,
        "proxy",
        &["--inbound", "none", "--exit-with-app", &pid],
    );
    assert!(sidecar.try_status().is_none());
    drop(app); // kills and reaps it
    let exit = sidecar.wait_exit(EXIT);
    assert!(exit.success(), "exit status {exit}:\n{}", sidecar.log());
    assert!(
        sidecar
            .log()
            .contains(&format!("the app (pid {pid}) exited")),
        "{}",
        sidecar.log()
    );
}

#[test]
fn exits_with_the_app_named_by_a_pidfile() {
    let pod = Pod::new();
    let pidfile = pod.log_dir().join("app.pid");
    let mut sidecar = Sidecar::start(
        &pod,
        "proxy",
        &[
            "--inbound",
            "none",
            "--exit-with-app",
            &pidfile.display().to_string(),
            "--app-probe-interval",
            "100ms",
        ],
    );
    // The app starts after the sidecar and writes its pidfile.
    let app = PodProcess::spawn(&pod, Path::new("/bin/sleep"), &["300"]);
    fs::write(&pidfile, format!("{}\n", app.pid()))
        .unwrap_or_else(|e| panic!("write {}: {e}", pidfile.display()));
    wait_for(
        Duration::from_secs(20),
        "the sidecar found the pidfile",
        || sidecar.log().contains("watching the app"),
    );
    assert!(sidecar.try_status().is_none());
    drop(app);
    let exit = sidecar.wait_exit(EXIT);
    assert!(exit.success(), "exit status {exit}:\n{}", sidecar.log());
}

#[test]
fn exits_when_the_shutdown_file_appears() {
    let pod = Pod::new();
    let done = pod.log_dir().join("done");
    let mut sidecar = Sidecar::start(
        &pod,
        "proxy",
        &[
            "--inbound",
            "none",
            "--shutdown-file",
            &done.display().to_string(),
            "--app-probe-interval",
            "100ms",
        ],
    );
    assert!(sidecar.try_status().is_none());
    fs::write(&done, b"").unwrap_or_else(|e| panic!("create {}: {e}", done.display()));
    let exit = sidecar.wait_exit(EXIT);
    assert!(exit.success(), "exit status {exit}:\n{}", sidecar.log());
    assert!(sidecar.log().contains("appeared"), "{}", sidecar.log());
}
