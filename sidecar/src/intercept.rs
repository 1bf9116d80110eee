//! The init step: load the embedded eBPF object, attach its programs to one pod's cgroup, pin the
//! links and maps under the pod's own bpffs directory, and exit; or remove exactly that again.
//!
//! Pin directory layout (`<pin root>/<pod id>/`): `link_<program>` for each cgroup link (the pin
//! is what keeps the attachment alive after this process exits) and `map_<map>` for each map (so
//! `sidecar status` can read them). A re-init builds the new set in a staging directory, swaps it
//! in, then detaches the old set, so there is never a moment without interception and never more
//! than one set once it returns.
//!
//! Files, lowest first (each imports only those before it): `error`, `btf` (the kernel offsets
//! `--msg-redirect` needs), `config` (flags),
//! `host` (cgroup2, netns, capabilities), `load` (the object: load, fill, attach, pin),
//! `gc` (removal, garbage collection, `sidecar cleanup`), `status`, `trace`; this file is the
//! install and remove steps.
mod btf;
mod config;
mod error;
mod gc;
mod host;
mod load;
mod status;
mod trace;

use std::{
    fs,
    io::{self, Write as _},
    path::Path,
    process::ExitCode,
};

pub(crate) use btf::msg_redirect_support;
pub use config::{Cidr, ConfigErrors, FailMode, InitArgs, InitConfig, PortSet, DEFAULT_PIN_ROOT};
pub use error::InitError;
use gc::remove_pins;
pub use gc::{cleanup_main, collect_garbage, CleanupArgs};
use host::check_privileges;
pub use host::pod_uid_of;
pub use host::{cgroup2_mounts, pids_below, pod_cgroup, resolve_cgroup, PodCgroup};
pub use load::PROGRAMS;
use load::{load_attach_pin, OBJECT};
pub use status::{Status, StatusArgs};
pub use trace::{main as trace_main, TraceArgs};

use crate::pins::pod_dir as pin_dir;

/// `sidecar init` entry point.
pub fn main(args: InitArgs) -> ExitCode {
    let result = if args.remove {
        remove(&args)
    } else {
        install(&args)
    };
    match result {
        // Written without println!/eprintln!, which panic on a closed pipe: the work is done (or
        // rolled back) by now, and the exit code must say which.
        Ok(summary) => {
            let _ = writeln!(io::stdout(), "{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = match &e {
                // The shared report names the command itself.
                InitError::Config(report) => writeln!(io::stderr(), "{report}"),
                e => writeln!(io::stderr(), "sidecar init: error: {e}"),
            };
            ExitCode::from(e.exit_code())
        }
    }
}

/// `sidecar status` entry point.
pub fn status_main(args: StatusArgs) -> ExitCode {
    status::main(args)
}

