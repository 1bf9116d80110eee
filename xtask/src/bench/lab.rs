//! The bench's own small fixture (xtask does not depend on the test crate): three network
//! namespaces and a cgroup tree, all named `sidecar-bench-<pid>...`, removed on drop.
//!
//! ```text
//!  netns <name>-pod  10.201.0.2 ──veth── 10.201.0.1  netns <name>-up   (upstream nginx :8080)
//!   load generator, proxies,                10.201.1.1
//!   eBPF pod cgroup                            │
//!  netns <name>-ipt  10.201.1.2 ──veth─────────┘  (iptables REDIRECT lives only here)
//! ```
//!
//! Processes are started through a chain of small exec-ing tools instead of libc calls (xtask
//! depends on anyhow only): `sh` writes its own pid into the cgroup, then `nsenter --net` (which,
//! unlike `ip netns exec`, does not remount /sys and so keeps the cgroup2 mount visible), `taskset`,
//! `nice`, `prlimit` and, for the proxy user, `setpriv`. Each execs the next, so the pid we spawn is the
//! pid of the final program and every process it forks stays in its cgroup: stopping a target is
//! `cgroup.kill` on that cgroup, and nothing can be left behind by name.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::say;

pub const NAME_PREFIX: &str = "sidecar-bench-";
/// The proxy's uid/gid, excluded from capture by both the eBPF programs and the iptables rule.
pub const PROXY_UID: u32 = 1337;
pub const POD_IP: &str = "10.201.0.2";
pub const UPSTREAM_IP: &str = "10.201.0.1";
pub const IPT_POD_IP: &str = "10.201.1.2";
pub const IPT_UPSTREAM_IP: &str = "10.201.1.1";
pub const UPSTREAM_PORT: u16 = 8080;
/// Where both interception mechanisms send captured connections (the sidecar's default).
pub const OUTBOUND_PORT: u16 = 15001;
/// Open files wanted by a load generator or proxy: 1,000 client connections and as many upstream
/// ones, with room to spare. Capped at our own hard limit (raising it needs CAP_SYS_RESOURCE,
/// which containers often lack).
const NOFILE_WANTED: u64 = 65536;
/// A fixed PATH for children: nothing from the caller's shell (SIDECAR_*, ...) reaches a target.
const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// See [`Lab::command`]; needs CAP_SYS_NICE (root has it).
pub const NICE: &str = "-19";
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped process may take to exit on SIGTERM before its cgroup is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Pod,
    Ipt,
    Up,
}

/// Which CPU each role is pinned to (`None`: no pinning, on a 1-CPU machine).
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    pub load: Option<u32>,
    pub proxy: Option<u32>,
    pub upstream: Option<u32>,
}

impl Cpus {
    /// Proxy alone on one CPU; load generator and upstream share another on a 2-CPU machine (a
    /// third CPU, if there is one, goes to the upstream).
    pub fn plan(allowed: &[u32]) -> Cpus {
        match allowed {
            [] | [_] => Cpus {
                load: None,
                proxy: None,
                upstream: None,
            },
            [a, b] => Cpus {
                load: Some(*a),
                proxy: Some(*b),
                upstream: Some(*a),
            },
            [a, b, c, ..] => Cpus {
                load: Some(*a),
                proxy: Some(*b),
                upstream: Some(*c),
            },
        }
    }

    pub fn describe(&self) -> String {
        let s = |c: Option<u32>| c.map_or("any".to_string(), |c| format!("CPU {c}"));
        format!(
            "load generator on {}, proxy on {}, upstream on {}",
            s(self.load),
            s(self.proxy),
            s(self.upstream)
        )
    }
}

/// Where and how a process runs.
#[derive(Clone, Debug)]
pub struct Place {
    pub net: Net,
    pub cgroup: PathBuf,
    pub cpu: Option<u32>,
    pub proxy_user: bool,
}

