//! `sidecar init` flags, and their validation into an [`InitConfig`] (every bad key reported at once).
use std::{fmt, net::IpAddr, path::PathBuf};

use clap::{Args, ValueEnum};

/// What happens to a connection when the proxy is not listening.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Connections go straight to their destination, unproxied.
    Open,
    /// Connections are refused (iptables parity: the default).
    #[default]
    Closed,
}

impl fmt::Display for FailMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

/// Default pin root: one directory per pod below it, never the bpffs root itself.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sidecar";
/// Istio's proxy UID/GID: the proxy's own connections are never redirected.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Istio's outbound capture port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound capture port.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// The admin port (metrics/health); never captured inbound.
pub const DEFAULT_ADMIN_PORT: u16 = 15090;
/// Original-destination map size: connections in flight between connect() and the proxy's accept
/// plus established ones (for getpeername). 64Ki entries cost about 6 MiB of kernel memory.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65536;

#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    /// The pod's cgroup v2 directory (e.g. /sys/fs/cgroup/kubepods.slice/.../pod<uid>), or "auto":
    /// the parent of the cgroup this process runs in (the init container's pod).
    #[arg(long, env = "SIDECAR_CGROUP")]
    pub cgroup: PathBuf,

    /// Detach and unpin this pod's programs instead of installing them.
    #[arg(long)]
    pub remove: bool,

    /// Name of the pod's pin directory (default: "cg<inode of the cgroup directory>").
    #[arg(long, env = "SIDECAR_POD_ID")]
    pub pod_id: Option<String>,

    /// bpffs directory that holds one pin directory per pod.
    #[arg(long, env = "SIDECAR_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,

    /// UID whose connections are never redirected (the proxy's).
    #[arg(long, env = "SIDECAR_PROXY_UID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,

    /// GID whose connections are never redirected; "none" disables the GID exclusion.
    #[arg(long, env = "SIDECAR_PROXY_GID", default_value = "1337")]
    pub proxy_gid: String,

    /// Port of the proxy's outbound listener on loopback.
    #[arg(long, env = "SIDECAR_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// The pod's own IP addresses (comma list, repeatable): traffic to them is never redirected.
    #[arg(long, env = "SIDECAR_POD_IPS", value_delimiter = ',')]
    pub pod_ip: Vec<String>,

    /// Destination ports never redirected (comma list of ports and ranges, e.g. 22,9000-9010).
    #[arg(long, env = "SIDECAR_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<String>,

    /// If set, only these destination ports are redirected.
    #[arg(long, env = "SIDECAR_INCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub include_outbound_ports: Vec<String>,

    /// Destination CIDRs never redirected (comma list, IPv4 and IPv6).
    #[arg(long, env = "SIDECAR_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,

    /// If set, only destinations inside these CIDRs are redirected.
    #[arg(long, env = "SIDECAR_INCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub include_outbound_cidrs: Vec<String>,

    /// The pod's network namespace (e.g. /proc/<pid>/ns/net or /run/netns/<name>): attaches the
    /// inbound sk_lookup program there. Without it, inbound traffic is not captured.
    #[arg(long, env = "SIDECAR_NETNS")]
    pub netns: Option<PathBuf>,

    /// Port of the proxy's inbound listener.
    #[arg(long, env = "SIDECAR_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,

    /// The proxy's admin port (never captured).
    #[arg(long, env = "SIDECAR_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT)]
    pub admin_port: u16,

    /// Inbound ports never captured (e.g. kubelet probe ports), comma list of ports and ranges.
    #[arg(long, env = "SIDECAR_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<String>,

    /// If set, only these inbound ports are captured.
    #[arg(long, env = "SIDECAR_INCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub include_inbound_ports: Vec<String>,

    /// Outbound connections when the proxy is not listening: open = go direct, closed = refused.
    #[arg(long, env = "SIDECAR_FAIL_MODE_OUTBOUND", value_enum, default_value_t = FailMode::Closed)]
    pub fail_mode_outbound: FailMode,

    /// Inbound connections when the proxy is not listening: open = to the app, closed = refused.
    #[arg(long, env = "SIDECAR_FAIL_MODE_INBOUND", value_enum, default_value_t = FailMode::Closed)]
    pub fail_mode_inbound: FailMode,

    /// The node's IP (downward API status.hostIP): a pod IP equal to it means hostNetwork, which
    /// is refused.
    #[arg(long, env = "SIDECAR_HOST_IP")]
    pub host_ip: Option<String>,

    /// Size of the original-destination maps (connections tracked at once).
    #[arg(long, env = "SIDECAR_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: u32,

    /// Emit kernel-side debug records through aya-log (costs on every connect; read them with
    /// `sidecar trace`).
    #[arg(long, env = "SIDECAR_DEBUG_LOG")]
    pub debug_log: bool,

    /// Move the in-pod leg of outbound connections (app <-> proxy) socket to socket with an
    /// sk_msg program instead of through loopback TCP, bounded by the receiver's buffer; only
    /// non-blocking app sockets take part (needs kernel >= 6.10 with BTF; `sidecar doctor`
    /// checks the node). `--msg-redirect`, or `--msg-redirect true|false`.
    #[arg(
        long,
        env = "SIDECAR_MSG_REDIRECT",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub msg_redirect: bool,
}

