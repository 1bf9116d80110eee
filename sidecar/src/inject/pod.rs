//! What `sidecar inject` adds to one pod template: the per-workload settings read from its
//! annotations, the privileged init container, the proxy as a native sidecar, the two host
//! volumes and the Prometheus scrape annotations.
//!
//! Size: just over 600 lines: the annotation table, the two containers and the volumes are what a
//! reviewer checks side by side against `deploy/`; its tests are in `pod/tests.rs`.
use super::yaml::Node;
use crate::intercept::Cidr;

/// Prefix of every annotation the injector reads.
pub const PREFIX: &str = "sidecar.mesh.dev/";

pub const INIT_CONTAINER: &str = "sidecar-init";
pub const PROXY_CONTAINER: &str = "sidecar-proxy";
pub const BPFFS_VOLUME: &str = "sidecar-bpffs";
pub const CGROUP_VOLUME: &str = "sidecar-cgroup";
/// The ConfigMap named by the `config-map` annotation, mounted as a directory (so that the
/// kubelet's updates reach the proxy: a `subPath` mount would never change).
pub const CONFIG_VOLUME: &str = "sidecar-config";
/// Where it is mounted in the proxy container...
pub const CONFIG_MOUNT: &str = "/etc/sidecar/config";
/// ...and the key of the ConfigMap the proxy reads (`SIDECAR_CONFIG`).
pub const CONFIG_KEY: &str = "policy.toml";
/// The workload identity for mesh mTLS (`identity` / `identity-secret` annotations), mounted
/// in the proxy container only, where `SIDECAR_IDENTITY_DIR` points.
pub const IDENTITY_VOLUME: &str = "sidecar-identity";
pub const IDENTITY_MOUNT: &str = "/var/run/secrets/sidecar.mesh.dev/identity";
/// cert-manager's csi-driver-spiffe: writes tls.crt, tls.key and ca.crt, renews them in place.
pub const CSI_SPIFFE_DRIVER: &str = "spiffe.csi.cert-manager.io";
/// Where the init container sees the node's cgroup2 hierarchy. Not /sys/fs/cgroup: the container
/// runtime mounts the container's own (namespaced) cgroup there. Deeper than /sys/fs/cgroup on
/// purpose: containerd orders mounts by depth, so this one comes after the container's own in
/// mountinfo, which `--cgroup auto` reads first to learn its own cgroup.
pub const HOST_CGROUP_MOUNT: &str = "/host/sys/fs/cgroup";
/// The node's pin root (`sidecar init --pin-root` default), relative to the bpffs volume.
pub const PIN_ROOT_SUBPATH: &str = "sidecar";
/// Where the proxy sees the node's pin root, read-only. Only the pin root is mounted, not the whole
/// bpffs: systemd (and Cilium's mount unit) mount /sys/fs/bpf with mode 0700, which UID 1337 cannot
/// search, while `sidecar init` makes the pin root and the pod directories 0755. Not under /sys: the
/// container's /sys is a read-only sysfs in which the runtime cannot create a mount point. Path
/// lookups go through the pin root each time, so a re-run of `sidecar init` (which swaps the pod's
/// directory) is seen at once.
pub const PROXY_PIN_ROOT_MOUNT: &str = "/host/sys/fs/bpf/sidecar";
/// The proxy's admin port (metrics, probes): `sidecar init`'s default, never captured inbound.
pub const ADMIN_PORT: i64 = 15090;
/// `sidecar init`'s default proxy UID/GID: connections from it are never redirected.
pub const PROXY_UID: i64 = 1337;

/// The proxy's default resources: the seed proxy's, which fit a busy service; the idle proxy
/// measures about 10 MiB resident. Override per workload with the proxy-* annotations.
pub const DEFAULT_PROXY_CPU_REQUEST: &str = "100m";
pub const DEFAULT_PROXY_MEMORY_REQUEST: &str = "128Mi";
pub const DEFAULT_PROXY_CPU_LIMIT: &str = "500m";
pub const DEFAULT_PROXY_MEMORY_LIMIT: &str = "512Mi";

/// Containers another mesh's injector adds; two meshes in one pod would fight over traffic.
const OTHER_MESH_CONTAINERS: [&str; 2] = ["istio-proxy", "linkerd-proxy"];

