//! Turning per-round samples into medians with their spread, ratios and differences against the
//! `direct` baseline of the same round, the goals of the performance issue, and the three outputs:
//! a plain-text table (stdout), a Markdown table (for docs/performance.md) and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::json::Json;
use super::targets::Target;

/// What one target measured in one round. Metrics are named (see `METRICS`) so that a phase
/// that failed simply has no entry.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub metrics: BTreeMap<&'static str, f64>,
    pub failures: Vec<String>,
}

impl Sample {
    pub fn set(&mut self, key: &'static str, value: f64) {
        if value.is_finite() {
            self.metrics.insert(key, value);
        }
    }
    pub fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }
}

/// Metric keys and what they mean (units in the name).
pub const METRICS: &[(&str, &str)] = &[
    (
        "rss_idle_mib",
        "proxy RSS after start and a few requests, MiB",
    ),
    ("ol1k_p50_us", "open loop 1k req/s: p50 latency, µs"),
    ("ol1k_p99_us", "open loop 1k req/s: p99 latency, µs"),
    ("ol1k_p999_us", "open loop 1k req/s: p99.9 latency, µs"),
    ("ol1k_rps", "open loop 1k req/s: achieved rate"),
    (
        "ol1k_cpu_us_per_req",
        "open loop 1k req/s: proxy CPU (its cgroup's cpu.stat usage_usec) per request, µs",
    ),
    ("ol5k_p50_us", "open loop 5k req/s: p50 latency, µs"),
    ("ol5k_p99_us", "open loop 5k req/s: p99 latency, µs"),
    ("ol5k_p999_us", "open loop 5k req/s: p99.9 latency, µs"),
    ("ol5k_rps", "open loop 5k req/s: achieved rate"),
    (
        "ol5k_cpu_us_per_req",
        "open loop 5k req/s: proxy CPU per request, µs",
    ),
    ("max_rps", "closed loop (wrk, keep-alive): requests/s"),
    (
        "msg_redirected_sends",
        "sidecar-ebpf-msg: sends that went socket to socket over the run",
    ),
    (
        "msg_back_to_tcp",
        "sidecar-ebpf-msg: connections sent back to TCP by the bound over the run",
    ),
    (
        "msg_peer_missing",
        "sidecar-ebpf-msg: sends that found no peer over the run",
    ),
    (
        "max_rps_cpu_us_per_req",
        "closed loop: proxy CPU per request, µs",
    ),
    (
        "conn_per_s",
        "closed loop with `Connection: close`: new connections/s",
    ),
    (
        "conn_cpu_us_per_conn",
        "connection churn: proxy CPU per connection, µs",
    ),
    (
        "conn_upstream_opens_per_conn",
        "connection churn: upstream TCP connections accepted per client connection",
    ),
    (
        "rss_1000_mib",
        "proxy RSS, highest seen during 1,000 concurrent connections, MiB",
    ),
    (
        "busy_conn_kib",
        "proxy RSS growth per connection with 1,000 busy connections (highest RSS minus idle RSS), KiB",
    ),
    (
        "idle_conn_kib",
        "proxy RSS growth per idle keep-alive client connection (1,000 held, each answered once), KiB",
    ),
    (
        "idle_next_conn_kib",
        "proxy RSS growth per idle keep-alive client connection for 1,000 more, held once the first \
         1,000 have been idle a while (the sidecar parked them), KiB",
    ),
    (
        "pss_idle_mib",
        "proxy PSS (shared pages divided among sharers) when idle, MiB",
    ),
    (
        "pss_1000_mib",
        "proxy PSS when the RSS peaked with 1,000 connections, MiB",
    ),
    (
        "proxy_processes",
        "processes of the proxy (nginx: master + worker)",
    ),
    ("errors", "failed or non-2xx requests over all phases"),
    (
        "listen_drops",
        "TCP ListenOverflows + ListenDrops where the target listens, all phases",
    ),
];

