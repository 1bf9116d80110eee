//! The Pod fixture works on its own, with no sidecar involved: the app runs in the pod's netns and
//! cgroup (as the requested user), reaches every kind of upstream directly and untouched, a test
//! thread can act from the pod netns outside the cgroup, and dropping the pod removes everything.
//! When these fail, the harness or the machine is at fault, not the sidecar.
use std::path::Path;
use std::time::Duration;

use sidecar_tests::netns::netns_path;
use sidecar_tests::{Pod, POD_IP4, POD_IP6, PROXY_GID, PROXY_UID};

#[test]
fn app_runs_in_the_pod_netns_and_cgroup_as_the_requested_user() {
    let pod = Pod::new();
    let host_netns = std::fs::read_link("/proc/self/ns/net").expect("readlink own netns");
    let cgroup_name = format!("/{}", pod.name());

    let root = pod.run_app(&["whoami"]);
    assert_eq!(root["uid"], "0");
    assert_eq!(root["cgroup"], cgroup_name.as_str(), "{root}");
    assert_ne!(
        root["netns"],
        host_netns.to_string_lossy().as_ref(),
        "{root}"
    );

    let proxy = pod.run_probe_as(Some((PROXY_UID, PROXY_GID)), &["whoami"]);
    assert!(proxy.status.success(), "{proxy:?}");
    assert_eq!(proxy.json["uid"], PROXY_UID.to_string(), "{proxy:?}");
    assert_eq!(proxy.json["gid"], PROXY_GID.to_string(), "{proxy:?}");
    assert_eq!(proxy.json["groups"], serde_json::json!([]), "{proxy:?}");
    assert_eq!(proxy.json["cgroup"], cgroup_name.as_str(), "{proxy:?}");
    assert_eq!(proxy.json["netns"], root["netns"]);
}

#[test]
fn without_the_sidecar_the_app_reaches_upstreams_directly() {
    let pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    let beta = pod.http_upstream("10.200.0.3:9090", "beta");
    let alpha6 = pod.http_upstream("[fd00:200::1]:8080", "alpha6");

    let a = pod.app_http("10.200.0.1:8080");
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "hello from alpha\n"),
        "{a:?}"
    );
    assert_eq!(a.peer, "10.200.0.1:8080");
    assert_eq!(a.header("x-upstream"), Some("alpha"));
    let b = pod.app_http("10.200.0.3:9090");
    assert_eq!(b.body, "hello from beta\n");
    let v6 = pod.app_http("[fd00:200::1]:8080");
    assert_eq!(v6.body, "hello from alpha6\n");
    assert_eq!(v6.peer, "[fd00:200::1]:8080");
    let mapped = pod.app_http("[::ffff:10.200.0.1]:8080");
    assert_eq!(mapped.body, "hello from alpha\n");
    assert_eq!(mapped.peer, "[::ffff:10.200.0.1]:8080");

    let seen = alpha.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[0].header("x-forwarded-by"), None);
    assert_eq!(
        seen[0].peer.to_string(),
        a.local,
        "alpha saw the app's own socket"
    );
    assert_eq!(seen[0].peer.ip().to_string(), POD_IP4);
    assert_eq!(alpha6.only_request().peer.ip().to_string(), POD_IP6);
    assert_eq!(beta.only_request().header("host"), Some("10.200.0.3:9090"));
}

#[test]
fn opaque_and_server_first_upstreams_work_directly() {
    let pod = Pod::new();
    let echo = pod.echo_upstream("10.200.0.1:7000", "echo");
    let greeter = pod.greeting_upstream("10.200.0.1:2525", "greeter");

    let reply = pod.app_echo("10.200.0.1:7000", 64 * 1024);
    assert!(reply.ok, "{reply:?}");
    assert_eq!(echo.only_connection().to_string(), reply.local);

    let hello = pod.app_greeting("10.200.0.1:2525", Duration::from_secs(5));
    assert_eq!(hello.line, "220 greeting");
    assert_eq!(greeter.only_connection().to_string(), hello.local);
}

#[test]
fn a_test_thread_can_act_from_the_pod_netns() {
    let pod = Pod::new();
    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");

    let reply = pod.outside_http("10.200.0.1:8080");

    assert_eq!(reply.body, "hello from alpha\n");
    assert_eq!(alpha.only_request().peer.ip().to_string(), POD_IP4);
}

#[test]
fn nothing_outside_the_namespaces_is_reachable_from_the_pod() {
    let pod = Pod::new();
    // No route out of the pod: a redirect that silently failed could not leak traffic.
    let run = pod.run_app_raw(&["http", "--connect", "192.0.2.1:80"]);
    assert!(!run.status.success(), "{run:?}");
    assert!(
        run.stdout.contains("unreachable"),
        "expected 'network unreachable': {run:?}"
    );
}

#[test]
fn dropping_the_pod_removes_its_namespaces_and_cgroup() {
    let pod = Pod::new();
    let pod_ns = netns_path(pod.pod_netns());
    let remote_ns = netns_path(pod.remote_netns());
    let cgroup = pod.cgroup().to_path_buf();
    let logs = pod.log_dir().to_path_buf();
    // Something still running in the pod when it is dropped must not stop the cleanup.
    let _alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    assert!(pod_ns.exists() && remote_ns.exists() && cgroup.is_dir() && logs.is_dir());

    drop(pod);

    for path in [&pod_ns, &remote_ns, &cgroup, &logs] {
        assert!(!Path::new(path).exists(), "{} still exists", path.display());
    }
}