/// What a value of an annotation must look like.
#[derive(Clone, Copy)]
enum Kind {
    OnOff,
    Ports,
    Cidrs,
    FailMode,
    Quantity,
    Word,
    AppProbe,
    /// A Kubernetes object name (DNS subdomain: lower-case letters, digits, `-`, `.`).
    ObjectName,
    /// `csi-spiffe`.
    IdentitySource,
    /// `init` or `cni`.
    Interception,
}

/// One row of the annotation table: the annotation (after the prefix), the `SIDECAR_*` variable it
/// becomes on the init container (if any), and what its value must look like.
struct Annotation {
    name: &'static str,
    init_env: Option<&'static str>,
    kind: Kind,
}

/// Every annotation the injector understands, in the order their variables are written. Any other
/// `sidecar.mesh.dev/` annotation is a typo and is refused.
const ANNOTATIONS: &[Annotation] = &[
    Annotation {
        name: "inject",
        init_env: None,
        kind: Kind::OnOff,
    },
    Annotation {
        name: "interception",
        init_env: None,
        kind: Kind::Interception,
    },
    Annotation {
        name: "exclude-outbound-ports",
        init_env: Some("SIDECAR_EXCLUDE_OUTBOUND_PORTS"),
        kind: Kind::Ports,
    },
    Annotation {
        name: "include-outbound-ports",
        init_env: Some("SIDECAR_INCLUDE_OUTBOUND_PORTS"),
        kind: Kind::Ports,
    },
    Annotation {
        name: "exclude-outbound-cidrs",
        init_env: Some("SIDECAR_EXCLUDE_OUTBOUND_CIDRS"),
        kind: Kind::Cidrs,
    },
    Annotation {
        name: "include-outbound-cidrs",
        init_env: Some("SIDECAR_INCLUDE_OUTBOUND_CIDRS"),
        kind: Kind::Cidrs,
    },
    Annotation {
        name: "exclude-inbound-ports",
        init_env: Some("SIDECAR_EXCLUDE_INBOUND_PORTS"),
        kind: Kind::Ports,
    },
    Annotation {
        name: "include-inbound-ports",
        init_env: Some("SIDECAR_INCLUDE_INBOUND_PORTS"),
        kind: Kind::Ports,
    },
    Annotation {
        name: "fail-mode-outbound",
        init_env: Some("SIDECAR_FAIL_MODE_OUTBOUND"),
        kind: Kind::FailMode,
    },
    Annotation {
        name: "fail-mode-inbound",
        init_env: Some("SIDECAR_FAIL_MODE_INBOUND"),
        kind: Kind::FailMode,
    },
    Annotation {
        name: "msg-redirect",
        init_env: Some("SIDECAR_MSG_REDIRECT"),
        kind: Kind::OnOff,
    },
    Annotation {
        name: "proxy-cpu-request",
        init_env: None,
        kind: Kind::Quantity,
    },
    Annotation {
        name: "proxy-cpu-limit",
        init_env: None,
        kind: Kind::Quantity,
    },
    Annotation {
        name: "proxy-memory-request",
        init_env: None,
        kind: Kind::Quantity,
    },
    Annotation {
        name: "proxy-memory-limit",
        init_env: None,
        kind: Kind::Quantity,
    },
    Annotation {
        name: "image",
        init_env: None,
        kind: Kind::Word,
    },
    Annotation {
        name: "service-name",
        init_env: None,
        kind: Kind::Word,
    },
    Annotation {
        name: "proxy-log-level",
        init_env: None,
        kind: Kind::Word,
    },
    Annotation {
        name: "app-probe",
        init_env: None,
        kind: Kind::AppProbe,
    },
    Annotation {
        name: "config-map",
        init_env: None,
        kind: Kind::ObjectName,
    },
    Annotation {
        name: "identity",
        init_env: None,
        kind: Kind::IdentitySource,
    },
    Annotation {
        name: "identity-secret",
        init_env: None,
        kind: Kind::ObjectName,
    },
];

/// The names of all annotations, for documentation and error messages.
pub fn annotation_names() -> impl Iterator<Item = String> {
    ANNOTATIONS.iter().map(|a| format!("{PREFIX}{}", a.name))
}

/// The annotations that apply to one pod template: the template's own, then those of the
/// enclosing objects (the workload, a CronJob's job template), nearest first.
pub struct Annotations<'a> {
    maps: Vec<&'a Node>,
}