pub use crate::net::Cidr;

/// A 65536-bit port set, in the layout of the kernel bitmaps.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(pub Vec<u64>);

impl Default for PortSet {
    fn default() -> Self {
        PortSet(vec![0; 1024])
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.ports()).finish()
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port / 64)] |= 1 << (port % 64);
    }
    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port / 64)] >> (port % 64) & 1 == 1
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=u16::MAX).filter(|p| self.contains(*p))
    }

    /// Parses "22", "9000-9010" items.
    fn add_item(&mut self, item: &str) -> Result<(), String> {
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    format!("{item:?}: ports are 1..=65535, ranges written as 9000-9010")
                })
        };
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (parse(lo)?, parse(hi)?),
            None => {
                let p = parse(item)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("{item:?}: range is backwards"));
        }
        for p in lo..=hi {
            self.insert(p);
        }
        Ok(())
    }
}

/// What `sidecar init` installs, validated.
#[derive(Debug, Clone)]
pub struct InitConfig {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub pod_ips: Vec<IpAddr>,
    pub exclude_ports: PortSet,
    pub include_ports: Option<PortSet>,
    pub exclude_cidrs: Vec<Cidr>,
    pub include_cidrs: Option<Vec<Cidr>>,
    pub max_connections: u32,
    pub debug_log: bool,
    pub msg_redirect: bool,
    pub netns: Option<PathBuf>,
    pub inbound_port: u16,
    pub admin_port: u16,
    pub exclude_inbound_ports: PortSet,
    pub include_inbound_ports: Option<PortSet>,
    pub fail_mode_outbound: FailMode,
    pub fail_mode_inbound: FailMode,
}

pub use crate::config_errors::{ConfigError, ConfigErrors};

/// Collects bad keys in the report format every subcommand shares.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn bad(&mut self, key: &str, value: impl ToString, problem: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.to_owned().into(),
            value: value.to_string(),
            problem: problem.into(),
        });
    }
}

fn nonempty(items: &[String]) -> impl Iterator<Item = &str> {
    items.iter().map(|s| s.trim()).filter(|s| !s.is_empty())
}

