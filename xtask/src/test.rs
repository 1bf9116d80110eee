//! `cargo xtask test`: the project's one test command (README, CI). Runs every test, the privileged
//! ones included, the integration suite a second time with the in-pod redirect on
//! (`SIDECAR_TEST_MSG_REDIRECT=1`), then the format check, clippy and the benchmark harness's smoke run
//! (`bench --quick`, no speed assertions). It never skips: without root it fails.

use std::ffi::OsString;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::cmd::{self, probe, Ctx};
use crate::{ebpf, host, prereq, say};

pub fn run(ctx: &Ctx, extra: &[OsString]) -> Result<()> {
    let started = Instant::now();
    // Environment first: it takes a second, the builds take minutes.
    host::require_privileged_host(ctx, "cargo xtask test")?;
    prereq::ensure(ctx, prereq::Mode::Install)?;
    ensure_stable_component(ctx, "rustfmt", &["fmt", "--version"])?;
    ensure_stable_component(ctx, "clippy", &["clippy", "--version"])?;
    ebpf::build(ctx, ebpf::Profile::Release)?;
    let tools = prereq::test_tools(ctx)?;

    // A build failure leaves nothing to test: stop here.
    cmd::run(
        ctx.cargo().args(["build", "--workspace", "--all-targets"]),
        "cargo build --workspace --all-targets",
        None,
    )?;
    let sidecar = ctx.debug_bin("sidecar");
    if !sidecar.is_file() {
        bail!(
            "{} does not exist after the build; the integration tests need it",
            sidecar.display()
        );
    }

    // From here on, run every step and report all failures together.
    let mut results: Vec<(&str, Result<()>)> = Vec::new();

    let mut tests = if probe(ctx.cargo().args(["nextest", "--version"])).is_some() {
        let mut c = ctx.cargo();
        // Threads and per-test timeouts live in .config/nextest.toml. `--no-tests=warn`:
        // a filter given after `--` may legitimately match nothing.
        c.args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--no-tests=warn",
        ]);
        c
    } else {
        say!("cargo-nextest not found: using cargo test (no per-test timeout)");
        let mut c = ctx.cargo();
        c.args(["test", "--workspace", "--no-fail-fast"]);
        c
    };
    let mut redirected = ctx.cargo();
    for c in [&mut tests, &mut redirected] {
        c.env("SIDECAR_BIN", &sidecar)
            .env("SIDECAR_PROBE_BIN", ctx.debug_bin("sidecar-probe"))
            .env("KUBERNETES_VALIDATE", &tools.kubernetes_validate)
            .env("GRPC_PYTHON", &tools.grpc_python);
    }
    tests.args(extra);
    results.push(("tests", cmd::run(&mut tests, "tests", None)));
    // The integration suite once more with every `sidecar init` given `--msg-redirect` (the
    // in-pod leg socket to socket): what apps, upstreams and operators see must not change.
    if probe(ctx.cargo().args(["nextest", "--version"])).is_some() {
        redirected.args([
            "nextest",
            "run",
            "-p",
            "sidecar-tests",
            "--no-fail-fast",
            "--no-tests=warn",
        ]);
    } else {
        redirected.args(["test", "-p", "sidecar-tests", "--no-fail-fast"]);
    }
    redirected.args(extra).env("SIDECAR_TEST_MSG_REDIRECT", "1");
    results.push((
        "integration tests with --msg-redirect",
        cmd::run(
            &mut redirected,
            "integration tests with --msg-redirect (SIDECAR_TEST_MSG_REDIRECT=1)",
            None,
        ),
    ));

    results.push((
        "format check",
        cmd::run(
            ctx.cargo().args(["fmt", "--all", "--", "--check"]),
            "cargo fmt --check",
            Some("run `cargo fmt --all`"),
        ),
    ));
    // sidecar-ebpf is its own workspace, so `--all` above does not reach it. (No `--all` here:
    // with it cargo-fmt follows the path dependency back into the main workspace.)
    let ebpf_manifest = ctx.root.join(ebpf::CRATE_DIR).join("Cargo.toml");
    results.push((
        "format check (sidecar-ebpf)",
        cmd::run(
            ctx.cargo()
                .arg("fmt")
                .arg("--manifest-path")
                .arg(&ebpf_manifest)
                .args(["--", "--check"]),
            "cargo fmt --check (sidecar-ebpf)",
            Some("run `cargo fmt --manifest-path sidecar-ebpf/Cargo.toml`"),
        ),
    ));
    // The workspace's lint policy (`[workspace.lints]` in Cargo.toml): a warning fails the run.
    results.push((
        "clippy",
        cmd::run(
            ctx.cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "cargo clippy -- -D warnings",
            Some("fix the warnings above (or allow one where it is wrong, saying why)"),
        ),
    ));

    // Every fuzz target for a short, bounded run from its kept corpus: a crash or a broken
    // invariant fails the run (`cargo xtask fuzz --seconds 600` is the long run). Skipped when a
    // test filter was given, as the bench smoke is.
    if extra.is_empty() {
        let opts = crate::fuzz::Options {
            seconds: crate::fuzz::SMOKE_SECONDS,
            targets: crate::fuzz::TARGETS
                .iter()
                .map(|t| (*t).to_owned())
                .collect(),
        };
        results.push((
            "fuzz smoke (cargo xtask fuzz --seconds 15)",
            crate::fuzz::run(ctx, &opts),
        ));
    }

    // The benchmark harness's smoke run: every target starts and answers through the right path
    // and every tool's output parses. It asserts no speed (that would be flaky on a shared
    // machine); speed is what `cargo xtask bench` reports. Skipped when a test filter was given.
    if extra.is_empty() {
        let opts = crate::bench::Options {
            quick: true,
            rounds: None,
            only: None,
            sidecar: None,
            perf: false,
        };
        results.push((
            "bench smoke (cargo xtask bench --quick)",
            crate::bench::run(ctx, &opts),
        ));
    }

    // The container image, built offline and run as a user would (after the bench smoke, which
    // built the same release binary). Skipped when a test filter was given.
    if extra.is_empty() {
        results.push((
            "image (cargo xtask image: build, --version, doctor, the proxy as 1337 read-only)",
            crate::image::run(ctx).map(|_| ()),
        ));
    }

    say!("summary ({} in all):", cmd::elapsed(started.elapsed()));
    for (name, r) in &results {
        say!("  {name}: {}", if r.is_ok() { "ok" } else { "FAILED" });
    }
    // The first failure decides the exit code, as if that tool had been run alone.
    match results.into_iter().find_map(|(_, r)| r.err()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// rustfmt and clippy ship with most toolchains but not with a `minimal` profile.
fn ensure_stable_component(ctx: &Ctx, component: &str, check: &[&str]) -> Result<()> {
    if let Some(v) = probe(ctx.cargo().args(check)) {
        say!("check {component}: present ({})", v.trim());
        return Ok(());
    }
    say!("check {component}: missing -> rustup component add {component}");
    // No --toolchain: rustup uses RUSTUP_TOOLCHAIN, i.e. the toolchain running xtask.
    cmd::run(
        ctx.cmd("rustup").args(["component", "add", component]),
        &format!("rustup component add {component}"),
        Some(&format!(
            "install it yourself with `rustup component add {component}`"
        )),
    )
}