impl<'a> Annotations<'a> {
    pub fn new(maps: Vec<&'a Node>) -> Self {
        Annotations { maps }
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        let key = format!("{PREFIX}{name}");
        self.maps
            .iter()
            .find_map(|m| m.get(&key))
            .and_then(Node::as_str)
            .map(str::trim)
    }

    /// `Some(reason)` when the workload opted out.
    pub fn opted_out(&self) -> Option<String> {
        match self.get("inject") {
            Some(v) if matches!(v.to_ascii_lowercase().as_str(), "false" | "disabled") => {
                Some(format!("opted out ({PREFIX}inject: \"{v}\")"))
            }
            _ => None,
        }
    }
}

/// Where a pod's workload identity for mesh mTLS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// A csi-driver-spiffe volume (`sidecar.mesh.dev/identity: csi-spiffe`).
    CsiSpiffe,
    /// A TLS Secret with `ca.crt` (cert-manager's Certificate secrets have it).
    Secret(String),
}

/// Per-workload settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub image: String,
    pub service_name: String,
    /// `interception: cni`: the node's CNI plugin sets up the interception; no init container.
    pub cni: bool,
    pub init_env: Vec<(&'static str, String)>,
    pub proxy_log: Option<String>,
    /// `SIDECAR_APP_PROBE`: `/ready` also waits for the app.
    pub app_probe: Option<String>,
    /// The policy ConfigMap (`SIDECAR_CONFIG`, reloaded when the kubelet updates it).
    pub config_map: Option<String>,
    /// Where the workload identity comes from (`SIDECAR_IDENTITY_DIR`), if anywhere.
    pub identity: Option<IdentitySource>,
    /// The app containers' `httpGet` probe paths (`SIDECAR_PROBE_PATHS`): answered on strict
    /// mTLS ports and under default-deny authorization, so the kubelet's probes keep working.
    pub probe_paths: Vec<String>,
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
}