/// A started process and the cgroup that holds it (and anything it forks).
pub struct Proc {
    pub label: String,
    pub child: Child,
    pub cgroup: PathBuf,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status text)` if the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub struct Lab {
    pub name: String,
    /// Configs and logs; kept when the run failed.
    pub dir: PathBuf,
    cgroup_root: PathBuf,
    pub cpus: Cpus,
    netns: Vec<String>,
    /// Created cgroups, parents before children (removed in reverse).
    cgroups: Vec<PathBuf>,
    /// `sidecar init` was run on these cgroups with this binary: undo it on drop.
    ebpf: Vec<(PathBuf, PathBuf)>,
    procs: Vec<Proc>,
    counter: u32,
    pub failed: bool,
    /// `LLVM_PROFILE_FILE` for every lab process (profile training of an instrumented sidecar:
    /// one file per process, written by its own user, see `release`).
    pub profile_file: Option<OsString>,
}

impl Lab {
    pub fn new(cgroup2: &Path, cpus: Cpus, sidecar: &Path) -> Result<Lab> {
        sweep_leftovers(cgroup2, sidecar);
        let name = format!("{NAME_PREFIX}{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let mut lab = Lab {
            cgroup_root: cgroup2.join(&name),
            dir: dir.clone(),
            name,
            cpus,
            netns: Vec::new(),
            cgroups: Vec::new(),
            ebpf: Vec::new(),
            procs: Vec::new(),
            counter: 0,
            failed: false,
            profile_file: None,
        };
        // Readable by uid 1337, which runs the sidecar binary copied in here.
        fs::create_dir_all(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let root = lab.cgroup_root.clone();
        lab.make_cgroup(&root)?;
        lab.build_network()?;
        Ok(lab)
    }

    pub fn netns_name(&self, net: Net) -> String {
        let suffix = match net {
            Net::Pod => "pod",
            Net::Ipt => "ipt",
            Net::Up => "up",
        };
        format!("{}-{suffix}", self.name)
    }

    fn build_network(&mut self) -> Result<()> {
        for net in [Net::Pod, Net::Ipt, Net::Up] {
            let ns = self.netns_name(net);
            ip(&["netns", "add", &ns])?;
            self.netns.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (pod, ipt, up) = (
            self.netns_name(Net::Pod),
            self.netns_name(Net::Ipt),
            self.netns_name(Net::Up),
        );
        // Each veth is created inside a bench namespace with its peer directly in another: no
        // interface ever appears in the host namespace.
        for (ns, peer, ns_ip, peer_ip) in [
            (&pod, "vpod", POD_IP, UPSTREAM_IP),
            (&ipt, "vipt", IPT_POD_IP, IPT_UPSTREAM_IP),
        ] {
            ip(&[
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", &up,
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ns_ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &up,
                "addr",
                "add",
                &format!("{peer_ip}/24"),
                "dev",
                peer,
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &up, "link", "set", peer, "up"])?;
        }
        for (ns, dev) in [(&pod, "eth0"), (&ipt, "eth0"), (&up, "vpod"), (&up, "vipt")] {
            let up_now = poll(Duration::from_secs(5), || {
                Command::new("ip")
                    .args(["-n", ns, "-o", "link", "show", dev])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("LOWER_UP"))
            });
            if !up_now {
                bail!("veth {dev} in netns {ns} has no carrier after 5 s");
            }
        }
        // Connection-churn phases open tens of thousands of connections per run: a wide port
        // range and TIME_WAIT reuse keep the client side from running out of ports. The range
        // starts above every listening port of the lab (8080, 15001, 151xx), so that no
        // connection can hold a port a target is about to bind. Same settings in every
        // namespace: every target gets the same host tuning.
        for ns in [&pod, &ipt, &up] {
            run_quiet(
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args([
                        "sysctl",
                        "-q",
                        "-w",
                        "net.ipv4.ip_local_port_range=20000 65535",
                        "net.ipv4.tcp_tw_reuse=1",
                    ]),
                &format!("sysctl in netns {ns}"),
            )?;
        }
        Ok(())
    }

    /// The iptables REDIRECT rule of the incumbent mechanism, in the ipt namespace only: every
    /// TCP connection to a non-loopback address from anyone but the proxy user goes to the
    /// proxy's outbound port (what Istio's init container does, reduced to its core).
    pub fn install_iptables_redirect(&self, iptables: &Path) -> Result<()> {
        let ns = self.netns_name(Net::Ipt);
        let uid = PROXY_UID.to_string();
        let port = OUTBOUND_PORT.to_string();
        run_quiet(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .arg(iptables)
                .args(["-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp"])
                .args(["!", "-d", "127.0.0.0/8", "-m", "owner", "!", "--uid-owner"])
                .arg(&uid)
                .args(["-j", "REDIRECT", "--to-ports"])
                .arg(&port),
            &format!("iptables REDIRECT rule in netns {ns}"),
        )
    }

    /// A fresh cgroup `<root>/<rel>` (parents must exist).
    pub fn cgroup(&mut self, rel: &str) -> Result<PathBuf> {
        let path = self.cgroup_root.join(rel);
        self.make_cgroup(&path)?;
        Ok(path)
    }

    /// The path of a cgroup of the lab made earlier with [`Lab::cgroup`].
    pub fn cgroup_path(&self, rel: &str) -> PathBuf {
        self.cgroup_root.join(rel)
    }

    fn make_cgroup(&mut self, path: &Path) -> Result<()> {
        fs::create_dir(path).with_context(|| format!("cannot create cgroup {}", path.display()))?;
        self.cgroups.push(path.to_path_buf());
        Ok(())
    }

    /// `sidecar init` on `cgroup` (outbound capture only); undone on drop.
    pub fn init_ebpf(&mut self, sidecar: &Path, cgroup: &Path) -> Result<()> {
        self.init_with(sidecar, cgroup, &["--pod-ip", POD_IP])
    }

    /// `sidecar init --msg-redirect` on `cgroup` (outbound capture, the app's leg socket to
    /// socket); undone on drop.
    pub fn init_ebpf_msg(&mut self, sidecar: &Path, cgroup: &Path) -> Result<()> {
        self.init_with(sidecar, cgroup, &["--pod-ip", POD_IP, "--msg-redirect"])
    }

    /// `sidecar init` on `cgroup` with inbound capture in `net` (its address `ip`), as for a pod
    /// serving there; undone by [`Lab::remove_ebpf`] or on drop.
    pub fn init_ebpf_inbound(
        &mut self,
        sidecar: &Path,
        cgroup: &Path,
        net: Net,
        ip: &str,
    ) -> Result<()> {
        let netns = format!("/run/netns/{}", self.netns_name(net));
        self.init_with(sidecar, cgroup, &["--pod-ip", ip, "--netns", &netns])
    }

    /// Undoes [`Lab::init_ebpf_inbound`].
    pub fn remove_ebpf(&mut self, cgroup: &Path) -> Result<()> {
        let Some(i) = self.ebpf.iter().position(|(_, c)| c == cgroup) else {
            return Ok(());
        };
        let (sidecar, cgroup) = self.ebpf.remove(i);
        run_quiet(
            Command::new(&sidecar)
                .args(["init", "--remove", "--cgroup"])
                .arg(&cgroup)
                .env_clear()
                .env("PATH", CHILD_PATH),
            "sidecar init --remove",
        )
    }

    fn init_with(&mut self, sidecar: &Path, cgroup: &Path, args: &[&str]) -> Result<()> {
        self.ebpf
            .push((sidecar.to_path_buf(), cgroup.to_path_buf()));
        let out = Command::new(sidecar)
            .args(["init", "--cgroup"])
            .arg(cgroup)
            .args(args)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .envs(self.profile_env())
            .stdin(Stdio::null())
            .output()
            .context("cannot run sidecar init")?;
        if !out.status.success() {
            bail!(
                "sidecar init --cgroup {} failed ({}): {}",
                cgroup.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The command line that starts `program` at `place` (see the module comment).
    pub fn command(&self, place: &Place, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(place.cgroup.join("cgroup.procs"))
            .arg("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns_name(place.net)))
            .arg("--");
        if let Some(cpu) = place.cpu {
            cmd.args(["taskset", "-c", &cpu.to_string()]);
        }
        // Every lab process, whatever the target, gets the same high CFS weight: a build running
        // next to the bench then takes leftover CPU instead of preempting the measured path.
        cmd.args(["nice", "-n", NICE]);
        let nofile = nofile_limit();
        cmd.arg("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--");
        if place.proxy_user {
            cmd.arg("setpriv")
                .arg(format!("--reuid={PROXY_UID}"))
                .arg(format!("--regid={PROXY_UID}"))
                .arg("--clear-groups")
                .arg("--");
        }
        cmd.arg(program)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .envs(self.profile_env())
            .env("HOME", &self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }

    fn profile_env(&self) -> Option<(&'static str, OsString)> {
        self.profile_file
            .clone()
            .map(|file| ("LLVM_PROFILE_FILE", file))
    }

    /// A unique file name in the lab directory.
    pub fn file(&mut self, stem: &str, ext: &str) -> PathBuf {
        self.counter += 1;
        self.dir.join(format!("{stem}-{}.{ext}", self.counter))
    }

    /// Starts `cmd` (from [`Lab::command`]) with stderr in a log file, and stdout there too
    /// unless `stdout` names a file of its own (a load generator's report).
    pub fn spawn(
        &mut self,
        label: &str,
        cgroup: &Path,
        mut cmd: Command,
        stdout: Option<&Path>,
    ) -> Result<Proc> {
        let log = self.file(&sanitize(label), "log");
        let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let out = match stdout {
            Some(path) => {
                File::create(path).with_context(|| format!("create {}", path.display()))?
            }
            None => file.try_clone()?,
        };
        cmd.stdout(out).stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {label}"))?;
        Ok(Proc {
            label: label.to_string(),
            child,
            cgroup: cgroup.to_path_buf(),
            log,
        })
    }

    /// Keeps `proc` running until the lab is dropped.
    pub fn keep(&mut self, proc: Proc) {
        self.procs.push(proc);
    }

    /// Stops the process as a pod's runtime would: SIGTERM, up to [`TERM_GRACE`] to exit (a
    /// proxy drains; an instrumented one writes its profile on the way out), then kills
    /// everything in its cgroup and waits until that is empty.
    pub fn stop(&mut self, mut proc: Proc) -> Result<()> {
        terminate(&mut proc);
        kill_cgroup(&proc.cgroup);
        let _ = proc.child.kill();
        let _ = proc.child.wait();
        if !poll(STOP_TIMEOUT, || cgroup_empty(&proc.cgroup)) {
            bail!(
                "{} (cgroup {}) still has processes {STOP_TIMEOUT:?} after cgroup.kill",
                proc.label,
                proc.cgroup.display()
            );
        }
        Ok(())
    }

    /// Removes an (emptied) cgroup made with [`Lab::cgroup`] before the lab ends.
    pub fn remove_cgroup(&mut self, path: &Path) {
        if remove_cgroup(path) {
            self.cgroups.retain(|c| c != path);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Never panic here: this is also the cleanup after an error.
        for cg in self.cgroups.iter().rev() {
            kill_cgroup(cg);
        }
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        for (sidecar, cgroup) in self.ebpf.iter().rev() {
            let ok = Command::new(sidecar)
                .args(["init", "--remove", "--cgroup"])
                .arg(cgroup)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                say!(
                    "cleanup: `sidecar init --remove --cgroup {}` failed; `sidecar cleanup` \
                     collects the pins once the cgroup is gone",
                    cgroup.display()
                );
            }
        }
        for ns in self.netns.drain(..) {
            if ip(&["netns", "del", &ns]).is_err() {
                say!("cleanup: could not delete netns {ns}");
            }
        }
        for cg in self.cgroups.drain(..).rev() {
            if !remove_cgroup(&cg) {
                say!("cleanup: could not remove cgroup {}", cg.display());
            }
        }
        if self.failed {
            say!("logs and configs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// SIGTERM to `proc` (the program itself: the start-up chain execs into it) and up to
/// [`TERM_GRACE`] for it to exit.
fn terminate(proc: &mut Proc) {
    if proc.exited().is_some() {
        return;
    }
    let sent = Command::new("kill")
        .args(["-TERM", &proc.pid().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if sent {
        poll(TERM_GRACE, || proc.exited().is_some());
    }
}

fn kill_cgroup(cg: &Path) {
    if !cgroup_empty(cg) {
        let _ = fs::write(cg.join("cgroup.kill"), "1");
    }
}

fn cgroup_empty(cg: &Path) -> bool {
    fs::read_to_string(cg.join("cgroup.procs")).map_or(true, |s| s.trim().is_empty())
}

/// Kills and removes a cgroup and its sub-cgroups; true when it is gone.
fn remove_cgroup(cg: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(cg) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    kill_cgroup(cg);
    poll(STOP_TIMEOUT, || {
        cgroup_empty(cg) && (fs::remove_dir(cg).is_ok() || !cg.exists())
    })
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run_quiet(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
}

fn run_quiet(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot start"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `sidecar-bench-<pid>[-suffix]` -> pid.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let pid = rest.split('-').next()?;
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what an earlier, killed bench run left behind: only names of our exact shape whose
/// creating process is gone.
fn sweep_leftovers(cgroup2: &Path, sidecar: &Path) {
    let dead = |name: &str| owner_pid(name).is_some_and(|p| !pid_alive(p));
    if let Ok(entries) = fs::read_dir(cgroup2) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) && e.path().is_dir() {
                say!("sweep: removing leftover cgroup {}", e.path().display());
                for attached in ["pod", "upstream"] {
                    let pod = e.path().join(attached);
                    if pod.is_dir() {
                        let _ = Command::new(sidecar)
                            .args(["init", "--remove", "--cgroup"])
                            .arg(&pod)
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status();
                    }
                }
                remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                say!("sweep: deleting leftover netns {name}");
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// min(NOFILE_WANTED, our hard RLIMIT_NOFILE) from /proc/self/limits.
pub fn nofile_limit() -> u64 {
    let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let v = l.split_whitespace().nth(4)?;
            if v == "unlimited" {
                Some(u64::MAX)
            } else {
                v.parse().ok()
            }
        })
        .unwrap_or(NOFILE_WANTED);
    hard.min(NOFILE_WANTED)
}

/// The CPUs this process may run on (Cpus_allowed_list, e.g. "0-1" or "0,2-3").
pub fn allowed_cpus() -> Vec<u32> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("")
        .trim();
    parse_cpu_list(list)
}

fn parse_cpu_list(list: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.trim().parse::<u32>().ok()),
        }
    }
    out
}

/// Copies `bin` into the lab directory, executable by everyone (uid 1337 cannot reach a checkout
/// under /root), and so that a rebuild by someone else during the run cannot change it.
pub fn private_copy(lab: &Lab, bin: &Path) -> Result<PathBuf> {
    let name: OsString = bin.file_name().context("binary has no file name")?.into();
    let dst = lab.dir.join(name);
    fs::copy(bin, &dst).with_context(|| format!("copy {} to {}", bin.display(), dst.display()))?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1"), vec![0, 1]);
        assert_eq!(parse_cpu_list("0,2-3"), vec![0, 2, 3]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
    }

    #[test]
    fn cpu_plan_on_two_cores_keeps_the_proxy_alone() {
        let c = Cpus::plan(&[0, 1]);
        assert_eq!((c.load, c.proxy, c.upstream), (Some(0), Some(1), Some(0)));
        let c = Cpus::plan(&[0]);
        assert_eq!(c.proxy, None);
    }

    #[test]
    fn only_our_names_have_an_owner() {
        assert_eq!(owner_pid("sidecar-bench-42"), Some(42));
        assert_eq!(owner_pid("sidecar-bench-42-pod"), Some(42));
        assert_eq!(owner_pid("sidecar-test-42-1"), None);
        assert_eq!(owner_pid("sidecar-bench-x"), None);
    }
}