#[derive(Debug, Clone)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub values: Vec<f64>,
}

impl Stat {
    pub fn of(values: Vec<f64>) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            values,
        })
    }

    fn to_json(&self) -> Json {
        Json::obj()
            .with("median", self.median)
            .with("min", self.min)
            .with("max", self.max)
            .with("rounds", self.values.clone())
    }
}

pub struct Results {
    /// Targets in table order, each with one sample per round (round order).
    pub targets: Vec<(Target, Vec<Sample>)>,
}

impl Results {
    fn samples(&self, t: Target) -> Option<&[Sample]> {
        self.targets
            .iter()
            .find(|(x, _)| *x == t)
            .map(|(_, s)| s.as_slice())
    }

    pub fn stat(&self, t: Target, key: &str) -> Option<Stat> {
        let values = self.samples(t)?.iter().filter_map(|s| s.get(key)).collect();
        Stat::of(values)
    }

    /// Per round: f(target value, same-round value of `base`), then the median over rounds.
    pub fn paired(
        &self,
        t: Target,
        base: Target,
        key: &str,
        f: fn(f64, f64) -> f64,
    ) -> Option<Stat> {
        let ts = self.samples(t)?;
        let bs = self.samples(base)?;
        let values = ts
            .iter()
            .zip(bs)
            .filter_map(|(a, b)| Some(f(a.get(key)?, b.get(key)?)))
            .filter(|v| v.is_finite())
            .collect();
        Stat::of(values)
    }

    /// Latency added over `direct`, round by round.
    pub fn added(&self, t: Target, key: &str) -> Option<Stat> {
        self.paired(t, Target::Direct, key, |a, b| a - b)
    }

    /// `t / base`, round by round.
    pub fn ratio(&self, t: Target, base: Target, key: &str) -> Option<Stat> {
        self.paired(t, base, key, |a, b| a / b)
    }

    pub fn failures(&self) -> Vec<String> {
        self.targets
            .iter()
            .flat_map(|(t, ss)| {
                ss.iter().enumerate().flat_map(move |(r, s)| {
                    s.failures
                        .iter()
                        .map(move |f| format!("{} round {}: {f}", t.key(), r + 1))
                })
            })
            .collect()
    }
}

/// "41.2 ±1.3": median and half the range over rounds (no ± with one round).
fn cell(stat: Option<&Stat>, decimals: usize, signed: bool) -> String {
    let Some(s) = stat else {
        return "-".into();
    };
    let m = if signed {
        format!("{:+.*}", decimals, s.median)
    } else {
        format!("{:.*}", decimals, s.median)
    };
    if s.values.len() > 1 {
        format!("{m} ±{:.*}", decimals, (s.max - s.min) / 2.0)
    } else {
        m
    }
}