impl Settings {
    /// Reads and checks every annotation; all problems are returned at once.
    pub fn from_annotations(
        annotations: &Annotations<'_>,
        default_image: &str,
        default_service: &str,
    ) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        // Typos first: an annotation that does nothing is worse than an error.
        for map in &annotations.maps {
            if let Node::Map { entries, .. } = map {
                for (key, _) in entries {
                    let Some(name) = key.as_str().and_then(|k| k.strip_prefix(PREFIX)) else {
                        continue;
                    };
                    if !ANNOTATIONS.iter().any(|a| a.name == name) {
                        let closest =
                            crate::config_errors::nearest(ANNOTATIONS.iter().map(|a| a.name), name);
                        errors.push(match closest {
                            Some(known) => format!(
                                "unknown annotation {PREFIX}{name}: did you mean {PREFIX}{known}?"
                            ),
                            _ => format!(
                                "unknown annotation {PREFIX}{name}; known: {}",
                                ANNOTATIONS
                                    .iter()
                                    .map(|a| a.name)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    }
                }
            }
        }
        let mut init_env = Vec::new();
        let mut value_of = |name: &str| -> Option<String> {
            let spec = ANNOTATIONS.iter().find(|a| a.name == name)?;
            let value = annotations.get(name)?;
            match check(spec.kind, value) {
                Ok(()) => Some(value.to_owned()),
                Err(problem) => {
                    errors.push(format!("annotation {PREFIX}{name}: \"{value}\": {problem}"));
                    None
                }
            }
        };
        let _ = value_of("inject");
        let cni = value_of("interception").as_deref() == Some("cni");
        // Each annotation is read (and checked) once: the others are read below. With
        // `interception: cni` there is no init container: the node's sidecar-cni plugin applies
        // these from the annotations the runtime hands it (`pod_init_flags`).
        for spec in ANNOTATIONS {
            if let Some(env) = spec.init_env {
                if let Some(value) = value_of(spec.name) {
                    init_env.push((env, init_value(spec.kind, &value)));
                }
            }
        }
        let image = value_of("image").unwrap_or_else(|| default_image.to_owned());
        let service_name = value_of("service-name").unwrap_or_else(|| default_service.to_owned());
        let proxy_log = value_of("proxy-log-level");
        let app_probe = value_of("app-probe");
        let config_map = value_of("config-map");
        let identity_sources = (value_of("identity"), value_of("identity-secret"));
        let cpu_request = value_of("proxy-cpu-request");
        let cpu_limit = value_of("proxy-cpu-limit");
        let memory_request = value_of("proxy-memory-request");
        let memory_limit = value_of("proxy-memory-limit");
        let mut pair =
            |what: &str, request: Option<String>, limit: Option<String>, defaults: (&str, &str)| {
                let request_set = request.is_some();
                let limit_set = limit.is_some();
                let request = request.unwrap_or_else(|| defaults.0.to_owned());
                let limit = limit.unwrap_or_else(|| defaults.1.to_owned());
                if let (Some(r), Some(l)) = (quantity(&request), quantity(&limit)) {
                    if r > l {
                        errors.push(format!(
                            "proxy {what} request {request} is above its limit {limit}{}",
                            match (request_set, limit_set) {
                                (true, false) =>
                                    format!(" (the default): also set {PREFIX}proxy-{what}-limit"),
                                (false, true) => format!(
                                " (the request's default): also set {PREFIX}proxy-{what}-request"
                            ),
                                _ => String::new(),
                            }
                        ));
                    }
                }
                (request, limit)
            };
        let (cpu_request, cpu_limit) = pair(
            "cpu",
            cpu_request,
            cpu_limit,
            (DEFAULT_PROXY_CPU_REQUEST, DEFAULT_PROXY_CPU_LIMIT),
        );
        let (memory_request, memory_limit) = pair(
            "memory",
            memory_request,
            memory_limit,
            (DEFAULT_PROXY_MEMORY_REQUEST, DEFAULT_PROXY_MEMORY_LIMIT),
        );
        let identity = match identity_sources {
            (Some(_), Some(_)) => {
                errors.push(format!(
                    "annotations {PREFIX}identity and {PREFIX}identity-secret both set: choose one source of the workload identity"
                ));
                None
            }
            (Some(_), None) => Some(IdentitySource::CsiSpiffe),
            (None, Some(secret)) => Some(IdentitySource::Secret(secret)),
            (None, None) => None,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Settings {
            image,
            service_name,
            cni,
            init_env,
            proxy_log,
            app_probe,
            config_map,
            identity,
            probe_paths: Vec::new(),
            cpu_request,
            cpu_limit,
            memory_request,
            memory_limit,
        })
    }
}

/// What a pod's own annotations (as the container runtime passes them to a CNI plugin) say
/// about its interception.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInterception {
    /// `interception: cni`.
    pub cni: bool,
    /// `inject: "false"` (or `"disabled"`).
    pub opted_out: bool,
    /// `sidecar init` flags from the init annotations, in table order: `["--exclude-inbound-ports",
    /// "22"]`; checked as the injector checks them.
    pub init_flags: Vec<(String, String)>,
}

/// An init annotation's value as `sidecar init` takes it: on/off values as `true` / `false`
/// (`enabled` and `disabled` are the annotation's words too).
fn init_value(kind: Kind, value: &str) -> String {
    match kind {
        Kind::OnOff => match value.to_ascii_lowercase().as_str() {
            "true" | "enabled" => "true".into(),
            _ => "false".into(),
        },
        _ => value.to_owned(),
    }
}

/// Reads a pod's annotations for the CNI plugin, with the injector's table and checks (the same
/// annotations set the same flags in both install modes). Errors name the annotation.
pub fn pod_interception<'a>(
    annotations: impl Iterator<Item = (&'a str, &'a str)> + Clone,
) -> Result<PodInterception, Vec<String>> {
    let get = |name: &str| {
        let key = format!("{PREFIX}{name}");
        annotations
            .clone()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.trim())
    };
    let mut errors = Vec::new();
    let mut out = PodInterception::default();
    for spec in ANNOTATIONS {
        let Some(value) = get(spec.name) else {
            continue;
        };
        let matters = spec.init_env.is_some() || matches!(spec.name, "inject" | "interception");
        if !matters {
            continue;
        }
        if let Err(problem) = check(spec.kind, value) {
            errors.push(format!(
                "annotation {PREFIX}{}: \"{value}\": {problem}",
                spec.name
            ));
            continue;
        }
        match spec.name {
            "inject" => {
                out.opted_out = matches!(value.to_ascii_lowercase().as_str(), "false" | "disabled");
            }
            "interception" => out.cni = value == "cni",
            name => out
                .init_flags
                .push((format!("--{name}"), init_value(spec.kind, value))),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn check(kind: Kind, value: &str) -> Result<(), String> {
    let items = || value.split(',').map(str::trim).filter(|s| !s.is_empty());
    match kind {
        Kind::OnOff => match value.to_ascii_lowercase().as_str() {
            "true" | "false" | "enabled" | "disabled" => Ok(()),
            _ => Err("expected \"true\" or \"false\"".into()),
        },
        Kind::FailMode => match value {
            "open" | "closed" => Ok(()),
            _ => Err("expected \"open\" or \"closed\"".into()),
        },
        Kind::Ports => {
            if items().next().is_none() {
                return Err("empty; expected ports and ranges such as 22,9000-9010".into());
            }
            items().try_for_each(|item| {
                let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
                let ok = match item.split_once('-') {
                    Some((lo, hi)) => {
                        matches!((port(lo), port(hi)), (Some(lo), Some(hi)) if lo <= hi)
                    }
                    None => port(item).is_some(),
                };
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "{item:?} is not a port (1-65535) or a range such as 9000-9010"
                    ))
                }
            })
        }
        Kind::Cidrs => {
            if items().next().is_none() {
                return Err("empty; expected CIDRs such as 10.0.0.0/8,fd00::/8".into());
            }
            items().try_for_each(|item| Cidr::parse(item).map(|_| ()))
        }
        Kind::Quantity => match quantity(value) {
            Some(q) if q > 0.0 => Ok(()),
            _ => Err("expected a Kubernetes quantity such as 250m, 1, 64Mi or 1Gi".into()),
        },
        Kind::Word => {
            if value.is_empty() || value.chars().any(char::is_whitespace) {
                Err("expected one word without spaces".into())
            } else {
                Ok(())
            }
        }
        // What `sidecar run` would refuse with exit 64 (a crash-looping proxy) is refused here.
        Kind::AppProbe => crate::lifecycle::AppProbe::parse(value).map(|_| ()),
        Kind::Interception => match value {
            "init" | "cni" => Ok(()),
            _ => Err("expected \"init\" (a privileged init container in the pod) or \"cni\" (the node's sidecar-cni plugin sets it up)".into()),
        },
        Kind::IdentitySource => match value {
            "csi-spiffe" => Ok(()),
            _ => Err(format!(
                "expected \"csi-spiffe\" (cert-manager's csi-driver-spiffe); for a TLS Secret use {PREFIX}identity-secret"
            )),
        },
        Kind::ObjectName => {
            let ok = !value.is_empty()
                && value.len() <= 253
                && value.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && value.starts_with(|c: char| c.is_ascii_alphanumeric())
                && value.ends_with(|c: char| c.is_ascii_alphanumeric());
            if ok {
                Ok(())
            } else {
                Err("expected an object name (lower-case letters, digits, '-' and '.')".into())
            }
        }
    }
}

