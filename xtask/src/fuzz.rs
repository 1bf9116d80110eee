//! `cargo xtask fuzz [--seconds N] [TARGET...]`: the coverage-guided targets of `fuzz/` (cargo
//! fuzz, libFuzzer, nightly), each for N seconds (default 60), seeded from the kept corpus
//! `fuzz/corpus/<target>/`. What a run discovers goes to `target/fuzz-corpus/<target>/`, not into
//! the repository; a crash leaves its input in `fuzz/artifacts/<target>/` and fails the run (turn
//! it into a seed and a unit test). `cargo xtask test` runs every target for
//! [`SMOKE_SECONDS`]; a nightly job should run `cargo xtask fuzz --seconds 600`.
use std::path::Path;

use anyhow::{bail, Result};

use crate::cmd::{self, Ctx};
use crate::say;

/// The targets (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &[
    "detect",
    "h1_request",
    "h1_response",
    "h1_chunked",
    "config_file",
    "inject_yaml",
    "log_records",
    "proc_tables",
    "units",
    "tls_hello",
    "spiffe",
    "authz",
    "transcode",
];

/// Seconds per target in `cargo xtask test`: enough to find a shallow regression, bounded.
pub const SMOKE_SECONDS: u32 = 15;

pub const USAGE: &str = "fuzz [--seconds N] [TARGET...]";
pub const HELP: &str = "install cargo-fuzz if missing, build the fuzz targets (nightly) and run \
     each for N seconds (default 60) from its kept corpus; fails on a crash or a broken \
     invariant. Targets: detect, config_file, inject_yaml, log_records, proc_tables, units, \
     tls_hello, spiffe, authz, transcode";

/// Parsed `fuzz` arguments.
#[derive(Debug)]
pub struct Options {
    pub seconds: u32,
    pub targets: Vec<String>,
}

impl Options {
    pub fn parse(args: &[std::ffi::OsString]) -> Result<Options> {
        let mut seconds = 60;
        let mut targets = Vec::new();
        let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    let value = args.next().unwrap_or_default();
                    seconds = match value.parse::<u32>() {
                        Ok(n) if n > 0 => n,
                        _ => bail!("--seconds {value:?}: expected a whole number of seconds"),
                    };
                }
                name if TARGETS.contains(&name) => targets.push(name.to_owned()),
                other => bail!(
                    "unknown fuzz target {other:?}; targets: {}",
                    TARGETS.join(", ")
                ),
            }
        }
        if targets.is_empty() {
            targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
        }
        Ok(Options { seconds, targets })
    }
}

/// Installs cargo-fuzz when it is missing.
fn ensure_cargo_fuzz(ctx: &Ctx) -> Result<()> {
    if ctx.find_program("cargo-fuzz").is_some() {
        return Ok(());
    }
    say!("cargo-fuzz missing: installing it from crates.io");
    cmd::run(
        ctx.cargo().args(["install", "cargo-fuzz", "--locked"]),
        "cargo install cargo-fuzz",
        Some("check that crates.io is reachable"),
    )
}

/// `cargo +nightly fuzz <args>` in fuzz/ (the rustup proxy understands `+nightly`).
fn cargo_fuzz(ctx: &Ctx, args: &[&str]) -> std::process::Command {
    let mut c = ctx.cmd("cargo");
    c.current_dir(ctx.root.join("fuzz"))
        .args(["+nightly", "fuzz"])
        .args(args);
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTFLAGS"] {
        c.env_remove(var);
    }
    c
}

pub fn run(ctx: &Ctx, options: &Options) -> Result<()> {
    ensure_cargo_fuzz(ctx)?;
    // Safe Rust: coverage guidance without AddressSanitizer, which only slows it down here.
    cmd::run(
        &mut cargo_fuzz(ctx, &["build", "--sanitizer", "none"]),
        "cargo fuzz build",
        None,
    )?;
    for target in &options.targets {
        let found = ctx.target_dir.join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&found)?;
        let seeds = ctx.root.join("fuzz/corpus").join(target);
        let found_arg = found.display().to_string();
        let seeds_arg = seeds.display().to_string();
        let time = format!("-max_total_time={}", options.seconds);
        let mut args = vec!["run", "--sanitizer", "none", target.as_str(), &found_arg];
        if Path::new(&seeds).is_dir() {
            args.push(&seeds_arg);
        }
        args.extend(["--", &time, "-print_final_stats=1", "-max_len=4096"]);
        cmd::run(
            &mut cargo_fuzz(ctx, &args),
            &format!("fuzz {target} for {}s", options.seconds),
            Some("the crashing input is in fuzz/artifacts/<target>/: add it to fuzz/corpus/<target>/ and as a unit test, then fix"),
        )?;
    }
    Ok(())
}
