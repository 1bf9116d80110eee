//! The `Pod` fixture: a network namespace for the pod and one for "remote" services, joined by a
//! veth; a cgroup2 directory of its own; helpers to run `sidecar init`, the proxy and the probe app
//! inside it; and a Drop guard that removes all of it, also when the test panics.
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::client::{
    self, EchoReply, GreetingReply, GrpcReply, HttpReply, IdleReply, WebSocketReply,
};
use crate::env::{self, DEFAULT_PIN_ROOT, NAME_PREFIX};
use crate::netns;
use crate::status::{Counters, Status};
use crate::upstream::Upstream;

/// The pod's own addresses (passed to `sidecar init --pod-ip`).
pub const POD_IP4: &str = "10.200.0.2";
pub const POD_IP6: &str = "fd00:200::2";
/// The remote namespace's main addresses; 10.200.0.3 and 10.200.0.4 are extra remote addresses for
/// "two different upstreams" and CIDR exclusions.
pub const REMOTE_IP4: &str = "10.200.0.1";
pub const REMOTE_IP6: &str = "fd00:200::1";
const REMOTE_EXTRA_IP4: [&str; 2] = ["10.200.0.3", "10.200.0.4"];

/// The proxy runs as this uid/gid, which the kernel programs exclude from capture (Istio's 1337).
pub const PROXY_UID: u32 = 1337;
pub const PROXY_GID: u32 = 1337;
const OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound listeners: 0.0.0.0:15006 and [::]:15006.
pub const INBOUND_PORT: u16 = 15006;
/// The proxy's inbound listeners (IPv4 and IPv6) each enter the kernel's SOCKMAP once per start.
const INBOUND_LISTENERS: u64 = 2;

/// How long a freshly spawned proxy may take to listen: a debug build on a busy 2-core machine.
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long cleanup waits for killed processes to leave the cgroup.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of a child's log printed when a test fails.
const LOG_TAIL_LINES: usize = 300;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How `Pod::try_init_with` runs `sidecar init`.
#[derive(Debug, Clone, Copy)]
pub enum InitRunner {
    /// As root, from the test process (outside the pod), like a privileged init container.
    Root,
    /// As an unprivileged user (no capabilities).
    User { uid: u32, gid: u32 },
    /// As root inside a private cgroup namespace rooted at the pod cgroup, with cgroup2 mounted
    /// afresh at the usual mount point in a private mount namespace. Then `--cgroup <mount point>`
    /// is "the cgroup2 root" from the sidecar's point of view, while the kernel object behind it
    /// is the pod's own cgroup: if the refusal were missing, programs would land on a cgroup the
    /// test owns, never on the host's real root (testing.md rule 1).
    CgroupNsRoot,
}

/// One run of the probe app.
#[derive(Debug)]
pub struct AppRun {
    pub status: ExitStatus,
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

struct Spawned {
    label: String,
    child: Child,
    log: PathBuf,
}

/// What `sidecar init` was pointed at, so that cleanup can undo it.
struct InitRecord {
    cgroup: PathBuf,
    pin_root: Option<String>,
    pod_id: Option<String>,
    /// Where that init pins, when it can be known in advance (for a fallback unpin).
    pin_dir: Option<PathBuf>,
}

/// A pod: netns `<name>-pod` (10.200.0.2, fd00:200::2) joined by veth to netns `<name>-remote`
/// (10.200.0.1/.3/.4, fd00:200::1), and cgroup `<cgroup2>/<name>`. Dropping it kills what it
/// started, runs `sidecar init --remove`, deletes both namespaces and the cgroup.
pub struct Pod {
    name: String,
    pod_ns: String,
    remote_ns: String,
    netns_created: Vec<String>,
    pod_netns: Option<File>,
    cgroup: PathBuf,
    /// What cleanup removes: the pod's cgroup, or the tree above it (`new_kube`).
    cgroup_top: PathBuf,
    cgroup_created: bool,
    cgroup_procs: CString,
    dir: PathBuf,
    sidecar_exec: Option<PathBuf>,
    children: Vec<Spawned>,
    inits: Vec<InitRecord>,
    failed: bool,
}

impl Pod {
    /// Builds a fresh pod. Panics loudly when not privileged (tests must fail, not pass silently).
    pub fn new() -> Pod {
        Pod::create(None)
    }

    /// A pod whose cgroup is named as the kubelet names it (cgroupfs driver):
    /// `<cgroup2>/<pod name>/kubepods/burstable/pod<uid>`; [`Pod::cgroup_root`] is the
    /// `<cgroup2>/<pod name>` above it (the "cgroup mount" a CNI plugin is told to search).
    pub fn new_kube(uid: &str) -> Pod {
        Pod::create(Some(uid))
    }

    /// The directory above the pod's cgroup that cleanup removes (its own cgroup but for
    /// [`Pod::new_kube`]).
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_top
    }