/// Loads, attaches and pins; returns a one-line summary.
pub fn install(args: &InitArgs) -> Result<String, InitError> {
    let cfg = InitConfig::from_args(args)?;
    let cgroup = pod_cgroup(&resolve_cgroup(&args.cgroup)?)?;
    let netns = match &cfg.netns {
        Some(path) => Some(host::pod_netns(path)?),
        None => None,
    };
    host::check_one_pod(&cgroup, netns.as_ref())?;
    check_privileges()?;
    if OBJECT.is_empty() {
        return Err(InitError::NoObject);
    }
    let collected = collect_garbage(&args.pin_root);
    let pod_id = host::pod_id_for(&cgroup, args.pod_id.as_deref())?;
    let final_dir = pin_dir(&args.pin_root, pod_id.as_deref(), cgroup.id);
    host::check_pins_are_ours(&final_dir, &cgroup)?;
    let pod_name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = args
        .pin_root
        .join(format!("_staging_{}_{pod_name}", std::process::id()));
    let bpffs_hint = if host::on_bpffs(&args.pin_root) {
        "check that the pin root is writable".to_string()
    } else {
        format!(
            "{} is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or pass --pin-root below a bpffs mount",
            args.pin_root.display()
        )
    };
    let created_root = !args.pin_root.exists();
    create_dir_all_racy(&staging).map_err(InitError::io(format!(
        "create pin directory {}",
        staging.display()
    )))?;
    let previous = final_dir.exists().then_some(final_dir.as_path());
    let result = load_attach_pin(
        &cfg,
        &cgroup,
        netns.as_ref(),
        &staging,
        previous,
        &bpffs_hint,
    );
    let (links, kept) = match result {
        Ok(found) => found,
        Err(e) => {
            // Nothing of this attempt may stay: unpinning drops the last reference to each link.
            let _ = remove_pins(&staging);
            if created_root {
                let _ = fs::remove_dir(&args.pin_root);
            }
            return Err(e);
        }
    };
    // Swap the new set in, then detach the old one.
    let old = args
        .pin_root
        .join(format!("_old_{}_{pod_name}", std::process::id()));
    let replaced = final_dir.exists();
    if replaced {
        fs::rename(&final_dir, &old).map_err(InitError::io(format!(
            "move old pins {} aside",
            final_dir.display()
        )))?;
    }
    if let Err(e) = fs::rename(&staging, &final_dir) {
        if replaced {
            let _ = fs::rename(&old, &final_dir);
        }
        let _ = remove_pins(&staging);
        return Err(InitError::io(format!(
            "move new pins to {}",
            final_dir.display()
        ))(e));
    }
    if replaced {
        remove_pins(&old)?;
    }
    let mut summary = format!(
        "sidecar init: {} {} programs on cgroup {} (id {}){}, pins in {}",
        if replaced { "replaced" } else { "attached" },
        links.len(),
        cgroup.path.display(),
        cgroup.id,
        match &netns {
            Some(ns) => format!(" and netns {} (inode {})", ns.path.display(), ns.inode),
            None => String::new(),
        },
        final_dir.display()
    );
    if !kept.maps.is_empty() {
        summary.push_str(&format!(
            "\nsidecar init: kept from the previous set (no moment without interception): {}",
            kept.maps.join(", ")
        ));
    }
    if !kept.not.is_empty() {
        summary.push_str(&format!(
            "\nsidecar init: started afresh (their layout changed): {}; connections made during this re-run may miss their original destination",
            kept.not.join(", ")
        ));
    }
    for dir in collected {
        summary.push_str(&format!(
            "\nsidecar init: removed stale pins of a pod that is gone: {}",
            dir.display()
        ));
    }
    Ok(summary)
}

/// `fs::create_dir_all`, tolerating a concurrent `remove` of another pod that deletes the shared,
/// momentarily empty pin root between our two mkdirs.
fn create_dir_all_racy(dir: &Path) -> io::Result<()> {
    match fs::create_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir),
        other => other,
    }
}

/// `sidecar init --remove`: detaches and unpins this pod's programs. Removing twice is fine.
pub fn remove(args: &InitArgs) -> Result<String, InitError> {
    check_privileges()?;
    let dir = match &args.pod_id {
        // With an explicit pod id the cgroup may already be gone (garbage collection); when it
        // is there, the pins must be its own (never another pod's, named by a wrong id).
        Some(id) => {
            let dir = pin_dir(&args.pin_root, Some(id), 0);
            if let Ok(cgroup) = resolve_cgroup(&args.cgroup).and_then(|c| pod_cgroup(&c)) {
                host::check_pins_are_ours(&dir, &cgroup)?;
            }
            dir
        }
        None => pin_dir(
            &args.pin_root,
            None,
            pod_cgroup(&resolve_cgroup(&args.cgroup)?)?.id,
        ),
    };
    let removed = remove_pins(&dir)?;
    Ok(if removed == 0 {
        format!(
            "sidecar init --remove: nothing of ours pinned in {}",
            dir.display()
        )
    } else {
        format!(
            "sidecar init --remove: detached {removed} programs, removed {}",
            dir.display()
        )
    })
}
