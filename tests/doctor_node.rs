//! `sidecar doctor` passes on this VM (a machine that runs the privileged tests has everything the
//! sidecar needs), and names the failure, with a fix, when pointed at a missing or wrong cgroup2 or
//! bpffs path or run without the capabilities.
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sidecar_tests::env::{require_bpffs, require_privileged, sidecar_bin};
use sidecar_tests::Pod;

fn doctor(args: &[&str]) -> Output {
    Command::new(sidecar_bin())
        .arg("doctor")
        .args(args)
        .output()
        .expect("run sidecar doctor")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} check in {report:#}"))
}

fn failures(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "fail")
        .map(|c| format!("{}: {} (fix: {})", c["name"], c["detail"], c["fix"]))
        .collect()
}

#[test]
fn doctor_passes_on_this_vm() {
    require_privileged();
    require_bpffs();
    let out = doctor(&["--json"]);
    let report = json(&out);
    assert!(
        out.status.success() && report["ok"] == true,
        "doctor fails on the machine the tests run on:\n  {}",
        failures(&report).join("\n  ")
    );
    for name in [
        "kernel",
        "program type cgroup_sock_addr",
        "program type sock_ops",
        "program type cgroup_sockopt",
        "program type sk_lookup",
        "helpers",
        "map types",
        "bpffs",
        "capabilities",
    ] {
        assert_eq!(
            check(&report, name)["status"],
            "pass",
            "{name}: {:#}",
            check(&report, name)
        );
    }
    // Hybrid here (cgroup2 at /sys/fs/cgroup/unified): a warning, with where it is.
    let cgroup = check(&report, "cgroup v2");
    assert_ne!(cgroup["status"], "fail", "{cgroup:#}");
    assert!(
        cgroup["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("/sys/fs/cgroup"),
        "{cgroup:#}"
    );

    let table = doctor(&[]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}");
    assert!(text.starts_with("CHECK"), "{text}");
    assert!(text.contains("result: pass"), "{text}");
}

#[test]
fn doctor_names_a_missing_cgroup2_path() {
    let missing = "/nonexistent/sidecar-doctor/cgroup";
    let out = doctor(&["--cgroup-root", missing, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    assert_eq!(report["ok"], false);
    let cgroup = check(&report, "cgroup v2");
    assert_eq!(cgroup["status"], "fail");
    assert_eq!(cgroup["detail"], format!("{missing} does not exist"));
    assert!(
        cgroup["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("--cgroup-root"),
        "{cgroup:#}"
    );

    let table = doctor(&["--cgroup-root", missing]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(1));
    assert!(
        text.contains(&format!("FAIL    {missing} does not exist")),
        "{text}"
    );
    assert!(
        text.contains("fix: mount the node's cgroup v2 hierarchy"),
        "{text}"
    );
    assert!(text.contains("result: FAIL"), "{text}");
}

#[test]
fn doctor_names_a_path_that_is_not_cgroup2() {
    // /proc exists but is not a cgroup2 filesystem.
    let report = json(&doctor(&["--cgroup-root", "/proc", "--json"]));
    let cgroup = check(&report, "cgroup v2");
    assert_eq!(cgroup["status"], "fail");
    assert_eq!(cgroup["detail"], "/proc is not a cgroup2 filesystem (proc)");
}

#[test]
fn doctor_names_a_missing_or_wrong_bpffs_path() {
    let missing = "/nonexistent/sidecar-doctor/bpf";
    let out = doctor(&["--bpffs", missing, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let bpffs = check(&json(&out), "bpffs").clone();
    assert_eq!(bpffs["status"], "fail");
    assert_eq!(bpffs["detail"], format!("{missing} does not exist"));
    assert!(
        bpffs["fix"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("mount -t bpf bpf {missing}")),
        "{bpffs:#}"
    );

    // A directory that exists on another filesystem: what an unmounted /sys/fs/bpf looks like.
    let plain = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = doctor(&["--bpffs", plain.to_str().expect("utf-8 path"), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let bpffs = check(&json(&out), "bpffs").clone();
    assert_eq!(bpffs["status"], "fail");
    let detail = bpffs["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with(&format!("{} is not a bpf filesystem", plain.display())),
        "{bpffs:#}"
    );
}

#[test]
fn doctor_without_capabilities_says_which_are_missing() {
    require_privileged();
    let mut cmd = Command::new(sidecar_bin());
    cmd.args(["doctor", "--json"]);
    // SAFETY: prctl only changes this (forked) process's capability bounding set; it allocates
    // nothing. Emptying it means the exec'd doctor runs as root without any capability.
    unsafe {
        cmd.pre_exec(|| {
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run sidecar doctor");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report = json(&out);
    let caps = check(&report, "capabilities");
    assert_eq!(caps["status"], "fail");
    assert_eq!(
        caps["detail"],
        "missing CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"
    );
    assert!(
        caps["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("BPF, NET_ADMIN and SYS_ADMIN"),
        "{caps:#}"
    );
}

/// Our own programs on a pod's cgroup are not "other programs".
#[test]
fn doctor_does_not_count_our_programs_as_conflicts() {
    let mut pod = Pod::new();
    pod.init(&[]);
    let cgroup = pod.cgroup().to_string_lossy().into_owned();
    let out = doctor(&["--cgroup", &cgroup, "--json"]);
    let report = json(&out);
    let others = check(&report, "other programs");
    assert_eq!(others["status"], "pass", "{others:#}");
    assert!(out.status.success(), "  {}", failures(&report).join("\n  "));
}

/// A process of the pod (not the proxy) running as the proxy's uid is named: its connections are
/// never captured.
#[test]
fn doctor_names_a_pod_process_running_as_the_proxy_uid() {
    let mut pod = Pod::new();
    pod.init(&[]);
    let cgroup = pod.cgroup().to_string_lossy().into_owned();
    let report = json(&doctor(&["--cgroup", &cgroup, "--json"]));
    assert_eq!(check(&report, "proxy identity")["status"], "pass");

    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("60");
    pod.in_pod(
        &mut cmd,
        Some((sidecar_tests::PROXY_UID, sidecar_tests::PROXY_GID)),
    );
    let mut app = cmd.spawn().expect("spawn sleep in the pod");
    let out = doctor(&["--cgroup", &cgroup, "--json"]);
    let _ = app.kill();
    let _ = app.wait();
    let report = json(&out);
    let identity = check(&report, "proxy identity");
    assert_eq!(identity["status"], "fail", "{identity:#}");
    assert!(
        identity["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("sleep (pid {})", app.id())),
        "{identity:#}"
    );
    assert!(!out.status.success());
}
