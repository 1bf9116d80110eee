//! `cargo xtask demo`: builds everything and runs the demo binary (`sidecar-demo`, from the
//! sidecar-tests crate), which makes a demo pod, runs `sidecar init` + `sidecar run`, sends
//! requests, prints what happened and cleans up.

use std::ffi::OsString;

use anyhow::{bail, Result};

use crate::cmd::{self, Ctx};
use crate::{ebpf, host, prereq};

pub fn run(ctx: &Ctx, extra: &[OsString]) -> Result<()> {
    host::require_privileged_host(ctx, "cargo xtask demo")?;
    prereq::ensure(ctx, prereq::Mode::Install)?;
    ebpf::build(ctx, ebpf::Profile::Release)?;
    cmd::run(
        ctx.cargo().args(["build", "--workspace"]),
        "cargo build --workspace",
        None,
    )?;
    let sidecar = ctx.debug_bin("sidecar");
    let demo = ctx.debug_bin("sidecar-demo");
    for bin in [&sidecar, &demo] {
        if !bin.is_file() {
            bail!(
                "{} does not exist after `cargo build --workspace` (sidecar-demo is a [[bin]] of the \
                 sidecar-tests crate in tests/)",
                bin.display()
            );
        }
    }
    cmd::run(
        ctx.cmd(&demo)
            .args(extra)
            .env("SIDECAR_BIN", &sidecar)
            .env("SIDECAR_PROBE_BIN", ctx.debug_bin("sidecar-probe")),
        "demo",
        None,
    )
}
