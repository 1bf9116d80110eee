//! The chained CNI plugin, invoked exactly as a container runtime does: the binary named
//! `sidecar-cni` from `CNI_PATH`, no arguments, `CNI_COMMAND` / `CNI_CONTAINERID` / `CNI_NETNS` /
//! `CNI_IFNAME` / `CNI_ARGS` (with the kubelet's `K8S_POD_*`) in the environment, the network
//! configuration with the previous plugin's `prevResult` on stdin. The pod is the harness's, its
//! cgroup named as the kubelet names it; the prevResult is its interface's. No `sidecar init` is
//! run by hand: after ADD the pod's traffic goes through the proxy both ways; after DEL nothing
//! of it is left.
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sidecar_tests::env::sidecar_bin;
use sidecar_tests::Pod;

const PIN_ROOT: &str = "/sys/fs/bpf/sidecar";

/// A pod UID of this test process (the pin directory is named after it).
fn new_uid() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{:08x}-c0de-4000-8000-{:012x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// The plugin binary as the runtime finds it: `<CNI_PATH>/sidecar-cni`.
fn plugin_dir(pod: &Pod) -> PathBuf {
    let dir = pod.log_dir().join("cni-bin");
    let plugin = dir.join("sidecar-cni");
    if !plugin.exists() {
        fs::create_dir_all(&dir).unwrap();
        fs::copy(sidecar_bin(), &plugin).unwrap();
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

struct Call {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// One plugin call as the runtime makes it.
fn cni(pod: &Pod, command: &str, namespace: &str, uid: &str, conf: &str) -> Call {
    let dir = plugin_dir(pod);
    exec_plugin(
        Command::new(dir.join("sidecar-cni")),
        &dir,
        pod,
        command,
        namespace,
        uid,
        "eth0",
        conf,
    )
}

/// Runs one plugin binary with the CNI environment and `conf` on stdin.
#[allow(clippy::too_many_arguments)]
fn exec_plugin(
    mut cmd: Command,
    cni_path: &Path,
    pod: &Pod,
    command: &str,
    namespace: &str,
    uid: &str,
    ifname: &str,
    conf: &str,
) -> Call {
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=orders-7d9f;\
         K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID={uid}"
    );
    let started = Instant::now();
    let mut child = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "abc123")
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", ifname)
        .env("CNI_ARGS", args)
        .env("CNI_PATH", cni_path)
        // The runtime's environment reaches plugins: init's variables there must not count
        // (were this one read, every ADD would fail on its value).
        .env("SIDECAR_FAIL_MODE_INBOUND", "sideways")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "the plugin panicked: {stderr}"
    );
    Call {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        took,
    }
}

/// Debian's reference plugins (containernetworking-plugins).
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A conflist run as libcni runs it: ADD plugin by plugin in order, each given the list's
/// `name` and `cniVersion`, the previous plugin's result as `prevResult` and, for the
/// capabilities it declares, the runtime's `runtimeConfig`; DEL and CHECK in reverse order with
/// the cached ADD result. The reference plugins run in the node's network namespace (the
/// harness's remote namespace), ours where the runtime runs, as a node's would.
fn run_list(
    pod: &Pod,
    command: &str,
    list: &Value,
    runtime: &Value,
    cached: Option<&Value>,
    uid: &str,
) -> Result<Value, Call> {
    let ours = plugin_dir(pod);
    let cni_path = std::env::join_paths([ours.as_path(), Path::new(REFERENCE_PLUGINS)]).unwrap();
    let mut plugins: Vec<Value> = list["plugins"].as_array().unwrap().clone();
    if command != "ADD" {
        plugins.reverse();
    }
    let mut prev = cached.cloned();
    for plugin in plugins {
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(prev) = &prev {
            conf["prevResult"] = prev.clone();
        }
        let mut rc = serde_json::Map::new();
        for (cap, on) in plugin["capabilities"].as_object().into_iter().flatten() {
            if on == &json!(true) {
                if let Some(v) = runtime.get(cap) {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf["runtimeConfig"] = Value::Object(rc);
        }
        let kind = plugin["type"].as_str().unwrap();
        let cmd = if kind == "sidecar-cni" {
            Command::new(ours.join(kind))
        } else {
            let mut c = Command::new("nsenter");
            c.arg(format!(
                "--net={}",
                sidecar_tests::netns::netns_path(pod.remote_netns()).display()
            ))
            .arg(Path::new(REFERENCE_PLUGINS).join(kind));
            c
        };
        let call = exec_plugin(
            cmd,
            Path::new(&cni_path),
            pod,
            command,
            "shop",
            uid,
            "net1",
            &conf.to_string(),
        );
        eprintln!("{command} {kind}: {:?}", call.took);
        if !call.ok {
            return Err(call);
        }
        if command == "ADD" {
            prev = Some(call.json());
        }
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// The harness pod's interface, as the network plugin before ours reports it.
fn prev_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
        "ips": [
            {"address": "10.200.0.2/24", "interface": 0},
            {"address": "fd00:200::2/64", "interface": 0}
        ],
        "dns": {}
    })
}

/// The pod annotations `sidecar inject` writes for the CNI mode.
fn injected() -> Value {
    json!({"sidecar.mesh.dev/interception": "cni", "kubectl.kubernetes.io/default-container": "app"})
}

/// The plugin's `sidecar` section for the harness pod, with `extra` keys.
fn settings(pod: &Pod, extra: Value) -> Value {
    let mut sidecar = json!({
        "namespaces": ["shop"],
        "cgroup_root": pod.cgroup_root(),
        "pin_root": PIN_ROOT,
    });
    if let (Value::Object(base), Value::Object(more)) = (&mut sidecar, extra) {
        base.extend(more);
    }
    sidecar
}

/// The configuration the runtime hands the plugin for an injected pod: the plugin's entry with the
/// previous result and, for its declared capability, the pod's annotations in `runtimeConfig`.
fn conf(pod: &Pod, extra: Value) -> String {
    conf_with(pod, extra, Some(injected()))
}

fn conf_with(pod: &Pod, extra: Value, annotations: Option<Value>) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "sidecar-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "prevResult": prev_result(pod),
        "sidecar": settings(pod, extra),
    });
    if let Some(annotations) = annotations {
        conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": annotations});
    }
    conf.to_string()
}