/// A Kubernetes resource quantity as a number (`250m` = 0.25, `1Ki` = 1024), for comparisons.
fn quantity(s: &str) -> Option<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.starts_with('-') {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// Why this pod cannot get the sidecar, if it cannot.
pub fn skip_reason(spec: &Node) -> Option<String> {
    if spec.get("hostNetwork").is_some_and(Node::is_true) {
        return Some(
            "hostNetwork: true (the pod shares the node's network namespace; capturing there would \
             steer the whole node's traffic)"
                .into(),
        );
    }
    let containers = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(k).and_then(Node::items))
        .flatten();
    for c in containers {
        if let Some(name) = c.get("name").and_then(Node::as_str) {
            if OTHER_MESH_CONTAINERS.contains(&name) {
                return Some(format!("already has {name} (another service mesh)"));
            }
        }
    }
    if spec
        .path(&["nodeSelector", "kubernetes.io/os"])
        .and_then(Node::as_str)
        == Some("windows")
    {
        return Some("a Windows pod (eBPF cgroup hooks are Linux only)".into());
    }
    None
}

/// App containers that would run as the proxy's uid or gid: the kernel hooks exempt both (as
/// Istio's iptables rules exempt `--uid-owner 1337` and `--gid-owner 1337`), so such a
/// container's traffic would silently never be captured. One problem per container.
pub fn proxy_identity_clashes(spec: &Node) -> Vec<String> {
    let id = |node: Option<&Node>, key: &str| {
        node.and_then(|n| n.get("securityContext"))
            .and_then(|c| c.get(key))
            .and_then(Node::as_str)
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let pod_uid = id(Some(spec), "runAsUser");
    let pod_gid = id(Some(spec), "runAsGroup");
    let mut problems = Vec::new();
    let containers = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec.get(k).and_then(Node::items))
        .flatten()
        .filter(|c| {
            let name = c.get("name").and_then(Node::as_str);
            name != Some(INIT_CONTAINER) && name != Some(PROXY_CONTAINER)
        });
    for c in containers {
        let name = c.get("name").and_then(Node::as_str).unwrap_or("?");
        let uid = id(Some(c), "runAsUser").or(pod_uid);
        let gid = id(Some(c), "runAsGroup").or(pod_gid);
        for (what, value, key) in [("uid", uid, "runAsUser"), ("gid", gid, "runAsGroup")] {
            if value == Some(PROXY_UID) {
                problems.push(format!(
                    "container {name} runs as {what} {PROXY_UID}, the proxy's: its traffic would never be captured; give it another {key}"
                ));
            }
        }
    }
    problems
}

