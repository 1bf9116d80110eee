//! `cargo xtask bench`: the sidecar side by side with no proxy, nginx, HAProxy and Envoy, and its
//! eBPF interception side by side with iptables REDIRECT, all measured in the same run on this
//! machine. Prints tables, writes target/bench/results.json (and results.md for
//! docs/performance.md). Method and caveats: docs/performance.md.
//!
//! Per round, every target in turn (the order is reversed on even rounds so that a slow drift of
//! the machine does not always favour the same targets): start it, check that a request through
//! it reaches the upstream with the proxy's header, then
//! 1. RSS after start (idle),
//! 2. warm-up (closed loop, not recorded),
//! 3. open loop at 1k and 5k req/s (oha, 50 connections, latency correction), with the proxy's
//!    CPU time over each,
//! 4. closed loop, keep-alive (wrk, 50 connections): maximum req/s,
//! 5. closed loop with `Connection: close`: new connections/s,
//! 6. 1,000 concurrent connections (wrk): highest RSS seen,
//!
//! and stop it. Medians over rounds are reported with half their range.

mod json;
mod lab;
mod load;
mod procfs;
mod report;
mod targets;
mod tools;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, probe, Ctx};
use crate::{host, prereq, release, say};
use json::Json;
use lab::{Cpus, Lab, Place};
use load::Tools;
use report::{Results, Sample};
use targets::{Cgroups, Live, Programs, Target};

pub const USAGE: &str = "bench [--quick] [--rounds N] [--only T1,T2,...] [--sidecar PATH] [--perf]";
pub const HELP: &str = "needs root. Installs what is missing, builds the release sidecar and \
    compares direct, sidecar-ebpf, sidecar-iptables, sidecar, nginx, haproxy and envoy in \
    interleaved rounds (latency at 1k/5k req/s, CPU per request, max req/s, new connections/s, \
    RSS): tables on stdout, target/bench/results.json and results.md. --quick: one short round \
    (< 1 min), a smoke test with no speed assertions; --rounds N (default 2); --only T,... (direct \
    is always kept); --sidecar PATH: measure that binary, no build; --perf: perf record/trace of \
    each proxy into target/bench/perf/. Method: docs/performance.md";

#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub rounds: Option<u32>,
    pub only: Option<Vec<Target>>,
    pub sidecar: Option<PathBuf>,
    pub perf: bool,
}

impl Options {
    pub fn parse(args: &[OsString]) -> Result<Options> {
        let mut opts = Options {
            quick: false,
            rounds: None,
            only: None,
            sidecar: None,
            perf: false,
        };
        let mut it = args.iter().map(|a| a.to_str());
        while let Some(arg) = it.next() {
            let Some(arg) = arg else {
                bail!("bench: arguments must be UTF-8");
            };
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (arg, None),
            };
            let mut value = |name: &str| -> Result<String> {
                match inline
                    .clone()
                    .or_else(|| it.next().flatten().map(str::to_string))
                {
                    Some(v) => Ok(v),
                    None => bail!("bench: {name} needs a value"),
                }
            };
            match flag {
                "--quick" => opts.quick = true,
                "--perf" => opts.perf = true,
                "--rounds" => {
                    let v = value("--rounds")?;
                    match v.parse::<u32>() {
                        Ok(n) if (1..=20).contains(&n) => opts.rounds = Some(n),
                        _ => bail!("bench: --rounds expects a number from 1 to 20, got {v:?}"),
                    }
                }
                "--only" => {
                    let v = value("--only")?;
                    let mut list = vec![Target::Direct];
                    for key in v.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                        match Target::from_key(key) {
                            Some(t) if !list.contains(&t) => list.push(t),
                            Some(_) => {}
                            None => bail!(
                                "bench: unknown target {key:?}; known: {}",
                                Target::ALL.map(Target::key).join(", ")
                            ),
                        }
                    }
                    opts.only = Some(list);
                }
                "--sidecar" => opts.sidecar = Some(PathBuf::from(value("--sidecar")?)),
                other => bail!("unexpected argument {other:?} for `bench`"),
            }
        }
        Ok(opts)
    }
}

/// How long holding the idle connections may take to set up (1,000 requests one after another).
const IDLE_HOLD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the sidecar may take to park the held connections (it parks after 1 s of silence).
const IDLE_PARK_TIMEOUT: Duration = Duration::from_secs(20);
/// The sidecar's admin port, in the network namespace of the load generator for the targets
/// whose held connections it parks (see [`Target::sidecar_in_front`]).
const SIDECAR_METRICS: &str = "http://127.0.0.1:15090/metrics";

