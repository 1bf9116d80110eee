//! The release `sidecar` (what the image ships and the bench measures), built with
//! profile-guided optimisation:
//!
//! 1. an instrumented build (`-Cprofile-generate`) in `target/pgo/build`. Not with an explicit
//!    `--target` (which would keep build scripts uninstrumented): symbol names then differ from
//!    the final build's and the profile would match nothing;
//! 2. training: the bench lab's sidecar targets run briefly with that binary (eBPF capture and
//!    iptables, `--target`, inbound, mutual TLS with and without authorization, REST to gRPC),
//!    with real clients (oha, wrk, curl) and upstreams (nginx). Each proxy writes its counts when
//!    it exits on SIGTERM; `llvm-profdata` merges them into `target/pgo/sidecar.profdata`;
//! 3. the release build with `-Cprofile-use` (rustc tracks the profile as an input, so a new
//!    profile rebuilds what it touches).
//!
//! The training reruns only when the instrumented binary changed (its size and modification
//! time are kept in `target/pgo/trained-on`). It needs what the bench needs: root, cgroup v2,
//! the bench tools. `SIDECAR_PGO=off` builds without a profile (a plain `cargo build
//! --release`), for a machine where the training cannot run; numbers from such a binary are not
//! the ones docs/performance.md reports.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, probe, Ctx};
use crate::{bench, ebpf, prereq, say};

/// Set to `off` to build the release binary without profile-guided optimisation.
pub const PGO_VAR: &str = "SIDECAR_PGO";

/// False when `SIDECAR_PGO=off` asks for a plain release build.
pub fn pgo_enabled() -> bool {
    std::env::var(PGO_VAR).map_or(true, |v| v != "off")
}

