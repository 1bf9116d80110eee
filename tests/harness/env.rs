//! The machine the tests run on: privileged preconditions, where cgroup2 and bpffs are mounted,
//! where the binaries under test are, and the sweep of leftovers from crashed runs of this harness.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Once, OnceLock};
use std::time::Duration;

/// Every name this harness gives to a system object (cgroup, netns, temp dir) starts with this,
/// followed by `<pid>-<n>`; the sweep only ever touches names of that exact shape.
pub const NAME_PREFIX: &str = "sidecar-test-";

/// Children get a fixed, minimal environment: nothing from the developer's shell (SIDECAR_*,
/// TARGET_URL, ...) can change what a test exercises.
pub const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The default bpffs pin root of `sidecar init` (see the CLI contract).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sidecar";

/// `SIDECAR_TEST_MSG_REDIRECT=1`: every `sidecar init` of the suite runs with `--msg-redirect`
/// (the in-pod leg socket to socket), so that the whole suite shows it changes nothing an app,
/// an upstream or an operator can see.
pub fn msg_redirect_everywhere() -> bool {
    std::env::var_os("SIDECAR_TEST_MSG_REDIRECT").is_some_and(|v| v == "1")
}

/// Panics (loudly, so the test fails instead of passing vacuously) unless this process can run the
/// privileged tests: root, a cgroup2 mount, and the `ip` tool.
pub fn require_privileged() {
    // Checked once per process; the verdict is kept (not a poisoned Once) so that every test in
    // the process fails with the same explanation.
    static VERDICT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(why) = VERDICT.get_or_init(privileged_verdict) {
        panic!("\n\n*** PRIVILEGED TEST: {why} ***\n\n");
    }
}

fn privileged_verdict() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "must run as root (euid is {euid}).\n\
             These tests create network namespaces and cgroups and attach eBPF programs.\n\
             Run them as root, e.g. `sudo -E cargo xtask test`."
        ));
    }
    if find_mount("cgroup2").is_none() {
        return Err(
            "no cgroup2 mount found in /proc/self/mountinfo.\n\
                    The sidecar needs cgroup v2 (hybrid hosts mount it at /sys/fs/cgroup/unified)."
                .to_string(),
        );
    }
    let ip_ok = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ip_ok {
        return Err(
            "the `ip` tool (iproute2) is missing.\nInstall it: apt-get install -y iproute2"
                .to_string(),
        );
    }
    Ok(())
}

/// The mount point of the cgroup2 hierarchy (on hybrid hosts /sys/fs/cgroup/unified), read from
/// /proc/self/mountinfo rather than assumed.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| match find_mount("cgroup2") {
        Some(path) => path,
        None => panic!(
            "\n\n*** PRIVILEGED TEST: no cgroup2 mount found in /proc/self/mountinfo. ***\n\
             The sidecar needs cgroup v2 (hybrid hosts mount it at /sys/fs/cgroup/unified).\n\n"
        ),
    })
}

/// Panics with what to do unless a bpffs is mounted at /sys/fs/bpf (needed to pin links and maps).
pub fn require_bpffs() {
    let mounted = sidecar_common::mountinfo::of_type("bpf")
        .into_iter()
        .any(|m| m.mount_point == Path::new("/sys/fs/bpf"));
    if !mounted {
        panic!(
            "\n\n*** PRIVILEGED TEST: bpffs is not mounted at /sys/fs/bpf. ***\n\
             Mount it: mount -t bpf bpf /sys/fs/bpf   (`cargo xtask test` does this)\n\n"
        );
    }
}

fn find_mount(fstype: &str) -> Option<PathBuf> {
    sidecar_common::mountinfo::of_type(fstype)
        .into_iter()
        .next()
        .map(|m| m.mount_point)
}

/// Directory holding the binaries cargo built next to the running executable: integration tests
/// live in `<target>/<profile>/deps/`, binaries (probe, demo, sidecar) in `<target>/<profile>/`.
fn exe_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// The `sidecar` binary under test: $SIDECAR_BIN, else the one cargo built next to this executable
/// (same target dir and profile), else <workspace>/target/debug/sidecar.
pub fn sidecar_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SIDECAR_BIN") {
        let path = PathBuf::from(path);
        // Tests run with the package dir as cwd; a relative path is more likely meant from the
        // workspace root, where the developer typed it.
        let from_workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(&path);
        return match (path.is_file(), from_workspace.is_file()) {
            (true, _) => path,
            (false, true) if path.is_relative() => from_workspace,
            _ => panic!(
                "SIDECAR_BIN={} does not exist (build it: cargo build -p sidecar)",
                path.display()
            ),
        };
    }
    let candidates = [
        exe_dir().map(|d| d.join("sidecar")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sidecar")),
    ];
    for candidate in candidates.into_iter().flatten() {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "\n\n*** the sidecar binary was not found (looked next to {:?} and in target/debug). ***\n\
         build it first: cargo build -p sidecar (or run cargo xtask test), or set SIDECAR_BIN\n\n",
        exe_dir()
    );
}

