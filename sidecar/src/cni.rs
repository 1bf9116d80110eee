//! `sidecar cni` (also run as `sidecar-cni`, the name the container runtime executes): a chained
//! CNI plugin (CNI specification 1.0; 0.3.x and 0.4.0 configurations accepted) that does what
//! `sidecar init` does for a pod when the runtime creates the pod's network, so that app pods
//! need no privileged init container.
//!
//! | `CNI_COMMAND` | what it does |
//! |---|---|
//! | `ADD` | for a selected pod (below): finds its cgroup from `K8S_POD_UID` (cgroupfs `.../pod<uid>` and systemd `...-pod<uid_>.slice` naming), takes its addresses from `prevResult`, and installs the interception with `sidecar init`'s own code (`intercept::install`, pod id = the pod UID, the section's `init_args` as init flags, the pod's init annotations over them); prints `prevResult` unchanged. Any other pod: `prevResult` unchanged, nothing done |
//! | `DEL` | for a pod of a served namespace: removes its pins (`intercept::remove`); nothing there is not an error |
//! | `CHECK` | fails (code 100) when a selected pod's interception is not in place |
//! | `VERSION` | the supported versions |
//!
//! Which pods: only those of the namespaces listed in the plugin's configuration
//! (`sidecar.namespaces`) are looked at; a pod of any other namespace never gets an error. Of
//! those, `select = "annotation"` (the default) takes the pods annotated
//! `sidecar.mesh.dev/interception: cni` (what `sidecar inject` writes for this mode), not opted
//! out with `sidecar.mesh.dev/inject: "false"`. The annotations come from the container runtime
//! itself: containerd (1.5+) and CRI-O (1.29+) pass them in `runtimeConfig` to a plugin that
//! declares the `io.kubernetes.cri.pod-annotations` capability, as `sidecar cni install` does. So
//! a pod's network set-up never waits on the API server, and the node needs no credentials to
//! read pods. The pod's init annotations (`exclude-inbound-ports`, `fail-mode-outbound`, ...) are
//! read with the injector's table and checks and become `sidecar init` flags, as they would on an
//! init container. `select = "namespace"` takes every pod of the served namespaces, for runtimes
//! that pass no annotations (in `annotation` mode such a runtime gets error 7 for served pods,
//! saying so).
//!
//! Errors are CNI error objects on stdout (`{"cniVersion","code","msg","details"}`) with a
//! non-zero exit: 4 (bad environment), 6 (stdin is not JSON), 7 (bad configuration), 1 (a
//! version not supported), 100 (interception failed or, for `CHECK`, missing), 101 (no cgroup
//! for the pod). A pod outside the served namespaces never gets an error.
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::intercept::{self, InitArgs};

pub mod install;

/// The configuration versions this plugin reads (and echoes in its results).
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0"];

/// The largest network configuration read from stdin.
const MAX_STDIN: u64 = 1 << 20;

/// A CNI error: its well-known code, the message and details.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// The `sidecar` section of the plugin's network configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Namespaces the plugin serves: pods of any other namespace are never looked at.
    #[serde(default)]
    namespaces: Vec<String>,
    /// Which pods of the served namespaces are intercepted.
    #[serde(default)]
    select: Select,
    /// The cgroup v2 mount where the kubelet's pod cgroups are.
    #[serde(default)]
    cgroup_root: Option<PathBuf>,
    /// `sidecar init --pin-root`.
    #[serde(default)]
    pin_root: Option<PathBuf>,
    /// More `sidecar init` flags for every pod (`["--exclude-inbound-ports", "15021"]`).
    #[serde(default)]
    init_args: Vec<String>,
}

/// `sidecar.select`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Select {
    /// The pods annotated `sidecar.mesh.dev/interception: cni` (what `sidecar inject` writes), read
    /// from the annotations the runtime passes (`runtimeConfig`, capability
    /// `io.kubernetes.cri.pod-annotations`).
    #[default]
    Annotation,
    /// Every pod of the served namespaces (for runtimes that pass no annotations).
    Namespace,
}

