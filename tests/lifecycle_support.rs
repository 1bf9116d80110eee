//! Shared by the lifecycle tests (metrics, readiness, shutdown, lifecycle commands), included with
//! `#[path]`; not a test of its own. A `Sidecar` is `sidecar run` started in a pod as UID 1337 and
//! owned by the test (so that it can be signalled and its exit status read); clients talk to its
//! admin port from inside the pod (loopback) or from the remote namespace; `SlowApp` is an app
//! server whose answers take a while, so that requests are in flight when a drain starts.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sidecar_tests::{env, netns, Pod, POD_IP4, PROXY_GID, PROXY_UID};

/// The admin port (`sidecar run --admin` default).
pub use sidecar_tests::metrics::ADMIN_PORT;
/// A debug build on a busy 2-core machine may take this long to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Every client exchange is bounded, so a broken proxy fails a test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `sidecar run` in the pod, owned by the test: killed (SIGKILL) when dropped unless it exited.
/// Declare it after the `Pod` so that it is dropped first.
pub struct Sidecar {
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Sidecar {
    /// Starts `sidecar run <args>` in `pod` as 1337:1337 with SIDECAR_LOG=debug and waits until
    /// `/live` answers 200 (its listeners are bound). `name` names the log file.
    pub fn start(pod: &Pod, name: &str, args: &[&str]) -> Sidecar {
        let mut sidecar = Sidecar::spawn(pod, name, args);
        sidecar.wait_live(pod);
        sidecar
    }

    /// Starts it without waiting for anything.
    pub fn spawn(pod: &Pod, name: &str, args: &[&str]) -> Sidecar {
        let log = pod.log_dir().join(format!("{name}.log"));
        let file = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let file2 = file
            .try_clone()
            .unwrap_or_else(|e| panic!("dup log fd: {e}"));
        let mut cmd = Command::new(sidecar_exec(pod));
        cmd.env_clear()
            .env("PATH", env::CHILD_PATH)
            .env("SIDECAR_LOG", "debug")
            .env("RUST_BACKTRACE", "1")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .arg("run")
            .args(args);
        pod.in_pod(&mut cmd, Some((PROXY_UID, PROXY_GID)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sidecar run in pod {}: {e}", pod.name()));
        eprintln!(
            "pod {}: sidecar {name} started, pid {}, log {}",
            pod.name(),
            child.id(),
            log.display()
        );
        Sidecar {
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until `/live` is 200, failing fast (with the log) if the process exits first.
    pub fn wait_live(&mut self, pod: &Pod) {
        let live = sidecar_tests::eventually(START_TIMEOUT, || {
            self.try_status().is_some()
                || admin_get(pod, "/live").is_ok_and(|(status, _)| status == 200)
        });
        if let Some(status) = self.try_status() {
            panic!(
                "sidecar exited ({status}) before it was live:\n{}",
                self.log()
            );
        }
        assert!(
            live,
            "sidecar not live within {START_TIMEOUT:?}:\n{}",
            self.log()
        );
    }

    /// `wait_live`, then waits until the kernel has registered both inbound listeners (the
    /// `inbound_listener_seen` counter moves by two), so that SYNs reach them (see
    /// `Pod::start_proxy_with_inbound`). Pass the counter read before the start.
    pub fn wait_inbound_registered(&mut self, pod: &mut Pod, before: u64) {
        let registered = sidecar_tests::eventually(START_TIMEOUT, || {
            pod.counters().get("inbound_listener_seen") >= before + 2
        });
        assert!(
            registered,
            "the kernel did not register the inbound listeners:\n{}",
            self.log()
        );
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill on the pid of our own child, which we have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            self.child.id(),
            io::Error::last_os_error()
        );
    }

    /// Waits for the exit; panics (with the log) if it does not come within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let exited = sidecar_tests::poll_until(timeout, || self.try_status());
        match exited {
            Some(status) => status,
            None => panic!("sidecar did not exit within {timeout:?}:\n{}", self.log()),
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- sidecar log {} -----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// The sidecar binary at a path UID 1337 can execute (copied into the pod's log dir if needed).
fn sidecar_exec(pod: &Pod) -> PathBuf {
    let bin = env::sidecar_bin();
    if env::executable_by_others(&bin) {
        return bin;
    }
    let copy = pod.log_dir().join("sidecar-lifecycle");
    if !copy.exists() {
        fs::copy(&bin, &copy)
            .and_then(|_| fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)))
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", bin.display(), copy.display()));
    }
    copy
}

/// A child process of the test inside the pod (root, pod cgroup and netns), killed on drop.
pub struct PodProcess {
    pub child: Child,
}

impl PodProcess {
    /// Runs `program args` in the pod as root, stdout and stderr piped.
    pub fn spawn(pod: &Pod, program: &std::path::Path, args: &[&str]) -> PodProcess {
        PodProcess::spawn_as(pod, None, program, args)
    }

    /// Runs `program args` in the pod as `user` (root: `None`), stdout and stderr piped.
    pub fn spawn_as(
        pod: &Pod,
        user: Option<(u32, u32)>,
        program: &std::path::Path,
        args: &[&str],
    ) -> PodProcess {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", env::CHILD_PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .args(args);
        pod.in_pod(&mut cmd, user);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} in pod: {e}", program.display()));
        PodProcess { child }
    }

    /// `sidecar <args>` in the pod (as root).
    pub fn sidecar(pod: &Pod, args: &[&str]) -> PodProcess {
        PodProcess::spawn(pod, &sidecar_exec(pod), args)
    }

    /// `sidecar <args>` in the pod as the proxy's uid (as a preStop hook in its container runs).
    pub fn sidecar_as_proxy(pod: &Pod, args: &[&str]) -> PodProcess {
        PodProcess::spawn_as(pod, Some((PROXY_UID, PROXY_GID)), &sidecar_exec(pod), args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit and returns (status, stdout, stderr); panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let Some(status) = sidecar_tests::poll_until(timeout, || self.try_status()) else {
            panic!(
                "process {} did not exit within {timeout:?}",
                self.child.id()
            );
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        (status, out, err)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `sidecar <args>` in the pod (as root), to completion: (status, stdout, stderr).
pub fn sidecar_in_pod(pod: &Pod, args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    PodProcess::sidecar(pod, args).wait(timeout)
}

/// One HTTP/1.1 exchange (`Connection: close`): (status, body).
pub fn http_exchange(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("timeouts: {e}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response from {addr}: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// GET `path` from the admin port, from inside the pod (loopback).
pub fn admin_get(pod: &Pod, path: &str) -> Result<(u16, String), String> {
    admin_request(pod, "GET", path)
}

/// `method path` on the admin port from inside the pod (loopback: 127.0.0.1).
pub fn admin_request(pod: &Pod, method: &str, path: &str) -> Result<(u16, String), String> {
    let (method, path) = (method.to_owned(), path.to_owned());
    let addr = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
    netns::in_netns(pod.pod_netns(), move || http_exchange(addr, &method, &path))
        .unwrap_or_else(|e| panic!("enter the pod netns: {e}"))
}

/// `method path` on the admin port at the pod's address, from the remote namespace.
pub fn admin_request_from_remote(
    pod: &Pod,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let (method, path) = (method.to_owned(), path.to_owned());
    let addr: SocketAddr = format!("{POD_IP4}:{ADMIN_PORT}")
        .parse()
        .unwrap_or_else(|e| panic!("address: {e}"));
    netns::in_netns(pod.remote_netns(), move || {
        http_exchange(addr, &method, &path)
    })
    .unwrap_or_else(|e| panic!("enter the remote netns: {e}"))
}

/// An app server in the pod's network namespace that answers every request with 200 `ok` after
/// `delay` (simulated work, so that requests are in flight when a drain starts), one thread per
/// connection, `Connection: close`. Counts the requests it answered. Stops on drop.
pub struct SlowApp {
    pub addr: SocketAddr,
    answered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SlowApp {
    pub fn start(pod: &Pod, addr: &str, delay: Duration) -> SlowApp {
        let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
        let ns = netns::open_netns(pod.pod_netns()).unwrap_or_else(|e| panic!("open netns: {e}"));
        let answered = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (count, stopping) = (Arc::clone(&answered), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let listener = netns::enter(&ns)
                .map_err(|e| format!("setns: {e}"))
                .and_then(|()| TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}")));
            let listener = match listener {
                Ok(l) => {
                    let _ = bound_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            // Non-blocking accepts polled every few milliseconds, so that dropping the app can
            // stop this thread without reaching into the pod's namespace.
            if let Err(e) = listener.set_nonblocking(true) {
                eprintln!("slow app: set_nonblocking: {e}");
                return;
            }
            while !stopping.load(Ordering::Acquire) {
                let conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let count = Arc::clone(&count);
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                    let mut reader = BufReader::new(&conn);
                    let mut line = String::new();
                    // The request head, up to the empty line.
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" || line == "\n" => break,
                            Ok(_) => {}
                        }
                    }
                    std::thread::sleep(delay);
                    let mut w = &conn;
                    if w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                    )
                    .is_ok()
                    {
                        count.fetch_add(1, Ordering::AcqRel);
                    }
                });
            }
        });
        match bound_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("slow app: {e}"),
            Err(_) => panic!("slow app thread ended before binding"),
        }
        SlowApp {
            addr,
            answered,
            stop,
            thread: Some(thread),
        }
    }

    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::Acquire)
    }
}

impl Drop for SlowApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until `condition` holds, for at most `timeout`; panics with `what` otherwise.
pub fn wait_for(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    assert!(
        sidecar_tests::eventually(timeout, condition),
        "{what} (waited {timeout:?})"
    );
}

/// Seconds since `start`, for messages.
pub fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
