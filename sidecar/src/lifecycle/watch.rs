//! Stopping with the app: `--exit-with-app PID|PIDFILE` watches the app process through a pidfd
//! (needs a shared PID namespace in Kubernetes: `shareProcessNamespace: true`), and
//! `--shutdown-file PATH` waits for a file the app creates as its last step (a shared `emptyDir`
//! is all it takes; the app image needs nothing but `touch`).
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What `--exit-with-app` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppTarget {
    Pid(u32),
    /// A file holding the app's PID, written when the app starts (it may not exist yet).
    PidFile(PathBuf),
}

impl AppTarget {
    /// A number is a PID; anything else is a pidfile path (absolute).
    pub fn parse(value: &str) -> Result<AppTarget, String> {
        let value = value.trim();
        if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            return match value.parse::<u32>() {
                Ok(pid) if pid > 1 && i32::try_from(pid).is_ok() => Ok(AppTarget::Pid(pid)),
                _ => Err("not a usable PID (expected 2 and up)".to_owned()),
            };
        }
        let path = PathBuf::from(value);
        if !path.is_absolute() {
            return Err("expected a PID or an absolute path to a pidfile".to_owned());
        }
        Ok(AppTarget::PidFile(path))
    }
}

impl std::fmt::Display for AppTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppTarget::Pid(pid) => write!(f, "pid {pid}"),
            AppTarget::PidFile(path) => write!(f, "pidfile {}", path.display()),
        }
    }
}

/// Resolves with the app's PID once it has exited. A pidfile is polled every `poll` until it
/// holds a PID. `Err` when the process cannot be watched (the caller logs it and goes on without).
pub async fn watch_app(target: AppTarget, poll: Duration) -> Result<u32, String> {
    let pid = match target {
        AppTarget::Pid(pid) => pid,
        AppTarget::PidFile(path) => read_pidfile(&path, poll).await,
    };
    tracing::info!(pid, "watching the app");
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        // Gone before we looked: it has exited.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(pid),
        Err(e) => {
            return Err(format!(
                "cannot watch pid {pid}: {e} (in Kubernetes the app and the proxy must share \
                 the PID namespace: shareProcessNamespace: true)"
            ))
        }
    };
    // A pidfd becomes readable when the process exits.
    // SAFETY: an OwnedFd stays open, and is the same descriptor, for as long as it lives, and the
    // AsyncFd owns it.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(|e| format!("cannot watch pid {pid}: {e}"))?;
    match fd.readable().await {
        Ok(_) => Ok(pid),
        Err(e) => Err(format!("watching pid {pid} failed: {e}")),
    }
}

async fn read_pidfile(path: &Path, poll: Duration) -> u32 {
    let mut logged = false;
    loop {
        // A small local file: reading it inline does not hold the runtime up.
        match std::fs::read_to_string(path) {
            Ok(text) => match text.trim().parse::<u32>() {
                Ok(pid) if pid > 1 => return pid,
                // Being written: try again.
                _ => {}
            },
            Err(e) if !logged => {
                tracing::info!(path = %path.display(), error = %e, "waiting for the app's pidfile");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(poll).await;
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(pid, flags = 0) takes plain integers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Resolves once `path` exists, checking every `poll`.
pub async fn watch_shutdown_file(path: PathBuf, poll: Duration) -> PathBuf {
    loop {
        if path.try_exists().unwrap_or(false) {
            return path;
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(AppTarget::parse("1234"), Ok(AppTarget::Pid(1234)));
        assert_eq!(
            AppTarget::parse("/run/app.pid"),
            Ok(AppTarget::PidFile("/run/app.pid".into()))
        );
        assert!(AppTarget::parse("1").is_err());
        assert!(AppTarget::parse("app.pid").is_err());
        assert!(AppTarget::parse("99999999999").is_err());
    }

    #[tokio::test]
    async fn a_child_exiting_is_seen() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let watch = tokio::spawn(watch_app(AppTarget::Pid(pid), Duration::from_millis(50)));
        child.kill().unwrap();
        child.wait().unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(20), watch)
            .await
            .expect("the exit is seen")
            .unwrap();
        assert_eq!(seen, Ok(pid));
    }

    #[tokio::test]
    async fn gone_pid_counts_as_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(
            watch_app(AppTarget::Pid(pid), Duration::from_millis(50)).await,
            Ok(pid)
        );
    }
}
