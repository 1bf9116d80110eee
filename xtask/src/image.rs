//! `cargo xtask image`: the container image, built offline with podman from what this machine
//! has: the release `sidecar` (eBPF object embedded) and the shared objects it links (the dynamic
//! loader, libc, libm, libgcc_s, as `ldd` lists them), copied into an otherwise empty image
//! (`FROM scratch`, no base image pulled, no shell). Then the image is run as a user would:
//! `sidecar --version`, `sidecar doctor`, and the proxy as UID 1337 on a read-only root
//! filesystem answering on its admin port and exiting cleanly on SIGTERM.
//!
//! podman runs containers with runc here: crun refuses hybrid cgroup hierarchies, and this VM's
//! hard limits are below podman's default ulimits, so the runs set their own.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, probe, Ctx};
use crate::say;

/// The image's name, as the manifests use it.
pub const TAG: &str = "sidecar:0.1.0";
/// Ports of the run check (host network; nothing else of the tests uses them).
const ADMIN_PORT: u16 = 17090;
const OUTBOUND_PORT: u16 = 17101;

/// The cgroup the check containers go under (in every hierarchy), removed after the checks:
/// podman's default parent, `libpod_parent`, would stay on the host. (`--cgroups=disabled` would
/// make none, but runc refuses it, and crun refuses hybrid hierarchies.)
const CGROUP_PARENT: &str = "sidecar-image-check";

/// Container run flags this machine needs (see the module documentation).
const RUN_FLAGS: [&str; 8] = [
    "--cgroup-parent",
    "/sidecar-image-check",
    "--ulimit",
    "nofile=16384:16384",
    "--ulimit",
    "nproc=4096:4096",
    "--pull",
    "never",
];

/// Builds the image and checks it; returns its size in bytes.
pub fn run(ctx: &Ctx) -> Result<u64> {
    let binary = crate::release::build(ctx)?;
    let context = ctx.root.join("target/image");
    stage(ctx, &binary, &context)?;
    // The image the tag named before: removed once the tag moves, so rebuilds leave no
    // untagged images behind.
    let previous = probe(
        ctx.cmd("podman")
            .args(["image", "inspect", "--format", "{{.Id}}", TAG]),
    );
    cmd::run(
        ctx.cmd("podman")
            .args(["build", "--pull=never", "-t", TAG, "-f"])
            .arg(ctx.root.join("deploy/Dockerfile"))
            .arg(&context),
        "podman build",
        Some("see the build output above; the context is target/image/"),
    )?;
    let size: u64 =
        probe(
            ctx.cmd("podman")
                .args(["image", "inspect", "--format", "{{.Size}}", TAG]),
        )
        .and_then(|s| s.trim().parse().ok())
        .context("podman image inspect gave no size")?;
    let current = probe(
        ctx.cmd("podman")
            .args(["image", "inspect", "--format", "{{.Id}}", TAG]),
    );
    if let (Some(old), Some(new)) = (previous, current) {
        if old.trim() != new.trim() {
            let _ = ctx.cmd("podman").args(["rmi", old.trim()]).output();
        }
    }
    say!("image {TAG}: {:.1} MB ({size} bytes)", size as f64 / 1e6);
    let checked = check(ctx);
    let cleaned = remove_cgroup_parent();
    checked?;
    cleaned?;
    Ok(size)
}

/// Removes [`CGROUP_PARENT`] from the cgroup2 root and every v1 hierarchy (empty by now: the
/// check containers are gone).
fn remove_cgroup_parent() -> Result<()> {
    fn rmdir_tree(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join(CGROUP_PARENT)];
    if let Ok(entries) = fs::read_dir(root) {
        candidates.extend(entries.flatten().map(|e| e.path().join(CGROUP_PARENT)));
    }
    let left: Vec<String> = candidates
        .iter()
        .filter(|c| c.exists())
        .inspect(|c| rmdir_tree(c))
        .filter(|c| c.exists())
        .map(|c| c.display().to_string())
        .collect();
    if !left.is_empty() {
        bail!(
            "could not remove the check containers' cgroups: {}",
            left.join(", ")
        );
    }
    Ok(())
}