    /// Pins made for this pod by something other than `init` (a CNI plugin): removed with
    /// `init --remove --pod-id <pod_id>` at cleanup if the test did not.
    pub fn track_pins(&mut self, pin_root: &str, pod_id: &str) {
        self.inits.push(InitRecord {
            cgroup: self.cgroup.clone(),
            pin_root: Some(pin_root.to_owned()),
            pod_id: Some(pod_id.to_owned()),
            pin_dir: Some(Path::new(pin_root).join(pod_id)),
        });
    }

    fn create(kube_uid: Option<&str>) -> Pod {
        env::require_privileged();
        env::sweep_leftovers();
        let name = format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let cgroup_top = env::cgroup2_mount().join(&name);
        let cgroup = match kube_uid {
            Some(uid) => cgroup_top.join(format!("kubepods/burstable/pod{uid}")),
            None => cgroup_top.clone(),
        };
        let cgroup_procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
            .unwrap_or_else(|e| panic!("cgroup path {}: {e}", cgroup.display()));
        // Fields first, resources second: if a step below panics, Drop removes what exists so far.
        let mut pod = Pod {
            pod_ns: format!("{name}-pod"),
            remote_ns: format!("{name}-remote"),
            dir: std::env::temp_dir().join(&name),
            name,
            netns_created: Vec::new(),
            pod_netns: None,
            cgroup,
            cgroup_top,
            cgroup_created: false,
            cgroup_procs,
            sidecar_exec: None,
            children: Vec::new(),
            inits: Vec::new(),
            failed: false,
        };
        fs::create_dir_all(&pod.dir)
            .and_then(|()| fs::set_permissions(&pod.dir, fs::Permissions::from_mode(0o755)))
            .unwrap_or_else(|e| panic!("create {}: {e}", pod.dir.display()));
        pod.build_network();
        fs::create_dir(&pod.cgroup_top)
            .and_then(|()| fs::create_dir_all(&pod.cgroup))
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", pod.cgroup.display()));
        pod.cgroup_created = true;
        eprintln!(
            "pod {}: netns {} + {}, cgroup {}, logs in {}",
            pod.name,
            pod.pod_ns,
            pod.remote_ns,
            pod.cgroup.display(),
            pod.dir.display()
        );
        pod
    }

