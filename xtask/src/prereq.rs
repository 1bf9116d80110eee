//! Build prerequisites for the eBPF crate, each checked and installed only if missing (so a second
//! run changes nothing), one line per step. Recipe: shared/toolchain.md.
//!
//! 1. Debian packages: llvm-22-dev (bpf-linker links it), bpftool and iproute2 (tests inspect with
//!    them). `apt-get update` runs once, only when something must be installed.
//! 2. The nightly toolchain and its rust-src (`-Z build-std=core`).
//! 3. bpf-linker built against that same LLVM major (a plain `cargo install bpf-linker` wants a newer
//!    LLVM than Debian ships and fails to link).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, probe, Ctx};
use crate::say;

/// LLVM major shared by rustc nightly, Debian's llvm-22-dev and bpf-linker. bpf-linker reads the
/// bitcode rustc emits, so its LLVM must not be older than rustc's.
pub const LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "~0.13";

pub fn llvm_prefix() -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Install what is missing.
    Install,
    /// Only report; fail if anything is missing (`cargo xtask prereqs --check`).
    CheckOnly,
}

pub fn ensure(ctx: &Ctx, mode: Mode) -> Result<()> {
    let started = Instant::now();
    let mut missing = Vec::new();
    debian_packages(ctx, mode, &mut missing)?;
    nightly(ctx, mode, &mut missing)?;
    bpf_linker(ctx, mode, &mut missing)?;
    if !missing.is_empty() {
        bail!(
            "missing prerequisites: {}. Run `cargo xtask prereqs` (as root) to install them.",
            missing.join(", ")
        );
    }
    say!(
        "prerequisites: all present ({})",
        cmd::elapsed(started.elapsed())
    );
    Ok(())
}

struct DebPackage {
    name: String,
    /// What the check looked at, for the progress line.
    found: Option<String>,
}

fn debian_packages(ctx: &Ctx, mode: Mode, missing: &mut Vec<String>) -> Result<()> {
    let llvm_pkg = format!("llvm-{LLVM_MAJOR}-dev");
    let packages = [
        DebPackage {
            found: llvm_dev_found(ctx, &llvm_pkg),
            name: llvm_pkg,
        },
        DebPackage {
            name: "bpftool".into(),
            found: ctx.find_program("bpftool").map(|p| p.display().to_string()),
        },
        DebPackage {
            name: "iproute2".into(),
            found: ctx.find_program("ip").map(|p| p.display().to_string()),
        },
        // The tests' real clients and servers: curl as the app and the operator, Prometheus
        // (and promtool) scraping a pod and checking the shipped rules.
        DebPackage {
            name: "curl".into(),
            found: ctx.find_program("curl").map(|p| p.display().to_string()),
        },
        // The mTLS and authorization tests: tcpdump captures the wire between two pods; openssl
        // is a TLS client with a certificate of our choosing; nghttp an HTTP/2 client with
        // several streams on one connection; redis-server a real non-HTTP server.
        DebPackage {
            name: "tcpdump".into(),
            found: ctx.find_program("tcpdump").map(|p| p.display().to_string()),
        },
        DebPackage {
            name: "openssl".into(),
            found: ctx.find_program("openssl").map(|p| p.display().to_string()),
        },
        DebPackage {
            name: "nghttp2-client".into(),
            found: ctx.find_program("nghttp").map(|p| p.display().to_string()),
        },
        DebPackage {
            name: "redis-server".into(),
            found: ctx
                .find_program("redis-server")
                .and(ctx.find_program("redis-cli"))
                .map(|p| p.display().to_string()),
        },
        // The image (`cargo xtask image`): podman builds it, runc runs it (crun refuses hybrid
        // cgroup hierarchies).
        DebPackage {
            name: "podman".into(),
            found: ctx.find_program("podman").map(|p| p.display().to_string()),
        },
        DebPackage {
            name: "runc".into(),
            found: ctx.find_program("runc").map(|p| p.display().to_string()),
        },
        // The CNI plugin's test chains it after the reference `bridge` plugin (host-local IPAM).
        DebPackage {
            name: "containernetworking-plugins".into(),
            found: Some(PathBuf::from("/usr/lib/cni/bridge"))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string()),
        },
        DebPackage {
            name: "prometheus".into(),
            found: ctx
                .find_program("promtool")
                .and(ctx.find_program("prometheus"))
                .map(|p| p.display().to_string()),
        },
    ];
    let mut to_install = Vec::new();
    for p in &packages {
        match &p.found {
            Some(what) => say!("check Debian package {}: present ({what})", p.name),
            None => {
                say!("check Debian package {}: missing", p.name);
                to_install.push(p.name.clone());
            }
        }
    }
    if to_install.is_empty() {
        return Ok(());
    }
    let list = to_install.join(" ");
    if mode == Mode::CheckOnly {
        say!(
            "would run: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {list}"
        );
        missing.extend(to_install);
        return Ok(());
    }
    if !ctx.is_root {
        bail!(
            "Debian packages {list} must be installed and that needs root: run as root, or install \
             them yourself: `sudo apt-get update && sudo apt-get install -y {list}`"
        );
    }
    let hint = format!(
        "check that Debian's package lists are reachable and that no other apt/dpkg is stuck, then \
         run `apt-get update && apt-get install -y {list}` yourself and retry"
    );
    // Wait for a dpkg lock held by another apt run (e.g. unattended-upgrades on a fresh VM)
    // instead of failing at once.
    let lock_wait = "DPkg::Lock::Timeout=300";
    cmd::run(
        ctx.cmd("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", lock_wait, "update"]),
        "apt-get update",
        Some(&hint),
    )?;
    cmd::run(
        ctx.cmd("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Without recommends: Prometheus would bring its node exporter, a daemon.
            .args(["-o", lock_wait, "install", "-y", "--no-install-recommends"])
            .args(&to_install),
        &format!("apt-get install {list}"),
        Some(&hint),
    )?;
    // Re-check: apt can exit 0 without giving us what we test for (e.g. a virtual package).
    for name in &to_install {
        let ok = match name.as_str() {
            "bpftool" => ctx.find_program("bpftool").is_some(),
            "iproute2" => ctx.find_program("ip").is_some(),
            "curl" => ctx.find_program("curl").is_some(),
            "tcpdump" => ctx.find_program("tcpdump").is_some(),
            "openssl" => ctx.find_program("openssl").is_some(),
            "redis-server" => ctx.find_program("redis-server").is_some(),
            "nghttp2-client" => ctx.find_program("nghttp").is_some(),
            "podman" => ctx.find_program("podman").is_some(),
            "runc" => ctx.find_program("runc").is_some(),
            "containernetworking-plugins" => Path::new("/usr/lib/cni/bridge").exists(),
            "prometheus" => {
                ctx.find_program("promtool").is_some() && ctx.find_program("prometheus").is_some()
            }
            llvm => llvm_dev_found(ctx, llvm).is_some(),
        };
        if !ok {
            bail!("{name} was installed but the check for it still fails; {hint}");
        }
        say!("check Debian package {name}: now present");
    }
    Ok(())
}