/// The CNI capability under which containerd (1.5 and later) and CRI-O (1.29 and later) pass a
/// pod's annotations in `runtimeConfig`, when the plugin's configuration declares it.
pub const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";

#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    #[serde(default)]
    sidecar: Settings,
    #[serde(rename = "runtimeConfig")]
    runtime_config: Option<Value>,
}

/// The CNI environment of one call.
#[derive(Debug, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: HashMap<String, String>,
}

impl CniEnv {
    /// From the process environment.
    pub fn from_process() -> CniEnv {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        let args = var("CNI_ARGS")
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args,
        }
    }
}

/// Runs one call as the runtime made it; what to print on stdout and the exit code.
pub fn main() -> ExitCode {
    // The runtime's own environment reaches its plugins (libcni passes it on): a `SIDECAR_*`
    // variable there must not become an init setting of every pod. Only the configuration and
    // the pod's annotations decide. (Single-threaded here: nothing else reads the environment.)
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SIDECAR_") {
            std::env::remove_var(key);
        }
    }
    let env = CniEnv::from_process();
    let mut stdin = String::new();
    let read = io::stdin().take(MAX_STDIN).read_to_string(&mut stdin);
    let started = Instant::now();
    let result = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => Err(CniError::new(
            5,
            "cannot read the network configuration",
            e.to_string(),
        )),
    };
    let version = requested_version(&stdin);
    let mut out = io::stdout();
    match result {
        Ok(printed) => {
            if let Some(printed) = printed {
                let _ = writeln!(out, "{printed}");
            }
            let _ = writeln!(
                io::stderr(),
                "sidecar-cni: {} {} done in {:.1} ms",
                env.command,
                env.container_id,
                started.elapsed().as_secs_f64() * 1000.0
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "{}",
                json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})
            );
            ExitCode::FAILURE
        }
    }
}

/// The `cniVersion` the caller gave (results and errors echo it), else 1.0.0.
fn requested_version(stdin: &str) -> String {
    serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "1.0.0".to_owned())
}

