//! The log forwarder also runs inside `sidecar run` (`--logs-*` flags, `SIDECAR_LOGS_*`), so one
//! sidecar container can proxy and ship the app's log; on SIGTERM the proxy drains, then the
//! forwarder sends what it has read and the process exits 0. Bad `--logs-*` values are reported
//! with the proxy's own, all at once.
#[path = "logs_support.rs"]
mod support;

use std::fs::File;
use std::process::{Command, Stdio};

use sidecar_tests::env::sidecar_bin;
use sidecar_tests::{eventually, poll_until};
use support::{Collector, Scratch, Writer, WAIT};

/// `sidecar run` in reverse-proxy mode on an ephemeral loopback port (no interception, no admin
/// port: nothing here needs privileges or fixed ports), with the forwarder on.
fn run_with_logs(scratch: &Scratch, collector: &Collector) -> std::process::Child {
    let stderr = File::create(scratch.root().join("run.stderr")).expect("create stderr file");
    let log = scratch.log();
    Command::new(sidecar_bin())
        .args([
            "run",
            "--target",
            "http://127.0.0.1:9",
            "--outbound",
            "127.0.0.1:0",
        ])
        .args([
            "--inbound",
            "none",
            "--admin",
            "none",
            "--drain-timeout",
            "5s",
        ])
        .args(["--logs-file", log.to_str().expect("utf-8 path")])
        .args([
            "--logs-endpoint",
            &collector.endpoint(),
            "--logs-service",
            "web",
        ])
        .args(["--logs-poll-interval", "20ms", "--logs-batch-wait", "100ms"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("SIDECAR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn sidecar run")
}

#[test]
fn run_forwards_the_log_and_flushes_on_sigterm() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let mut sidecar = run_with_logs(&scratch, &collector);

    let first = app.write(300);
    assert!(
        eventually(WAIT, || collector.has_all(first.clone())),
        "lines {first:?} did not all arrive; stderr:\n{}",
        std::fs::read_to_string(scratch.root().join("run.stderr")).unwrap_or_default()
    );
    let bodies = collector.bodies();
    assert!(bodies.iter().all(|b| b["service"] == "web"), "{bodies:?}");

    // Written just before SIGTERM: the shutdown flush must still send them.
    let last = app.write(50);
    // SAFETY: a signal to our own, not yet reaped, child.
    unsafe { libc::kill(sidecar.id() as libc::pid_t, libc::SIGTERM) };
    let status = poll_until(WAIT, || sidecar.try_wait().ok().flatten()).unwrap_or_else(|| {
        let _ = sidecar.kill();
        panic!("sidecar run did not exit after SIGTERM")
    });
    assert!(status.success(), "exit status {status}");
    assert!(
        collector.has_all(last.clone()),
        "lines {last:?} written before SIGTERM were not flushed: {:?}",
        collector.tally().missing(0..app.next)
    );
    assert_eq!(collector.tally().duplicates(), 0);
}

#[test]
fn bad_logs_flags_are_reported_with_the_proxy_flags() {
    let out = Command::new(sidecar_bin())
        .args(["run", "--workers", "zero", "--logs-file", "/tmp/x.log"])
        .args(["--logs-endpoint", "ftp://nope", "--logs-service", "web"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .expect("run sidecar");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["--workers", "--logs-endpoint"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}
