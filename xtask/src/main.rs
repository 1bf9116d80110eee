//! Project automation, run as `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! Each command is a module with a `run` function; adding one means one entry in COMMANDS, one
//! match arm in `dispatch` and the module.

mod bench;
mod cmd;
mod demo;
mod ebpf;
mod fuzz;
mod host;
mod image;
mod prereq;
mod release;
mod test;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};

use cmd::{Ctx, StepFailed};

const COMMANDS: &[(&str, &str)] = &[
    (
        "build-ebpf [--debug]",
        "install missing prerequisites, build sidecar-ebpf for bpfel-unknown-none (release unless \
         --debug) and print the object path",
    ),
    (
        "test [-- ARGS]",
        "prerequisites, eBPF build, workspace build, ALL tests (privileged ones too: needs root), \
         cargo fmt --check, cargo clippy. ARGS go to cargo nextest run (e.g. a test name filter)",
    ),
    (
        "demo [-- ARGS]",
        "prerequisites, builds, then runs target/debug/sidecar-demo (needs root)",
    ),
    (bench::USAGE, bench::HELP),
    (fuzz::USAGE, fuzz::HELP),
    (
        "image",
        "build the container image sidecar:0.1.0 offline with podman (the release binary and the \
         shared objects it links, FROM scratch) and run it: --version, doctor, the proxy as UID \
         1337 on a read-only root filesystem (needs root)",
    ),
    (
        "release",
        "build target/release/sidecar as the image ships it and the bench measures it: \
         profile-guided (an instrumented build trained on the bench's sidecar targets, needs \
         root; SIDECAR_PGO=off builds without a profile) and print its path",
    ),
    (
        "check-host",
        "check what the privileged tests need from this machine: root with CAP_BPF, CAP_SYS_ADMIN \
         and CAP_NET_ADMIN, a cgroup v2 mount, bpffs at /sys/fs/bpf (mounted if missing)",
    ),
    (
        "prereqs [--check]",
        "only check/install the build prerequisites (llvm-22-dev, bpftool, iproute2, nightly + \
         rust-src, bpf-linker); --check installs nothing and fails if something is missing",
    ),
];

/// Exit code for bad usage (sysexits EX_USAGE, as the sidecar binary uses).
const EX_USAGE: u8 = 64;

fn usage() -> String {
    let mut s = String::from("usage: cargo xtask <command>\n\ncommands:\n");
    for (name, help) in COMMANDS {
        s.push_str(&format!("  {name}\n      {help}\n"));
    }
    s
}

enum Parsed {
    Run(Command),
    Help,
}

enum Command {
    BuildEbpf { profile: ebpf::Profile },
    Test { extra: Vec<OsString> },
    Demo { extra: Vec<OsString> },
    Prereqs { mode: prereq::Mode },
    CheckHost,
    Bench(bench::Options),
    Fuzz(fuzz::Options),
    Image,
    Release,
}

fn parse(args: Vec<OsString>) -> Result<Parsed> {
    let mut args = args.into_iter();
    let Some(name) = args.next() else {
        return Ok(Parsed::Help);
    };
    let rest: Vec<OsString> = args.collect();
    let wants_help = |rest: &[OsString]| rest.first().is_some_and(|a| a == "-h" || a == "--help");
    if wants_help(&rest) {
        return Ok(Parsed::Help);
    }
    // Commands that pass arguments on: everything, minus a leading "--".
    let passthrough = |rest: Vec<OsString>| -> Vec<OsString> {
        match rest.first() {
            Some(a) if a == "--" => rest.into_iter().skip(1).collect(),
            _ => rest,
        }
    };
    // Commands with flags only: every argument must be one of `allowed`.
    let flags = |rest: &[OsString], allowed: &[&str]| -> Result<Vec<String>> {
        rest.iter()
            .map(|a| match a.to_str() {
                Some(a) if allowed.contains(&a) => Ok(a.to_string()),
                _ => bail!("unexpected argument {a:?} for `{}`", name.to_string_lossy()),
            })
            .collect()
    };
    let command = match name.to_str() {
        Some("-h" | "--help" | "help") => return Ok(Parsed::Help),
        Some("build-ebpf") => {
            let f = flags(&rest, &["--debug", "--release"])?;
            let profile = if f.iter().any(|a| a == "--debug") {
                ebpf::Profile::Debug
            } else {
                ebpf::Profile::Release
            };
            Command::BuildEbpf { profile }
        }
        Some("test") => Command::Test {
            extra: passthrough(rest),
        },
        Some("demo") => Command::Demo {
            extra: passthrough(rest),
        },
        Some("prereqs") => {
            let f = flags(&rest, &["--check"])?;
            let mode = if f.is_empty() {
                prereq::Mode::Install
            } else {
                prereq::Mode::CheckOnly
            };
            Command::Prereqs { mode }
        }
        Some("bench") => Command::Bench(bench::Options::parse(&rest)?),
        Some("fuzz") => Command::Fuzz(fuzz::Options::parse(&rest)?),
        Some("image") => {
            flags(&rest, &[])?;
            Command::Image
        }
        Some("release") => {
            flags(&rest, &[])?;
            Command::Release
        }
        Some("check-host") => {
            flags(&rest, &[])?;
            Command::CheckHost
        }
        _ => bail!("unknown command {name:?}"),
    };
    Ok(Parsed::Run(command))
}

fn dispatch(ctx: &Ctx, command: Command) -> Result<()> {
    match command {
        Command::BuildEbpf { profile } => {
            prereq::ensure(ctx, prereq::Mode::Install)?;
            let object = ebpf::build(ctx, profile)?;
            if profile == ebpf::Profile::Debug {
                say!(
                    "the sidecar embeds the release object by default; to embed this one: \
                     {}={} cargo build -p sidecar",
                    cmd::EBPF_OBJECT_VAR,
                    object.display()
                );
            }
            // Alone on stdout, for scripts: `obj=$(cargo xtask build-ebpf)`.
            println!("{}", object.display());
            Ok(())
        }
        Command::Test { extra } => test::run(ctx, &extra),
        Command::Demo { extra } => demo::run(ctx, &extra),
        Command::Prereqs { mode } => prereq::ensure(ctx, mode),
        Command::CheckHost => host::require_privileged_host(ctx, "cargo xtask check-host"),
        Command::Bench(opts) => bench::run(ctx, &opts),
        Command::Image => {
            prereq::ensure(ctx, prereq::Mode::Install)?;
            image::run(ctx).map(|_| ())
        }
        Command::Release => {
            prereq::ensure(ctx, prereq::Mode::Install)?;
            let binary = release::build(ctx)?;
            println!("{}", binary.display());
            Ok(())
        }
        Command::Fuzz(opts) => {
            prereq::ensure(ctx, prereq::Mode::Install)?;
            fuzz::run(ctx, &opts)
        }
    }
}

fn main() -> ExitCode {
    let command = match parse(std::env::args_os().skip(1).collect()) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("xtask: {e:#}\n\n{}", usage());
            return ExitCode::from(EX_USAGE);
        }
    };
    let started = Instant::now();
    let result = Ctx::new().and_then(|ctx| dispatch(&ctx, command));
    match result {
        Ok(()) => {
            say!("done ({})", cmd::elapsed(started.elapsed()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            // Propagate the failing tool's own exit code (clamped to 1..=255).
            let code = e
                .downcast_ref::<StepFailed>()
                .and_then(|f| f.code)
                .and_then(|c| u8::try_from(c).ok())
                .filter(|c| *c != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}