/// One call: `Ok(Some(json))` to print, `Ok(None)` for nothing (DEL, CHECK).
pub fn run(env: &CniEnv, stdin: &str) -> Result<Option<String>, CniError> {
    if env.command == "VERSION" {
        let version = requested_version(stdin);
        return Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        ));
    }
    let conf = parse_conf(stdin)?;
    let passthrough = || {
        let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
        if let Value::Object(map) = &mut result {
            map.insert("cniVersion".into(), Value::from(conf.cni_version.clone()));
        }
        result.to_string()
    };
    let served = match (
        env.args.get("K8S_POD_NAMESPACE"),
        env.args.get("K8S_POD_UID"),
    ) {
        (Some(ns), Some(uid)) if conf.sidecar.namespaces.iter().any(|n| n == ns) => {
            Some((ns.clone(), uid.clone()))
        }
        _ => None,
    };
    match env.command.as_str() {
        "ADD" => {
            if conf.prev_result.is_none() {
                return Err(CniError::new(
                    7,
                    "sidecar-cni is a chained plugin: it needs a prevResult",
                    "list it after the plugin that sets up the pod's interface in the conflist",
                ));
            }
            let Some((flags, uid)) = selected(&conf, env, served)? else {
                return Ok(Some(passthrough()));
            };
            if env.netns.is_empty() {
                return Err(CniError::new(4, "CNI_NETNS is not set", ""));
            }
            let root = cgroup_root(&conf.sidecar);
            // The node's init flags are checked first: a bad configuration says so for every
            // selected pod (`sidecar cni install` refuses to write one).
            init_args(&conf.sidecar, &root, &uid, None, &[], false, &[])?;
            let cgroup = find_pod_cgroup(&root, &uid).ok_or_else(|| {
                CniError::new(
                    101,
                    format!("no cgroup for pod {uid} under {}", root.display()),
                    "is sidecar.cgroup_root the kubelet's cgroup v2 mount?",
                )
            })?;
            let ips = pod_ips(conf.prev_result.as_ref());
            let args = init_args(
                &conf.sidecar,
                &cgroup,
                &uid,
                Some(&env.netns),
                &ips,
                false,
                &flags,
            )?;
            intercept::install(&args).map_err(|e| {
                CniError::new(
                    100,
                    format!("interception of pod {uid} failed"),
                    e.to_string(),
                )
            })?;
            Ok(Some(passthrough()))
        }
        "DEL" => {
            // Whatever the pod's annotations say now: a served pod's pins go (none is no error).
            let Some((_, uid)) = served else {
                return Ok(None);
            };
            let root = cgroup_root(&conf.sidecar);
            // The cgroup may be gone already: then the pins are removed by the pod id alone.
            let cgroup = find_pod_cgroup(&root, &uid).unwrap_or_else(|| root.join("gone"));
            let args = init_args(&conf.sidecar, &cgroup, &uid, None, &[], true, &[])?;
            intercept::remove(&args).map_err(|e| {
                CniError::new(
                    100,
                    format!("removing pod {uid}'s interception failed"),
                    e.to_string(),
                )
            })?;
            Ok(None)
        }
        "CHECK" => {
            let Some((_, uid)) = selected(&conf, env, served)? else {
                return Ok(None);
            };
            let pin_root = conf
                .sidecar
                .pin_root
                .clone()
                .unwrap_or_else(|| PathBuf::from(intercept::DEFAULT_PIN_ROOT));
            let dir = crate::pins::pod_dir(&pin_root, Some(&uid), 0);
            for prog in [
                sidecar_common::progs::CONNECT4,
                sidecar_common::progs::SOCKOPS,
            ] {
                let link = crate::pins::link(&dir, prog);
                if !link.exists() {
                    return Err(CniError::new(
                        100,
                        format!("pod {uid} is not intercepted"),
                        format!("{} is missing", link.display()),
                    ));
                }
            }
            Ok(None)
        }
        other => Err(CniError::new(
            4,
            format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"),
            "",
        )),
    }
}

