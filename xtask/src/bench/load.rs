//! The load generators, started inside the lab and parsed: oha for fixed-rate open-loop latency
//! (coordinated-omission corrected), wrk for closed-loop maximum throughput and connection churn,
//! curl for the "does it answer, and through the proxy?" check, and a small Python holder for
//! idle keep-alive connections (no load generator keeps connections open doing nothing).

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::json::{self, Json};
use super::lab::{self, Lab, Place, Proc};

/// Load-generator runs end by themselves (`-z`/`-d`); this bounds a hung one.
const GRACE: Duration = Duration::from_secs(30);

pub struct Tools {
    pub oha: PathBuf,
    pub wrk: PathBuf,
    pub curl: PathBuf,
    pub python3: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct OpenLoop {
    pub completed: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub achieved_rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

#[derive(Debug, Clone, Default)]
pub struct ClosedLoop {
    pub requests: u64,
    pub rps: f64,
    pub errors: u64,
    pub non_2xx: u64,
}

/// A load generator that is running.
pub struct Running {
    proc: Proc,
    out: PathBuf,
    deadline: Instant,
}

impl Running {
    /// True once it has exited (or overrun its deadline, which `finish` then reports).
    pub fn done(&mut self) -> bool {
        self.proc.exited().is_some() || Instant::now() > self.deadline
    }

    /// Waits for the exit and returns its stdout; a failure or an overrun is an error.
    pub fn finish(mut self, lab: &mut Lab) -> Result<String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let exited = lab::poll(left, || self.proc.exited().is_some());
        let status = self.proc.exited();
        let label = self.proc.label.clone();
        let log = self.proc.log_tail();
        lab.stop(self.proc)?;
        let out = fs::read_to_string(&self.out).unwrap_or_default();
        if !exited {
            bail!("{label} did not finish in time and was killed:\n{log}\n{out}");
        }
        match status.as_deref() {
            Some("exit status: 0") => Ok(out),
            other => bail!(
                "{label} failed ({}):\n{log}\n{out}",
                other.unwrap_or("unknown")
            ),
        }
    }
}

fn start(
    lab: &mut Lab,
    place: &Place,
    label: &str,
    program: &PathBuf,
    args: &[String],
    runs_for: Duration,
) -> Result<Running> {
    let out = lab.file(&format!("{label}-stdout"), "txt");
    let mut cmd = lab.command(place, program);
    cmd.args(args);
    let proc = lab.spawn(label, &place.cgroup, cmd, Some(&out))?;
    Ok(Running {
        proc,
        out,
        deadline: Instant::now() + runs_for + GRACE,
    })
}

/// oha at a fixed rate (`-q`) with latency correction: each request's latency counts from when
/// it was due, not from when a free connection got around to sending it, so a stall shows in
/// the tail instead of silently lowering the offered load.
pub fn open_loop(
    lab: &mut Lab,
    tools: &Tools,
    place: &Place,
    url: &str,
    rate: u32,
    connections: u32,
    duration: Duration,
) -> Result<OpenLoop> {
    let args = vec![
        "-z".into(),
        format!("{}ms", duration.as_millis()),
        "-q".into(),
        rate.to_string(),
        "-c".into(),
        connections.to_string(),
        "--latency-correction".into(),
        "--disable-compression".into(),
        "--no-tui".into(),
        // It shares one CPU with the upstream: more runtime threads would only contend.
        "--worker-threads".into(),
        "1".into(),
        "--output-format".into(),
        "json".into(),
        url.into(),
    ];
    let run = start(lab, place, "oha", &tools.oha, &args, duration)?;
    let out = run.finish(lab)?;
    parse_oha(&out).with_context(|| format!("unexpected oha output:\n{out}"))
}

fn parse_oha(out: &str) -> Result<OpenLoop> {
    let j = json::parse(out.trim())?;
    let secs = |key: &str| -> Result<f64> {
        j.path("latencyPercentiles")
            .and_then(|p| p.get(key))
            .and_then(Json::as_f64)
            .with_context(|| format!("no latencyPercentiles.{key}"))
    };
    let count = |field: &str, pred: &dyn Fn(&str) -> bool| -> u64 {
        j.get(field)
            .and_then(Json::as_obj)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| pred(k))
                    .filter_map(|(_, v)| v.as_f64())
                    .sum::<f64>() as u64
            })
            .unwrap_or(0)
    };
    let ok = count("statusCodeDistribution", &|k| k.starts_with('2'));
    let non_2xx = count("statusCodeDistribution", &|k| !k.starts_with('2'));
    // Requests still in flight when the duration ends are "aborted due to deadline": an
    // artefact of stopping, not a failure of the target.
    let errors = count("errorDistribution", &|k| !k.contains("deadline"));
    Ok(OpenLoop {
        completed: ok + non_2xx,
        errors,
        non_2xx,
        achieved_rps: j
            .path("summary.requestsPerSec")
            .and_then(Json::as_f64)
            .unwrap_or(0.0),
        p50_us: secs("p50")? * 1e6,
        p99_us: secs("p99")? * 1e6,
        p999_us: secs("p99.9")? * 1e6,
    })
}