/// llvm-N-dev counts as present if dpkg says so, or if its shared library and llvm-config (all that
/// building bpf-linker with LLVM_PREFIX uses) are there, e.g. on a non-Debian-packaged LLVM.
fn llvm_dev_found(ctx: &Ctx, pkg: &str) -> Option<String> {
    let dpkg = probe(ctx.cmd("dpkg-query").args(["-W", "-f=${Status}", pkg]));
    if dpkg.is_some_and(|s| s.contains("install ok installed")) {
        return Some("dpkg: installed".into());
    }
    let prefix = llvm_prefix();
    let lib = find_libllvm(&prefix.join("lib"))?;
    let config = prefix.join("bin/llvm-config");
    config
        .is_file()
        .then(|| format!("{} and {}", lib.display(), config.display()))
}

fn find_libllvm(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
}

fn nightly(ctx: &Ctx, mode: Mode, missing: &mut Vec<String>) -> Result<()> {
    let Some(list) = probe(ctx.cmd("rustup").args(["toolchain", "list"])) else {
        bail!(
            "`rustup toolchain list` failed: rustup is needed to get the nightly toolchain. Install \
             rustup (https://rustup.rs) or put $CARGO_HOME/bin on PATH (source ~/.cargo/env)."
        );
    };
    // "nightly-x86_64-unknown-linux-gnu (active)": the plain nightly channel, not a dated
    // "nightly-2025-01-01-..." one, because the build runs `cargo +nightly`.
    let present = list.lines().find_map(|l| {
        let name = l.split_whitespace().next()?;
        let rest = name.strip_prefix("nightly-")?;
        (!rest.starts_with(|c: char| c.is_ascii_digit())).then(|| name.to_string())
    });
    match present {
        Some(name) => say!("check nightly toolchain: present ({name})"),
        None if mode == Mode::CheckOnly => {
            say!("check nightly toolchain: missing; would run: rustup toolchain install nightly --profile minimal");
            missing.push("nightly toolchain".into());
            // rust-src and the LLVM check need the toolchain; nothing more to look at.
            return Ok(());
        }
        None => {
            say!("check nightly toolchain: missing -> installing");
            cmd::run(
                ctx.cmd("rustup")
                    .args(["toolchain", "install", "nightly", "--profile", "minimal"]),
                "rustup toolchain install nightly",
                Some("check network access to the Rust distribution server, or install a nightly toolchain yourself: `rustup toolchain install nightly --profile minimal`"),
            )?;
        }
    }

    let installed = probe(ctx.cmd("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    // Component names carry the target ("rust-std-x86_64-...") except rust-src, which is "rust-src".
    if installed.lines().any(|l| l.trim() == "rust-src") {
        say!("check rust-src for nightly: present");
    } else if mode == Mode::CheckOnly {
        say!("check rust-src for nightly: missing; would run: rustup component add rust-src --toolchain nightly");
        missing.push("rust-src (nightly)".into());
    } else {
        say!("check rust-src for nightly: missing -> installing");
        cmd::run(
            ctx.cmd("rustup")
                .args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src --toolchain nightly",
            Some("`-Z build-std=core` needs the standard library sources; check access to the Rust distribution server and run `rustup component add rust-src --toolchain nightly` yourself"),
        )?;
    }

    // A nightly newer than bpf-linker's LLVM emits bitcode bpf-linker cannot read; say so here
    // instead of letting the link fail with an obscure bitcode error.
    let vv = probe(ctx.cmd("rustup").args(["run", "nightly", "rustc", "-vV"])).unwrap_or_default();
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(str::trim);
    match llvm.and_then(|v| v.split('.').next()?.parse::<u32>().ok()) {
        Some(major) if major > LLVM_MAJOR => bail!(
            "nightly rustc uses LLVM {major} but bpf-linker is built against LLVM {LLVM_MAJOR}: \
             install a nightly that uses LLVM {LLVM_MAJOR} (e.g. `rustup toolchain install nightly-<date>` \
             and make it `nightly`), or raise LLVM_MAJOR in xtask/src/prereq.rs and reinstall bpf-linker"
        ),
        Some(major) => say!("check nightly's LLVM: {major} (bpf-linker's is {LLVM_MAJOR}): ok"),
        None => say!("check nightly's LLVM: unknown (`rustc +nightly -vV` printed no LLVM version); continuing"),
    }
    Ok(())
}

fn bpf_linker(ctx: &Ctx, mode: Mode, missing: &mut Vec<String>) -> Result<()> {
    let version = probe(ctx.cmd("bpf-linker").arg("--version")).map(|v| v.trim().to_string());
    let mut reinstall = false;
    match &version {
        Some(v) => match linked_llvm_major(ctx) {
            // Older than rustc's LLVM: it cannot read the bitcode. A newer one can, so keep it.
            Some(major) if major < LLVM_MAJOR => {
                say!("check bpf-linker: {v}, but linked against LLVM {major}, older than {LLVM_MAJOR} -> reinstalling");
                reinstall = true;
            }
            Some(major) => {
                say!("check bpf-linker: present ({v}, LLVM {major})");
                return Ok(());
            }
            // Statically linked (or no ldd): trust it; the eBPF build will tell.
            None => {
                say!("check bpf-linker: present ({v})");
                return Ok(());
            }
        },
        None => say!("check bpf-linker: `bpf-linker --version` failed (not installed or broken)"),
    }

    let mut install = ctx.cargo();
    install
        .env("LLVM_PREFIX", llvm_prefix())
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{LLVM_MAJOR}"));
    if reinstall {
        install.arg("--force");
    }
    if mode == Mode::CheckOnly {
        say!("would run: {}", cmd::display(&install));
        missing.push("bpf-linker".into());
        return Ok(());
    }
    say!(
        "installing bpf-linker into {}/bin (about 4 minutes on 2 cores)",
        ctx.cargo_home.display()
    );
    cmd::run(
        &mut install,
        "cargo install bpf-linker",
        Some(&format!(
            "it needs llvm-{LLVM_MAJOR}-dev (/usr/lib/llvm-{LLVM_MAJOR}/bin/llvm-config) and crates.io; \
             a plain `cargo install bpf-linker` does not work here"
        )),
    )?;
    match probe(ctx.cmd("bpf-linker").arg("--version")) {
        Some(v) => say!("check bpf-linker: now present ({})", v.trim()),
        None => bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails; is {}/bin writable and \
             on PATH?",
            ctx.cargo_home.display()
        ),
    }
    Ok(())
}

/// The LLVM major of the libLLVM bpf-linker is dynamically linked against ("libLLVM.so.22.1").
fn linked_llvm_major(ctx: &Ctx) -> Option<u32> {
    let path = ctx.find_program("bpf-linker")?;
    let out = probe(ctx.cmd("ldd").arg(path))?;
    out.lines().find_map(|l| {
        let name = l.split_whitespace().next()?;
        let rest = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"))?;
        rest.split(['.', '-']).next()?.parse().ok()
    })
}

/// Version of the offline Kubernetes schema validator the manifest tests use.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The transcoding tests' independent gRPC app and client (tests/fixtures/transcode/*.py).
const GRPC_PYTHON: &[&str] = &["grpcio==1.85.3", "protobuf==7.36.2"];

/// Tools only the tests need, each in its own venv under target/tools (nothing goes into the
/// system Python). The tests receive them as environment variables of the same names.
pub struct TestTools {
    /// $KUBERNETES_VALIDATE: the kubernetes-validate script.
    pub kubernetes_validate: PathBuf,
    /// $GRPC_PYTHON: a python with grpcio and protobuf.
    pub grpc_python: PathBuf,
}

pub fn test_tools(ctx: &Ctx) -> Result<TestTools> {
    Ok(TestTools {
        kubernetes_validate: python_venv(
            ctx,
            &Venv {
                dir: "kubernetes-validate",
                packages: &[KUBERNETES_VALIDATE],
                product: "bin/kubernetes-validate",
                env: "KUBERNETES_VALIDATE",
            },
        )?,
        grpc_python: python_venv(
            ctx,
            &Venv {
                dir: "grpcio",
                packages: GRPC_PYTHON,
                product: "bin/python",
                env: "GRPC_PYTHON",
            },
        )?,
    })
}

/// A venv under target/tools with pinned PyPI packages.
struct Venv {
    /// Directory under target/tools.
    dir: &'static str,
    /// pip requirements, installed with one `pip install`.
    packages: &'static [&'static str],
    /// The file the tests use, relative to the venv.
    product: &'static str,
    /// The environment variable the tests read it from.
    env: &'static str,
}