/// Durations and loads of one run.
#[derive(Debug, Clone)]
struct Plan {
    rounds: u32,
    warmup: Duration,
    open_loop: Duration,
    closed_loop: Duration,
    churn: Duration,
    many_conns: Duration,
    rates: [u32; 2],
    connections: u32,
    many_connections: u32,
    /// Idle keep-alive connections held for the memory-per-connection measurement.
    idle_connections: u32,
    /// `--perf`: where perf.data files go.
    perf_dir: Option<PathBuf>,
}

impl Plan {
    /// `--quick`: every phase once, short.
    fn quick(rounds: u32) -> Plan {
        Plan {
            rounds,
            warmup: Duration::ZERO,
            open_loop: Duration::from_secs(1),
            closed_loop: Duration::from_secs(1),
            churn: Duration::from_secs(1),
            many_conns: Duration::from_secs(1),
            rates: [1000, 5000],
            connections: 50,
            many_connections: 1000,
            idle_connections: 1000,
            perf_dir: None,
        }
    }

    fn new(opts: &Options) -> Plan {
        if opts.quick {
            Plan::quick(opts.rounds.unwrap_or(1))
        } else {
            Plan {
                rounds: opts.rounds.unwrap_or(2),
                warmup: Duration::from_secs(2),
                open_loop: Duration::from_secs(8),
                closed_loop: Duration::from_secs(5),
                churn: Duration::from_secs(5),
                many_conns: Duration::from_secs(3),
                rates: [1000, 5000],
                connections: 50,
                many_connections: 1000,
                idle_connections: 1000,
                perf_dir: None,
            }
        }
    }

    fn to_json(&self) -> Json {
        Json::obj()
            .with("rounds", self.rounds as u64)
            .with("warmup_s", self.warmup.as_secs_f64())
            .with("open_loop_s", self.open_loop.as_secs_f64())
            .with("closed_loop_s", self.closed_loop.as_secs_f64())
            .with("churn_s", self.churn.as_secs_f64())
            .with("many_connections_s", self.many_conns.as_secs_f64())
            .with(
                "open_loop_rates",
                vec![self.rates[0] as u64, self.rates[1] as u64],
            )
            .with("connections", self.connections as u64)
            .with("many_connections", self.many_connections as u64)
            .with("idle_connections", self.idle_connections as u64)
    }
}

pub fn run(ctx: &Ctx, opts: &Options) -> Result<()> {
    let started = Instant::now();
    host::require_privileged_host(ctx, "cargo xtask bench")?;
    let cgroup2 = host::require_cgroup2()?;
    prereq::ensure(ctx, prereq::Mode::Install)?;
    let found = tools::ensure(ctx)?;
    let release = match &opts.sidecar {
        Some(path) => {
            let path = ctx.root.join(path);
            if !path.is_file() {
                bail!("--sidecar {}: no such file", path.display());
            }
            say!(
                "measuring the given sidecar binary {} (no build)",
                path.display()
            );
            path
        }
        None => release::build(ctx)?,
    };

    let mut plan = Plan::new(opts);
    if opts.perf {
        if ctx.find_program("perf").is_none() {
            bail!("--perf needs perf: `apt-get install -y linux-perf`");
        }
        let dir = ctx.target_dir.join("bench").join("perf");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        plan.perf_dir = Some(dir);
    }
    let targets: Vec<Target> = opts.only.clone().unwrap_or_else(|| Target::ALL.to_vec());
    let load_before = loadavg();
    if load_before.0 > 0.5 {
        say!(
            "note: load average is {:.2} before starting: others are using the CPUs, so \
             numbers will be noisy (ratios within one run stay comparable)",
            load_before.0
        );
    }
    let nofile = lab::nofile_limit();
    if nofile < 4096 {
        bail!(
            "the open-files hard limit is {nofile}; the 1,000-connection phase needs about 2,100 \
             descriptors per process (client and upstream sides). Raise it (`ulimit -Hn 65536` as \
             root, or LimitNOFILE= for a service) and retry"
        );
    }
    let cpus = Cpus::plan(&lab::allowed_cpus());
    say!("pinning: {}", cpus.describe());

    let mut lab = Lab::new(&cgroup2, cpus, &release)?;
    let outcome = run_in_lab(&mut lab, &found, &release, &plan, &targets);
    if outcome.as_ref().map_or(true, |(_, failed)| *failed) {
        lab.failed = true;
    }
    drop(lab);
    let (results, failed) = outcome?;

    let load_after = loadavg();
    let goals = report::goals(&results);
    let conditions = format!(
        "{} round(s), targets interleaved; each cell: median ± half the range over rounds. \
         Load average {:.2} before, {:.2} after; {}; lab processes at nice {}.",
        plan.rounds,
        load_before.0,
        load_after.0,
        cpus.describe(),
        lab::NICE
    );
    let tables = report::text(&results);
    println!("{conditions}");
    print!("{tables}");
    if !opts.quick {
        print!("{}", report::goals_text(&goals));
    }
    let meta = meta(
        ctx,
        &release,
        &found,
        &plan,
        opts,
        cpus,
        load_before,
        load_after,
    )?;
    let out_dir = ctx.target_dir.join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let json_path = out_dir.join("results.json");
    fs::write(&json_path, report::to_json(&results, meta, &goals).pretty())
        .with_context(|| format!("write {}", json_path.display()))?;
    let md_path = out_dir.join("results.md");
    let mut md = format!("{conditions}\n\n");
    md.push_str(&report::markdown(&results));
    md.push_str(&report::goals_text(&goals).replace("\n  [", "\n- ["));
    fs::write(&md_path, md).with_context(|| format!("write {}", md_path.display()))?;
    say!(
        "results: {} and {} ({} in all; load average {:.2} before, {:.2} after)",
        json_path.display(),
        md_path.display(),
        cmd::elapsed(started.elapsed()),
        load_before.0,
        load_after.0
    );
    let failures = results.failures();
    if failed || !failures.is_empty() {
        for f in &failures {
            say!("FAILED: {f}");
        }
        bail!(
            "{} measurement(s) failed (see above); the tables show what was measured",
            failures.len()
        );
    }
    Ok(())
}