/// `target/image/root/`: the binary and the shared objects it needs, at their paths.
fn stage(ctx: &Ctx, binary: &Path, context: &Path) -> Result<()> {
    let root = context.join("root");
    let _ = fs::remove_dir_all(&root);
    let ldd = probe(ctx.cmd("ldd").arg(binary)).context("ldd gave nothing")?;
    let mut files: Vec<PathBuf> = vec![];
    for line in ldd.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    if !files
        .iter()
        .any(|f| f.to_string_lossy().contains("ld-linux"))
    {
        bail!("ldd {} listed no dynamic loader:\n{ldd}", binary.display());
    }
    for file in &files {
        let dest = root.join(file.strip_prefix("/").unwrap_or(file));
        fs::create_dir_all(dest.parent().unwrap_or(&root))?;
        // `fs::copy` follows the symlink: the image gets the file itself.
        fs::copy(file, &dest).with_context(|| format!("copy {}", file.display()))?;
    }
    let dest = root.join("usr/local/bin/sidecar");
    fs::create_dir_all(dest.parent().unwrap_or(&root))?;
    fs::copy(binary, &dest).context("copy the sidecar binary")?;
    say!(
        "image context: {} and {} shared objects",
        dest.display(),
        files.len()
    );
    Ok(())
}

fn podman_run(ctx: &Ctx) -> std::process::Command {
    let mut c = ctx.cmd("podman");
    c.args(["--runtime", "runc", "run"]).args(RUN_FLAGS);
    c
}

/// The image as a user runs it.
fn check(ctx: &Ctx) -> Result<()> {
    // No network for the checks that need none: podman's default one would leave its bridge
    // (`cni-podman0`) on the host.
    let version = probe(podman_run(ctx).args(["--rm", "--network", "none", TAG, "--version"]))
        .context("`podman run sidecar --version` failed")?;
    if !version.contains("sidecar 0.1.0") {
        bail!("`sidecar --version` in the image printed {version:?}");
    }
    say!("image check: --version: {}", version.trim());
    // doctor judges the node; inside a container without privileges it fails its checks, but
    // it must run and say so (a missing library or file would make it crash instead).
    let doctor = ctx
        .cmd("podman")
        .args(["--runtime", "runc", "run"])
        .args(RUN_FLAGS)
        .args(["--rm", "--network", "none", TAG, "doctor"])
        .output()
        .context("podman run doctor")?;
    let text = String::from_utf8_lossy(&doctor.stdout);
    if !text.contains("CHECK") || !text.contains("result:") {
        bail!(
            "`sidecar doctor` in the image printed no report ({}):\n{text}{}",
            doctor.status,
            String::from_utf8_lossy(&doctor.stderr)
        );
    }
    say!(
        "image check: doctor ran ({})",
        text.lines().last().unwrap_or("").trim()
    );
    proxy_check(ctx)
}

/// The proxy as the manifests run it: UID 1337, read-only root filesystem, answering `/live`
/// and `/ready`, exiting 0 on SIGTERM.
fn proxy_check(ctx: &Ctx) -> Result<()> {
    let name = format!("sidecar-image-check-{}", std::process::id());
    let _ = ctx.cmd("podman").args(["rm", "-f", &name]).output();
    let target = format!("http://127.0.0.1:{ADMIN_PORT}");
    cmd::run(
        podman_run(ctx)
            .args(["-d", "--name", &name, "--read-only", "--user", "1337:1337"])
            .args(["--network", "host", TAG, "run", "--target", &target])
            .arg("--outbound")
            .arg(format!("127.0.0.1:{OUTBOUND_PORT}"))
            .arg("--admin")
            .arg(format!("127.0.0.1:{ADMIN_PORT}")),
        "podman run (the proxy)",
        None,
    )?;
    let result = (|| -> Result<()> {
        let started = Instant::now();
        let url = format!("http://127.0.0.1:{ADMIN_PORT}/ready");
        loop {
            let code =
                probe(
                    ctx.cmd("curl")
                        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]),
                );
            if code.as_deref() == Some("200") {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let logs = probe(ctx.cmd("podman").args(["logs", &name])).unwrap_or_default();
                bail!("the proxy in the image did not answer /ready within 20 s:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let user = probe(ctx.cmd("podman").args(["top", &name, "user"]))
            .context("podman top gave nothing")?;
        let users: Vec<&str> = user.lines().skip(1).map(str::trim).collect();
        if users.is_empty() || users.iter().any(|u| *u != "1337") {
            bail!("the proxy does not run as 1337: {user}");
        }
        cmd::run(
            ctx.cmd("podman").args(["stop", "-t", "10", &name]),
            "podman stop",
            None,
        )?;
        let code =
            probe(
                ctx.cmd("podman")
                    .args(["inspect", "--format", "{{.State.ExitCode}}", &name]),
            )
            .unwrap_or_default();
        if code.trim() != "0" {
            let logs = probe(ctx.cmd("podman").args(["logs", &name])).unwrap_or_default();
            bail!(
                "the proxy exited {} on SIGTERM, not 0:\n{logs}",
                code.trim()
            );
        }
        say!("image check: the proxy ran as 1337 on a read-only root, ready, exited 0 on SIGTERM");
        Ok(())
    })();
    let _ = ctx.cmd("podman").args(["rm", "-f", &name]).output();
    result
}