/// wrk, one thread, `connections` keep-alive connections (or a new connection per request with
/// `close`), as fast as the target answers.
pub fn start_closed_loop(
    lab: &mut Lab,
    tools: &Tools,
    place: &Place,
    url: &str,
    connections: u32,
    duration: Duration,
    close: bool,
) -> Result<Running> {
    let mut args = vec![
        "-t".into(),
        "1".into(),
        "-c".into(),
        connections.to_string(),
        "-d".into(),
        format!("{}s", duration.as_secs().max(1)),
        "--timeout".into(),
        "5s".into(),
    ];
    if close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(url.into());
    start(lab, place, "wrk", &tools.wrk, &args, duration)
}

pub fn closed_loop(
    lab: &mut Lab,
    tools: &Tools,
    place: &Place,
    url: &str,
    connections: u32,
    duration: Duration,
    close: bool,
) -> Result<ClosedLoop> {
    let run = start_closed_loop(lab, tools, place, url, connections, duration, close)?;
    let out = run.finish(lab)?;
    parse_wrk(&out).with_context(|| format!("unexpected wrk output:\n{out}"))
}

pub fn parse_wrk(out: &str) -> Result<ClosedLoop> {
    let mut r = ClosedLoop::default();
    let mut seen_rps = false;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("Requests/sec")?;
            seen_rps = true;
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse().context("requests in")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        }
    }
    if !seen_rps {
        bail!("no Requests/sec line");
    }
    Ok(r)
}

/// What one request through a target looked like.
#[derive(Debug, Clone)]
pub struct Check {
    pub status: u16,
    pub body: String,
    /// The upstream echoes the `X-Forwarded-By` it received in `X-Seen-Forwarded-By`: present
    /// means the request really went through a proxy.
    pub forwarded_by: Option<String>,
}

/// One GET with curl from `place`.
/// The idle-connection holder: `n` keep-alive connections opened one after another, each
/// answered once (so the proxy has served it and holds whatever it keeps between requests),
/// then all kept open, silent, until the holder is stopped.
const HOLDER: &str = r#"
import socket, sys, threading
host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
held = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"connection {i}: closed before the answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 2"):
        sys.exit(f"connection {i}: {lines[0]!r}")
    length = next((int(l.split(b":", 1)[1]) for l in lines[1:]
                   if l.lower().startswith(b"content-length:")), None)
    if length is None:
        sys.exit(f"connection {i}: no content-length")
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"connection {i}: closed inside the body")
        body += chunk
    held.append(s)
print(f"held {len(held)}", flush=True)
threading.Event().wait()
"#;

/// Idle connections being held (see [`HOLDER`]).
pub struct Holding {
    proc: Proc,
    out: PathBuf,
}

/// Starts holding `n` idle keep-alive connections to `url` (`http://host:port/path`).
pub fn hold_idle(
    lab: &mut Lab,
    tools: &Tools,
    place: &Place,
    url: &str,
    n: u32,
) -> Result<Holding> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority
        .rsplit_once(':')
        .with_context(|| format!("no port in {url}"))?;
    let path = if path.is_empty() { "/" } else { path };
    let script = lab.file("idle-holder", "py");
    fs::write(&script, HOLDER).with_context(|| format!("write {}", script.display()))?;
    let out = lab.file("idle-holder-stdout", "txt");
    let mut cmd = lab.command(place, &tools.python3);
    cmd.arg(&script).args([host, port, path]).arg(n.to_string());
    let proc = lab.spawn("idle holder", &place.cgroup, cmd, Some(&out))?;
    Ok(Holding { proc, out })
}