fn pins(uid: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(uid)
}

#[test]
fn add_intercepts_the_pod_both_ways_and_del_leaves_nothing() {
    let uid = new_uid();
    let mut pod = Pod::new_kube(&uid);
    pod.track_pins(PIN_ROOT, &uid);
    let upstream = pod.http_upstream("10.200.0.1:8080", "upstream");
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    let conf = conf(&pod, json!({}));

    let add = cni(&pod, "ADD", "shop", &uid, &conf);
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    let mut expected = prev_result(&pod);
    expected["cniVersion"] = json!("1.0.0");
    assert_eq!(
        add.json(),
        expected,
        "the result is the previous plugin's, unchanged"
    );
    eprintln!(
        "ADD took {:?} (the whole process: exec, load, attach, pin)",
        add.took
    );
    assert!(pins(&uid).exists(), "pinned under the pod's UID");
    let check = cni(&pod, "CHECK", "shop", &uid, &conf);
    assert!(check.ok, "CHECK: {} {}", check.stdout, check.stderr);

    // No `sidecar init` by hand: the proxy starts and both directions are captured.
    pod.start_proxy_with_inbound(&[]);
    let reply = pod.app_http("10.200.0.1:8080");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        upstream.only_request().header("x-forwarded-by"),
        Some("sidecar"),
        "the app's outbound call went through the proxy"
    );
    let inbound = pod.remote_http("10.200.0.2:8080");
    assert_eq!(inbound.status, 200, "{inbound:?}");
    assert_eq!(
        app.only_request().peer.ip().to_string(),
        "127.0.0.6",
        "the inbound call was delivered by the proxy"
    );

    let del = cni(&pod, "DEL", "shop", &uid, &conf);
    assert!(del.ok, "DEL: {} {}", del.stdout, del.stderr);
    assert!(
        del.stdout.trim().is_empty(),
        "DEL prints nothing: {}",
        del.stdout
    );
    assert!(!pins(&uid).exists(), "DEL left {}", pins(&uid).display());
    let again = cni(&pod, "DEL", "shop", &uid, &conf);
    assert!(again.ok, "a second DEL is not an error: {}", again.stdout);
    let check = cni(&pod, "CHECK", "shop", &uid, &conf);
    assert!(!check.ok, "CHECK after DEL must fail");
    assert_eq!(check.json()["code"], 100, "{}", check.stdout);
}

