//! Kernel-side debug records (aya-log) are off by default and, with `sidecar init --debug-log`,
//! reach `sidecar trace` with the destination and the decision for each connect.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sidecar_tests::{env, Pod};

/// `sidecar trace` for the pod, killed (by PID) when dropped.
struct Trace {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Trace {
    fn start(pod: &Pod) -> Trace {
        let cgroup = pod.cgroup().to_str().expect("utf-8 path").to_string();
        let mut child = Command::new(env::sidecar_bin())
            .args(["trace", "--cgroup", &cgroup])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sidecar trace");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Trace { child, lines }
    }

    /// Lines until one contains `needle` (or the deadline), all of them for the failure message.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, Vec<String>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => return Err(seen),
            }
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn debug_records_show_each_connect_decision() {
    let mut pod = Pod::new();
    let _alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    pod.init(&["--debug-log"]);
    pod.start_proxy(&[]);
    let trace = Trace::start(&pod);
    // The reader is attached once it says so; records written before would still be in the ring
    // buffer, so this only orders the output, it does not make the test depend on timing.
    trace
        .wait_for("reading debug records", Duration::from_secs(10))
        .expect("sidecar trace starts");

    let reply = pod.app_http("10.200.0.1:8080");
    assert_eq!(reply.status, 200, "{reply:?}");

    let redirected = trace.wait_for(
        "connect4 10.200.0.1:8080 redirected",
        Duration::from_secs(10),
    );
    assert!(
        redirected.is_ok(),
        "no record of the redirect; trace printed: {redirected:?}"
    );
    // The proxy's own upstream connect (UID 1337) is recorded as left alone.
    let skipped = trace.wait_for(
        "connect4 10.200.0.1:8080 left alone",
        Duration::from_secs(10),
    );
    assert!(
        skipped.is_ok(),
        "no record of the proxy's own connect; trace printed: {skipped:?}"
    );
}

#[test]
fn without_debug_log_trace_says_there_will_be_no_records() {
    let mut pod = Pod::new();
    pod.init(&[]);
    let trace = Trace::start(&pod);
    let line = trace.wait_for("reading debug records", Duration::from_secs(10));
    let line = line.expect("sidecar trace starts");
    assert!(line.contains("WITHOUT --debug-log"), "{line}");
}