/// Makes the venv unless it holds exactly `packages` (a stamp written after a successful install
/// records them, so a changed pin reinstalls); returns the path of its product.
fn python_venv(ctx: &Ctx, v: &Venv) -> Result<PathBuf> {
    let venv = ctx.target_dir.join("tools").join(v.dir);
    let product = venv.join(v.product);
    let stamp = venv.join("xtask-installed.txt");
    let wanted = v.packages.join(" ");
    if product.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        say!("check {wanted}: present ({})", venv.display());
        return Ok(product);
    }
    say!(
        "check {wanted}: missing (or other versions), installing into {}",
        venv.display()
    );
    let hint = format!(
        "check that PyPI is reachable; or make the venv yourself (`python3 -m venv {0} && \
         {0}/bin/pip install {wanted}`) and, to run the tests by hand, set {1}={2}",
        venv.display(),
        v.env,
        product.display()
    );
    let python = ctx.find_program("python3").ok_or_else(|| {
        anyhow::anyhow!("python3 is not installed: `apt-get install -y python3 python3-venv`")
    })?;
    let venv_ok = ctx
        .cmd(&python)
        .args(["-m", "venv", "--help"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !venv_ok {
        if !ctx.is_root {
            bail!("python3-venv is missing and installing it needs root: `sudo apt-get install -y python3-venv`");
        }
        cmd::run(
            ctx.cmd("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args([
                    "-o",
                    "DPkg::Lock::Timeout=300",
                    "install",
                    "-y",
                    "python3-venv",
                ]),
            "apt-get install python3-venv",
            Some(&hint),
        )?;
    }
    // A half-made venv from an interrupted run would make `venv` succeed and pip fail oddly.
    let _ = fs::remove_dir_all(&venv);
    cmd::run(
        ctx.cmd(&python).arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
        Some(&hint),
    )?;
    cmd::run(
        ctx.cmd(venv.join("bin/pip"))
            .args(["install", "--disable-pip-version-check", "--quiet"])
            .args(v.packages),
        &format!("pip install {wanted}"),
        Some(&hint),
    )?;
    if !product.is_file() {
        bail!(
            "pip installed {wanted} but {} is missing; {hint}",
            product.display()
        );
    }
    fs::write(&stamp, format!("{wanted}\n"))
        .with_context(|| format!("cannot write {}", stamp.display()))?;
    say!("check {wanted}: now present");
    Ok(product)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_prefix_matches_major() {
        assert_eq!(llvm_prefix(), Path::new("/usr/lib/llvm-22"));
    }
}