    fn build_network(&mut self) {
        for ns in [self.pod_ns.clone(), self.remote_ns.clone()] {
            ip(&["netns", "add", &ns]);
            self.netns_created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let (pod, remote) = (self.pod_ns.as_str(), self.remote_ns.as_str());
        // Created inside the pod netns with the peer created directly in the remote netns: no
        // interface ever appears in the host's namespace, and "eth0" is unique per namespace.
        ip(&[
            "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            remote,
        ]);
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{POD_IP4}/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{POD_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        for addr in std::iter::once(REMOTE_IP4).chain(REMOTE_EXTRA_IP4) {
            ip(&[
                "-n",
                remote,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
        }
        ip(&[
            "-n",
            remote,
            "addr",
            "add",
            &format!("{REMOTE_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        for ns in [pod, remote] {
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        for ns in [pod, remote] {
            let up = crate::eventually(LINK_UP_TIMEOUT, || {
                Command::new("ip")
                    .args(["-n", ns, "-o", "link", "show", "eth0"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("LOWER_UP"))
                    .unwrap_or(false)
            });
            assert!(
                up,
                "veth eth0 in {ns} has no carrier after {LINK_UP_TIMEOUT:?}"
            );
        }
        self.pod_netns =
            Some(netns::open_netns(pod).unwrap_or_else(|e| panic!("open netns {pod}: {e}")));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Name of the pod's network namespace (`ip netns` name).
    pub fn pod_netns(&self) -> &str {
        &self.pod_ns
    }

    /// Name of the remote services' network namespace.
    pub fn remote_netns(&self) -> &str {
        &self.remote_ns
    }

    /// The pod's cgroup2 directory.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Directory for this pod's logs (kept when a test fails).
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// Treat this pod as failed even without a panic: on drop, print the children's logs and keep
    /// the log directory (for callers that report failures without panicking, like the demo).
    pub fn mark_failed(&mut self) {
        self.failed = true;
    }

    /// Makes `cmd` start inside the pod: in its network namespace, in its cgroup, and (if `user` is
    /// given) as that uid/gid with no supplementary groups.
    ///
    /// One pre_exec closure does it all, in this order, because std's own `uid()`/`gid()` would be
    /// applied before pre_exec, and an unprivileged process can no longer setns or join a cgroup.
    pub fn in_pod(&self, cmd: &mut Command, user: Option<(u32, u32)>) {
        let Some(ns) = self.pod_netns.as_ref() else {
            panic!("pod {} has no network namespace", self.name);
        };
        // Prepared before fork: after fork only raw async-signal-safe syscalls are allowed.
        let ns_fd = ns.as_raw_fd();
        let procs = self.cgroup_procs.clone();
        // SAFETY: the closure only makes raw syscalls (setns, open, write, close, setgroups,
        // setgid, setuid) on data prepared before fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                join_cgroup(&procs)?;
                if let Some((uid, gid)) = user {
                    drop_privileges(uid, gid)?;
                }
                Ok(())
            });
        }
    }

    /// The sidecar binary, at a path that uid 1337 and nobody can execute too (copied into the
    /// pod's log dir when the checkout itself is not reachable by other users, e.g. under /root).
    fn sidecar_exec(&mut self) -> PathBuf {
        if let Some(path) = &self.sidecar_exec {
            return path.clone();
        }
        let bin = env::sidecar_bin();
        let path = if env::executable_by_others(&bin) {
            bin
        } else {
            let copy = self.dir.join("sidecar");
            fs::copy(&bin, &copy)
                .and_then(|_| fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)))
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", bin.display(), copy.display()));
            copy
        };
        self.sidecar_exec = Some(path.clone());
        path
    }

    fn base_command(program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", env::CHILD_PATH)
            .current_dir("/")
            .stdin(Stdio::null());
        cmd
    }

    /// `sidecar init --cgroup <cgroup_arg> --pod-ip 10.200.0.2,fd00:200::2 <extra>`, not yet run.
    /// Remembered (as acting on `real_cgroup`, the kernel object behind `cgroup_arg`) so that
    /// cleanup runs the matching `init --remove`.
    fn init_command(&mut self, cgroup_arg: &Path, real_cgroup: &Path, extra: &[&str]) -> Command {
        let pin_root = flag_value(extra, "--pin-root");
        let pod_id = flag_value(extra, "--pod-id");
        let root = Path::new(pin_root.as_deref().unwrap_or(DEFAULT_PIN_ROOT));
        let pin_dir = match (&pod_id, fs::metadata(real_cgroup)) {
            (Some(id), _) => Some(root.join(id)),
            (None, Ok(meta)) => Some(root.join(format!("cg{}", meta.ino()))),
            (None, Err(_)) => None,
        };
        let known = self
            .inits
            .iter()
            .any(|r| r.cgroup == real_cgroup && r.pin_root == pin_root && r.pod_id == pod_id);
        if !known {
            self.inits.push(InitRecord {
                cgroup: real_cgroup.to_path_buf(),
                pin_root,
                pod_id,
                pin_dir,
            });
        }
        let mut cmd = Self::base_command(&self.sidecar_exec());
        cmd.arg("init")
            .arg("--cgroup")
            .arg(cgroup_arg)
            .arg("--pod-ip")
            .arg(format!("{POD_IP4},{POD_IP6}"))
            .args(extra);
        // The whole suite once more with the in-pod redirect on (`cargo xtask test` does).
        if env::msg_redirect_everywhere() {
            cmd.env("SIDECAR_MSG_REDIRECT", "true");
        }
        cmd
    }

    /// Runs `sidecar init` for this pod as root from outside the pod; panics (showing stderr)
    /// unless it succeeds. Returns its output (stdout says what it attached and collected).
    pub fn init(&mut self, extra: &[&str]) -> Output {
        env::require_bpffs();
        let out = self.try_init(extra);
        if !out.status.success() {
            panic!(
                "sidecar init {extra:?} failed ({}):\n--- stderr ---\n{}\n--- stdout ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        out
    }

    /// `init` with `--netns <the pod's netns>`: inbound capture (sk_lookup) as well as outbound.
    pub fn init_with_netns(&mut self, extra: &[&str]) -> Output {
        let netns = self.netns_path().to_string_lossy().into_owned();
        let mut args = vec!["--netns", netns.as_str()];
        args.extend_from_slice(extra);
        self.init(&args)
    }

    /// The pod's network namespace as `sidecar init --netns` takes it (/run/netns/<name>).
    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.pod_ns)
    }

    /// Runs `sidecar init` for this pod as root and returns what happened, success or not.
    pub fn try_init(&mut self, extra: &[&str]) -> Output {
        let cgroup = self.cgroup.clone();
        self.try_init_with(&cgroup, extra, InitRunner::Root)
    }

    /// Runs `sidecar init --cgroup <cgroup> <extra>` the given way and returns what happened.
    /// With `InitRunner::CgroupNsRoot`, `cgroup` is ignored: the sidecar is pointed at the cgroup2
    /// mount point as seen from inside the private namespaces (see `InitRunner`).
    pub fn try_init_with(&mut self, cgroup: &Path, extra: &[&str], runner: InitRunner) -> Output {
        let (cgroup_arg, real_cgroup) = match runner {
            // The kernel object behind the namespaced mount point is the pod's cgroup.
            InitRunner::CgroupNsRoot => (env::cgroup2_mount().to_path_buf(), self.cgroup.clone()),
            InitRunner::Root | InitRunner::User { .. } => {
                (cgroup.to_path_buf(), cgroup.to_path_buf())
            }
        };
        let mut cmd = self.init_command(&cgroup_arg, &real_cgroup, extra);
        match runner {
            InitRunner::Root => {}
            InitRunner::User { uid, gid } => {
                // SAFETY: raw syscalls only, see drop_privileges.
                unsafe {
                    cmd.pre_exec(move || drop_privileges(uid, gid));
                }
            }
            InitRunner::CgroupNsRoot => {
                let procs = self.cgroup_procs.clone();
                let target = CString::new(cgroup_arg.as_os_str().as_bytes())
                    .unwrap_or_else(|e| panic!("mount point path: {e}"));
                // SAFETY: raw syscalls only on data prepared before fork.
                unsafe {
                    cmd.pre_exec(move || {
                        join_cgroup(&procs)?;
                        private_cgroup_root(&target)
                    });
                }
            }
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("spawn sidecar init ({runner:?}): {e}"))
    }

    /// `sidecar init --remove` for this pod's cgroup (default pin root and pod id).
    pub fn remove(&mut self) -> Output {
        self.remove_with(&[])
    }

    /// `sidecar init --remove --cgroup <this pod's cgroup> <extra>` (e.g. `--pin-root DIR`).
    pub fn remove_with(&mut self, extra: &[&str]) -> Output {
        let mut cmd = Self::base_command(&self.sidecar_exec());
        cmd.args(["init", "--remove", "--cgroup"])
            .arg(&self.cgroup)
            .args(extra);
        cmd.output()
            .unwrap_or_else(|e| panic!("spawn sidecar init --remove: {e}"))
    }

    /// `sidecar status --cgroup <this pod's cgroup> --json` (default pin root and pod id), parsed;
    /// panics unless it succeeds.
    pub fn status(&mut self) -> Status {
        let text = self.sidecar_status(&["--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("sidecar status --json printed something else ({e}):\n{text}")
        })
    }

    /// `sidecar status` as a human reads it (the table).
    pub fn status_table(&mut self) -> String {
        self.sidecar_status(&[])
    }

    /// The kernel counters of this pod, from `sidecar status --json`.
    pub fn counters(&mut self) -> Counters {
        self.status().counters
    }

    fn sidecar_status(&mut self, extra: &[&str]) -> String {
        let mut cmd = Self::base_command(&self.sidecar_exec());
        cmd.args(["status", "--cgroup"])
            .arg(&self.cgroup)
            .args(extra);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("spawn sidecar status: {e}"));
        if !out.status.success() {
            panic!(
                "sidecar status {extra:?} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `sidecar run <extra>` inside the pod as uid/gid 1337 with SIDECAR_LOG=debug, and
    /// waits until it listens on 127.0.0.1:15001. Returns its pid. Starting it again after
    /// `stop_proxy` is a restart (each run logs to a file of its own).
    pub fn start_proxy(&mut self, extra: &[&str]) -> u32 {
        let run = 1 + self
            .children
            .iter()
            .filter(|s| s.label.starts_with("proxy"))
            .count();
        let (log, label) = if run == 1 {
            (
                self.dir.join("proxy.log"),
                "proxy (sidecar run)".to_string(),
            )
        } else {
            (
                self.dir.join(format!("proxy-{run}.log")),
                format!("proxy run #{run} (sidecar run)"),
            )
        };
        let file = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let file2 = file
            .try_clone()
            .unwrap_or_else(|e| panic!("dup log fd: {e}"));
        let mut cmd = Self::base_command(&self.sidecar_exec());
        cmd.arg("run")
            .args(extra)
            .env("SIDECAR_LOG", "debug")
            .env("RUST_BACKTRACE", "1")
            .stdout(file)
            .stderr(file2);
        self.in_pod(&mut cmd, Some((PROXY_UID, PROXY_GID)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sidecar run in pod {}: {e}", self.name));
        let pid = child.id();
        eprintln!(
            "pod {}: proxy started, pid {pid}, log {}",
            self.name,
            log.display()
        );
        self.children.push(Spawned { label, child, log });
        self.wait_listening(pid, OUTBOUND_PORT, false);
        pid
    }

    /// `start_proxy`, then waits for its inbound side: listening on 0.0.0.0:15006 and
    /// [::]:15006, and both listeners registered in the kernel (the sockops LISTEN callback puts
    /// them in the SOCKMAP that sk_lookup reads; the counter `inbound_listener_seen` moves by
    /// two). The pod must have been initialised with `init_with_netns`. Returns the proxy's pid.
    ///
    /// Waiting on the counter, not only on the socket state: the kernel lists a socket as
    /// listening a moment before that callback runs, and a fail-closed pod refuses SYNs meanwhile.
    pub fn start_proxy_with_inbound(&mut self, extra: &[&str]) -> u32 {
        let before = self.counters().get("inbound_listener_seen");
        let pid = self.start_proxy(extra);
        self.wait_listening(pid, INBOUND_PORT, false);
        self.wait_listening(pid, INBOUND_PORT, true);
        let target = before + INBOUND_LISTENERS;
        let mut seen = before;
        let registered = crate::eventually(PROXY_START_TIMEOUT, || {
            seen = self.counters().get("inbound_listener_seen");
            seen >= target
        });
        if !registered {
            panic!(
                "the proxy (pid {pid}) listens on port {INBOUND_PORT}, but the kernel registered \
                 {} of its {INBOUND_LISTENERS} inbound listeners within {PROXY_START_TIMEOUT:?} \
                 (counter inbound_listener_seen {before} -> {seen}): is the proxy in the pod \
                 cgroup, and was init run with --netns?\n{}",
                seen - before,
                self.logs_of(pid)
            );
        }
        pid
    }

    /// Stops the running proxy the hard way (SIGKILL to its pid, then waits for it): a crashed
    /// proxy, which is what the fail modes are about. Its listeners are closed by the time the
    /// wait returns (the kernel closes a dying process's files before reporting its exit), which
    /// also takes them out of the kernel's SOCKMAP. Panics if the proxy had already exited.
    pub fn stop_proxy(&mut self) {
        let Some(spawned) = self
            .children
            .iter_mut()
            .rev()
            .find(|s| s.label.starts_with("proxy"))
        else {
            panic!("no proxy started in pod {}", self.name);
        };
        let pid = spawned.child.id();
        if let Ok(Some(status)) = spawned.child.try_wait() {
            let log = format_log(&spawned.label, &spawned.log);
            panic!("the proxy (pid {pid}) had already exited ({status}) before the test stopped it:\n{log}");
        }
        if let Err(e) = spawned.child.kill() {
            panic!("kill proxy pid {pid}: {e}");
        }
        if let Err(e) = spawned.child.wait() {
            panic!("wait for proxy pid {pid}: {e}");
        }
        eprintln!("pod {}: proxy pid {pid} stopped (SIGKILL)", self.name);
    }

    /// Waits until something in the pod listens on [::]-family port `port` (v6) or the v4 one,
    /// failing fast (with the log) if the process `pid` exits meanwhile. Reads /proc/<pid>/net
    /// rather than connecting, so that readiness checks add no traffic to what tests observe.
    pub fn wait_listening(&mut self, pid: u32, port: u16, v6: bool) {
        let mut exited = None;
        let listening = crate::eventually(PROXY_START_TIMEOUT, || {
            if let Some(spawned) = self.children.iter_mut().find(|s| s.child.id() == pid) {
                if let Ok(Some(status)) = spawned.child.try_wait() {
                    exited = Some(status);
                    return true;
                }
            }
            listening_on(pid, port, v6)
        });
        let family = if v6 { "IPv6" } else { "IPv4" };
        if let Some(status) = exited {
            panic!(
                "process {pid} exited ({status}) before listening on {family} port {port}:\n{}",
                self.logs_of(pid)
            );
        }
        if !listening {
            panic!(
                "process {pid} did not listen on {family} port {port} within {PROXY_START_TIMEOUT:?}:\n{}",
                self.logs_of(pid)
            );
        }
    }

    /// Waits for the proxy's IPv6 outbound listener ([::1]:15001) as well.
    pub fn wait_proxy_listening_v6(&mut self) {
        let Some(pid) = self.proxy_pid() else {
            panic!("no proxy started in pod {}", self.name);
        };
        self.wait_listening(pid, OUTBOUND_PORT, true);
    }

    /// The most recently started proxy.
    fn proxy_pid(&self) -> Option<u32> {
        self.children
            .iter()
            .rev()
            .find(|s| s.label.starts_with("proxy"))
            .map(|s| s.child.id())
    }

    /// Everything the most recently started proxy has logged so far.
    pub fn proxy_log(&self) -> String {
        self.children
            .iter()
            .rev()
            .find(|s| s.label.starts_with("proxy"))
            .map(|s| fs::read_to_string(&s.log).unwrap_or_default())
            .unwrap_or_default()
    }

    fn logs_of(&self, pid: u32) -> String {
        self.children
            .iter()
            .filter(|s| s.child.id() == pid)
            .map(|s| format_log(&s.label, &s.log))
            .collect()
    }

    /// Runs the probe app (`sidecar-probe <args>`) inside the pod as root and returns its result,
    /// success or not.
    pub fn run_app_raw(&self, args: &[&str]) -> AppRun {
        self.run_probe_as(None, args)
    }

    /// Runs the probe inside the pod as `user` (uid, gid), or root.
    pub fn run_probe_as(&self, user: Option<(u32, u32)>, args: &[&str]) -> AppRun {
        let mut cmd = Self::base_command(&env::probe_bin());
        cmd.args(args);
        self.in_pod(&mut cmd, user);
        // The probe bounds its own connects and reads, so waiting for it cannot hang.
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("spawn sidecar-probe in pod {}: {e}", self.name));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        AppRun {
            status: out.status,
            json,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs the probe app inside the pod and returns its JSON output; panics unless it succeeded.
    pub fn run_app(&self, args: &[&str]) -> Value {
        let run = self.run_app_raw(args);
        if !run.status.success() || run.json.is_null() {
            panic!(
                "app `sidecar-probe {}` failed ({}):\n{}{}",
                args.join(" "),
                run.status,
                run.stdout,
                run.stderr
            );
        }
        run.json
    }

    fn run_app_as<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let json = self.run_app(args);
        serde_json::from_value(json.clone())
            .unwrap_or_else(|e| panic!("unexpected probe output {json}: {e}"))
    }

    /// The app in the pod GETs `/` from `addr` (e.g. "10.200.0.1:8080", "[fd00:200::1]:8080").
    pub fn app_http(&self, addr: &str) -> HttpReply {
        self.run_app_as(&["http", "--connect", addr])
    }

    /// The app in the pod sends `bytes` opaque bytes to an echo server at `addr`.
    pub fn app_echo(&self, addr: &str, bytes: usize) -> EchoReply {
        self.run_app_as(&["tcp-echo", "--connect", addr, "--bytes", &bytes.to_string()])
    }

    /// The app in the pod connects to `addr`, sends nothing, and reads the server's first line.
    pub fn app_greeting(&self, addr: &str, timeout: Duration) -> GreetingReply {
        let ms = timeout.as_millis().to_string();
        self.run_app_as(&["greeting", "--connect", addr, "--timeout-ms", &ms])
    }

    /// A thread of the test process, in the pod's network namespace but NOT in its cgroup, GETs
    /// `/` from `addr`: "a process outside the pod".
    pub fn outside_http(&self, addr: &str) -> HttpReply {
        let target = sock(addr);
        let result = in_namespace(&self.pod_ns, move || client::http_get(target, "/", None));
        result.unwrap_or_else(|e| panic!("outside-the-pod request to {addr} failed: {e}"))
    }

    /// A client in the remote namespace (another host, as far as the pod can tell) GETs `/` from
    /// `addr` (e.g. "10.200.0.2:8080", the pod's address). Panics unless it gets a response.
    pub fn remote_http(&self, addr: &str) -> HttpReply {
        self.try_remote_http(addr)
            .unwrap_or_else(|e| panic!("request from the remote netns to {addr} failed: {e}"))
    }

    /// `remote_http`, returning the failure (e.g. "... Connection refused") instead of panicking.
    pub fn try_remote_http(&self, addr: &str) -> Result<HttpReply, String> {
        let target = sock(addr);
        in_namespace(&self.remote_ns, move || client::http_get(target, "/", None))
    }

    /// A client in the remote namespace sends one request (`headers` as `Name: value`).
    pub fn remote_request(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        headers: &[&str],
        body: &str,
    ) -> HttpReply {
        let target = sock(addr);
        let (method, path, body) = (method.to_owned(), path.to_owned(), body.to_owned());
        let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
        in_namespace(&self.remote_ns, move || {
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            client::http_request(
                target,
                &client::HttpRequest {
                    method: &method,
                    path: &path,
                    host: None,
                    headers: &headers,
                    body: &body,
                },
            )
        })
        .unwrap_or_else(|e| panic!("request from the remote netns to {addr} failed: {e}"))
    }

    /// A client in the remote namespace sends `bytes` opaque bytes to an echo server at `addr`.
    pub fn remote_echo(&self, addr: &str, bytes: usize) -> EchoReply {
        let target = sock(addr);
        in_namespace(&self.remote_ns, move || client::tcp_echo(target, bytes))
            .unwrap_or_else(|e| panic!("echo from the remote netns to {addr} failed: {e}"))
    }

    /// A client in the remote namespace connects to `addr`, sends nothing, and reads the server's
    /// first line.
    pub fn remote_greeting(&self, addr: &str, timeout: Duration) -> GreetingReply {
        let target = sock(addr);
        in_namespace(&self.remote_ns, move || client::greeting(target, timeout))
            .unwrap_or_else(|e| panic!("greeting from the remote netns to {addr} failed: {e}"))
    }

    /// An HTTP server of the app, in the pod's network namespace (see `Upstream::http`; it
    /// answers `hello from <name>` and records each request's headers and peer address). It runs
    /// in the test process, outside the pod cgroup: start it **before** `init`, which reads the
    /// listeners already in the namespace. The kernel learns of later listeners only from
    /// processes in the pod cgroup (as a pod's app is): for one started after `init`, run
    /// `sidecar-probe serve` in the pod (`tests/interception_integrity.rs`, `PodServer`).
    pub fn app_http_server(&self, addr: &str, name: &str) -> Upstream {
        Upstream::http(&self.pod_ns, addr, name)
    }

    /// A TCP echo server of the app, in the pod's network namespace.
    pub fn app_echo_server(&self, addr: &str, name: &str) -> Upstream {
        Upstream::echo(&self.pod_ns, addr, name)
    }

    /// A server-speaks-first server of the app, in the pod's network namespace.
    pub fn app_greeting_server(&self, addr: &str, name: &str) -> Upstream {
        Upstream::greeting(&self.pod_ns, addr, name)
    }

    /// Deletes the pod's network namespace as the kubelet does when a pod goes away, without
    /// `sidecar init --remove`: what the pod pinned stays in bpffs. Kills what the pod started
    /// first (a process or socket inside keeps a namespace alive). Servers returned by
    /// `app_*_server` live in the test process: drop them before calling this.
    pub fn delete_netns(&mut self) {
        self.kill_children();
        self.pod_netns = None;
        let pod_ns = self.pod_ns.clone();
        ip(&["netns", "del", &pod_ns]);
        self.netns_created.retain(|ns| *ns != pod_ns);
    }

    /// Deletes the pod's cgroup as the kubelet does when a pod goes away, without
    /// `sidecar init --remove` (its members are killed first).
    pub fn delete_cgroup(&mut self) {
        self.kill_children();
        if !env::remove_cgroup_tree(&self.cgroup_top, CLEANUP_TIMEOUT) {
            panic!("could not remove cgroup {}", self.cgroup_top.display());
        }
        self.cgroup_created = false;
    }

    fn kill_children(&mut self) {
        for spawned in &mut self.children {
            let _ = spawned.child.kill();
            let _ = spawned.child.wait();
        }
    }

    /// An HTTP upstream in the remote namespace (see `Upstream::http`).
    pub fn http_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::http(&self.remote_ns, addr, name)
    }

    /// A TCP echo upstream in the remote namespace.
    pub fn echo_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::echo(&self.remote_ns, addr, name)
    }

    /// A server-speaks-first upstream in the remote namespace.
    pub fn greeting_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::greeting(&self.remote_ns, addr, name)
    }

    /// An HTTP upstream in the remote namespace answering `status` to everything.
    pub fn status_upstream(&self, addr: &str, name: &str, status: u16) -> Upstream {
        Upstream::status(&self.remote_ns, addr, name, status)
    }

    /// An HTTP upstream answering 503 until `recover()`, then 200.
    pub fn recovering_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::recovering(&self.remote_ns, addr, name)
    }

    /// An upstream that resets each connection after reading its request.
    pub fn resetting_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::resetting(&self.remote_ns, addr, name)
    }

    /// An upstream that reads requests and never answers.
    pub fn hanging_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::hanging(&self.remote_ns, addr, name)
    }

    /// An address in the remote namespace whose connects time out (SYNs dropped).
    pub fn blackhole_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::blackhole(&self.remote_ns, addr, name)
    }

    /// An address in the remote namespace where nothing listens (connects are refused).
    pub fn refusing_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::refusing(addr, name)
    }