fn env_value(name: &str, value: &str) -> Node {
    Node::map([("name", Node::str(name)), ("value", Node::str(value))])
}

fn env_field(name: &str, field: &str) -> Node {
    Node::map([
        ("name", Node::str(name)),
        (
            "valueFrom",
            Node::map([("fieldRef", Node::map([("fieldPath", Node::str(field))]))]),
        ),
    ])
}

fn resources(cpu_request: &str, memory_request: &str, cpu_limit: &str, memory_limit: &str) -> Node {
    Node::map([
        (
            "requests",
            Node::map([
                ("cpu", Node::str(cpu_request)),
                ("memory", Node::str(memory_request)),
            ]),
        ),
        (
            "limits",
            Node::map([
                ("cpu", Node::str(cpu_limit)),
                ("memory", Node::str(memory_limit)),
            ]),
        ),
    ])
}

fn strings(items: &[&str]) -> Node {
    Node::seq(items.iter().map(|s| Node::str(*s)))
}

fn http_probe(path: &str, period: i64, failures: i64) -> Node {
    Node::map([
        (
            "httpGet",
            Node::map([("path", Node::str(path)), ("port", Node::int(ADMIN_PORT))]),
        ),
        ("periodSeconds", Node::int(period)),
        ("failureThreshold", Node::int(failures)),
    ])
}

/// `sidecar init`: attaches the programs to this pod's cgroup and network namespace, then exits.
pub fn init_container(s: &Settings) -> Node {
    let mut env = vec![
        // The pin directory is named after the pod, so `sidecar status` and cleanup find it.
        env_field("SIDECAR_POD_ID", "metadata.uid"),
        // Comma-separated, both families on dual-stack clusters: never redirected.
        env_field("SIDECAR_POD_IPS", "status.podIPs"),
        // A pod IP equal to the node's means hostNetwork, which init refuses.
        env_field("SIDECAR_HOST_IP", "status.hostIP"),
    ];
    env.extend(
        s.init_env
            .iter()
            .map(|(name, value)| env_value(name, value)),
    );
    Node::map([
        ("name", Node::str(INIT_CONTAINER)),
        ("image", Node::str(&s.image)),
        (
            "args",
            strings(&["init", "--cgroup", "auto", "--netns", "/proc/self/ns/net"]),
        ),
        ("env", Node::seq(env)),
        // Loading and verifying takes a moment of CPU once; the maps' kernel memory is charged here.
        ("resources", resources("10m", "32Mi", "500m", "128Mi")),
        (
            "securityContext",
            Node::map([
                // bpf(2), pinning in the node's bpffs and opening the node's cgroup directories.
                ("runAsUser", Node::int(0)),
                ("runAsGroup", Node::int(0)),
                ("runAsNonRoot", Node::bool(false)),
                ("privileged", Node::bool(false)),
                ("readOnlyRootFilesystem", Node::bool(true)),
                (
                    "capabilities",
                    Node::map([
                        ("drop", strings(&["ALL"])),
                        ("add", strings(&["BPF", "NET_ADMIN", "SYS_ADMIN"])),
                    ]),
                ),
                // Container AppArmor profiles deny writes under /sys/fs/*, where the pins go.
                (
                    "appArmorProfile",
                    Node::map([("type", Node::str("Unconfined"))]),
                ),
            ]),
        ),
        (
            "volumeMounts",
            Node::seq([
                Node::map([
                    ("name", Node::str(BPFFS_VOLUME)),
                    ("mountPath", Node::str("/sys/fs/bpf")),
                ]),
                Node::map([
                    ("name", Node::str(CGROUP_VOLUME)),
                    ("mountPath", Node::str(HOST_CGROUP_MOUNT)),
                    ("readOnly", Node::bool(true)),
                ]),
            ]),
        ),
    ])
}

