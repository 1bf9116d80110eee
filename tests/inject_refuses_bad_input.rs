//! `sidecar inject` refuses input it cannot handle safely: malformed YAML, bad or misspelt
//! annotations, a container already using one of our names, a missing file. Each time: a message
//! that names the problem (and every problem, not just the first), exit 1, and nothing on stdout,
//! so `sidecar inject -f x.yaml | kubectl apply -f -` applies nothing.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sidecar_tests::env::sidecar_bin;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/inject")
}

fn inject_file(path: &Path) -> Output {
    Command::new(sidecar_bin())
        .args(["inject", "--image", "sidecar:test", "-f"])
        .arg(path)
        .output()
        .expect("run sidecar inject")
}

/// Exit 1 (not a panic's 101), nothing on stdout; returns stderr with the fixture dir shortened.
fn assert_refused(out: &Output, what: &str) -> String {
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&*fixtures().to_string_lossy(), "<fixtures>");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit 1\n{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: something was written:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("nothing written") || stderr.contains("cannot read"),
        "{what}:\n{stderr}"
    );
    stderr
}

fn assert_golden(name: &str, actual: &str) {
    let path = fixtures().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        expected,
        actual,
        "{} differs (UPDATE_GOLDEN=1 to rewrite, then review)",
        path.display()
    );
}

#[test]
fn malformed_yaml_names_the_line_and_writes_nothing() {
    let out = inject_file(&fixtures().join("malformed.in.yaml"));
    let stderr = assert_refused(&out, "malformed YAML");
    assert!(stderr.contains("not valid YAML: line 12"), "{stderr}");
    assert_golden("malformed.err", &stderr);
}

#[test]
fn every_bad_annotation_is_reported_at_once() {
    let out = inject_file(&fixtures().join("bad-annotations.in.yaml"));
    let stderr = assert_refused(&out, "bad annotations");
    for expected in [
        "7 problem(s)",
        "did you mean sidecar.mesh.dev/exclude-outbound-ports?",
        "\"70000\" is not a port",
        "10.0.0.0/33",
        "fail-mode-inbound: \"maybe\"",
        "proxy memory request 1Gi is above its limit 512Mi",
        "app-probe: \"127.0.0.1:8080/healthz\": expected http://HOST:PORT/PATH or tcp://HOST:PORT",
        "pod/taken: an application container is named \"sidecar-proxy\"",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    // Each problem once, however the annotation is used.
    let lines: Vec<&str> = stderr.lines().collect();
    let unique: std::collections::BTreeSet<&str> = lines.iter().copied().collect();
    assert_eq!(
        unique.len(),
        lines.len(),
        "a problem is repeated:\n{stderr}"
    );
    assert_golden("bad-annotations.err", &stderr);
}

#[test]
fn one_bad_document_stops_the_whole_stream() {
    // A good workload followed by a bad one: the good one must not be written either, or
    // `| kubectl apply -f -` would half-apply the stream.
    let good = fs::read_to_string(fixtures().join("pod.in.yaml")).expect("fixture");
    let bad = fs::read_to_string(fixtures().join("malformed.in.yaml")).expect("fixture");
    let out = Command::new(sidecar_bin())
        .args(["inject", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(format!("{good}---\n{bad}").as_bytes())?;
            }
            child.wait_with_output()
        })
        .expect("run sidecar inject");
    let stderr = assert_refused(&out, "good then bad document");
    assert!(stderr.contains("standard input"), "{stderr}");
}

#[test]
fn missing_file_is_named() {
    let missing = fixtures().join("no-such-file.yaml");
    let out = inject_file(&missing);
    let stderr = assert_refused(&out, "missing file");
    assert!(stderr.contains("no-such-file.yaml"), "{stderr}");
}

#[test]
fn bad_usage_exits_64() {
    let out = Command::new(sidecar_bin())
        .args(["inject", "-f", "a.yaml", "b.yaml"])
        .output()
        .expect("run sidecar inject");
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
