//! Running code of the test process inside a named network namespace. setns(CLONE_NEWNET) only
//! moves the calling thread, so each use gets a fresh thread; the rest of the test process (and
//! its cgroup membership) is untouched.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Where `ip netns add NAME` puts the namespace handle.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Opens the handle of a named network namespace.
pub fn open_netns(name: &str) -> io::Result<File> {
    File::open(netns_path(name))
}

/// Moves the calling thread into the network namespace `ns`.
pub fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a namespace fd we hold open; affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that first joins the named network namespace, and returns its result.
/// The thread stays in the test's own cgroup: this is "a process outside the pod cgroup".
pub fn in_netns<T, F>(name: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = open_netns(name)?;
    let handle = std::thread::Builder::new()
        .name(format!("in-{name}"))
        .spawn(move || -> io::Result<T> {
            enter(&ns)?;
            Ok(f())
        })?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