/// Builds `target/release/sidecar` (eBPF object embedded) and returns its path.
pub fn build(ctx: &Ctx) -> Result<PathBuf> {
    ebpf::build(ctx, ebpf::Profile::Release)?;
    let release = ctx.target_dir.join("release").join("sidecar");
    let pgo = std::env::var(PGO_VAR).unwrap_or_default();
    if pgo == "off" {
        say!("{PGO_VAR}=off: release build without profile-guided optimisation");
        cmd::run(
            ctx.cargo().args(["build", "--release", "-p", "sidecar"]),
            "cargo build --release -p sidecar",
            None,
        )?;
        return present(release);
    }
    if !pgo.is_empty() {
        bail!("{PGO_VAR}={pgo}: the only value it takes is `off` (unset builds with PGO)");
    }
    let llvm_major = rustc_llvm_major(ctx)?;
    let profdata_tool = prereq::llvm_prefix().join("bin").join("llvm-profdata");
    if llvm_major != prereq::LLVM_MAJOR {
        bail!(
            "profile-guided release build: rustc uses LLVM {llvm_major}, but the profile merger \
             this machine gets is LLVM {want}'s, and a profile only merges with the same major \
             version. Use a stable rustc on LLVM {want}, or raise LLVM_MAJOR in \
             xtask/src/prereq.rs (and run `cargo xtask prereqs`); or build without a profile: \
             {PGO_VAR}=off",
            want = prereq::LLVM_MAJOR
        );
    }
    if !profdata_tool.is_file() {
        bail!(
            "profile-guided release build: {} is missing. Run `cargo xtask prereqs` (it installs \
             llvm-{}-dev, which brings it), or build without a profile: {PGO_VAR}=off",
            profdata_tool.display(),
            prereq::LLVM_MAJOR
        );
    }

    let dir = ctx.target_dir.join("pgo");
    let raw = dir.join("raw");
    let profile = dir.join("sidecar.profdata");
    let stamp = dir.join("trained-on");
    let build_dir = dir.join("build");
    cmd::run(
        ctx.cargo()
            .args(["build", "--release", "-p", "sidecar"])
            .arg("--target-dir")
            .arg(&build_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", flag("-Cprofile-generate=", &raw))
            .env_remove("RUSTFLAGS"),
        "instrumented release build (PGO training binary)",
        None,
    )?;
    let instrumented = present(build_dir.join("release").join("sidecar"))?;
    let fingerprint = fingerprint(&instrumented)?;
    if profile.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(&fingerprint) {
        say!(
            "PGO profile {} is from this instrumented binary: no new training",
            profile.display()
        );
    } else {
        train(ctx, &instrumented, &raw, &profdata_tool, &profile)?;
        fs::write(&stamp, &fingerprint).with_context(|| format!("write {}", stamp.display()))?;
    }
    cmd::run(
        ctx.cargo()
            .args(["build", "--release", "-p", "sidecar"])
            .env("CARGO_ENCODED_RUSTFLAGS", flag("-Cprofile-use=", &profile))
            .env_remove("RUSTFLAGS"),
        "cargo build --release -p sidecar (with the PGO profile)",
        None,
    )?;
    present(release)
}

/// Runs the training and merges what the proxies wrote into `profile`.
fn train(ctx: &Ctx, binary: &Path, raw: &Path, tool: &Path, profile: &Path) -> Result<()> {
    if raw.exists() {
        fs::remove_dir_all(raw).with_context(|| format!("remove {}", raw.display()))?;
    }
    fs::create_dir_all(raw).with_context(|| format!("create {}", raw.display()))?;
    // The proxies run as uid 1337: each writes a file of its own here (sticky, like /tmp).
    fs::set_permissions(raw, fs::Permissions::from_mode(0o1777))?;
    bench::train(ctx, binary, &raw.join("sidecar-%p.profraw"))?;
    let mut files: Vec<PathBuf> = fs::read_dir(raw)
        .with_context(|| format!("read {}", raw.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "the PGO training ran but no proxy wrote a profile into {} (each writes one when it \
             exits on SIGTERM); see the lab logs above",
            raw.display()
        );
    }
    say!("PGO training: {} process profile(s)", files.len());
    let partial = profile.with_extension("profdata.partial");
    cmd::run(
        ctx.cmd(tool)
            .arg("merge")
            .arg("-o")
            .arg(&partial)
            .args(&files),
        "llvm-profdata merge",
        None,
    )?;
    fs::rename(&partial, profile).with_context(|| format!("write {}", profile.display()))?;
    Ok(())
}

/// The LLVM major version of the rustc that builds the workspace.
fn rustc_llvm_major(ctx: &Ctx) -> Result<u32> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let vv = probe(ctx.cmd(&rustc).arg("-vV")).context("cannot run `rustc -vV`")?;
    parse_rustc_vv(&vv).with_context(|| format!("unexpected `rustc -vV` output:\n{vv}"))
}

fn parse_rustc_vv(vv: &str) -> Option<u32> {
    let version = vv.lines().find_map(|l| l.strip_prefix("LLVM version:"))?;
    version.trim().split('.').next()?.parse().ok()
}

/// One rustc flag with a path, for `CARGO_ENCODED_RUSTFLAGS` (a single flag, so a path with
/// spaces stays whole; `RUSTFLAGS` would split it).
fn flag(prefix: &str, path: &Path) -> std::ffi::OsString {
    let mut flag = std::ffi::OsString::from(prefix);
    flag.push(path);
    flag
}

fn fingerprint(bin: &Path) -> Result<String> {
    let meta = fs::metadata(bin).with_context(|| format!("stat {}", bin.display()))?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    Ok(format!("{} bytes, modified {mtime}\n", meta.len()))
}

fn present(path: PathBuf) -> Result<PathBuf> {
    if !path.is_file() {
        bail!("{} is missing after the build", path.display());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustc_version_output() {
        let vv = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n";
        assert_eq!(parse_rustc_vv(vv), Some(22));
        assert_eq!(parse_rustc_vv("rustc 1.95.0\nhost: x\n"), None);
    }
}
