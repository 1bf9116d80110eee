//! `sidecar run` with a bad policy file (or bad policy flags) refuses to start: exit 64, and one
//! message naming every bad key with its file section, the value given and what is expected.
//! Nothing is bound: the check comes before any listener.
use std::path::PathBuf;

use sidecar_tests::env::run_sidecar;

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("sidecar-policy-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn every_bad_key_is_reported_at_once_with_exit_64() {
    let file = TempFile::new(
        "bad.toml",
        r#"
[defaults]
request_timout = "2s"
breaker.open_time = "soon"

[[destination]]
match = "10.0.0.7"
retry.on = ["timeout"]
"#,
    );
    let path = file.0.to_string_lossy().into_owned();
    // Unroutable listener addresses too: the run must stop before binding anything.
    let out = run_sidecar(&[
        "run",
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "none",
        "--admin",
        "none",
        "--config",
        &path,
        "--max-retries",
        "lots",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{}\n{stderr}", out.status);
    let expected = format!(
        "sidecar run: invalid configuration:\n  \
         {path}: [defaults] breaker.open_time = \"soon\": expected a whole number with a unit (ms, s, m, h), e.g. 1s or 500ms\n  \
         {path}: [defaults] request_timout = \"2s\": unknown key; did you mean request_timeout?\n  \
         {path}: [[destination]] #1 match = \"10.0.0.7\": missing port; expected IP:PORT, [IPv6]:PORT or HOST:PORT, e.g. 10.0.0.7:80 or api.example:443\n  \
         --max-retries / SIDECAR_MAX_RETRIES = \"lots\": expected a whole number from 0 to 10\n"
    );
    assert!(
        stderr.starts_with(&expected),
        "expected:\n{expected}\ngot:\n{stderr}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let out = run_sidecar(&[
        "run",
        "--inbound",
        "none",
        "--admin",
        "none",
        "--config",
        "/nonexistent/sidecar-policy.toml",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--config / SIDECAR_CONFIG = \"/nonexistent/sidecar-policy.toml\": cannot read the config file"),
        "{stderr}"
    );
}

/// `sidecar check-config FILE` (for CI pipelines) reports a bad file with the same lines as
/// `sidecar run --config FILE`, exit 64, and says a good one is valid, exit 0; it starts nothing.
#[test]
fn check_config_reports_what_run_would() {
    let bad = TempFile::new(
        "check-bad.toml",
        "[defaults]\nrequest_timout = \"2s\"\n\n[[destination]]\nmatch = \"10.0.0.7\"\n",
    );
    let path = bad.0.to_string_lossy().into_owned();
    let checked = run_sidecar(&["check-config", &path]);
    let run = run_sidecar(&[
        "run",
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "none",
        "--admin",
        "none",
        "--config",
        &path,
    ]);
    assert_eq!(checked.status.code(), Some(64));
    assert_eq!(run.status.code(), Some(64));
    let lines = |out: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("  "))
            .map(str::to_owned)
            .collect()
    };
    let checked_lines = lines(&checked);
    assert_eq!(checked_lines.len(), 2, "{checked_lines:?}");
    assert_eq!(
        checked_lines,
        lines(&run),
        "the same messages as sidecar run"
    );
    assert!(String::from_utf8_lossy(&checked.stderr)
        .starts_with("sidecar check-config: invalid configuration:\n"));

    let good = TempFile::new(
        "check-good.toml",
        "[defaults]\nrequest_timeout = \"2s\"\n\n[[destination]]\nmatch = \"10.0.0.7:80\"\n",
    );
    let out = run_sidecar(&["check-config", &good.0.to_string_lossy()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("valid ([defaults], [run] and 1 destination rule)"),
        "{stdout}"
    );
}
