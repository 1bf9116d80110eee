//! Removing pins: one pod's (`init --remove`), and every pod's that is gone (`sidecar cleanup`,
//! and each `init`, which collects garbage first).
use std::{
    fs,
    io::{self, Write as _},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::ExitCode,
};

use aya::programs::links::PinnedLink;

use super::config;
use super::error::InitError;
use super::host::{self, check_privileges};

/// `sidecar cleanup`: node-level garbage collection of pins left by pods that are gone.
#[derive(clap::Args, Debug, Clone)]
pub struct CleanupArgs {
    #[arg(long, env = "SIDECAR_PIN_ROOT", default_value = config::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Repeat every DURATION (e.g. 10m) until SIGTERM/SIGINT, for a node DaemonSet; default: once.
    #[arg(long, env = "SIDECAR_CLEANUP_INTERVAL", value_name = "DURATION")]
    pub interval: Option<String>,
}

fn cleanup_once(pin_root: &Path) {
    let removed = collect_garbage(pin_root);
    let mut out = io::stdout().lock();
    for dir in &removed {
        let _ = writeln!(
            out,
            "sidecar cleanup: removed stale pins of a pod that is gone: {}",
            dir.display()
        );
    }
    let _ = writeln!(
        out,
        "sidecar cleanup: {} stale pod pin director{} removed",
        removed.len(),
        if removed.len() == 1 { "y" } else { "ies" }
    );
}

pub fn cleanup_main(args: CleanupArgs) -> ExitCode {
    if let Err(e) = check_privileges() {
        let _ = writeln!(io::stderr(), "sidecar cleanup: error: {e}");
        return ExitCode::from(e.exit_code());
    }
    let Some(interval) = &args.interval else {
        cleanup_once(&args.pin_root);
        return ExitCode::SUCCESS;
    };
    let period = match crate::units::parse_duration(interval) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            let report = crate::config_errors::ConfigErrors {
                command: "cleanup",
                errors: vec![crate::config_errors::ConfigError {
                    key: "--interval".into(),
                    value: interval.clone(),
                    problem: "expected a duration such as 30s or 10m".to_owned(),
                }],
            };
            let _ = writeln!(io::stderr(), "{report}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    let runtime = match crate::cli::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "sidecar cleanup: error: cannot start the runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let Ok(mut signals) = crate::cli::Signals::new() else {
            return ExitCode::FAILURE;
        };
        loop {
            cleanup_once(&args.pin_root);
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = signals.next() => return ExitCode::SUCCESS,
            }
        }
    })
}

/// Detaches and unpins everything of ours in `dir`, then removes the directory. Links are opened
/// before they are unpinned so that the detach happens when we close them, synchronously, rather
/// than whenever the kernel's deferred release runs.
pub(crate) fn remove_pins(dir: &Path) -> Result<usize, InitError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(InitError::io(format!("read {}", dir.display()))(e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if crate::pins::is_link(&name) {
            if crate::pins::program_of(&name).is_none() {
                continue; // not ours: never touch it
            }
            match PinnedLink::from_pin(&path) {
                Ok(link) => {
                    let fd_link = link
                        .unpin()
                        .map_err(InitError::io(format!("unpin {}", path.display())))?;
                    drop(fd_link);
                }
                // A pin we cannot open is still ours to delete (e.g. a half-written staging dir).
                Err(_) => fs::remove_file(&path)
                    .map_err(InitError::io(format!("remove {}", path.display())))?,
            }
            removed += 1;
        } else if crate::pins::map_of(&name).is_some() {
            fs::remove_file(&path).map_err(InitError::io(format!("remove {}", path.display())))?;
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(InitError::io(format!(
                "remove {} (something else is pinned there?)",
                dir.display()
            ))(e))
        }
    }
    // The shared root goes when the last pod leaves, so no empty directory is left behind; only on
    // bpffs, where it can only be ours or another agent's pin tree, never a user's directory.
    if let Some(root) = dir.parent().filter(|r| host::on_bpffs(r)) {
        let _ = fs::remove_dir(root);
    }
    Ok(removed)
}

/// Removes pin directories of pods that are gone: a cgroup link whose cgroup was deleted reports
/// cgroup id 0, a netns link whose namespace was deleted reports inode 0 (the kernel detached
/// them; only our pins kept them in memory). Also removes staging directories left by an init
/// that died half-way. Returns what it removed; failures are left for the next run.
pub fn collect_garbage(pin_root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(pin_root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = if let Some(rest) = name
            .strip_prefix("_staging_")
            .or_else(|| name.strip_prefix("_old_"))
        {
            // "<pid>_<pod>": stale when that init process no longer runs.
            let pid = rest.split('_').next().unwrap_or_default();
            !Path::new("/proc").join(pid).exists()
        } else {
            pod_is_gone(&dir)
        };
        if stale && remove_pins(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

fn pod_is_gone(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        if !crate::pins::is_link(&name) {
            return false;
        }
        let Ok(fd) = crate::bpf::obj_get(&e.path()) else {
            return false;
        };
        matches!(
            crate::bpf::link_info(fd.as_fd()),
            Ok(crate::bpf::LinkInfo {
                target: crate::bpf::LinkTarget::Cgroup { cgroup_id: 0 },
                ..
            }) | Ok(crate::bpf::LinkInfo {
                target: crate::bpf::LinkTarget::Netns { netns_ino: 0 },
                ..
            })
        )
    })
}
