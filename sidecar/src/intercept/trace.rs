//! `sidecar trace`: prints the kernel-side debug records of one pod's programs (aya-log), for a pod
//! initialised with `--debug-log`. The records cost a ring-buffer write per connect, which is why
//! they are off by default; this command is how an operator reads them when they are on.
use std::{
    io::{self, Write as _},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    process::ExitCode,
};

use clap::Args;

use super::config::DEFAULT_PIN_ROOT;
use super::error::InitError;
use super::host::{pod_cgroup, resolve_cgroup};
use crate::pins::pod_dir as pin_dir;

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// The pod's cgroup v2 directory (as given to `sidecar init`).
    #[arg(long, env = "SIDECAR_CGROUP")]
    pub cgroup: PathBuf,
    /// Pod id, if `sidecar init` was given one.
    #[arg(long, env = "SIDECAR_POD_ID")]
    pub pod_id: Option<String>,
    #[arg(long, env = "SIDECAR_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

/// Writes each record as one line on stdout: "<level> <message>".
struct Printer;

impl log::Log for Printer {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{} {}", record.level(), record.args());
        let _ = out.flush();
    }
    fn flush(&self) {}
}

fn run(args: &TraceArgs) -> Result<(), InitError> {
    let cgroup = pod_cgroup(&resolve_cgroup(&args.cgroup)?)?;
    // As `init` names it: the pod UID of a kubelet cgroup, else the given id, else the inode.
    let pod_id = super::host::pod_id_for(&cgroup, args.pod_id.as_deref())?;
    let dir = pin_dir(&args.pin_root, pod_id.as_deref(), cgroup.id);
    let link = crate::pins::link(&dir, sidecar_common::progs::CONNECT4);
    let fd = crate::bpf::obj_get(&link).map_err(|e| InitError::Kernel {
        what: format!("open {}", link.display()),
        detail: e.to_string(),
        fix: "run `sidecar init --debug-log` for this pod first, and `sidecar trace` as root"
            .into(),
    })?;
    let info = crate::bpf::link_info(fd.as_fd()).map_err(|e| {
        InitError::kernel(format!("query {}", link.display()), "run as root")(e.into())
    })?;
    // All programs of the object share one log ring buffer, so one program's id finds it.
    let mut logger = aya_log::EbpfLogger::init_from_id_with_logger(info.prog_id, Printer).map_err(|e| {
        InitError::kernel(
            "open the programs' log buffer",
            "the pod's programs were loaded by an older sidecar without aya-log; re-run `sidecar init --debug-log`",
        )(e.into())
    })?;
    eprintln!(
        "sidecar trace: reading debug records of {} (Ctrl-C to stop){}",
        dir.display(),
        if status_says_debug_off(&dir) {
            "; note: this pod was initialised WITHOUT --debug-log, so there will be none"
        } else {
            ""
        }
    );
    loop {
        let mut pfd = libc::pollfd {
            fd: logger.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(InitError::Io {
                what: "poll the log buffer".into(),
                error: err,
            });
        }
        logger.flush();
    }
}

fn status_says_debug_off(dir: &std::path::Path) -> bool {
    super::status::rodata_flags(dir).is_some_and(|f| f & sidecar_common::flags::DEBUG_LOG == 0)
}

pub fn main(args: TraceArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "sidecar trace: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
