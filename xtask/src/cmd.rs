//! Running child processes: one place that decides PATH, stdin, the working directory and how a
//! failure is reported, so every step behaves the same in a terminal and in CI (no stdin, CI=true).

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::host;

/// Progress line on stderr (stdout is kept for results such as the eBPF object path).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("xtask: {}", format_args!($($arg)*)) };
}

/// A child process that ran and failed. `main` turns `code` into xtask's own exit code so that CI
/// sees the same status as the failing tool.
#[derive(Debug)]
pub struct StepFailed {
    pub what: String,
    pub code: Option<i32>,
    pub hint: Option<String>,
}

impl fmt::Display for StepFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{} failed (exit code {code})", self.what)?,
            None => write!(f, "{} was killed by a signal", self.what)?,
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  what to do: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StepFailed {}

/// Read by sidecar/build.rs: which eBPF object to embed instead of the default release one.
pub const EBPF_OBJECT_VAR: &str = "SIDECAR_EBPF_OBJECT";

/// Paths and environment shared by all steps.
pub struct Ctx {
    /// Workspace root (the directory holding the root Cargo.toml).
    pub root: PathBuf,
    /// Host target directory (where `target/debug/sidecar` ends up).
    pub target_dir: PathBuf,
    /// `$CARGO_HOME`, where `cargo install` puts bpf-linker.
    pub cargo_home: PathBuf,
    pub is_root: bool,
    /// PATH for children: the inherited one plus `$CARGO_HOME/bin` and the sbin directories.
    path: OsString,
    /// LD_LIBRARY_PATH for children, without what `cargo run` added for xtask itself.
    ld_library_path: Option<OsString>,
}

impl Ctx {
    pub fn new() -> Result<Self> {
        // `cargo run` sets CARGO_MANIFEST_DIR at run time too; the compile-time value is only a
        // fallback for running target/debug/xtask by hand.
        let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        let root = manifest_dir
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();

        let cwd = env::current_dir().context("cannot read the current directory")?;
        let target_dir = env::var_os("CARGO_TARGET_DIR")
            .or_else(|| env::var_os("CARGO_BUILD_TARGET_DIR"))
            .filter(|d| !d.is_empty())
            .map(|d| cwd.join(d))
            .unwrap_or_else(|| root.join("target"));

        let is_root = host::identity().map(|id| id.euid == 0).unwrap_or(false);
        let home = env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(if is_root { "/root" } else { "/" }));
        let cargo_home = env::var_os("CARGO_HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".cargo"));

        // Children must find what we install (bpf-linker in $CARGO_HOME/bin) and the Debian tools
        // in sbin, which a non-root user's PATH usually lacks.
        let inherited: Vec<PathBuf> = env::var_os("PATH")
            .map(|p| env::split_paths(&p).collect())
            .unwrap_or_default();
        let mut dirs = Vec::new();
        let cargo_bin = cargo_home.join("bin");
        if !inherited.contains(&cargo_bin) {
            dirs.push(cargo_bin);
        }
        dirs.extend(inherited.iter().cloned());
        for extra in [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ] {
            let extra = PathBuf::from(extra);
            if !dirs.contains(&extra) {
                dirs.push(extra);
            }
        }
        let path = env::join_paths(dirs).context("PATH contains a ':' inside a directory name")?;

        // `cargo run` prepends xtask's target dirs and the *stable* toolchain's lib dirs; a nested
        // `cargo +nightly` or bpf-linker must not inherit them.
        let toolchains = env::var_os("RUSTUP_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".rustup"))
            .join("toolchains");
        let ld_library_path = env::var_os("LD_LIBRARY_PATH").and_then(|p| {
            let kept: Vec<PathBuf> = env::split_paths(&p)
                .filter(|d| !d.starts_with(&target_dir) && !d.starts_with(&toolchains))
                .collect();
            if kept.is_empty() {
                None
            } else {
                env::join_paths(kept).ok()
            }
        });

        if env::var_os(EBPF_OBJECT_VAR).is_some() {
            crate::say!("note: ignoring {EBPF_OBJECT_VAR} for the builds xtask runs (it embeds the release object it builds)");
        }

        Ok(Ctx {
            root,
            target_dir,
            cargo_home,
            is_root,
            path,
            ld_library_path,
        })
    }

    /// A command with our PATH, no stdin (CI has none; nothing may prompt) and the workspace root
    /// as working directory.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PATH", &self.path)
            .stdin(Stdio::null())
            .current_dir(&self.root);
        match &self.ld_library_path {
            Some(p) => cmd.env("LD_LIBRARY_PATH", p),
            None => cmd.env_remove("LD_LIBRARY_PATH"),
        };
        cmd
    }

    /// The same cargo that runs xtask (`$CARGO`), so host builds use one toolchain throughout.
    pub fn cargo(&self) -> Command {
        let mut cmd = self.cmd(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        // sidecar/build.rs embeds $SIDECAR_EBPF_OBJECT if set; xtask always embeds the release
        // object it has just built (the default path), whatever the caller's shell exports.
        cmd.env_remove(EBPF_OBJECT_VAR);
        cmd
    }

    /// Where `name` would be found on the children's PATH.
    pub fn find_program(&self, name: &str) -> Option<PathBuf> {
        env::split_paths(&self.path)
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    }

    /// `target/debug/<name>`, absolute.
    pub fn debug_bin(&self, name: &str) -> PathBuf {
        self.target_dir.join("debug").join(name)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `cmd` with inherited stdout/stderr; a non-zero exit becomes [`StepFailed`].
pub fn run(cmd: &mut Command, what: &str, hint: Option<&str>) -> Result<()> {
    say!("$ {}", display(cmd));
    let started = Instant::now();
    let status = cmd.status().with_context(|| {
        format!(
            "{what}: cannot start `{}`",
            cmd.get_program().to_string_lossy()
        )
    })?;
    if status.success() {
        say!("{what}: ok ({})", elapsed(started.elapsed()));
        Ok(())
    } else {
        Err(StepFailed {
            what: what.to_string(),
            code: status.code(),
            hint: hint.map(str::to_string),
        }
        .into())
    }
}

/// Runs a check command quietly; `Some(stdout)` if it started and exited 0.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Shell-like rendering of a command, with the environment variables we set (PATH and
/// LD_LIBRARY_PATH are always set and would only be noise).
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (k, v) in cmd.get_envs() {
        if k == "PATH" || k == "LD_LIBRARY_PATH" {
            continue;
        }
        if let Some(v) = v {
            parts.push(format!("{}={}", k.to_string_lossy(), quote(v)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("{line}    (in {})", dir.display()),
        None => line,
    }
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^~".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub fn elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