struct Table {
    title: String,
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

fn tables(r: &Results) -> Vec<Table> {
    let mut latency = Table {
        title: "Open-loop latency (oha, 50 keep-alive connections, coordinated-omission \
                corrected): direct = absolute, others = added over direct, µs"
            .into(),
        head: vec![
            "target", "1k p50", "1k p99", "1k p99.9", "5k p50", "5k p99", "5k p99.9",
        ],
        rows: Vec::new(),
    };
    let keys = [
        "ol1k_p50_us",
        "ol1k_p99_us",
        "ol1k_p999_us",
        "ol5k_p50_us",
        "ol5k_p99_us",
        "ol5k_p999_us",
    ];
    for (t, _) in &r.targets {
        let mut row = vec![t.key().to_string()];
        for k in keys {
            row.push(if *t == Target::Direct {
                cell(r.stat(*t, k).as_ref(), 0, false)
            } else {
                cell(r.added(*t, k).as_ref(), 0, true)
            });
        }
        latency.rows.push(row);
    }

    let mut cost = Table {
        title:
            "Cost and capacity (proxy process only; CPU = cgroup cpu.stat usage_usec per request)"
                .into(),
        head: vec![
            "target",
            "CPU µs/req 1k",
            "CPU µs/req 5k",
            "max req/s",
            "×direct",
            "new conn/s",
            "×direct",
            "RSS idle MiB",
            "RSS 1k conns MiB",
            "KiB/idle conn",
            "errors",
        ],
        rows: Vec::new(),
    };
    for (t, _) in &r.targets {
        let proxy = t.is_proxy();
        let only_proxy = |s: Option<Stat>| if proxy { s } else { None };
        cost.rows.push(vec![
            t.key().to_string(),
            cell(
                only_proxy(r.stat(*t, "ol1k_cpu_us_per_req")).as_ref(),
                1,
                false,
            ),
            cell(
                only_proxy(r.stat(*t, "ol5k_cpu_us_per_req")).as_ref(),
                1,
                false,
            ),
            cell(r.stat(*t, "max_rps").as_ref(), 0, false),
            cell(r.ratio(*t, Target::Direct, "max_rps").as_ref(), 2, false),
            cell(r.stat(*t, "conn_per_s").as_ref(), 0, false),
            cell(r.ratio(*t, Target::Direct, "conn_per_s").as_ref(), 2, false),
            cell(only_proxy(r.stat(*t, "rss_idle_mib")).as_ref(), 1, false),
            cell(only_proxy(r.stat(*t, "rss_1000_mib")).as_ref(), 1, false),
            cell(only_proxy(r.stat(*t, "idle_conn_kib")).as_ref(), 1, false),
            cell(r.stat(*t, "errors").as_ref(), 0, false),
        ]);
    }

    let mut churn = Table {
        title: "Connection churn detail (wrk, `Connection: close`, 50 connections)".into(),
        head: vec![
            "target",
            "new conn/s",
            "CPU µs/conn",
            "upstream conns per client conn",
            "listen drops",
        ],
        rows: Vec::new(),
    };
    for (t, _) in &r.targets {
        churn.rows.push(vec![
            t.key().to_string(),
            cell(r.stat(*t, "conn_per_s").as_ref(), 0, false),
            cell(
                t.is_proxy()
                    .then(|| r.stat(*t, "conn_cpu_us_per_conn"))
                    .flatten()
                    .as_ref(),
                1,
                false,
            ),
            cell(
                r.stat(*t, "conn_upstream_opens_per_conn").as_ref(),
                2,
                false,
            ),
            cell(r.stat(*t, "listen_drops").as_ref(), 0, false),
        ]);
    }
    vec![latency, cost, churn]
}

pub fn text(r: &Results) -> String {
    let mut out = String::new();
    for t in tables(r) {
        let widths: Vec<usize> = (0..t.head.len())
            .map(|i| {
                t.rows
                    .iter()
                    .map(|row| row[i].chars().count())
                    .chain([t.head[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let _ = writeln!(out, "\n{}", t.title);
        let line = |cells: Vec<&str>| {
            cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    let pad = w - c.chars().count();
                    if i == 0 {
                        format!("{c}{}", " ".repeat(pad))
                    } else {
                        format!("{}{c}", " ".repeat(pad))
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        let _ = writeln!(out, "{}", line(t.head.clone()));
        for row in &t.rows {
            let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
        }
    }
    out
}

pub fn markdown(r: &Results) -> String {
    let mut out = String::new();
    for t in tables(r) {
        let _ = writeln!(out, "**{}**\n", t.title);
        let _ = writeln!(out, "| {} |", t.head.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            t.head
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for row in &t.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out.push('\n');
    }
    out
}

/// One goal from the performance issue, evaluated on this run.
pub struct Goal {
    pub name: String,
    pub detail: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Rounds disagree, or the difference is smaller than the baseline's own spread.
    WithinNoise,
    /// A target it needs did not produce the numbers.
    NoData,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::WithinNoise => "within noise",
            Verdict::NoData => "no data",
        }
    }

    /// Every round must agree: one round passing and one failing is noise, not a verdict.
    fn of_rounds(stat: &Option<Stat>, pass: impl Fn(f64) -> bool) -> Verdict {
        match stat {
            None => Verdict::NoData,
            Some(s) if s.values.iter().all(|v| pass(*v)) => Verdict::Met,
            Some(s) if s.values.iter().all(|v| !pass(*v)) => Verdict::Missed,
            Some(_) => Verdict::WithinNoise,
        }
    }
}

pub fn goals(r: &Results) -> Vec<Goal> {
    let mut goals = Vec::new();
    let m = |s: Option<Stat>| s.map(|s| s.median);
    for sc in [
        Target::SidecarEbpf,
        Target::SidecarEbpfMsg,
        Target::SidecarAddressed,
    ] {
        let name = sc.key();
        // CPU per request at 5k req/s vs nginx: at most 0.9x (goal 0.8x).
        let rs = r.ratio(sc, Target::Nginx, "ol5k_cpu_us_per_req");
        let ratio = m(rs.clone());
        goals.push(Goal {
            name: format!("{name}: CPU per request at 5k req/s <= 0.9x nginx's (goal 0.8x)"),
            detail: format!(
                "{} vs nginx {} µs/req = {}{}",
                fmt(m(r.stat(sc, "ol5k_cpu_us_per_req")), 1),
                fmt(m(r.stat(Target::Nginx, "ol5k_cpu_us_per_req")), 1),
                ratio_text(&rs, 2),
                if ratio.is_some_and(|x| x <= 0.8) {
                    " (goal met)"
                } else {
                    ""
                }
            ),
            verdict: Verdict::of_rounds(&rs, |x| x <= 0.9),
        });
        goals.push(against_nginx(
            r,
            sc,
            "max_rps",
            "closed-loop throughput >= nginx's",
            "req/s",
            0,
            |x| x >= 1.0,
        ));
        let ours = m(r.added(sc, "ol5k_p99_us"));
        let theirs = m(r.added(Target::Nginx, "ol5k_p99_us"));
        // Our p99 minus nginx's, round by round; a gap smaller than how much the direct
        // baseline's own p99 moves between rounds says nothing about either proxy.
        let gap = r.paired(sc, Target::Nginx, "ol5k_p99_us", |a, b| a - b);
        let noise = r
            .stat(Target::Direct, "ol5k_p99_us")
            .map_or(0.0, |s| (s.max - s.min) / 2.0);
        let verdict = match (Verdict::of_rounds(&gap, |d| d <= 0.0), &gap) {
            (Verdict::Missed, Some(g)) if g.median.abs() <= noise => Verdict::WithinNoise,
            (v, _) => v,
        };
        goals.push(Goal {
            name: format!("{name}: added p99 at 5k req/s <= nginx's"),
            detail: format!(
                "{} vs nginx {} µs (direct's p99 moves ±{noise:.0} µs between rounds)",
                fmt(ours, 0),
                fmt(theirs, 0)
            ),
            verdict,
        });
        goals.push(against_nginx(
            r,
            sc,
            "rss_1000_mib",
            "RSS with 1,000 connections < nginx's",
            "MiB",
            1,
            |x| x < 1.0,
        ));
        goals.push(against_nginx(
            r,
            sc,
            "busy_conn_kib",
            "memory per connection with 1,000 open <= nginx's",
            "KiB (RSS growth over idle)",
            1,
            |x| x <= 1.0,
        ));
        goals.push(against_nginx(
            r,
            sc,
            "idle_conn_kib",
            "memory per idle keep-alive connection <= nginx's",
            "KiB",
            1,
            |x| x <= 1.0,
        ));
        goals.push(against_nginx(
            r,
            sc,
            "idle_next_conn_kib",
            "memory per idle keep-alive connection, 1,000 more on top of 1,000 idle <= nginx's",
            "KiB",
            1,
            |x| x <= 1.0,
        ));
        let idle = m(r.stat(sc, "rss_idle_mib"));
        let busy = m(r.stat(sc, "rss_1000_mib"));
        goals.push(Goal {
            name: format!("{name}: RSS < 15 MB idle, < 40 MB with 1,000 connections"),
            detail: format!("{} MiB idle, {} MiB at 1,000", fmt(idle, 1), fmt(busy, 1)),
            verdict: match idle.zip(busy) {
                None => Verdict::NoData,
                Some((i, b)) if i * 1.048576 < 15.0 && b * 1.048576 < 40.0 => Verdict::Met,
                Some(_) => Verdict::Missed,
            },
        });
    }
    let rs = r.ratio(Target::SidecarEbpf, Target::SidecarAddressed, "max_rps");
    goals.push(Goal {
        name: "eBPF interception costs < 2% throughput vs addressing the proxy directly".into(),
        detail: format!(
            "sidecar-ebpf {} vs sidecar {} req/s = {}",
            fmt(m(r.stat(Target::SidecarEbpf, "max_rps")), 0),
            fmt(m(r.stat(Target::SidecarAddressed, "max_rps")), 0),
            ratio_text(&rs, 3)
        ),
        verdict: Verdict::of_rounds(&rs, |x| x >= 0.98),
    });
    let rs = r.ratio(
        Target::SidecarTranscode,
        Target::SidecarInbound,
        "ol1k_cpu_us_per_req",
    );
    goals.push(Goal {
        name: "REST->gRPC transcoding costs <= 2x a plain proxied request's CPU".into(),
        detail: format!(
            "sidecar-transcode {} vs sidecar-inbound {} µs/req at 1k req/s = {}",
            fmt(
                m(r.stat(Target::SidecarTranscode, "ol1k_cpu_us_per_req")),
                1
            ),
            fmt(m(r.stat(Target::SidecarInbound, "ol1k_cpu_us_per_req")), 1),
            ratio_text(&rs, 2)
        ),
        verdict: Verdict::of_rounds(&rs, |x| x <= 2.0),
    });
    let rs = r.ratio(Target::SidecarEbpf, Target::SidecarIptables, "conn_per_s");
    goals.push(Goal {
        name: "eBPF new-connection rate >= iptables REDIRECT's".into(),
        detail: format!(
            "{} vs {} conn/s = {}",
            fmt(m(r.stat(Target::SidecarEbpf, "conn_per_s")), 0),
            fmt(m(r.stat(Target::SidecarIptables, "conn_per_s")), 0),
            ratio_text(&rs, 3)
        ),
        verdict: Verdict::of_rounds(&rs, |x| x >= 1.0),
    });
    goals
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

/// "1.04x (rounds: 0.91, 1.17)": ratios are paired within a round, then the median is taken, so
/// the headline can differ from the ratio of the two medians printed next to it.
/// A goal comparing `sc`'s median of `key` with nginx's, its verdict `pass` on each round's ratio.
fn against_nginx(
    r: &Results,
    sc: Target,
    key: &str,
    what: &str,
    unit: &str,
    decimals: usize,
    pass: fn(f64) -> bool,
) -> Goal {
    let m = |s: Option<Stat>| s.map(|s| s.median);
    let rs = r.ratio(sc, Target::Nginx, key);
    Goal {
        name: format!("{}: {what}", sc.key()),
        detail: format!(
            "{} vs nginx {} {unit} = {}",
            fmt(m(r.stat(sc, key)), decimals),
            fmt(m(r.stat(Target::Nginx, key)), decimals),
            ratio_text(&rs, 2)
        ),
        verdict: Verdict::of_rounds(&rs, pass),
    }
}

fn ratio_text(s: &Option<Stat>, decimals: usize) -> String {
    match s {
        None => "n/a".into(),
        Some(s) if s.values.len() == 1 => format!("{:.decimals$}x", s.median),
        Some(s) => format!(
            "{:.decimals$}x (per round: {})",
            s.median,
            s.values
                .iter()
                .map(|v| format!("{v:.decimals$}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn goals_text(goals: &[Goal]) -> String {
    let mut out = String::from("\nGoals (from the performance issue; medians of this run):\n");
    for g in goals {
        let _ = writeln!(
            out,
            "  [{:<12}] {}: {}",
            g.verdict.label(),
            g.name,
            g.detail
        );
    }
    out
}

pub fn to_json(r: &Results, meta: Json, goals: &[Goal]) -> Json {
    let mut targets = Vec::new();
    for (t, samples) in &r.targets {
        let mut medians = Json::obj();
        for (key, _) in METRICS {
            if let Some(s) = r.stat(*t, key) {
                medians = medians.with(key, s.to_json());
            }
        }
        let mut derived = Json::obj();
        if *t != Target::Direct {
            for key in [
                "ol1k_p50_us",
                "ol1k_p99_us",
                "ol1k_p999_us",
                "ol5k_p50_us",
                "ol5k_p99_us",
                "ol5k_p999_us",
            ] {
                if let Some(s) = r.added(*t, key) {
                    derived = derived.with(&format!("{key}_added_over_direct"), s.to_json());
                }
            }
        }
        for key in ["max_rps", "conn_per_s"] {
            if let Some(s) = r.ratio(*t, Target::Direct, key) {
                derived = derived.with(&format!("{key}_ratio_to_direct"), s.to_json());
            }
        }
        targets.push(
            Json::obj()
                .with("name", t.key())
                .with("description", t.describe())
                .with("metrics", medians)
                .with("derived", derived)
                .with(
                    "failures",
                    Json::Arr(
                        samples
                            .iter()
                            .flat_map(|s| s.failures.iter().map(|f| Json::from(f.as_str())))
                            .collect(),
                    ),
                ),
        );
    }
    Json::obj()
        .with("meta", meta)
        .with(
            "metric_units",
            Json::Obj(
                METRICS
                    .iter()
                    .map(|(k, d)| (k.to_string(), Json::from(*d)))
                    .collect(),
            ),
        )
        .with("targets", Json::Arr(targets))
        .with(
            "goals",
            Json::Arr(
                goals
                    .iter()
                    .map(|g| {
                        Json::obj()
                            .with("goal", g.name.as_str())
                            .with("detail", g.detail.as_str())
                            .with("verdict", g.verdict.label())
                    })
                    .collect(),
            ),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pairs: &[(&'static str, f64)]) -> Sample {
        let mut s = Sample::default();
        for (k, v) in pairs {
            s.set(k, *v);
        }
        s
    }

    #[test]
    fn medians_and_spread() {
        let s = Stat::of(vec![3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!((s.min, s.max), (1.0, 10.0));
        assert_eq!(cell(Some(&s), 1, false), "2.5 ±4.5");
        assert_eq!(cell(Stat::of(vec![5.0]).as_ref(), 0, true), "+5");
        assert_eq!(cell(None, 0, false), "-");
    }

    #[test]
    fn added_latency_pairs_rounds() {
        let r = Results {
            targets: vec![
                (
                    Target::Direct,
                    vec![
                        sample(&[("ol5k_p99_us", 100.0)]),
                        sample(&[("ol5k_p99_us", 200.0)]),
                    ],
                ),
                (
                    Target::Nginx,
                    vec![
                        sample(&[("ol5k_p99_us", 150.0)]),
                        sample(&[("ol5k_p99_us", 270.0)]),
                    ],
                ),
            ],
        };
        let a = r.added(Target::Nginx, "ol5k_p99_us").unwrap();
        assert_eq!(a.values, vec![50.0, 70.0]);
        assert_eq!(a.median, 60.0);
        assert!(text(&r).contains("+60 ±10"));
        assert!(markdown(&r).contains("| nginx | - | - | - | - | +60 ±10 | - |"));
    }
}