impl Holding {
    /// Waits until every connection was answered and is held (the holder says so), up to
    /// `timeout`.
    pub fn wait_held(&mut self, timeout: Duration) -> Result<()> {
        let out = &self.out;
        let proc = &mut self.proc;
        let said = || fs::read_to_string(out).unwrap_or_default();
        lab::poll(timeout, || {
            said().starts_with("held ") || proc.exited().is_some()
        });
        if said().starts_with("held ") {
            return Ok(());
        }
        bail!(
            "the idle-connection holder did not hold its connections within {timeout:?} ({}):\n{}\n{}",
            proc.exited().unwrap_or_else(|| "still running".into()),
            proc.log_tail(),
            said()
        )
    }

    /// Closes the connections (stops the holder).
    pub fn stop(self, lab: &mut Lab) -> Result<()> {
        lab.stop(self.proc)
    }
}

/// The sum of every `series{...}` line in the Prometheus text at `url` (curl from `place`).
pub fn metric_sum(
    lab: &mut Lab,
    tools: &Tools,
    place: &Place,
    url: &str,
    series: &str,
) -> Result<f64> {
    let out = curl(lab, tools, place, &[url])?;
    let prefix = format!("{series}{{");
    let values: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    if values.is_empty() {
        let start: String = out.chars().take(300).collect();
        bail!("no {series} at {url}: {start}");
    }
    Ok(values.iter().sum())
}

pub fn check(lab: &mut Lab, tools: &Tools, place: &Place, url: &str) -> Result<Check> {
    let out = curl(lab, tools, place, &["-i", url])?;
    parse_curl(&out).with_context(|| format!("unexpected curl output:\n{out}"))
}

/// What `curl -sS --max-time 3 ARGS` run at `place` printed.
fn curl(lab: &mut Lab, tools: &Tools, place: &Place, args: &[&str]) -> Result<String> {
    let args: Vec<String> = ["-sS", "--max-time", "3"]
        .iter()
        .chain(args)
        .map(|a| (*a).to_owned())
        .collect();
    let run = start(
        lab,
        place,
        "curl",
        &tools.curl,
        &args,
        Duration::from_secs(3),
    )?;
    run.finish(lab)
}

fn parse_curl(out: &str) -> Result<Check> {
    let (head, body) = out
        .split_once("\r\n\r\n")
        .context("no end of response head")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let forwarded_by = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("x-seen-forwarded-by")
            .then(|| v.trim().to_string())
    });
    Ok(Check {
        status,
        body: body.trim().to_string(),
        forwarded_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 50 connections\n  \
                   Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.00ms  \
                   0.10ms   2.00ms   90.00%\n  12345 requests in 5.00s, 1.23MB read\n  \
                   Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx \
                   responses: 7\nRequests/sec:   2469.00\nTransfer/sec:    252.00KB\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 12345);
        assert_eq!(r.errors, 6);
        assert_eq!(r.non_2xx, 7);
        assert!((r.rps - 2469.0).abs() < 1e-9);
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn oha_report() {
        let out = r#"{"summary": {"requestsPerSec": 999.5},
            "latencyPercentiles": {"p50": 0.0001, "p99": 0.0002, "p99.9": 0.001},
            "statusCodeDistribution": {"200": 9990, "502": 3},
            "errorDistribution": {"aborted due to deadline": 12, "connection refused": 2}}"#;
        let r = parse_oha(out).unwrap();
        assert_eq!(r.completed, 9993);
        assert_eq!(r.non_2xx, 3);
        assert_eq!(r.errors, 2);
        assert!((r.p999_us - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn curl_head_and_body() {
        let out = "HTTP/1.1 200 OK\r\nServer: nginx\r\nX-Seen-Forwarded-By: sidecar\r\n\r\nok\n";
        let c = parse_curl(out).unwrap();
        assert_eq!(c.status, 200);
        assert_eq!(c.body, "ok");
        assert_eq!(c.forwarded_by.as_deref(), Some("sidecar"));
    }
}
