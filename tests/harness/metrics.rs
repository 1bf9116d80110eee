//! Reading the proxy's Prometheus exposition in tests: one place for the fetch and the parse.
use std::net::SocketAddr;
use std::time::Duration;

use crate::{client, netns, poll_until, Pod};

/// The proxy's admin port inside the pod.
pub const ADMIN_PORT: u16 = 15090;

/// The proxy's `/metrics`, read from the pod's network namespace by a thread outside the pod
/// cgroup (so the request is not intercepted). Waits for the admin listener; panics unless it
/// answers 200.
pub fn metrics(pod: &Pod) -> String {
    admin_get(pod, "/metrics")
}

/// `GET path` on the proxy's admin port (as [`metrics`] does); the body of its 200.
pub fn admin_get(pod: &Pod, path: &'static str) -> String {
    let admin = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
    let fetched = poll_until(Duration::from_secs(10), || {
        netns::in_netns(pod.pod_netns(), move || {
            client::http_get(admin, path, None).ok()
        })
        .unwrap_or_else(|e| panic!("enter netns {}: {e}", pod.pod_netns()))
        .filter(|reply| reply.status == 200)
    });
    match fetched {
        Some(reply) => reply.body,
        None => panic!("GET {path} from the admin port did not answer 200 within 10s"),
    }
}

/// The value of `name{labels}` in the pod's `/metrics`, 0 if absent.
pub fn value(pod: &Pod, series_name: &str) -> f64 {
    series(&metrics(pod), series_name).unwrap_or(0.0)
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}
