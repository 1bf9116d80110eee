//! Building the eBPF crate (sidecar-ebpf, its own workspace) for bpfel-unknown-none. The sidecar's
//! build.rs embeds the release object, so host builds come after this.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Ctx};
use crate::say;

pub const CRATE_DIR: &str = "sidecar-ebpf";
const TARGET: &str = "bpfel-unknown-none";
const EM_BPF: u16 = 247;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

/// sidecar-ebpf/target/bpfel-unknown-none/<profile>/sidecar-ebpf
pub fn object_path(ctx: &Ctx, profile: Profile) -> PathBuf {
    let dir = match profile {
        Profile::Release => "release",
        Profile::Debug => "debug",
    };
    ctx.root
        .join(CRATE_DIR)
        .join("target")
        .join(TARGET)
        .join(dir)
        .join("sidecar-ebpf")
}

/// Runs `cargo +nightly build [--release] --target bpfel-unknown-none -Z build-std=core` in
/// sidecar-ebpf/ and returns the object's path. Prerequisites must be in place (prereq::ensure).
pub fn build(ctx: &Ctx, profile: Profile) -> Result<PathBuf> {
    let crate_dir = ctx.root.join(CRATE_DIR);
    // `cargo` here is the rustup proxy (found via $CARGO_HOME/bin on our PATH), which understands
    // `+nightly`; $CARGO is the stable cargo binary itself and would not.
    let mut build = ctx.cmd("cargo");
    build.current_dir(&crate_dir).args(["+nightly", "build"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    build
        .args(["--target", TARGET, "-Z", "build-std=core"])
        // Explicit, so a CARGO_TARGET_DIR meant for host builds cannot move the object away from
        // where the sidecar's build.rs looks for it.
        .arg("--target-dir")
        .arg(crate_dir.join("target"));
    // Set by the outer `cargo run` or by the user for host builds; wrong for a BPF target.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO",
    ] {
        build.env_remove(var);
    }
    cmd::run(
        &mut build,
        "eBPF build (sidecar-ebpf)",
        Some(
            "if rustc reported errors in sidecar-ebpf/src, fix the eBPF code; if the link step \
             failed, check `bpf-linker --version` and `cargo xtask prereqs --check`",
        ),
    )?;
    let object = object_path(ctx, profile);
    check_bpf_object(&object)?;
    say!("eBPF object: {}", object.display());
    Ok(object)
}

/// Catches a build that "succeeded" without producing a BPF ELF (e.g. a renamed [[bin]]).
fn check_bpf_object(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| {
        format!(
            "the eBPF build finished but {} is missing (is the [[bin]] in sidecar-ebpf/Cargo.toml still named sidecar-ebpf?)",
            path.display()
        )
    })?;
    // e_ident: magic, EI_CLASS (2 = 64-bit), EI_DATA (1 = little endian); e_machine at offset 18.
    let ok = bytes.len() >= 20
        && bytes[..4] == *b"\x7fELF"
        && bytes[4] == 2
        && bytes[5] == 1
        && u16::from_le_bytes([bytes[18], bytes[19]]) == EM_BPF;
    if !ok {
        bail!(
            "{} is not a little-endian 64-bit BPF ELF object",
            path.display()
        );
    }
    Ok(())
}