/// The network configuration, checked: valid JSON, a supported version, a valid `sidecar`
/// section (unknown keys refused).
fn parse_conf(stdin: &str) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        let code = if e.is_data() { 7 } else { 6 };
        CniError::new(
            code,
            "the network configuration is not a valid sidecar-cni configuration",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            1,
            format!("cniVersion {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    Ok(conf)
}

/// Checks a `sidecar` section as ADD would (for the installer: a typo fails at install, not at
/// every pod start).
pub fn check_settings(settings: &Value) -> Result<(), CniError> {
    let conf =
        json!({"cniVersion": "1.0.0", "name": "check", "type": "sidecar-cni", "sidecar": settings});
    let conf = parse_conf(&conf.to_string())?;
    let root = cgroup_root(&conf.sidecar);
    init_args(&conf.sidecar, &root, "check", None, &[], false, &[]).map(|_| ())
}

/// Whether a served pod (namespace, UID) is intercepted, and with which per-pod `sidecar init`
/// flags: its annotations, read with the injector's table and checks.
#[allow(clippy::type_complexity)]
fn selected(
    conf: &NetConf,
    env: &CniEnv,
    served: Option<(String, String)>,
) -> Result<Option<(Vec<(String, String)>, String)>, CniError> {
    let Some((ns, uid)) = served else {
        return Ok(None);
    };
    let name = env.args.get("K8S_POD_NAME").cloned().unwrap_or_default();
    let annotations: Option<Vec<(String, String)>> = conf
        .runtime_config
        .as_ref()
        .and_then(|r| r.get(POD_ANNOTATIONS))
        .map(|a| {
            a.as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        });
    let pod = match &annotations {
        Some(a) => {
            crate::inject::pod::pod_interception(a.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|errors| {
                    CniError::new(
                        7,
                        format!("pod {ns}/{name}: its sidecar annotations are not valid"),
                        errors.join("; "),
                    )
                })?
        }
        None if conf.sidecar.select == Select::Annotation => {
            return Err(CniError::new(
                7,
                format!(
                    "pod {ns}/{name}: the runtime passed no pod annotations, so whether it is injected is unknown"
                ),
                format!(
                    "declare \"capabilities\": {{\"{POD_ANNOTATIONS}\": true}} on sidecar-cni in the conflist (sidecar cni install does) with containerd 1.5+ or CRI-O 1.29+, or set sidecar.select = \"namespace\" to intercept every pod of the served namespaces"
                ),
            ));
        }
        None => Default::default(),
    };
    let intercept = !pod.opted_out && (pod.cni || conf.sidecar.select == Select::Namespace);
    Ok(intercept.then_some((pod.init_flags, uid)))
}

fn cgroup_root(settings: &Settings) -> PathBuf {
    settings
        .cgroup_root
        .clone()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// The pod's addresses in a CNI result (`ips[].address`, without the prefix length).
fn pod_ips(prev: Option<&Value>) -> Vec<String> {
    prev.and_then(|p| p.get("ips"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .map(|a| a.split('/').next().unwrap_or(a).to_owned())
        .collect()
}

/// The cgroup of pod `uid` below `root`: the kubelet's naming under either driver, at most
/// four levels down (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`,
/// `kubepods/burstable/pod<uid>`).
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    fn walk(dir: &Path, uid: &str, depth: u32) -> Option<PathBuf> {
        let entries = std::fs::read_dir(dir).ok()?;
        let mut subdirs = Vec::new();
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.contains("pod") && intercept::pod_uid_of(&path).as_deref() == Some(uid) {
                return Some(path);
            }
            let qos = matches!(&*name, "burstable" | "besteffort" | "guaranteed");
            if name.starts_with("kubepods") || qos {
                subdirs.push(path);
            }
        }
        if depth >= 4 {
            return None;
        }
        subdirs.into_iter().find_map(|d| walk(&d, uid, depth + 1))
    }
    walk(root, uid, 0)
}

/// `sidecar init`'s arguments for the pod, parsed by its own parser (so every init flag and its
/// checks apply).
fn init_args(
    settings: &Settings,
    cgroup: &Path,
    uid: &str,
    netns: Option<&str>,
    ips: &[String],
    remove: bool,
    pod_flags: &[(String, String)],
) -> Result<InitArgs, CniError> {
    #[derive(Parser)]
    struct Init {
        #[command(flatten)]
        args: InitArgs,
    }
    let mut argv: Vec<String> = vec![
        "sidecar-cni init".into(),
        "--cgroup".into(),
        cgroup.display().to_string(),
        "--pod-id".into(),
        uid.to_owned(),
    ];
    if let Some(root) = &settings.pin_root {
        argv.extend(["--pin-root".into(), root.display().to_string()]);
    }
    if let Some(netns) = netns {
        argv.extend(["--netns".into(), netns.to_owned()]);
    }
    if !ips.is_empty() {
        argv.extend(["--pod-ip".into(), ips.join(",")]);
    }
    if remove {
        argv.push("--remove".into());
    }
    // The pod's annotation wins over the node's default for the same flag.
    let mut node = settings.init_args.iter();
    while let Some(arg) = node.next() {
        let flag = arg.split_once('=').map_or(arg.as_str(), |(f, _)| f);
        if pod_flags.iter().any(|(f, _)| f == flag) {
            if !arg.contains('=') {
                node.next();
            }
            continue;
        }
        argv.push(arg.clone());
    }
    let node_only = argv.clone();
    for (flag, value) in pod_flags {
        argv.extend([flag.clone(), value.clone()]);
    }
    Init::try_parse_from(&argv).map(|i| i.args).map_err(|e| {
        if Init::try_parse_from(node_only).is_ok() {
            CniError::new(
                7,
                "the pod's sidecar annotations are not valid `sidecar init` settings",
                e.to_string(),
            )
        } else {
            CniError::new(
                7,
                "sidecar.init_args are not valid `sidecar init` flags",
                e.to_string(),
            )
        }
    })
}

#[cfg(test)]
mod tests;
