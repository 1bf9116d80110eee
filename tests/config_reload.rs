//! Dynamic configuration through the real interception path, with curl as the app and as the
//! operator: a policy file changed by an atomic rename or by a kubelet-style `..data` symlink
//! swap is applied without a restart; an invalid file keeps the policy in force and says why;
//! `SIGHUP` and `POST /reload` apply at once, and `/reload` is refused to other uids and other
//! hosts; an open breaker survives a change to another rule; a response in flight finishes under
//! the policy it started with.
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sidecar_tests::metrics::{metrics, series};
use sidecar_tests::{env, eventually, netns, Pod, PROXY_GID, PROXY_UID};

/// The bound: a changed file is in force within this.
const APPLIED_WITHIN: Duration = Duration::from_secs(3);
/// A uid of the app's, not the proxy's.
const APP_USER: (u32, u32) = (1000, 1000);

/// curl's view of one exchange.
#[derive(Debug)]
struct Curl {
    status: u16,
    took: Duration,
    headers: String,
    body: String,
}

impl Curl {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `curl <args>` in the pod as `user`; the status and curl's own total time come from `-w`.
fn curl(pod: &Pod, user: Option<(u32, u32)>, args: &[&str]) -> Curl {
    let mut cmd = Command::new("curl");
    cmd.env_clear()
        .env("PATH", env::CHILD_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .args(["-sS", "--max-time", "30", "-D", "-"])
        .args(["-w", "\n%{http_code} %{time_total}"])
        .args(args);
    pod.in_pod(&mut cmd, user);
    let out = cmd.output().unwrap_or_else(|e| panic!("run curl: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, last) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    let mut fields = last.split_whitespace();
    let status = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let secs: f64 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    assert!(
        status != 0,
        "curl {args:?} as {user:?} failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Curl {
        status,
        took: Duration::from_secs_f64(secs),
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

/// The app calls `addr` (captured outbound).
fn app_get(pod: &Pod, addr: &str) -> Curl {
    curl(pod, Some(APP_USER), &[&format!("http://{addr}/")])
}

/// An admin request from inside the pod as `user`.
fn admin(pod: &Pod, user: Option<(u32, u32)>, method: &str, path: &str) -> Curl {
    curl(
        pod,
        user,
        &["-X", method, &format!("http://127.0.0.1:15090{path}")],
    )
}

fn config(pod: &Pod) -> serde_json::Value {
    let reply = admin(pod, None, "GET", "/config");
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("/config: {e}: {}", reply.body))
}

fn reloads(pod: &Pod, result: &str) -> f64 {
    series(
        &metrics(pod),
        &format!("sidecar_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

/// A config directory as the kubelet lays out a mounted ConfigMap: `policy.toml` ->
/// `..data/policy.toml`, `..data` -> a timestamped directory; readable by the proxy's uid.
struct ConfigMap {
    dir: PathBuf,
    versions: usize,
}

impl ConfigMap {
    fn new(pod: &Pod, text: &str) -> ConfigMap {
        let dir = pod.log_dir().join("config");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let mut cm = ConfigMap { dir, versions: 0 };
        cm.swap(text);
        symlink("..data/policy.toml", cm.file()).unwrap();
        cm
    }

    fn file(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    fn arg(&self) -> String {
        self.file().display().to_string()
    }

    /// What the kubelet does on a ConfigMap update: a new directory, a new `..data` link renamed
    /// over the old one (one atomic step).
    fn swap(&mut self, text: &str) {
        self.versions += 1;
        let version = self.dir.join(format!("..v{}", self.versions));
        fs::create_dir(&version).unwrap();
        fs::set_permissions(&version, fs::Permissions::from_mode(0o755)).unwrap();
        write_readable(&version.join("policy.toml"), text);
        let tmp = self.dir.join("..data_tmp");
        symlink(version.file_name().unwrap(), &tmp).unwrap();
        fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    /// What an editor or `mv` does: a new file renamed over `policy.toml`.
    fn rename_over(&self, text: &str) {
        let tmp = self.dir.join("policy.toml.new");
        write_readable(&tmp, text);
        fs::rename(&tmp, self.file()).unwrap();
    }
}

fn write_readable(path: &Path, text: &str) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}

fn rule(addr: &str, keys: &str) -> String {
    format!("[[destination]]\nmatch = \"{addr}\"\n{keys}\n")
}

fn wait_reloads(pod: &Pod, result: &str, n: f64, within: Duration) {
    let got = eventually(within, || reloads(pod, result) >= n);
    assert!(
        got,
        "{result} reloads did not reach {n} within {within:?} (now {}):\n{}",
        reloads(pod, result),
        pod.proxy_log()
    );
}

fn assert_504_at(reply: &Curl, at_least: Duration, below: Duration) {
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.header("x-sidecar-error"), Some("upstream-timeout"));
    assert!(
        reply.took >= at_least && reply.took < below,
        "answered after {:?}: not the {at_least:?} timeout in force",
        reply.took
    );
}

#[test]
fn a_changed_file_is_applied_without_a_restart() {
    let mut pod = Pod::new();
    let _hanging = pod.hanging_upstream("10.200.0.1:8080", "hanging");
    let slow = "10.200.0.1:8080";
    let mut cm = ConfigMap::new(&pod, &rule(slow, "request_timeout = \"8s\""));
    pod.init(&[]);
    let pid = pod.start_proxy(&["--config", &cm.arg()]);

    // The kubelet's symlink swap.
    cm.swap(&rule(slow, "request_timeout = \"2s\""));
    wait_reloads(&pod, "applied", 1.0, APPLIED_WITHIN);
    assert_504_at(
        &app_get(&pod, slow),
        Duration::from_secs(2),
        Duration::from_secs(8),
    );

    // An atomic rename of the file itself.
    cm.rename_over(&rule(slow, "request_timeout = \"300ms\""));
    wait_reloads(&pod, "applied", 2.0, APPLIED_WITHIN);
    assert_504_at(
        &app_get(&pod, slow),
        Duration::from_millis(300),
        Duration::from_secs(2),
    );

    // The same process all along, and /config says what is in force and from where.
    assert!(env::pid_alive(pid));
    let c = config(&pod);
    let file = &c["config_file"];
    assert_eq!(file["generation"], 2, "{c}");
    assert_eq!(
        c["policy"]["destinations"][0]["request_timeout"], "300ms",
        "{c}"
    );
    let text = fs::read_to_string(cm.file()).unwrap();
    let sha = sha256(&text);
    assert_eq!(file["sha256"], sha.as_str(), "{c}");
    assert_eq!(file["sources"]["defaults.request_timeout"], "default");
    assert!(metrics(&pod).contains(&format!("sha256=\"{sha}\"")));
}

/// `sha256sum`, as an operator would check the hash.
fn sha256(text: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn an_invalid_file_keeps_the_policy_in_force_and_lists_every_bad_key() {
    let mut pod = Pod::new();
    let _hanging = pod.hanging_upstream("10.200.0.1:8080", "hanging");
    let slow = "10.200.0.1:8080";
    let cm = ConfigMap::new(&pod, &rule(slow, "request_timeout = \"2s\""));
    pod.init(&[]);
    pod.start_proxy(&["--config", &cm.arg()]);

    cm.rename_over(&format!(
        "[defaults]\nrequest_timeout = \"soon\"\nconect_timeout = \"1s\"\n\n{}",
        rule(slow, "request_timeout = \"0s\"")
    ));
    wait_reloads(&pod, "rejected", 1.0, APPLIED_WITHIN);
    // The old policy still answers.
    assert_504_at(
        &app_get(&pod, slow),
        Duration::from_secs(2),
        Duration::from_secs(8),
    );
    let c = config(&pod);
    let errors = c["config_file"]["last_error"]
        .as_array()
        .unwrap_or_else(|| panic!("no last_error: {c}"));
    let keys: Vec<&str> = errors.iter().filter_map(|e| e["key"].as_str()).collect();
    assert_eq!(keys.len(), 3, "every bad key: {keys:?}");
    assert!(keys
        .iter()
        .any(|k| k.contains("[defaults] request_timeout")));
    assert!(keys.iter().any(|k| k.contains("conect_timeout")));
    assert!(keys.iter().any(|k| k.contains(slow)));
    assert_eq!(c["config_file"]["generation"], 0);
    assert!(metrics(&pod).contains("sidecar_config_last_reload_successful 0"));
    // Reported once in the log, not on every look at the unchanged file.
    let log = pod.proxy_log();
    assert_eq!(log.matches("conect_timeout").count(), 1, "{log}");

    // Fixed: applied, and the error is gone.
    cm.rename_over(&rule(slow, "request_timeout = \"400ms\""));
    wait_reloads(&pod, "applied", 1.0, APPLIED_WITHIN);
    let c = config(&pod);
    assert!(c["config_file"]["last_error"].is_null(), "{c}");
    assert_504_at(
        &app_get(&pod, slow),
        Duration::from_millis(400),
        Duration::from_secs(2),
    );
}

#[test]
fn sighup_and_post_reload_apply_at_once_for_the_proxy_uid_only() {
    let mut pod = Pod::new();
    let _hanging = pod.hanging_upstream("10.200.0.1:8080", "hanging");
    let slow = "10.200.0.1:8080";
    let cm = ConfigMap::new(&pod, &rule(slow, "request_timeout = \"8s\""));
    pod.init_with_netns(&[]);
    let pid = pod.start_proxy(&["--config", &cm.arg()]);

    // SIGHUP: applied before the poller could have seen the file (it waits for it to settle).
    cm.rename_over(&rule(slow, "request_timeout = \"2s\""));
    // SAFETY: kill(2) on the proxy's pid, which the pod owns and has not reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
    wait_reloads(&pod, "applied", 1.0, APPLIED_WITHIN);
    assert!(
        pod.proxy_log().contains("cause=\"SIGHUP\"") || pod.proxy_log().contains("cause=SIGHUP"),
        "{}",
        pod.proxy_log()
    );
    assert!(env::pid_alive(pid), "SIGHUP did not end the proxy");

    // POST /reload from another uid in the pod, or from another host: refused, nothing changes.
    cm.rename_over(&rule(slow, "request_timeout = \"700ms\""));
    let other = admin(&pod, Some(APP_USER), "POST", "/reload");
    assert_eq!(other.status, 403, "{other:?}");
    assert!(other.body.contains("own uid"), "{other:?}");
    let remote = netns::in_netns(pod.remote_netns(), || {
        raw_post("10.200.0.2:15090".parse().unwrap(), "/reload")
    })
    .unwrap();
    assert!(remote.starts_with("HTTP/1.1 403"), "{remote}");
    let other_shutdown = admin(&pod, Some(APP_USER), "POST", "/shutdown");
    assert_eq!(other_shutdown.status, 403, "{other_shutdown:?}");
    assert!(env::pid_alive(pid));

    // From the proxy's uid: applied at once, and the answer says so.
    let own = admin(&pod, Some((PROXY_UID, PROXY_GID)), "POST", "/reload");
    assert!(
        own.status == 200 && (own.body.starts_with("applied") || own.body.starts_with("unchanged")),
        "{own:?}"
    );
    assert_eq!(
        config(&pod)["policy"]["destinations"][0]["request_timeout"],
        "700ms"
    );
    // An invalid file through /reload: 422 with the problems; the policy stays.
    cm.rename_over("[defaults]\nrequest_timeout = 5\n");
    let bad = admin(&pod, Some((PROXY_UID, PROXY_GID)), "POST", "/reload");
    assert_eq!(bad.status, 422, "{bad:?}");
    assert!(bad.body.contains("request_timeout"), "{bad:?}");
    assert_eq!(
        config(&pod)["policy"]["destinations"][0]["request_timeout"],
        "700ms"
    );
}

/// One raw `POST path` (Connection: close); the whole answer.
fn raw_post(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// An upstream in the remote namespace whose answer head comes `delay` after the request, then
/// a body of `chunks` lines, one per 100 ms. Counts the requests it has read.
struct SlowStream {
    seen: Arc<AtomicUsize>,
}

impl SlowStream {
    fn start(pod: &Pod, addr: &str, delay: Duration, chunks: usize) -> SlowStream {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = netns::in_netns(pod.remote_netns(), move || TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(delay);
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    );
                    for i in 0..chunks {
                        std::thread::sleep(Duration::from_millis(100));
                        let line = format!("chunk {i}\n");
                        let _ = write!(stream, "{:x}\r\n{line}\r\n", line.len());
                    }
                    let _ = write!(stream, "0\r\n\r\n");
                });
            }
        });
        SlowStream { seen }
    }
}

#[test]
fn an_open_breaker_and_a_response_in_flight_survive_a_reload() {
    let mut pod = Pod::new();
    let failing = pod.status_upstream("10.200.0.1:8080", "failing", 500);
    let streaming = "10.200.0.1:8081";
    let slow = SlowStream::start(&pod, streaming, Duration::from_millis(1500), 10);
    let a = rule(
        "10.200.0.1:8080",
        "breaker.consecutive_failures = 2\nbreaker.open_time = \"5m\"\nbreaker.max_open_time = \"5m\"",
    );
    let b = |timeout: &str| rule(streaming, &format!("request_timeout = \"{timeout}\""));
    let cm = ConfigMap::new(&pod, &format!("{a}\n{}", b("20s")));
    pod.init(&[]);
    pod.start_proxy(&["--config", &cm.arg()]);

    // Open A's breaker.
    for _ in 0..2 {
        assert_eq!(app_get(&pod, "10.200.0.1:8080").status, 500);
    }
    let open = app_get(&pod, "10.200.0.1:8080");
    assert_eq!(
        open.header("x-sidecar-error"),
        Some("upstream-breaker-open"),
        "{open:?}"
    );
    let sent = failing.requests().len();

    // A response to B in flight (its head comes after 1.5 s) while B's rule changes to a
    // timeout it could not meet.
    let finished = std::thread::scope(|scope| {
        let in_flight = scope.spawn(|| app_get(&pod, streaming));
        assert!(
            eventually(Duration::from_secs(10), || slow.seen.load(Ordering::SeqCst)
                >= 1),
            "the request did not reach the upstream"
        );
        cm.rename_over(&format!("{a}\n{}", b("500ms")));
        let own = admin(&pod, Some((PROXY_UID, PROXY_GID)), "POST", "/reload");
        assert_eq!(own.status, 200, "{own:?}");
        assert!(own.body.contains("1 rule(s) kept"), "{own:?}");
        in_flight.join().unwrap()
    });
    assert_eq!(
        finished.status, 200,
        "finished under the policy it began with: {finished:?}"
    );
    assert!(finished.body.contains("chunk 9"), "{finished:?}");
    // A new request to B: the new timeout.
    assert_504_at(
        &app_get(&pod, streaming),
        Duration::from_millis(500),
        Duration::from_millis(1500),
    );
    // A's breaker is still open, and A saw nothing more.
    let still = app_get(&pod, "10.200.0.1:8080");
    assert_eq!(
        still.header("x-sidecar-error"),
        Some("upstream-breaker-open"),
        "{still:?}"
    );
    assert_eq!(failing.requests().len(), sent);
}

/// `[run]` keys are read once: the file may set them (below flags and the environment), and a
/// reload that changes one is rejected as a whole with "restart required", policies included.
#[test]
fn run_keys_in_the_file_need_a_restart_to_change() {
    let mut pod = Pod::new();
    let _hanging = pod.hanging_upstream("10.200.0.1:8080", "hanging");
    let slow = "10.200.0.1:8080";
    let file = |header_timeout: &str, request_timeout: &str| {
        format!(
            "[run]\nheader-timeout = \"{header_timeout}\"\naccess-log = true\n\n{}",
            rule(slow, &format!("request_timeout = \"{request_timeout}\""))
        )
    };
    let cm = ConfigMap::new(&pod, &file("12s", "2s"));
    pod.init(&[]);
    pod.start_proxy(&["--config", &cm.arg()]);
    let c = config(&pod);
    assert_eq!(c["header_timeout"], "12s", "{c}");
    assert_eq!(c["access_log"], true, "{c}");
    assert_eq!(c["sources"]["header-timeout"], "file", "{c}");
    assert_eq!(c["sources"]["config"], "flag", "{c}");
    assert_eq!(c["sources"]["workers"], "default", "{c}");

    cm.rename_over(&file("20s", "300ms"));
    wait_reloads(&pod, "rejected", 1.0, APPLIED_WITHIN);
    let c = config(&pod);
    let errors = c["config_file"]["last_error"].to_string();
    assert!(
        errors.contains("restart required: run.header-timeout"),
        "{c}"
    );
    assert_eq!(c["header_timeout"], "12s");
    assert_eq!(
        c["policy"]["destinations"][0]["request_timeout"], "2s",
        "nothing applied"
    );

    // Back to the [run] in force: the policy change is applied.
    cm.rename_over(&file("12s", "300ms"));
    wait_reloads(&pod, "applied", 1.0, APPLIED_WITHIN);
    assert_504_at(
        &app_get(&pod, slow),
        Duration::from_millis(300),
        Duration::from_secs(2),
    );
}
