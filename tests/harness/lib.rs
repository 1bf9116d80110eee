//! Test harness for the sidecar's privileged integration tests: a `Pod` fixture (network namespaces
//! joined by a veth, a cgroup2 directory of its own, cleanup on drop), mock upstream servers living in
//! the "remote" namespace, the probe app's client code and output types, and polling helpers.
//!
//! Everything here follows /work/shared/testing.md: traffic only goes to addresses inside
//! namespaces the fixture made, programs are only ever attached to a cgroup the fixture made, and the
//! fixture removes all of it even when the test panics.
//!
//! A test reads as a short story:
//! ```no_run
//! use sidecar_tests::Pod;
//! let mut pod = Pod::new();
//! let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
//! pod.init(&[]);
//! pod.start_proxy(&[]);
//! let reply = pod.app_http("10.200.0.1:8080");
//! assert_eq!(alpha.only_request().header("x-forwarded-by"), Some("sidecar"));
//! # let _ = reply;
//! ```
//!
//! Inbound, the app's server lives in the pod's netns and the client in the remote one:
//! ```no_run
//! use sidecar_tests::Pod;
//! let mut pod = Pod::new();
//! let app = pod.app_http_server("0.0.0.0:8080", "app");
//! pod.init_with_netns(&[]);
//! pod.start_proxy_with_inbound(&[]);
//! let reply = pod.remote_http("10.200.0.2:8080");
//! assert_eq!(app.only_request().peer.ip().to_string(), "127.0.0.6");
//! pod.stop_proxy(); // fail modes: what happens with no proxy; start_proxy* again to restart
//! # let _ = reply;
//! ```

pub mod bpf;
pub mod client;
pub mod env;
pub mod mesh;
pub mod metrics;
pub mod netns;
mod pod;
pub mod status;
pub mod upstream;
pub mod wire;

use std::time::{Duration, Instant};

pub use client::{EchoReply, GreetingReply, GrpcReply, HttpReply, IdleReply, WebSocketReply};
pub use pod::{
    AppRun, InitRunner, Pod, INBOUND_PORT, POD_IP4, POD_IP6, PROXY_GID, PROXY_UID, REMOTE_IP4,
    REMOTE_IP6,
};
pub use status::{Counters, Status};
pub use upstream::{SeenRequest, Upstream};

/// How often `eventually` re-checks its condition. Short, because every caller waits on something
/// that normally happens within milliseconds; the deadline is what bounds the wait.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `condition` until it returns true or `timeout` passes; returns whether it became true.
/// Use this instead of sleeping for "long enough".
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    poll_until(timeout, || condition().then_some(())).is_some()
}

/// Polls `probe` until it yields a value or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// `assert_eventually!(timeout, condition, "message {}", args)`: panics with the message when the
/// condition has not become true before the timeout.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {
        if !$crate::eventually($timeout, || $cond) {
            panic!($($msg)+);
        }
    };
}