    /// A gRPC (h2c) echo upstream in the remote namespace.
    pub fn grpc_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::grpc(&self.remote_ns, addr, name)
    }

    /// A WebSocket echo upstream in the remote namespace.
    pub fn websocket_upstream(&self, addr: &str, name: &str) -> Upstream {
        Upstream::websocket(&self.remote_ns, addr, name)
    }

    /// Runs `program args` as the app (in the pod's cgroup and netns, as root) and returns its
    /// output: a real third-party client (curl, redis-cli) as the app would use it.
    pub fn app_command(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        self.in_pod(&mut cmd, None);
        cmd.output()
            .unwrap_or_else(|e| panic!("run {program} in pod {}: {e}", self.name))
    }

    /// Starts `program args` as the app, with piped stdin and stdout (a long-lived client).
    pub fn app_spawn(&self, program: &str, args: &[&str]) -> Child {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
        self.in_pod(&mut cmd, None);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in pod {}: {e}", self.name))
    }

    /// The app in the pod sends one HTTP/1.1 request (`headers` as `Name: value`).
    pub fn app_request(&self, addr: &str, method: &str, headers: &[&str], body: &str) -> HttpReply {
        let mut args = vec![
            "http",
            "--connect",
            addr,
            "--method",
            method,
            "--body",
            body,
        ];
        for h in headers {
            args.extend(["--header", h]);
        }
        self.run_app_as(&args)
    }

    /// The app in the pod makes one unary gRPC call over h2c.
    pub fn app_grpc(&self, addr: &str, message: &str) -> GrpcReply {
        self.run_app_as(&["grpc", "--connect", addr, "--message", message])
    }

    /// The app in the pod opens a WebSocket and exchanges one text frame.
    pub fn app_websocket(&self, addr: &str, message: &str) -> WebSocketReply {
        self.run_app_as(&["websocket", "--connect", addr, "--message", message])
    }

    /// The app in the pod sends "ping" to an echo server, then idles up to `timeout` waiting for
    /// the connection to be closed.
    pub fn app_tcp_idle(&self, addr: &str, timeout: Duration) -> IdleReply {
        let ms = timeout.as_millis().to_string();
        self.run_app_as(&["tcp-idle", "--connect", addr, "--timeout-ms", &ms])
    }
}