/// Runs `sidecar <args>` as root from the test process (outside any pod), with the same fixed,
/// minimal environment as the pod's children, and returns what happened.
pub fn run_sidecar(args: &[&str]) -> Output {
    Command::new(sidecar_bin())
        .args(args)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn sidecar {args:?}: {e}"))
}

/// The probe app (`sidecar-probe`, built by this package): $SIDECAR_PROBE_BIN, else next to this
/// executable.
pub fn probe_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SIDECAR_PROBE_BIN") {
        return PathBuf::from(path);
    }
    match exe_dir().map(|d| d.join("sidecar-probe")) {
        Some(path) if path.is_file() => path,
        other => panic!(
            "the probe binary was not found at {other:?}: build it first: cargo build -p sidecar-tests"
        ),
    }
}

/// True when a process running as an unprivileged uid can execute `path`: the file and every
/// ancestor directory must be usable by "others" (a checkout under /root is not).
pub fn executable_by_others(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let mode_ok = |p: &Path, bit: u32| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & bit != 0)
            .unwrap_or(false)
    };
    mode_ok(&path, 0o001) && path.ancestors().skip(1).all(|dir| mode_ok(dir, 0o001))
}

/// True when `pid` names a live process (kill(pid, 0) succeeds or is refused for permission).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence; it delivers nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Parses `sidecar-test-<pid>-<n>[-<suffix>]` into (pid, suffix).
fn parse_name(name: &str) -> Option<(u32, Option<&str>)> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let _n: u32 = parts.next()?.parse().ok()?;
    Some((pid, parts.next()))
}

/// Once per process: deletes what crashed earlier runs of THIS harness left behind (names of our
/// exact shape whose creating process is gone). Nothing else is ever touched.
pub fn sweep_leftovers() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(|| {
        // Network namespaces: sidecar-test-<pid>-<n>-pod / -remote.
        if let Ok(entries) = fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some((pid, Some("pod" | "remote"))) = parse_name(&name) {
                    if !pid_alive(pid) {
                        eprintln!("sweep: deleting leftover netns {name}");
                        let _ = Command::new("ip")
                            .args(["netns", "del", &name])
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
        }
        // Cgroups: <cgroup2>/sidecar-test-<pid>-<n>.
        let root = cgroup2_mount();
        if let Ok(entries) = fs::read_dir(root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some((pid, None)) = parse_name(&name) {
                    if !pid_alive(pid) && entry.path().is_dir() {
                        eprintln!("sweep: removing leftover cgroup {}", entry.path().display());
                        sweep_cgroup(&entry.path());
                    }
                }
            }
        }
        // Private pin roots (`bpf::PinRoot`): /sys/fs/bpf/sidecar-test-<pid>-<n>-pins.
        if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some((pid, Some("pins"))) = parse_name(&name) {
                    if !pid_alive(pid) {
                        eprintln!(
                            "sweep: removing leftover pin root {}",
                            entry.path().display()
                        );
                        let _ = fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        // Log dirs: /tmp/sidecar-test-<pid>-<n>.
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some((pid, None)) = parse_name(&name) {
                    if !pid_alive(pid) {
                        let _ = fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
    });
}

/// Removes one leftover pod cgroup of ours: detach our programs (best effort), kill what a crashed
/// run left inside it (only that cgroup's members, via cgroup.kill), then rmdir.
fn sweep_cgroup(dir: &Path) {
    if let Some(bin) = [
        std::env::var_os("SIDECAR_BIN").map(PathBuf::from),
        exe_dir().map(|d| d.join("sidecar")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
    {
        let _ = Command::new(bin)
            .args(["init", "--remove", "--cgroup"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    remove_cgroup_tree(dir, Duration::from_secs(5));
}

/// rmdir a cgroup directory and its sub-cgroups, first killing the members (cgroup.kill), and
/// waiting (polling cgroup.procs) until the kernel has let them go.
pub fn remove_cgroup_tree(dir: &Path, timeout: Duration) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path(), timeout);
            }
        }
    }
    let procs = dir.join("cgroup.procs");
    let empty = || {
        fs::read_to_string(&procs)
            .map(|s| s.trim().is_empty())
            .unwrap_or(true)
    };
    if !empty() {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
    }
    crate::eventually(timeout, || {
        empty() && (fs::remove_dir(dir).is_ok() || !dir.exists())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_our_shape_parse_and_others_do_not() {
        assert_eq!(parse_name("sidecar-test-12-3"), Some((12, None)));
        assert_eq!(parse_name("sidecar-test-12-3-pod"), Some((12, Some("pod"))));
        assert_eq!(parse_name("sidecar-test-x-3"), None);
        assert_eq!(parse_name("other-12-3"), None);
    }
}