/// The sidecar targets, briefly, with `binary` (a PGO-instrumented build, see `release`): each
/// proxy process writes its profile to `profile_file` (`%p` is its pid) when it exits. A target
/// that fails fails the training: its paths would be missing from the profile.
pub fn train(ctx: &Ctx, binary: &Path, profile_file: &Path) -> Result<()> {
    host::require_privileged_host(ctx, "the PGO training of the release build")?;
    let cgroup2 = host::require_cgroup2()?;
    let found = tools::ensure(ctx)?;
    // The quick plan, with a longer closed loop: most of the counts come from the hot path.
    let plan = Plan {
        closed_loop: Duration::from_secs(2),
        ..Plan::quick(1)
    };
    let targets: Vec<Target> = Target::ALL
        .iter()
        .copied()
        .filter(|t| t.is_sidecar())
        .collect();
    say!(
        "PGO training: {} with the instrumented binary",
        targets
            .iter()
            .map(|t| t.key())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cpus = Cpus::plan(&lab::allowed_cpus());
    let mut lab = Lab::new(&cgroup2, cpus, binary)?;
    lab.profile_file = Some(profile_file.as_os_str().to_owned());
    let outcome = run_in_lab(&mut lab, &found, binary, &plan, &targets);
    if outcome.as_ref().map_or(true, |(_, failed)| *failed) {
        lab.failed = true;
    }
    drop(lab);
    let (results, failed) = outcome?;
    let failures = results.failures();
    if failed || !failures.is_empty() {
        for f in &failures {
            say!("FAILED: {f}");
        }
        bail!("the PGO training failed (see above): the profile would miss what did not run");
    }
    Ok(())
}

fn run_in_lab(
    lab: &mut Lab,
    found: &tools::Found,
    release: &Path,
    plan: &Plan,
    targets: &[Target],
) -> Result<(Results, bool)> {
    let sidecar = lab::private_copy(lab, release)?;
    lab.install_iptables_redirect(&found.iptables)?;
    let cgroups = Cgroups {
        load: lab.cgroup("load")?,
        pod: lab.cgroup("pod")?,
        pod_app: lab.cgroup("pod/app")?,
        msg_pod: lab.cgroup("msgpod")?,
        msg_pod_app: lab.cgroup("msgpod/app")?,
    };
    lab.init_ebpf(&sidecar, &cgroups.pod)?;
    lab.init_ebpf_msg(&sidecar, &cgroups.msg_pod)?;
    let upstream = targets::start_upstream(lab, &found.nginx)?;
    let upstream_pid = upstream.pid();
    lab.keep(upstream);

    let programs = Programs {
        sidecar,
        nginx: found.nginx.clone(),
        haproxy: found.haproxy.clone(),
        envoy: found.envoy.clone(),
    };
    let tools = Tools {
        oha: found.oha.clone(),
        wrk: found.wrk.clone(),
        curl: found.curl.clone(),
        python3: found.python3.clone(),
    };
    let mut samples: Vec<(Target, Vec<Sample>)> =
        targets.iter().map(|t| (*t, Vec::new())).collect();
    for round in 0..plan.rounds {
        let mut order: Vec<Target> = targets.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for target in order {
            say!(
                "round {}/{}: {} ({})",
                round + 1,
                plan.rounds,
                target.key(),
                target.describe()
            );
            let t0 = Instant::now();
            let sample = measure(
                lab,
                &programs,
                &tools,
                &cgroups,
                plan,
                target,
                upstream_pid,
                round + 1,
            );
            say!(
                "round {}/{}: {} done in {}{}",
                round + 1,
                plan.rounds,
                target.key(),
                cmd::elapsed(t0.elapsed()),
                if sample.failures.is_empty() {
                    String::new()
                } else {
                    format!(" with {} failure(s)", sample.failures.len())
                }
            );
            for f in &sample.failures {
                say!("  {f}");
            }
            if let Some((_, list)) = samples.iter_mut().find(|(t, _)| *t == target) {
                list.push(sample);
            }
        }
    }
    let failed = samples
        .iter()
        .any(|(_, ss)| ss.iter().any(|s| !s.failures.is_empty()));
    Ok((Results { targets: samples }, failed))
}

const MIB: f64 = 1024.0;

/// `msg_redirected`, `msg_back_to_tcp`, `msg_peer_missing` of the pod at `cgroup`, from
/// `sidecar status --json`.
fn msg_counters(sidecar: &Path, cgroup: &Path) -> Result<[u64; 3]> {
    let out = std::process::Command::new(sidecar)
        .args(["status", "--json", "--cgroup"])
        .arg(cgroup)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run sidecar status")?;
    if !out.status.success() {
        bail!(
            "sidecar status failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let status = json::parse(&String::from_utf8_lossy(&out.stdout))?;
    let mut found = [0; 3];
    for (slot, name) in
        found
            .iter_mut()
            .zip(["msg_redirected", "msg_back_to_tcp", "msg_peer_missing"])
    {
        *slot = status
            .get("counters")
            .and_then(|c| c.get(name))
            .and_then(Json::as_f64)
            .with_context(|| format!("no counter {name} in sidecar status --json"))?
            as u64;
    }
    Ok(found)
}

/// All phases for one target in one round. Failures are recorded in the sample, not returned:
/// the other targets still get measured.
#[allow(clippy::too_many_arguments)]
fn measure(
    lab: &mut Lab,
    programs: &Programs,
    tools: &Tools,
    cgroups: &Cgroups,
    plan: &Plan,
    target: Target,
    upstream_pid: u32,
    round: u32,
) -> Sample {
    let mut s = Sample::default();
    let live = match targets::start(lab, programs, tools, cgroups, target) {
        Ok(l) => l,
        Err(e) => {
            s.failures.push(format!("start: {e:#}"));
            return s;
        }
    };
    let mut m = Meter {
        live: &live,
        upstream_pid,
        errors: 0,
        listen_drops: 0,
        tag: format!("{}-r{round}", target.key()),
    };
    // The in-pod redirect's own counters around the phases: it must have carried the load.
    let msg_before = (target == Target::SidecarEbpfMsg)
        .then(|| msg_counters(&programs.sidecar, &cgroups.msg_pod));
    if let Err(e) = phases(lab, tools, plan, &mut m, &mut s) {
        s.failures.push(format!("{e:#}"));
    }
    if let Some(before) = msg_before {
        match (before, msg_counters(&programs.sidecar, &cgroups.msg_pod)) {
            (Ok(b), Ok(a)) => {
                let moved = |i: usize| a[i].saturating_sub(b[i]) as f64;
                s.set("msg_redirected_sends", moved(0));
                s.set("msg_back_to_tcp", moved(1));
                s.set("msg_peer_missing", moved(2));
                if moved(0) == 0.0 {
                    s.failures.push(
                        "the in-pod redirect carried nothing (msg_redirected did not move)".into(),
                    );
                }
            }
            (Err(e), _) | (_, Err(e)) => s.failures.push(format!("msg counters: {e:#}")),
        }
    }
    s.set("errors", m.errors as f64);
    s.set("listen_drops", m.listen_drops as f64);
    // A proxy that died during the run invalidates what came after.
    let mut live = live;
    if let Some(status) = live.proc.as_mut().and_then(|p| p.exited()) {
        let log = live.proc.as_ref().map(|p| p.log_tail()).unwrap_or_default();
        s.failures.push(format!(
            "the proxy exited during the run ({status}):\n{log}"
        ));
    }
    if let Err(e) = targets::stop(lab, live) {
        s.failures.push(format!("stop: {e:#}"));
    }
    s
}

/// Before/after readings around one phase.
struct Meter<'a> {
    live: &'a Live,
    upstream_pid: u32,
    errors: u64,
    listen_drops: u64,
    /// `<target>-r<round>`, for file names.
    tag: String,
}

struct Reading {
    cpu_usec: u64,
    upstream: procfs::TcpCounters,
    listener: procfs::TcpCounters,
}

impl Meter<'_> {
    /// The netns where the target listens: the proxy's, or the upstream's for `direct`.
    fn listener_pid(&self) -> u32 {
        self.live
            .proc
            .as_ref()
            .map_or(self.upstream_pid, |p| p.pid())
    }

    fn read(&self) -> Reading {
        Reading {
            cpu_usec: self
                .live
                .proxy_cgroups()
                .iter()
                .map(|cg| procfs::usage(cg).cpu_usec)
                .sum(),
            upstream: procfs::TcpCounters::read(self.upstream_pid),
            listener: procfs::TcpCounters::read(self.listener_pid()),
        }
    }

    /// Proxy CPU µs per unit of work between two readings (`None` without a proxy).
    fn cpu_us_per(&self, a: &Reading, b: &Reading, units: u64) -> Option<f64> {
        (!self.live.proxy_cgroups().is_empty() && units > 0)
            .then(|| b.cpu_usec.saturating_sub(a.cpu_usec) as f64 / units as f64)
    }

    fn account(&mut self, a: &Reading, b: &Reading, errors: u64) {
        self.errors += errors;
        self.listen_drops += a.listener.delta(&b.listener, "ListenOverflows")
            + a.listener.delta(&b.listener, "ListenDrops");
    }

    fn rss_mib(&self) -> Option<f64> {
        if self.live.proxy_cgroups().is_empty() {
            return None;
        }
        let kib: u64 = self
            .live
            .proxy_cgroups()
            .iter()
            .map(|cg| procfs::usage(cg).rss_kib)
            .sum();
        Some(kib as f64 / MIB)
    }

    /// (RSS, PSS, processes) of the proxy (both proxies of a pair).
    fn memory(&self) -> Option<(f64, f64, usize)> {
        if self.live.proxy_cgroups().is_empty() {
            return None;
        }
        let (mut rss, mut pss, mut processes) = (0, 0, 0);
        for cg in self.live.proxy_cgroups() {
            let u = procfs::usage(cg);
            rss += u.rss_kib;
            processes += u.processes;
            pss += procfs::pss_total_kib(cg);
        }
        Some((rss as f64 / MIB, pss as f64 / MIB, processes))
    }
}

/// Waits until the sidecar (its admin port seen from `load`'s network) has parked `n`
/// connections.
fn wait_parked(lab: &mut Lab, tools: &Tools, load: &Place, n: u32) -> Result<()> {
    let want = f64::from(n);
    let mut last = Ok(0.0);
    let parked = lab::poll(IDLE_PARK_TIMEOUT, || {
        last = parked_count(lab, tools, load);
        matches!(last, Ok(p) if p >= want)
    });
    if parked {
        return Ok(());
    }
    let active = admin_metric(lab, tools, load, "sidecar_tcp_connections_active");
    bail!(
        "the sidecar did not park the {n} held idle connections within {IDLE_PARK_TIMEOUT:?} \
         (sidecar_tcp_connections_parked: {last:?}, sidecar_tcp_connections_active: {active:?})"
    )
}

/// `sidecar_tcp_connections_parked` of the sidecar whose admin port is in `load`'s network.
fn parked_count(lab: &mut Lab, tools: &Tools, load: &Place) -> Result<f64> {
    admin_metric(lab, tools, load, "sidecar_tcp_connections_parked")
}

/// The sum of `series` on the sidecar's admin port in `load`'s network. Asked from a cgroup of
/// its own: stopping a process stops its cgroup's, and the load's holds connections (outside
/// the pod, the question is not captured either).
fn admin_metric(lab: &mut Lab, tools: &Tools, load: &Place, series: &str) -> Result<f64> {
    let cgroup = match lab.cgroup_path("admin-client") {
        made if made.exists() => made,
        _ => lab.cgroup("admin-client")?,
    };
    let place = Place {
        net: load.net,
        cgroup,
        cpu: load.cpu,
        proxy_user: false,
    };
    load::metric_sum(lab, tools, &place, SIDECAR_METRICS, series)
}

fn phases(
    lab: &mut Lab,
    tools: &Tools,
    plan: &Plan,
    m: &mut Meter<'_>,
    s: &mut Sample,
) -> Result<()> {
    let place: Place = m.live.load.clone();
    let url = m.live.url.clone();
    if let Some((rss, pss, processes)) = m.memory() {
        s.set("rss_idle_mib", rss);
        s.set("pss_idle_mib", pss);
        s.set("proxy_processes", processes as f64);
    }
    // Memory per idle client connection, first, on a fresh proxy: what its RSS grows by while
    // it holds connections that were each answered once and then say nothing (with the
    // upstream's keep-alive pool, as for every proxy here), sampled as soon as all are held
    // (`idle_conn_kib`). Then what the next as many cost on top (`idle_next_conn_kib`): the
    // sidecar parks a connection quiet for a second (freeing its task for the next ones), so
    // the first ones are given that time first, and the sidecar says when it has parked them;
    // the others have nothing to wait for.
    if m.live.target.sidecar_in_front() {
        // Asked once before too, so that what its first answer allocates is not counted as
        // the connections'.
        parked_count(lab, tools, &place).context("the sidecar's metrics before holding")?;
    }
    if let Some(before) = m.rss_mib() {
        let n = plan.idle_connections;
        let per_conn = |from: f64, to: f64| (to - from) * 1024.0 / f64::from(n);
        let mut first = load::hold_idle(lab, tools, &place, &url, n)?;
        let held = first.wait_held(IDLE_HOLD_TIMEOUT);
        let fresh = m.rss_mib();
        let mut next = None;
        let measured = held.and_then(|()| {
            if m.live.target.sidecar_in_front() {
                wait_parked(lab, tools, &place, n)?;
            }
            let mid = m.rss_mib();
            let second = next.insert(load::hold_idle(lab, tools, &place, &url, n)?);
            second.wait_held(IDLE_HOLD_TIMEOUT)?;
            if m.live.target.sidecar_in_front() {
                wait_parked(lab, tools, &place, 2 * n)?;
            }
            Ok((mid, m.rss_mib()))
        });
        if let Some(second) = next {
            second.stop(lab)?;
        }
        first.stop(lab)?;
        let (mid, after) = measured.context("idle connections")?;
        if let Some(fresh) = fresh {
            s.set("idle_conn_kib", per_conn(before, fresh));
        }
        if let (Some(mid), Some(after)) = (mid, after) {
            s.set("idle_next_conn_kib", per_conn(mid, after));
        }
    }
    if !plan.warmup.is_zero() {
        load::closed_loop(
            lab,
            tools,
            &place,
            &url,
            plan.connections,
            plan.warmup,
            false,
        )
        .context("warm-up")?;
    }

    for (rate, prefix) in plan.rates.iter().zip(["ol1k", "ol5k"]) {
        let perf = match &plan.perf_dir {
            Some(dir) if prefix == "ol5k" && m.live.is_proxy() => Some(start_perf(
                PerfKind::Record,
                dir,
                &m.tag,
                &m.live.proxy_cgroups(),
                plan.open_loop,
            )?),
            _ => None,
        };
        let a = m.read();
        let r = load::open_loop(
            lab,
            tools,
            &place,
            &url,
            *rate,
            plan.connections,
            plan.open_loop,
        )
        .with_context(|| format!("open loop at {rate} req/s"))?;
        let b = m.read();
        if let Some(perf) = perf {
            finish_perf(perf, r.completed)?;
        }
        m.account(&a, &b, r.errors + r.non_2xx);
        let key = |k: &str| -> &'static str {
            match (prefix, k) {
                ("ol1k", "p50") => "ol1k_p50_us",
                ("ol1k", "p99") => "ol1k_p99_us",
                ("ol1k", "p999") => "ol1k_p999_us",
                ("ol1k", "rps") => "ol1k_rps",
                ("ol1k", _) => "ol1k_cpu_us_per_req",
                (_, "p50") => "ol5k_p50_us",
                (_, "p99") => "ol5k_p99_us",
                (_, "p999") => "ol5k_p999_us",
                (_, "rps") => "ol5k_rps",
                _ => "ol5k_cpu_us_per_req",
            }
        };
        s.set(key("p50"), r.p50_us);
        s.set(key("p99"), r.p99_us);
        s.set(key("p999"), r.p999_us);
        s.set(key("rps"), r.achieved_rps);
        if let Some(cpu) = m.cpu_us_per(&a, &b, r.completed) {
            s.set(key("cpu"), cpu);
        }
    }

    let perf = match &plan.perf_dir {
        Some(dir) if m.live.is_proxy() => Some(start_perf(
            PerfKind::Trace,
            dir,
            &m.tag,
            &m.live.proxy_cgroups(),
            plan.closed_loop,
        )?),
        _ => None,
    };
    let a = m.read();
    let r = load::closed_loop(
        lab,
        tools,
        &place,
        &url,
        plan.connections,
        plan.closed_loop,
        false,
    )
    .context("closed loop")?;
    let b = m.read();
    if let Some(perf) = perf {
        finish_perf(perf, r.requests)?;
    }
    m.account(&a, &b, r.errors + r.non_2xx);
    s.set("max_rps", r.rps);
    if let Some(cpu) = m.cpu_us_per(&a, &b, r.requests) {
        s.set("max_rps_cpu_us_per_req", cpu);
    }

    let a = m.read();
    let r = load::closed_loop(lab, tools, &place, &url, plan.connections, plan.churn, true)
        .context("connection churn")?;
    let b = m.read();
    m.account(&a, &b, r.errors + r.non_2xx);
    s.set("conn_per_s", r.rps);
    if let Some(cpu) = m.cpu_us_per(&a, &b, r.requests) {
        s.set("conn_cpu_us_per_conn", cpu);
    }
    if r.requests > 0 {
        let opens = a.upstream.delta(&b.upstream, "PassiveOpens");
        s.set(
            "conn_upstream_opens_per_conn",
            opens as f64 / r.requests as f64,
        );
    }

    // 1,000 connections at once: the highest RSS sampled while they are open (a sampling
    // interval, not a wait for anything).
    let a = m.read();
    let mut run = load::start_closed_loop(
        lab,
        tools,
        &place,
        &url,
        plan.many_connections,
        plan.many_conns,
        false,
    )?;
    // (RSS, PSS) at the highest RSS seen.
    let mut peak: Option<(f64, f64)> = None;
    while !run.done() {
        if let Some(rss) = m.rss_mib() {
            if peak.is_none_or(|(p, _)| rss > p) {
                let pss = m.memory().map_or(0.0, |(_, pss, _)| pss);
                peak = Some((rss, pss));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run.finish(lab).context("1,000 connections")?;
    let r = load::parse_wrk(&out).with_context(|| format!("unexpected wrk output:\n{out}"))?;
    let b = m.read();
    m.account(&a, &b, r.errors + r.non_2xx);
    if let Some((rss, pss)) = peak {
        s.set("rss_1000_mib", rss);
        s.set("pss_1000_mib", pss);
        if let Some(idle) = s.get("rss_idle_mib") {
            let kib = (rss - idle) * 1024.0 / f64::from(plan.many_connections);
            s.set("busy_conn_kib", kib);
        }
    }
    Ok(())
}

/// `--perf` recordings of the proxy's processes over one phase, each ending by itself:
/// `perf record` (software cpu-clock samples, as this VM has no hardware counters; DWARF call
/// graphs, as release builds have no frame pointers) over the 5k req/s phase, and `perf trace -s`
/// (system calls by name) over the closed-loop phase. Tracing every system call slows the proxy a
/// lot, so the two never share a phase.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PerfKind {
    Record,
    Trace,
}

struct PerfRun {
    child: std::process::Child,
    out: PathBuf,
    kind: PerfKind,
}

fn start_perf(
    kind: PerfKind,
    dir: &Path,
    tag: &str,
    cgroups: &[&Path],
    duration: Duration,
) -> Result<PerfRun> {
    // Every process of the proxy: a server-side sidecar's and both of a two-proxy pair.
    let pids = cgroups
        .iter()
        .flat_map(|cg| procfs::cgroup_pids(cg))
        .map(|pid| pid.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = std::process::Command::new("perf");
    let out = match kind {
        PerfKind::Record => {
            let data = dir.join(format!("{tag}.data"));
            cmd.args(["record", "-q", "-e", "cpu-clock", "-F", "1999"])
                .args(["--call-graph", "dwarf,16384", "-o"])
                .arg(&data)
                .stderr(std::process::Stdio::null());
            data
        }
        PerfKind::Trace => {
            let txt = dir.join(format!("{tag}.syscalls.txt"));
            // The summary goes to stderr.
            cmd.args(["trace", "-s"]).stderr(
                fs::File::create(&txt).with_context(|| format!("create {}", txt.display()))?,
            );
            txt
        }
    };
    cmd.args(["-p", &pids, "--", "sleep"])
        .arg(duration.as_secs().max(1).to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let child = cmd.spawn().context("cannot start perf")?;
    Ok(PerfRun { child, out, kind })
}

/// Waits for perf (it stops by itself); writes a flat profile next to a recording, and the
/// request count under a system-call summary (to divide by).
fn finish_perf(mut run: PerfRun, requests: u64) -> Result<()> {
    let status = run.child.wait().context("wait for perf")?;
    if !status.success() {
        bail!("perf failed ({status}) for {}", run.out.display());
    }
    if run.kind == PerfKind::Trace {
        let mut text = fs::read_to_string(&run.out).unwrap_or_default();
        text.push_str(&format!(
            "\nrequests completed during the trace: {requests}\n"
        ));
        fs::write(&run.out, text)?;
        say!("perf: system calls in {}", run.out.display());
        return Ok(());
    }
    let report = std::process::Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol"])
        .args(["-g", "none", "--percent-limit", "0.2", "-i"])
        .arg(&run.out)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .context("cannot run perf report")?;
    // perf pads every line to the longest symbol name; keep the file readable.
    let mut flat: String = String::from_utf8_lossy(&report.stdout)
        .lines()
        .map(|l| format!("{}\n", l.trim_end().trim_end_matches(['-', ' '])))
        .collect();
    flat.push_str(&format!(
        "\nrequests completed during the recording: {requests}\n"
    ));
    let txt = run.out.with_extension("txt");
    fs::write(&txt, flat).with_context(|| format!("write {}", txt.display()))?;
    say!(
        "perf: {} (flat profile {})",
        run.out.display(),
        txt.display()
    );
    Ok(())
}

fn loadavg() -> (f64, f64, f64) {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    match v.as_slice() {
        [a, b, c] => (*a, *b, *c),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}

#[allow(clippy::too_many_arguments)]
fn meta(
    ctx: &Ctx,
    sidecar: &Path,
    found: &tools::Found,
    plan: &Plan,
    opts: &Options,
    cpus: Cpus,
    before: (f64, f64, f64),
    after: (f64, f64, f64),
) -> Result<Json> {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let git = |args: &[&str]| {
        probe(ctx.cmd("git").args(args))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let sidecar_version = probe(ctx.cmd(sidecar).arg("--version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mut versions = Json::obj().with("sidecar", sidecar_version);
    for (k, v) in &found.versions {
        versions = versions.with(k, v.as_str());
    }
    let seconds_since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Json::obj()
        .with(
            "command",
            if opts.quick {
                "cargo xtask bench --quick"
            } else {
                "cargo xtask bench"
            },
        )
        .with("unix_time", seconds_since_epoch)
        .with("git_commit", git(&["rev-parse", "HEAD"]))
        .with("git_dirty", dirty)
        .with("kernel", read("/proc/sys/kernel/osrelease").trim())
        .with("cpu_model", cpu_model)
        .with("cpus_allowed", lab::allowed_cpus().len())
        .with("pinning", cpus.describe())
        .with("load_average_before", vec![before.0, before.1, before.2])
        .with("load_average_after", vec![after.0, after.1, after.2])
        .with("plan", plan.to_json())
        .with("sidecar_binary", sidecar.display().to_string())
        .with(
            "sidecar_build",
            match (&opts.sidecar, release::pgo_enabled()) {
                (Some(_), _) => "the given binary (--sidecar)",
                (None, true) => "release, profile-guided (cargo xtask release)",
                (None, false) => "release without a profile (SIDECAR_PGO=off)",
            },
        )
        .with("versions", versions))
}