impl Default for Pod {
    fn default() -> Self {
        Pod::new()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Never panic here: a panic during unwinding aborts and skips the rest of the cleanup.
        let failed = self.failed || std::thread::panicking();
        self.kill_children();
        if failed {
            for spawned in &self.children {
                eprint!("{}", format_log(&spawned.label, &spawned.log));
            }
        }
        if !self.inits.is_empty() {
            let bin = self.sidecar_exec.clone();
            for record in self.inits.iter().rev() {
                if let Some(bin) = &bin {
                    let mut cmd = Self::base_command(bin);
                    cmd.args(["init", "--remove", "--cgroup"])
                        .arg(&record.cgroup);
                    if let Some(root) = &record.pin_root {
                        cmd.args(["--pin-root", root]);
                    }
                    if let Some(id) = &record.pod_id {
                        cmd.args(["--pod-id", id]);
                    }
                    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
                }
                // Pins are named after this pod only (its cgroup inode or a test-chosen id), so
                // removing what `--remove` left is safe, and keeps bpffs clean for later runs.
                if let Some(dir) = &record.pin_dir {
                    if dir.exists() {
                        eprintln!(
                            "cleanup: `init --remove` left {} behind; removing it",
                            dir.display()
                        );
                        let _ = fs::remove_dir_all(dir);
                    }
                }
            }
        }
        self.pod_netns = None;
        for ns in self.netns_created.drain(..) {
            let status = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("cleanup: could not delete netns {ns}");
            }
        }
        if self.cgroup_created && !env::remove_cgroup_tree(&self.cgroup_top, CLEANUP_TIMEOUT) {
            eprintln!(
                "cleanup: could not remove cgroup {}",
                self.cgroup_top.display()
            );
        }
        if failed {
            eprintln!("pod {}: logs kept in {}", self.name, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes "0" to the cgroup's cgroup.procs: moves the calling process into it. Raw syscalls only
/// (called between fork and exec).
fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: procs is a valid NUL-terminated path; open/write/close have no other preconditions.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = (written != 1).then(io::Error::last_os_error);
        libc::close(fd);
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// setgroups(0), setgid, setuid, in that order (after setuid the others are no longer allowed).
fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscalls on integers.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Enters a new cgroup namespace (rooted at the current cgroup) and a new mount namespace with
/// private propagation, and mounts cgroup2 afresh at `target` there (so the mount's root is the
/// namespace's root cgroup). Nothing propagates to the host: the root is made private first.
fn private_cgroup_root(target: &CString) -> io::Result<()> {
    // SAFETY: raw syscalls with valid NUL-terminated strings or nulls where the kernel allows.
    unsafe {
        if libc::unshare(libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        let root = b"/\0";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr().cast(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The kernel refuses (EBUSY) to stack the same cgroup2 superblock on its own mount root,
        // so the inherited mount goes first; it is private to this namespace by now.
        if libc::umount2(target.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fstype = b"cgroup2\0";
        if libc::mount(
            fstype.as_ptr().cast(),
            target.as_ptr(),
            fstype.as_ptr().cast(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True when the network namespace of `pid` has a TCP socket listening on `port` (/proc/<pid>/net/
/// tcp or tcp6: local port in hex, state 0A = LISTEN).
fn listening_on(pid: u32, port: u16, v6: bool) -> bool {
    let file = if v6 { "tcp6" } else { "tcp" };
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
        return false;
    };
    let want = format!("{port:04X}");
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].rsplit(':').next() == Some(want.as_str()) && fields[3] == "0A"
    })
}

fn format_log(label: &str, path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read: {e})\n"));
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut out = format!("----- {label}: {} -----\n", path.display());
    if skipped > 0 {
        out.push_str(&format!("({skipped} earlier lines omitted)\n"));
    }
    for line in &lines[skipped..] {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!("----- end of {label} -----\n"));
    out
}

/// Value of `--flag VALUE` or `--flag=VALUE` in an argument list.
fn flag_value(args: &[&str], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if *arg == flag {
            args.get(i + 1).map(|v| v.to_string())
        } else {
            arg.strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_string)
        }
    })
}

/// Runs `ip <args>`; panics with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `f` on a thread in the named network namespace (see `netns::in_netns`).
fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    match netns::in_netns(ns, f) {
        Ok(result) => result,
        Err(e) => panic!("enter netns {ns}: {e}"),
    }
}

fn sock(addr: &str) -> std::net::SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("bad socket address {addr:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_are_found_in_both_spellings() {
        assert_eq!(
            flag_value(&["--pin-root", "/x"], "--pin-root").as_deref(),
            Some("/x")
        );
        assert_eq!(
            flag_value(&["--pin-root=/y"], "--pin-root").as_deref(),
            Some("/y")
        );
        assert_eq!(flag_value(&["--pod-id", "a"], "--pin-root"), None);
    }
}