/// `sidecar run` as a native sidecar: started before the app (and before the app's own init
/// containers), stopped after it, so a Job still completes.
pub fn proxy_container(s: &Settings) -> Node {
    let mut env = vec![
        env_value("SIDECAR_SERVICE_NAME", &s.service_name),
        // The pin directory `sidecar init` made for this pod (its --pod-id is the pod UID).
        // Kubernetes expands $(POD_UID) because POD_UID is defined first.
        env_field("POD_UID", "metadata.uid"),
        env_value(
            "SIDECAR_PIN_DIR",
            &format!("{PROXY_PIN_ROOT_MOUNT}/$(POD_UID)"),
        ),
    ];
    if let Some(probe) = &s.app_probe {
        env.push(env_value("SIDECAR_APP_PROBE", probe));
    }
    if let Some(level) = &s.proxy_log {
        env.push(env_value("SIDECAR_LOG", level));
    }
    let mut mounts = vec![Node::map([
        ("name", Node::str(BPFFS_VOLUME)),
        ("mountPath", Node::str(PROXY_PIN_ROOT_MOUNT)),
        ("subPath", Node::str(PIN_ROOT_SUBPATH)),
        ("readOnly", Node::bool(true)),
    ])];
    if s.config_map.is_some() {
        env.push(env_value(
            "SIDECAR_CONFIG",
            &format!("{CONFIG_MOUNT}/{CONFIG_KEY}"),
        ));
        mounts.push(Node::map([
            ("name", Node::str(CONFIG_VOLUME)),
            ("mountPath", Node::str(CONFIG_MOUNT)),
            ("readOnly", Node::bool(true)),
        ]));
    }
    if !s.probe_paths.is_empty() {
        env.push(env_value("SIDECAR_PROBE_PATHS", &s.probe_paths.join(",")));
    }
    if s.identity.is_some() {
        env.push(env_value("SIDECAR_IDENTITY_DIR", IDENTITY_MOUNT));
        mounts.push(Node::map([
            ("name", Node::str(IDENTITY_VOLUME)),
            ("mountPath", Node::str(IDENTITY_MOUNT)),
            ("readOnly", Node::bool(true)),
        ]));
    }
    Node::map([
        ("name", Node::str(PROXY_CONTAINER)),
        ("image", Node::str(&s.image)),
        ("args", strings(&["run"])),
        ("restartPolicy", Node::str("Always")),
        ("env", Node::seq(env)),
        (
            "ports",
            Node::seq([Node::map([
                ("name", Node::str("sidecar-admin")),
                ("containerPort", Node::int(ADMIN_PORT)),
                ("protocol", Node::str("TCP")),
            ])]),
        ),
        (
            "resources",
            resources(
                &s.cpu_request,
                &s.memory_request,
                &s.cpu_limit,
                &s.memory_limit,
            ),
        ),
        // The app starts once this passes: its first connections find the proxy listening. /live,
        // not /ready: /ready may wait for the app (app-probe), which waits for this probe.
        ("startupProbe", http_probe("/live", 1, 30)),
        // Listeners, interception pins and (with app-probe) the app; 503 while draining. A native
        // sidecar's readiness counts in the pod's Ready condition.
        ("readinessProbe", http_probe("/ready", 5, 3)),
        ("livenessProbe", http_probe("/live", 10, 3)),
        (
            "securityContext",
            Node::map([
                // The UID (and GID) the kernel hooks never redirect.
                ("runAsUser", Node::int(PROXY_UID)),
                ("runAsGroup", Node::int(PROXY_UID)),
                ("runAsNonRoot", Node::bool(true)),
                ("privileged", Node::bool(false)),
                ("allowPrivilegeEscalation", Node::bool(false)),
                ("readOnlyRootFilesystem", Node::bool(true)),
                ("capabilities", Node::map([("drop", strings(&["ALL"]))])),
                (
                    "seccompProfile",
                    Node::map([("type", Node::str("RuntimeDefault"))]),
                ),
            ]),
        ),
        // Read-only: /ready stats the pod's link pins, /metrics reads the stats map (0444); the
        // policy ConfigMap, as a directory.
        ("volumeMounts", Node::seq(mounts)),
    ])
}