impl InitConfig {
    pub fn from_args(args: &InitArgs) -> Result<Self, ConfigErrors> {
        let mut errors = Problems::default();
        let proxy_gid = match args.proxy_gid.trim() {
            "none" => None,
            s => match s.parse() {
                Ok(g) => Some(g),
                Err(_) => {
                    errors.bad("--proxy-gid", s, "expected a number or \"none\"");
                    None
                }
            },
        };
        for (flag, port) in [
            ("outbound-port", args.outbound_port),
            ("inbound-port", args.inbound_port),
            ("admin-port", args.admin_port),
        ] {
            if port == 0 {
                errors.bad(&format!("--{flag}"), port, "must be 1..=65535");
            }
        }
        if args.inbound_port == args.outbound_port {
            errors.bad(
                "--inbound-port",
                args.inbound_port,
                "the same as --outbound-port: the proxy needs two listeners",
            );
        }
        let mut pod_ips = Vec::new();
        for s in nonempty(&args.pod_ip) {
            match s.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() || ip.is_loopback() => {
                    errors.bad("--pod-ip", s, "must be the pod's own routable address");
                }
                Ok(ip) => pod_ips.push(ip),
                Err(_) => errors.bad("--pod-ip", s, "not an IP address"),
            }
        }
        if let Some(host) = args
            .host_ip
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match host.parse::<IpAddr>() {
                Ok(h) if pod_ips.contains(&h) => errors.bad(
                    "--pod-ip",
                    h,
                    "is the node's own address (--host-ip): this is a hostNetwork pod, which the sidecar cannot intercept without capturing the whole node; remove the injection or set hostNetwork: false",
                ),
                Ok(_) => {}
                Err(_) => errors.bad("--host-ip", host, "not an IP address"),
            }
        }
        if args.netns.is_some() && pod_ips.is_empty() {
            errors.bad(
                "--netns",
                args.netns
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display(),
                "needs --pod-ip: inbound capture matches the pod's own addresses",
            );
        }
        if pod_ips.len() > 16 {
            errors.bad(
                "--pod-ip",
                format!("{} addresses", pod_ips.len()),
                "at most 16 addresses",
            );
        }
        let mut ports = |flag: &str, items: &[String]| {
            let mut set = PortSet::default();
            for s in nonempty(items) {
                if let Err(e) = set.add_item(s) {
                    errors.bad(&format!("--{flag}"), s, e);
                }
            }
            set
        };
        let exclude_ports = ports("exclude-outbound-ports", &args.exclude_outbound_ports);
        let include = ports("include-outbound-ports", &args.include_outbound_ports);
        let include_ports = (!include.is_empty()).then_some(include);
        let exclude_inbound_ports = ports("exclude-inbound-ports", &args.exclude_inbound_ports);
        let include = ports("include-inbound-ports", &args.include_inbound_ports);
        let include_inbound_ports = (!include.is_empty()).then_some(include);
        let mut cidrs = |flag: &str, items: &[String]| {
            let mut out = Vec::new();
            for s in nonempty(items) {
                match Cidr::parse(s) {
                    Ok(c) => out.push(c),
                    Err(e) => errors.bad(&format!("--{flag}"), s, e),
                }
            }
            out
        };
        let exclude_cidrs = cidrs("exclude-outbound-cidrs", &args.exclude_outbound_cidrs);
        let include = cidrs("include-outbound-cidrs", &args.include_outbound_cidrs);
        let include_cidrs = (!include.is_empty()).then_some(include);
        if args.max_connections < 1024 {
            errors.bad(
                "--max-connections",
                args.max_connections,
                "at least 1024 (each entry costs about 100 bytes of kernel memory)",
            );
        }
        if let Some(id) = &args.pod_id {
            if id.is_empty()
                || id.len() > 128
                || id.starts_with('_')
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                errors.bad(
                    "--pod-id",
                    id,
                    "use 1..128 characters of [A-Za-z0-9_-], not starting with '_' (bpffs refuses '.'; a Kubernetes pod UID fits)",
                );
            }
        }
        if !errors.0.is_empty() {
            return Err(ConfigErrors {
                command: "init",
                errors: errors.0,
            });
        }
        Ok(InitConfig {
            proxy_uid: args.proxy_uid,
            proxy_gid,
            outbound_port: args.outbound_port,
            pod_ips,
            exclude_ports,
            include_ports,
            exclude_cidrs,
            include_cidrs,
            max_connections: args.max_connections,
            debug_log: args.debug_log,
            msg_redirect: args.msg_redirect,
            netns: args.netns.clone(),
            inbound_port: args.inbound_port,
            admin_port: args.admin_port,
            exclude_inbound_ports,
            include_inbound_ports,
            fail_mode_outbound: args.fail_mode_outbound,
            fail_mode_inbound: args.fail_mode_inbound,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn parse(args: &[&str]) -> Result<InitConfig, ConfigErrors> {
        let mut argv = vec!["sidecar", "--cgroup", "/x"];
        argv.extend_from_slice(args);
        InitConfig::from_args(&Cli::parse_from(argv).init)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.proxy_uid, 1337);
        assert_eq!(c.proxy_gid, Some(1337));
        assert_eq!(c.outbound_port, 15001);
        assert!(c.exclude_ports.is_empty());
        assert!(c.include_ports.is_none() && c.include_cidrs.is_none());
    }

    #[test]
    fn msg_redirect_alone_or_with_a_value() {
        assert!(!parse(&[]).unwrap().msg_redirect);
        assert!(parse(&["--msg-redirect"]).unwrap().msg_redirect);
        assert!(parse(&["--msg-redirect", "true"]).unwrap().msg_redirect);
        assert!(!parse(&["--msg-redirect", "false"]).unwrap().msg_redirect);
        // Followed by another flag, it takes no value.
        let c = parse(&["--msg-redirect", "--outbound-port", "15009"]).unwrap();
        assert!(c.msg_redirect && c.outbound_port == 15009);
        let argv = ["sidecar", "--cgroup", "/x", "--msg-redirect", "sideways"];
        assert!(Cli::try_parse_from(argv).is_err(), "not a bool");
    }

    #[test]
    fn ports_and_ranges() {
        let c = parse(&[
            "--exclude-outbound-ports",
            "22,9000-9002",
            "--include-outbound-ports",
            "80",
        ])
        .unwrap();
        assert_eq!(
            c.exclude_ports.ports().collect::<Vec<_>>(),
            vec![22, 9000, 9001, 9002]
        );
        assert!(c.include_ports.unwrap().contains(80));
    }

    #[test]
    fn cidrs_are_masked_and_v4_mapped() {
        let c = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(c.len, 104);
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let c = Cidr::parse("fd00::1/8").unwrap();
        assert_eq!(c.to_string(), "fd00::/8");
        assert_eq!(Cidr::parse("10.0.0.4").unwrap().to_string(), "10.0.0.4/32");
    }

    #[test]
    fn every_bad_key_is_reported() {
        let e = parse(&[
            "--pod-ip",
            "nope",
            "--exclude-outbound-ports",
            "70000",
            "--include-outbound-cidrs",
            "10.0.0.0/40",
            "--proxy-gid",
            "x",
            "--pod-id",
            "../etc",
        ])
        .unwrap_err();
        let text = e.to_string();
        assert_eq!(e.errors.len(), 5, "{text}");
        for key in [
            "--pod-ip",
            "--exclude-outbound-ports",
            "--include-outbound-cidrs",
            "--proxy-gid",
            "--pod-id",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }
}
