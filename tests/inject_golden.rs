//! `sidecar inject` golden tests: for every fixture `tests/fixtures/inject/<case>.in.yaml` the
//! output and the messages are exactly `<case>.out.yaml` and `<case>.err`, and injecting that output
//! again changes nothing. One case per workload kind, plus a List, several documents in one stream,
//! every annotation, a re-injection, and the skipped pods (hostNetwork, opt-out).
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p sidecar-tests --test inject_golden`,
//! then review the diff of tests/fixtures/inject/.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sidecar_tests::env::sidecar_bin;

/// A fixed image, so the goldens do not change with the crate version.
const IMAGE: &str = "sidecar:test";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/inject")
}

fn inject(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(sidecar_bin())
        .arg("inject")
        .args(args)
        .env_remove("SIDECAR_IMAGE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sidecar inject");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).expect("write stdin");
    }
    child.wait_with_output().expect("wait for sidecar inject")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

/// Compares with the golden file, or rewrites it under UPDATE_GOLDEN=1.
fn assert_golden(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(path, actual).expect("write golden");
        return;
    }
    let expected = fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n(create it with UPDATE_GOLDEN=1 and review it)\n--- actual ---\n{actual}",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the output, first at line {}:\n  expected: {:?}\n  actual:   {:?}\n\
             --- actual output ---\n{actual}\n(after an intended change: UPDATE_GOLDEN=1, then review)",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first),
        );
    }
}

/// Injects `<case>.in.yaml`, checks output and messages against the goldens, then checks that
/// injecting the output again is a no-op.
fn golden(case: &str) {
    let input = fixtures().join(format!("{case}.in.yaml"));
    let out = inject(
        &["-f", input.to_str().expect("utf-8 path"), "--image", IMAGE],
        b"",
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "{case}: exit {}\n{stderr}",
        out.status
    );
    assert_golden(&fixtures().join(format!("{case}.out.yaml")), &stdout);
    assert_golden(&fixtures().join(format!("{case}.err")), &stderr);

    let again = inject(&["--image", IMAGE, "-"], stdout.as_bytes());
    let again_stderr = text(&again.stderr);
    assert!(
        again.status.success(),
        "{case}, second run: exit {}\n{again_stderr}",
        again.status
    );
    assert_eq!(
        text(&again.stdout),
        stdout,
        "{case}: injecting the output again changed it\n{again_stderr}"
    );
    assert!(
        again_stderr.contains(" 0 injected,"),
        "{case}: the second run should inject nothing:\n{again_stderr}"
    );
}

#[test]
fn deployment_keeps_everything_else_as_written() {
    golden("deployment");
    // What a YAML 1.2 round trip would break for Kubernetes' YAML 1.1 reader.
    let out = fs::read_to_string(fixtures().join("deployment.out.yaml")).expect("golden");
    for kept in [
        "defaultMode: 0644",
        "value: \"yes\"",
        "replicas: 2",
        "value: |\n",
    ] {
        assert!(out.contains(kept), "{kept:?} was not kept:\n{out}");
    }
}

#[test]
fn statefulset_own_init_containers_run_after_ours() {
    golden("statefulset");
}

#[test]
fn daemonset() {
    golden("daemonset");
}

/// `sidecar.mesh.dev/interception: cni`: the proxy alone, no privileged container in the pod.
#[test]
fn cni_mode_adds_only_the_proxy() {
    golden("cni-mode");
    let out = fs::read_to_string(fixtures().join("cni-mode.out.yaml")).expect("golden");
    assert!(
        !out.contains("sidecar-init") && !out.contains("SYS_ADMIN"),
        "{out}"
    );
}

#[test]
fn replicaset() {
    golden("replicaset");
}

#[test]
fn job() {
    golden("job");
}

#[test]
fn cronjob_inherits_annotations_from_outer_objects() {
    golden("cronjob");
}

#[test]
fn pod() {
    golden("pod");
}

#[test]
fn list_items_are_injected() {
    golden("list");
}

#[test]
fn multi_document_stream() {
    golden("multi-document");
}

#[test]
fn annotations_set_per_workload_settings() {
    golden("annotations");
}

#[test]
fn reinjection_replaces_what_was_added() {
    golden("reinject");
}

#[test]
fn host_network_and_opted_out_pods_are_skipped_with_a_message() {
    golden("hostnetwork");
    let input = fs::read_to_string(fixtures().join("hostnetwork.in.yaml")).expect("fixture");
    let out = fs::read_to_string(fixtures().join("hostnetwork.out.yaml")).expect("golden");
    assert!(
        !out.contains("sidecar-init"),
        "a skipped pod was injected:\n{out}"
    );
    assert!(input.contains("hostNetwork: true") && out.contains("hostNetwork: true"));
}

#[test]
fn standard_input_and_file_give_the_same_output() {
    let path = fixtures().join("deployment.in.yaml");
    let from_file = inject(
        &["-f", path.to_str().expect("utf-8 path"), "--image", IMAGE],
        b"",
    );
    let input = fs::read(&path).expect("fixture");
    let from_stdin = inject(&["--image", IMAGE], &input);
    let from_dash = inject(&["-f", "-", "--image", IMAGE], &input);
    assert!(
        from_file.status.success() && from_stdin.status.success() && from_dash.status.success()
    );
    assert_eq!(from_file.stdout, from_stdin.stdout);
    assert_eq!(from_file.stdout, from_dash.stdout);
}

#[test]
fn image_comes_from_the_flag_or_the_environment() {
    let input = fs::read(fixtures().join("pod.in.yaml")).expect("fixture");
    let out = Command::new(sidecar_bin())
        .args([
            "inject",
            "-f",
            fixtures().join("pod.in.yaml").to_str().expect("utf-8 path"),
        ])
        .env("SIDECAR_IMAGE", "registry.example/mesh/sidecar:9.9.9")
        .output()
        .expect("run sidecar inject");
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout
            .matches("image: registry.example/mesh/sidecar:9.9.9")
            .count(),
        2,
        "{stdout}"
    );
    // The default names the image deploy/Dockerfile builds.
    let out = inject(&[], &input);
    let stdout = text(&out.stdout);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        stdout.matches(&format!("image: sidecar:{version}")).count(),
        2,
        "{stdout}"
    );
}

#[test]
fn empty_input_gives_empty_output() {
    let out = inject(&[], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let out = inject(&[], b"---\n# nothing\n---\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

/// The example manifests under deploy/kubernetes/ are exactly what inject makes of their sources
/// (comments aside): the docs cannot drift from the tool.
#[test]
fn deploy_examples_are_what_inject_writes() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    for name in ["web.yaml", "job.yaml"] {
        let injected = deploy.join(name);
        let source = deploy.join("source").join(name);
        let a = inject(&["-f", injected.to_str().expect("utf-8 path")], b"");
        let b = inject(&["-f", source.to_str().expect("utf-8 path")], b"");
        assert!(a.status.success(), "{}", text(&a.stderr));
        assert!(b.status.success(), "{}", text(&b.stderr));
        assert!(
            text(&a.stderr).contains("1 already injected"),
            "{} should already be injected:\n{}",
            injected.display(),
            text(&a.stderr)
        );
        assert_eq!(
            text(&a.stdout),
            text(&b.stdout),
            "deploy/kubernetes/{name} is not what `sidecar inject -f deploy/kubernetes/source/{name}` writes"
        );
    }
}