/// The `httpGet` paths of the app containers' probes (startup, readiness, liveness), without
/// their queries, each once; ours are left out.
pub fn probe_paths(spec: &Node) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    let containers = spec.get("containers").and_then(Node::items).unwrap_or(&[]);
    for c in containers {
        let name = c.get("name").and_then(Node::as_str);
        if name == Some(PROXY_CONTAINER) || name == Some(INIT_CONTAINER) {
            continue;
        }
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let Some(path) = c.path(&[probe, "httpGet", "path"]).and_then(Node::as_str) else {
                continue;
            };
            let path = path.split('?').next().unwrap_or_default();
            // A path with '*', ',' or spaces is not written (the proxy would read it otherwise).
            let plain = path.starts_with('/')
                && !path.bytes().any(|b| {
                    b == b'*' || b == b',' || b.is_ascii_whitespace() || b.is_ascii_control()
                });
            if plain && !paths.iter().any(|p| p == path) {
                paths.push(path.to_owned());
            }
        }
    }
    paths
}

/// The pod's volumes for the sidecar; `Err` names one to remove (an earlier injection's).
pub fn volumes(s: &Settings) -> Vec<Result<Node, &'static str>> {
    let host_dir = |name: &str, path: &str| {
        Node::map([
            ("name", Node::str(name)),
            (
                "hostPath",
                Node::map([("path", Node::str(path)), ("type", Node::str("Directory"))]),
            ),
        ])
    };
    let config = match &s.config_map {
        Some(name) => Ok(Node::map([
            ("name", Node::str(CONFIG_VOLUME)),
            ("configMap", Node::map([("name", Node::str(name))])),
        ])),
        None => Err(CONFIG_VOLUME),
    };
    let identity = match &s.identity {
        // The files belong to the proxy's group; the driver renews them in place.
        Some(IdentitySource::CsiSpiffe) => Ok(Node::map([
            ("name", Node::str(IDENTITY_VOLUME)),
            (
                "csi",
                Node::map([
                    ("driver", Node::str(CSI_SPIFFE_DRIVER)),
                    ("readOnly", Node::bool(true)),
                    (
                        "volumeAttributes",
                        Node::map([(
                            "csi.cert-manager.io/fs-group",
                            Node::str(PROXY_UID.to_string()),
                        )]),
                    ),
                ]),
            ),
        ])),
        // Readable by the proxy's UID without an fsGroup; only the proxy container mounts it.
        Some(IdentitySource::Secret(name)) => Ok(Node::map([
            ("name", Node::str(IDENTITY_VOLUME)),
            (
                "secret",
                Node::map([
                    ("secretName", Node::str(name)),
                    ("defaultMode", Node::int(0o444)),
                ]),
            ),
        ])),
        None => Err(IDENTITY_VOLUME),
    };
    // The proxy reads the pin root (readiness); only the init container needs the cgroup tree.
    let cgroup = if s.cni {
        Err(CGROUP_VOLUME)
    } else {
        Ok(host_dir(CGROUP_VOLUME, "/sys/fs/cgroup"))
    };
    vec![
        Ok(host_dir(BPFFS_VOLUME, "/sys/fs/bpf")),
        cgroup,
        config,
        identity,
    ]
}

/// Pod annotations for Prometheus' kubernetes-pods scrape config.
pub const SCRAPE_ANNOTATIONS: [(&str, &str); 3] = [
    ("prometheus.io/scrape", "true"),
    ("prometheus.io/port", "15090"),
    ("prometheus.io/path", "/metrics"),
];

#[cfg(test)]
mod tests;