/// Chained after the reference `bridge` plugin (host-local IPAM) in a conflist, as a node's
/// runtime runs it: the pod gets its bridge interface and address from `bridge`, and our plugin
/// intercepts it on that address with the pod's own annotation applied; DEL takes both away.
#[test]
fn chained_after_the_reference_bridge_plugin() {
    let bridge = Path::new(REFERENCE_PLUGINS).join("bridge");
    assert!(
        bridge.exists(),
        "{} is missing: cargo xtask test installs containernetworking-plugins",
        bridge.display()
    );
    let uid = new_uid();
    let mut pod = Pod::new_kube(&uid);
    pod.track_pins(PIN_ROOT, &uid);
    let ipam_dir = pod.log_dir().join("ipam");
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": "scbr0", "isGateway": true,
             "ipam": {"type": "host-local", "subnet": "10.201.0.0/24", "dataDir": ipam_dir}},
            {"type": "sidecar-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true},
             "sidecar": settings(&pod, json!({}))}
        ]
    });
    let mut annotations = injected();
    annotations["sidecar.mesh.dev/exclude-inbound-ports"] = json!("9090");
    let runtime = json!({"io.kubernetes.cri.pod-annotations": annotations});
    // The app's listeners exist before ADD (harness servers run outside the pod cgroup).
    let app = pod.app_http_server("0.0.0.0:8080", "app");
    let direct = pod.app_http_server("0.0.0.0:9090", "excluded");
    let result = run_list(&pod, "ADD", &list, &runtime, None, &uid)
        .unwrap_or_else(|c| panic!("ADD: {} {}", c.stdout, c.stderr));
    assert_eq!(result["ips"][0]["address"], "10.201.0.2/24", "{result}");
    assert!(
        result["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "net1"),
        "bridge's result passed through: {result}"
    );
    assert!(pins(&uid).exists());
    run_list(&pod, "CHECK", &list, &runtime, Some(&result), &uid)
        .unwrap_or_else(|c| panic!("CHECK: {} {}", c.stdout, c.stderr));

    let upstream = pod.http_upstream("10.201.0.1:8080", "upstream");
    pod.start_proxy_with_inbound(&[]);
    assert_eq!(pod.app_http("10.201.0.1:8080").status, 200);
    assert_eq!(
        upstream.only_request().header("x-forwarded-by"),
        Some("sidecar"),
        "outbound over the bridge went through the proxy"
    );
    assert_eq!(pod.remote_http("10.201.0.2:8080").status, 200);
    assert_eq!(app.only_request().peer.ip().to_string(), "127.0.0.6");
    assert_eq!(pod.remote_http("10.201.0.2:9090").status, 200);
    assert_eq!(
        direct.only_request().peer.ip().to_string(),
        "10.201.0.1",
        "the pod's exclude-inbound-ports annotation applied"
    );

    run_list(&pod, "DEL", &list, &runtime, Some(&result), &uid)
        .unwrap_or_else(|c| panic!("DEL: {} {}", c.stdout, c.stderr));
    assert!(!pins(&uid).exists(), "DEL left {}", pins(&uid).display());
    let link = Command::new("ip")
        .args(["-n", pod.pod_netns(), "link", "show", "net1"])
        .output()
        .unwrap();
    assert!(!link.status.success(), "bridge's DEL removed net1");
    let leases = fs::read_dir(ipam_dir.join("k8s-pod-network"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("10.201."))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(leases, 0, "the address went back to host-local");
}

#[test]
fn pods_not_injected_or_outside_the_served_namespaces_are_untouched() {
    let uid = new_uid();
    let mut pod = Pod::new_kube(&uid);
    pod.track_pins(PIN_ROOT, &uid);
    let not_injected = [
        json!({}),
        json!({"sidecar.mesh.dev/interception": "init"}),
        json!({"sidecar.mesh.dev/interception": "cni", "sidecar.mesh.dev/inject": "false"}),
    ];
    // In a served namespace: the pod's annotations say it is not injected.
    let mut cases: Vec<(&str, String)> = not_injected
        .into_iter()
        .map(|a| ("shop", conf_with(&pod, json!({}), Some(a))))
        .collect();
    // In another namespace, whatever the annotations (or their absence) say.
    cases.push(("default", conf(&pod, json!({}))));
    cases.push(("default", conf_with(&pod, json!({}), None)));
    for (namespace, conf) in &cases {
        let add = cni(&pod, "ADD", namespace, &uid, conf);
        assert!(add.ok, "{conf}: {} {}", add.stdout, add.stderr);
        assert_eq!(add.json()["ips"][0]["address"], "10.200.0.2/24");
        assert!(!pins(&uid).exists(), "nothing pinned for {conf}");
        for command in ["CHECK", "DEL"] {
            let call = cni(&pod, command, namespace, &uid, conf);
            assert!(call.ok, "{command}: {} {}", call.stdout, call.stderr);
        }
    }
    // The pod is not intercepted: its outbound call reaches the upstream directly.
    let upstream = pod.http_upstream("10.200.0.1:8080", "upstream");
    assert_eq!(pod.app_http("10.200.0.1:8080").status, 200);
    assert_eq!(upstream.only_request().header("x-forwarded-by"), None);
    // A runtime that passes no annotations gets an error for a served pod, saying what to do,
    // unless the plugin takes every pod of the namespace.
    let blind = cni(&pod, "ADD", "shop", &uid, &conf_with(&pod, json!({}), None));
    assert!(!blind.ok);
    assert_eq!(blind.json()["code"], 7, "{}", blind.stdout);
    assert!(blind.stdout.contains("select"), "{}", blind.stdout);
    let every = conf_with(&pod, json!({"select": "namespace"}), None);
    let add = cni(&pod, "ADD", "shop", &uid, &every);
    assert!(add.ok, "{} {}", add.stdout, add.stderr);
    assert!(pins(&uid).exists(), "select = namespace takes every pod");
    assert!(cni(&pod, "DEL", "shop", &uid, &every).ok);
    assert!(!pins(&uid).exists());
    let version = cni(
        &pod,
        "VERSION",
        "default",
        &uid,
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(version.json()["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));
}

#[test]
fn bad_configuration_and_a_missing_cgroup_are_cni_errors_never_panics() {
    let uid = new_uid();
    let mut pod = Pod::new_kube(&uid);
    pod.track_pins(PIN_ROOT, &uid);
    let cases = [
        ("{not json".to_owned(), 6, "not JSON"),
        (
            conf(&pod, json!({"namespace": ["typo"]})),
            7,
            "an unknown key",
        ),
        (
            conf(
                &pod,
                json!({"init_args": ["--fail-mode-inbound", "sideways"]}),
            ),
            7,
            "a bad init flag",
        ),
        (
            conf(&pod, json!({"cgroup_root": pod.log_dir()})),
            101,
            "no cgroup for the pod",
        ),
        (
            conf_with(
                &pod,
                json!({}),
                Some(json!({"sidecar.mesh.dev/interception": "cni",
                    "sidecar.mesh.dev/fail-mode-outbound": "sideways"})),
            ),
            7,
            "a bad annotation on the pod",
        ),
    ];
    for (conf, code, what) in cases {
        let add = cni(&pod, "ADD", "shop", &uid, &conf);
        assert!(!add.ok, "{what}: must fail");
        let err = add.json();
        assert_eq!(err["code"], code, "{what}: {err}");
        assert!(
            !err["msg"].as_str().unwrap_or("").is_empty(),
            "{what}: {err}"
        );
        assert!(!pins(&uid).exists(), "{what}: nothing pinned");
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sidecar-cni-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("net.d")).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn installer(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(sidecar_bin());
    cmd.env_clear()
        .args(["cni", "install", "--cni-bin-dir"])
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--pin-root")
        .arg(dir.join("pins"))
        .args(extra);
    cmd
}

fn installed(dir: &Path) -> bool {
    Command::new(sidecar_bin())
        .env_clear()
        .args(["cni", "installed", "--cni-bin-dir"])
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.244.0.0/24"}}]}"#;

#[test]
fn the_node_installer_chains_itself_keeps_chained_and_removes_itself() {
    let s = Scratch::new("install");
    let conflist = s.0.join("net.d/10-bridge.conflist");
    fs::write(&conflist, BRIDGE).unwrap();
    fs::write(s.0.join("net.d/99-later.conflist"), BRIDGE).unwrap();
    let mut child = installer(
        &s.0,
        &[
            "--settings",
            r#"{"namespaces":["shop"]}"#,
            "--interval",
            "100ms",
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    assert!(
        sidecar_tests::eventually(Duration::from_secs(10), || installed(&s.0)),
        "not installed"
    );
    let conf = read_json(&conflist);
    assert_eq!(
        conf["plugins"][0]["type"], "bridge",
        "the network plugin first"
    );
    assert_eq!(
        conf["plugins"][1],
        json!({"type": "sidecar-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true}, "sidecar": {"namespaces": ["shop"]}})
    );
    assert_eq!(
        read_json(&s.0.join("net.d/99-later.conflist")),
        serde_json::from_str::<Value>(BRIDGE).unwrap(),
        "only the file the runtime uses is touched"
    );
    // The installed binary is the plugin.
    let plugin = s.0.join("bin/sidecar-cni");
    let mut version = Command::new(&plugin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    version
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"cniVersion":"1.0.0"}"#)
        .unwrap();
    let out = version.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));

    // The network plugin rewrites its file (dropping us): chained again.
    fs::write(&conflist, BRIDGE).unwrap();
    assert!(
        sidecar_tests::eventually(Duration::from_secs(10), || installed(&s.0)),
        "not chained again"
    );

    // Uninstall on SIGTERM: the entry and the binary go; the network plugin's file stays.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        read_json(&conflist)["plugins"].as_array().map(Vec::len),
        Some(1)
    );
    assert!(!plugin.exists());
    assert!(!installed(&s.0));
}

#[test]
fn the_installer_converts_a_single_plugin_conf_and_refuses_bad_settings() {
    let s = Scratch::new("single");
    fs::write(
        s.0.join("net.d/10-bridge.conf"),
        r#"{"cniVersion":"0.4.0","name":"net","type":"bridge","bridge":"cni0"}"#,
    )
    .unwrap();
    let out = installer(&s.0, &["--once", "--settings", r#"{"namespaces":["a"]}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.0.join("net.d/10-bridge.conf").exists());
    let conf = read_json(&s.0.join("net.d/10-bridge.conflist"));
    assert_eq!(conf["cniVersion"], "0.4.0");
    assert_eq!(conf["plugins"][0]["type"], "bridge");
    assert_eq!(conf["plugins"][1]["type"], "sidecar-cni");

    for (settings, names) in [
        (r#"{"namespace":["a"]}"#, "namespace"),
        (
            r#"{"init_args":["--fail-mode-inbound","sideways"]}"#,
            "sideways",
        ),
        ("[1]", "JSON object"),
    ] {
        let out = installer(&s.0, &["--once", "--settings", settings])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{settings}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(names), "{settings}: {err}");
    }
    // No configuration yet: a clear error with --once.
    let empty = Scratch::new("empty");
    let out = installer(&empty.0, &["--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CNI configuration yet"));
}
