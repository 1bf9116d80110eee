//! `POST /shutdown` starts the drain like SIGTERM, but only for the proxy's own uid inside the
//! pod: from another host, or from another uid in the pod, it is 403 and changes nothing; other
//! methods are 405.
#[path = "lifecycle_support.rs"]
mod support;

use std::time::Duration;

use sidecar_tests::Pod;
use support::{admin_get, admin_request, admin_request_from_remote, PodProcess, Sidecar};

#[test]
fn shutdown_only_from_loopback() {
    let mut pod = Pod::new();
    // With inbound capture on: the admin port is never captured, so the remote client reaches
    // the admin listener directly and is seen with its own address.
    pod.init_with_netns(&[]);
    let mut sidecar = Sidecar::start(&pod, "proxy", &[]);

    let (status, body) = admin_request_from_remote(&pod, "POST", "/shutdown")
        .unwrap_or_else(|e| panic!("POST /shutdown from the remote netns: {e}"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback"), "{body}");
    // Nothing changed: still ready, still running.
    assert_eq!(
        admin_request_from_remote(&pod, "GET", "/ready"),
        Ok((200, "ready\n".into()))
    );
    assert!(sidecar.try_status().is_none());
    assert!(sidecar.log().contains("refused POST /shutdown"));

    let (status, _) = admin_get(&pod, "/shutdown").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 405);
    assert!(sidecar.try_status().is_none());

    // Root in the pod, on loopback: not the proxy's uid.
    let (status, body) = admin_request(&pod, "POST", "/shutdown").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("own uid (1337)") && body.contains("uid 0"),
        "{body}"
    );
    assert!(sidecar.try_status().is_none());

    let (status, _, stderr) =
        PodProcess::sidecar_as_proxy(&pod, &["shutdown"]).wait(Duration::from_secs(15));
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
    let status = sidecar.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}:\n{}", sidecar.log());
    assert!(
        sidecar.log().contains("POST /shutdown from 127.0.0.1"),
        "{}",
        sidecar.log()
    );
}
