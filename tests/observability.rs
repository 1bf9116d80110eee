//! The shipped observability (deploy/observability/) against the real thing: `promtool` checks
//! and unit-tests the rules; a real Prometheus (Debian's package, in the test's remote network
//! namespace, on its loopback) scrapes a pod's sidecar while the test drives traffic, failures, a
//! breaker trip and a re-run of `init` that leaves inbound capture unregistered. In a healthy run
//! no alert is pending or firing; afterwards the breaker, proxy-error and interception alerts
//! fire; every dashboard query and every recording rule returns data; the dashboard names only
//! metrics the sidecar exports; every runbook link names a section of docs/troubleshooting.md.
//!
//! The live Prometheus runs the shipped rules with their `for:` and group intervals shortened to
//! a second (the time to fire is promtool's part, in rules-test.yaml).
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sidecar_tests::{env, eventually, Pod, POD_IP4};

const LIMIT: Duration = Duration::from_secs(90);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn observability() -> PathBuf {
    workspace().join("deploy/observability")
}

/// A program the test needs, or a loud failure that says how to get it.
fn program(name: &str) -> PathBuf {
    let found = env::CHILD_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: `cargo xtask test` installs Debian's prometheus package (apt-get install --no-install-recommends prometheus)")
    })
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let promtool = program("promtool");
    for args in [
        vec!["check", "rules", "prometheus-rules.yaml"],
        vec!["test", "rules", "rules-test.yaml"],
        // (scrape-config.yaml cannot be checked here: Debian's Prometheus is built without
        // Kubernetes service discovery.)
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(observability())
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_runbook_names_a_troubleshooting_section() {
    let rules = fs::read_to_string(observability().join("prometheus-rules.yaml")).unwrap();
    let guide = fs::read_to_string(workspace().join("docs/troubleshooting.md")).unwrap();
    let anchors: BTreeSet<String> = guide
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(anchor)
        .collect();
    let mut runbooks = 0;
    for line in rules.lines() {
        if let Some(link) = line.trim().strip_prefix("runbook: ") {
            let link = link.trim_matches('"');
            let section = link
                .strip_prefix("docs/troubleshooting.md#")
                .unwrap_or_else(|| panic!("runbook outside docs/troubleshooting.md: {link}"));
            assert!(
                anchors.contains(section),
                "no section #{section}: {anchors:?}"
            );
            runbooks += 1;
        }
    }
    assert!(runbooks >= 10, "{runbooks} runbooks");
}

/// GitHub's anchor of a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Prometheus in the pod's remote network namespace, scraping the pod's admin port every second.
struct Prometheus {
    child: Child,
    netns: String,
}

impl Prometheus {
    fn start(pod: &Pod) -> Prometheus {
        let dir = pod.log_dir().join("prometheus");
        fs::create_dir_all(dir.join("data")).unwrap();
        // The shipped rules, with `for:` and the evaluation interval shortened to a second.
        let rules = fs::read_to_string(observability().join("prometheus-rules.yaml")).unwrap();
        let rules: String = rules
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("for: ") || t.starts_with("interval: ") {
                    format!(
                        "{}{}",
                        &l[..l.len() - t.len()],
                        if t.starts_with("for") {
                            "for: 1s"
                        } else {
                            "interval: 1s"
                        }
                    )
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(dir.join("rules.yaml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: sidecar\n    static_configs:\n      - targets: ['{POD_IP4}:15090']\n        labels:\n          namespace: shop\n          pod: web-0\n",
            dir.join("rules.yaml").display()
        );
        fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = fs::File::create(dir.join("prometheus.log")).unwrap();
        let netns = pod.remote_netns().to_owned();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(program("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, netns };
        let up = eventually(LIMIT, || {
            prometheus
                .get("/api/v1/query", &[("query", "up{job=\"sidecar\"} == 1")])
                .is_some_and(|v| !v["data"]["result"].as_array().is_none_or(Vec::is_empty))
        });
        assert!(
            up,
            "Prometheus never scraped the sidecar:\n{}",
            fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        prometheus
    }

    /// A GET of Prometheus' HTTP API (curl, inside its namespace); `None` until it answers.
    fn get(&self, path: &str, params: &[(&str, &str)]) -> Option<Value> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.netns,
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--get",
        ]);
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd
            .arg(format!("http://127.0.0.1:9090{path}"))
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn query(&self, expr: &str) -> Vec<Value> {
        let v = self
            .get("/api/v1/query", &[("query", expr)])
            .unwrap_or_else(|| panic!("query {expr}: no answer"));
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Alerts pending or firing: (name, state).
    fn alerts(&self) -> Vec<(String, String)> {
        let v = self.get("/api/v1/alerts", &[]).unwrap_or_default();
        v["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["labels"]["alertname"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    a["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Waits until every rule group has been evaluated after now, `n` times over.
    fn evaluations(&self, n: u32) {
        for _ in 0..n {
            let since = Instant::now();
            let v = self.get("/api/v1/rules", &[]).unwrap_or_default();
            let stamp = |v: &Value| -> Vec<String> {
                v["data"]["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|g| g["lastEvaluation"].as_str().unwrap_or_default().to_owned())
                    .collect()
            };
            let before = stamp(&v);
            let moved = eventually(LIMIT, || {
                let now = stamp(&self.get("/api/v1/rules", &[]).unwrap_or_default());
                now.len() == before.len() && now.iter().zip(&before).all(|(a, b)| a != b)
            });
            assert!(moved, "rules not evaluated within {:?}", since.elapsed());
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The dashboard's queries, with its variables set to "everything".
fn dashboard_queries() -> Vec<(String, String)> {
    let text = fs::read_to_string(observability().join("grafana-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", ".*")
                .replace("$service", ".*")
                .replace("$destination", ".*")
                .replace("$__rate_interval", "15s");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(<selector>, label) -> the selector.
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.replace("$namespace", ".*").replace("$service", ".*"))
                .unwrap_or_else(|| panic!("variable query {q}"));
            queries.push((format!("variable {}", var["name"]), inner));
        }
    }
    queries
}

fn recording_rules() -> Vec<String> {
    fs::read_to_string(observability().join("prometheus-rules.yaml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_owned)
        .collect()
}

/// Metric names in a PromQL expression (what is not a function, keyword, label or string).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let word = &tail[..end];
        let before = rest[..start].chars().last();
        if (word.starts_with("sidecar") || word.starts_with("process_") || word == "up")
            && before != Some('"')
        {
            names.insert(word.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_and_alerts_work_against_a_real_prometheus() {
    let mut pod = Pod::new();
    let _ok = pod.http_upstream("10.200.0.1:8080", "ok");
    let _failing = pod.status_upstream("10.200.0.1:8081", "failing", 500);
    let _unavailable = pod.status_upstream("10.200.0.1:8082", "unavailable", 503);
    let _collector = pod.http_upstream("10.200.0.1:9999", "collector");
    let _app = pod.app_http_server("0.0.0.0:8080", "app");
    pod.init_with_netns(&[]);
    let pin_dir = sidecar_tests::bpf::default_pin_dir(pod.cgroup())
        .to_string_lossy()
        .into_owned();
    // The proxy's files: its config, the app's log and the forwarder's checkpoint.
    let files = pod.log_dir().join("proxy-files");
    fs::create_dir_all(&files).unwrap();
    fs::set_permissions(&files, fs::Permissions::from_mode(0o777)).unwrap();
    let config = files.join("policy.toml");
    fs::write(
        &config,
        "[[destination]]\nmatch = \"10.200.0.1:8081\"\nbreaker = { consecutive_failures = 3, open_time = \"5m\", max_open_time = \"5m\" }\n",
    )
    .unwrap();
    let log = files.join("app.log");
    fs::write(&log, "").unwrap();
    fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
    let (config, log) = (config.display().to_string(), log.display().to_string());
    pod.start_proxy_with_inbound(&[
        "--pin-dir",
        &pin_dir,
        "--service-name",
        "web",
        "--config",
        &config,
        "--app-probe-interval",
        "200ms",
        "--logs-file",
        &log,
        "--logs-endpoint",
        "http://10.200.0.1:9999/logs",
        "--logs-poll-interval",
        "50ms",
        "--logs-batch-wait",
        "100ms",
    ]);
    let prometheus = Prometheus::start(&pod);
    let write_log = |n: usize| {
        use std::io::Write as _;
        let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
        for i in 0..n {
            writeln!(f, "{{\"msg\":\"line {i}\"}}").unwrap();
        }
    };

    // Healthy: traffic both ways, a few log lines; nothing pending or firing.
    for _ in 0..5 {
        assert_eq!(pod.app_http("10.200.0.1:8080").status, 200);
        assert_eq!(pod.remote_http(&format!("{POD_IP4}:8080")).status, 200);
        write_log(3);
    }
    let seen = eventually(LIMIT, || {
        !prometheus.query("sidecar:requests:rate5m").is_empty()
            && !prometheus
                .query("sidecar_logs_lines_sent_total > 0")
                .is_empty()
    });
    assert!(seen, "no request or log metrics in Prometheus");
    prometheus.evaluations(3);
    assert_eq!(prometheus.alerts(), Vec::new(), "alerts in a healthy run");

    // Failures: a breaker trips, the proxy answers for refused connections, retries; and a
    // fresh set of kernel maps leaves the inbound listeners unregistered.
    let stop = AtomicBool::new(false);
    let fired = std::thread::scope(|scope| {
        scope.spawn(|| {
            // Not asserted: while init re-runs, a connect may go direct (and be refused).
            while !stop.load(Ordering::SeqCst) {
                for dst in ["10.200.0.1:8081", "10.200.0.1:8083", "10.200.0.1:8082"] {
                    let _ = pod.run_app_raw(&["http", "--connect", dst]);
                }
            }
        });
        let wanted = [
            "SidecarBreakerOpen",
            "SidecarProxyErrors",
            "SidecarInterceptionNotRegistered",
        ];
        let mut reinit = pod_reinit(&pod);
        let fired = eventually(LIMIT, || {
            let alerts = prometheus.alerts();
            wanted
                .iter()
                .all(|w| alerts.iter().any(|(n, s)| n == w && s == "firing"))
        });
        stop.store(true, Ordering::SeqCst);
        reinit.wait().unwrap();
        (fired, prometheus.alerts())
    });
    assert!(fired.0, "not all expected alerts fired: {:?}", fired.1);

    // Every dashboard query and every recording rule returns data.
    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        if prometheus.query(&expr).is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    for rule in recording_rules() {
        if prometheus.query(&rule).is_empty() {
            empty.push(format!("recording rule {rule}"));
        }
    }
    assert!(empty.is_empty(), "no data:\n  {}", empty.join("\n  "));

    // And the dashboard names only what the sidecar exports (or the rules record).
    let exported: BTreeSet<String> = prometheus
        .query("count by (__name__) ({job=\"sidecar\"})")
        .iter()
        .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_owned))
        .chain(recording_rules())
        .chain(["up".to_owned()])
        .collect();
    let mut unknown = BTreeSet::new();
    for (_, expr) in dashboard_queries() {
        unknown.extend(
            metric_names(&expr)
                .into_iter()
                .filter(|m| !exported.contains(m)),
        );
    }
    assert!(
        unknown.is_empty(),
        "the dashboard names metrics nobody exports: {unknown:?}"
    );
}

/// `init --remove`, then `init` again (fresh maps): run in the background, as root.
fn pod_reinit(pod: &Pod) -> Child {
    let script = format!(
        "{bin} init --remove --cgroup {cg} && {bin} init --cgroup {cg} --pod-ip {POD_IP4},{ip6} --netns {ns}",
        bin = env::sidecar_bin().display(),
        cg = pod.cgroup().display(),
        ip6 = sidecar_tests::POD_IP6,
        ns = pod.netns_path().display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("re-run init")
}
