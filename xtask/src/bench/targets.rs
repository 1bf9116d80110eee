//! The things being compared, their generated configurations, and how each is started and
//! addressed. Every proxy gets one worker thread, adds one request header (`X-Forwarded-By`,
//! what the sidecar adds), keeps upstream connections alive in a pool, and logs no access lines.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::lab::{
    self, Lab, Net, Place, Proc, IPT_UPSTREAM_IP, OUTBOUND_PORT, UPSTREAM_IP, UPSTREAM_PORT,
};
use super::load::{self, Tools};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Direct,
    SidecarEbpf,
    /// `SidecarEbpf` in a pod initialised with `--msg-redirect`: the app's leg to the proxy goes
    /// socket to socket (sk_msg) instead of through loopback TCP.
    SidecarEbpfMsg,
    SidecarIptables,
    SidecarAddressed,
    Nginx,
    Haproxy,
    Envoy,
    /// Two sidecars, mesh mTLS between them: the app's sidecar (eBPF capture) and the server's
    /// (sk_lookup inbound capture in front of the upstream).
    SidecarMtls,
    /// Two Envoys with static TLS contexts (mutual TLS 1.3) between them.
    EnvoyMtls,
    /// `SidecarMtls` with 50 authorization rules on the server side (the matching one last).
    SidecarMtlsAuthz,
    /// The server's sidecar alone (sk_lookup inbound capture in front of the upstream), plain
    /// HTTP/1.1: the baseline of `SidecarTranscode`.
    SidecarInbound,
    /// The server's sidecar alone, transcoding `GET /v1/orders/42` to a unary gRPC call
    /// (nginx answering a fixed gRPC message over h2c, with `grpc-status` trailers).
    SidecarTranscode,
}

impl Target {
    pub const ALL: [Target; 13] = [
        Target::Direct,
        Target::SidecarEbpf,
        Target::SidecarEbpfMsg,
        Target::SidecarIptables,
        Target::SidecarAddressed,
        Target::Nginx,
        Target::Haproxy,
        Target::Envoy,
        Target::SidecarMtls,
        Target::EnvoyMtls,
        Target::SidecarMtlsAuthz,
        Target::SidecarInbound,
        Target::SidecarTranscode,
    ];

    /// The load generator talks to a sidecar of its own network namespace (run as the proxy
    /// user, whom both capture mechanisms exempt): one that parks idle client connections
    /// (`--park-idle-after`) and answers on its admin port there.
    pub fn sidecar_in_front(self) -> bool {
        matches!(
            self,
            Target::SidecarEbpf
                | Target::SidecarEbpfMsg
                | Target::SidecarIptables
                | Target::SidecarAddressed
                | Target::SidecarMtls
                | Target::SidecarMtlsAuthz
        )
    }

    pub fn key(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::SidecarEbpf => "sidecar-ebpf",
            Target::SidecarEbpfMsg => "sidecar-ebpf-msg",
            Target::SidecarIptables => "sidecar-iptables",
            Target::SidecarAddressed => "sidecar",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
            Target::Envoy => "envoy",
            Target::SidecarMtls => "sidecar-mtls",
            Target::EnvoyMtls => "envoy-mtls",
            Target::SidecarMtlsAuthz => "sidecar-mtls-authz50",
            Target::SidecarInbound => "sidecar-inbound",
            Target::SidecarTranscode => "sidecar-transcode",
        }
    }

    pub fn from_key(key: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.key() == key)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Target::Direct => "load generator straight to the upstream (the baseline)",
            Target::SidecarEbpf => {
                "sidecar in interception mode, app connections captured by the eBPF programs"
            }
            Target::SidecarEbpfMsg => {
                "sidecar-ebpf in a pod initialised with --msg-redirect: the app's leg to the \
                 proxy socket to socket (sk_msg), not through loopback TCP"
            }
            Target::SidecarIptables => {
                "sidecar in interception mode behind iptables REDIRECT (nat OUTPUT, owner match) \
                 in a namespace of its own"
            }
            Target::SidecarAddressed => {
                "sidecar as a reverse proxy (`--target`), addressed directly, no interception"
            }
            Target::Nginx => "nginx reverse proxy, 1 worker, upstream keepalive pool",
            Target::Haproxy => "HAProxy reverse proxy, nbthread 1",
            Target::Envoy => "Envoy reverse proxy, --concurrency 1",
            Target::SidecarMtls => {
                "two sidecars, mutual TLS 1.3 between them (the app's, eBPF capture; the \
                 server's, sk_lookup inbound capture); CPU of both"
            }
            Target::EnvoyMtls => {
                "two Envoys, mutual TLS 1.3 with static TLS contexts; --concurrency 1 each, CPU \
                 of both"
            }
            Target::SidecarMtlsAuthz => {
                "sidecar-mtls with 50 inbound authorization rules on the server (default deny; \
                 the rule that allows is the last one evaluated)"
            }
            Target::SidecarInbound => {
                "the server's sidecar alone (sk_lookup inbound capture in front of the \
                 upstream), plain HTTP/1.1; CPU of that sidecar"
            }
            Target::SidecarTranscode => {
                "the server's sidecar alone, REST GET /v1/orders/42 transcoded to a unary gRPC \
                 call (the upstream nginx answers a fixed message over h2c with grpc-status \
                 trailers); CPU of that sidecar"
            }
        }
    }

    /// A target whose only proxy is the server's sidecar (the load calls the upstream's
    /// address from outside the pod).
    fn server_only(self) -> bool {
        matches!(self, Target::SidecarInbound | Target::SidecarTranscode)
    }

    pub fn is_proxy(self) -> bool {
        self != Target::Direct
    }

    /// A target whose proxies are all sidecars (the PGO training runs these).
    pub fn is_sidecar(self) -> bool {
        !matches!(
            self,
            Target::Direct | Target::Nginx | Target::Haproxy | Target::Envoy | Target::EnvoyMtls
        )
    }

    /// Listening port of a reverse-proxy target in the pod namespace.
    fn port(self) -> u16 {
        match self {
            Target::SidecarAddressed => 15101,
            Target::Nginx => 15102,
            Target::Haproxy => 15103,
            Target::Envoy => 15104,
            Target::EnvoyMtls => 15105,
            Target::Direct
            | Target::SidecarEbpf
            | Target::SidecarEbpfMsg
            | Target::SidecarIptables
            | Target::SidecarMtls
            | Target::SidecarMtlsAuthz
            | Target::SidecarInbound
            | Target::SidecarTranscode => OUTBOUND_PORT,
        }
    }
}

/// Paths of everything that gets started.
pub struct Programs {
    pub sidecar: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    pub envoy: PathBuf,
}

/// The lab's fixed cgroups.
pub struct Cgroups {
    /// Load generators of every target but the eBPF one.
    pub load: PathBuf,
    /// The eBPF pod: programs attached here; `app` and proxy leaves below it.
    pub pod: PathBuf,
    pub pod_app: PathBuf,
    /// A second pod, initialised with `--msg-redirect` (`sidecar-ebpf-msg`).
    pub msg_pod: PathBuf,
    pub msg_pod_app: PathBuf,
}

/// A target that is up and answering.
pub struct Live {
    pub target: Target,
    pub proc: Option<Proc>,
    /// The proxy's own cgroup (CPU and RSS are read from its processes).
    pub proxy_cgroup: Option<PathBuf>,
    /// Where the load generator runs and what it requests.
    pub load: Place,
    pub url: String,
    /// The server side of a two-proxy target, in its own cgroup (its CPU counts too).
    pub peer: Option<(Proc, PathBuf)>,
    /// The cgroup `sidecar init` attached to for the server side (removed again on stop).
    pub ebpf_upstream: Option<PathBuf>,
}

impl Live {
    /// True if a proxy is measured (not the `direct` baseline).
    pub fn is_proxy(&self) -> bool {
        !self.proxy_cgroups().is_empty()
    }

    /// Every cgroup whose processes are the proxy (one, or two for the mTLS pairs).
    pub fn proxy_cgroups(&self) -> Vec<&Path> {
        self.proxy_cgroup
            .iter()
            .map(PathBuf::as_path)
            .chain(self.peer.as_ref().map(|(_, cg)| cg.as_path()))
            .collect()
    }
}

/// The port the server-side Envoy of `envoy-mtls` listens on (in the upstream's namespace).
const ENVOY_MTLS_SERVER_PORT: u16 = 15443;
/// The upstream nginx's gRPC (h2c) port, for `sidecar-transcode`.
const GRPC_PORT: u16 = 15051;

/// A framed `shop.v1.Order {id: 42, item: "widget", quantity: 3, status: PENDING}`.
fn grpc_order() -> Vec<u8> {
    let mut msg = vec![0x08, 42, 0x12, 6];
    msg.extend_from_slice(b"widget");
    msg.extend_from_slice(&[0x18, 3, 0x20, 1]);
    let mut framed = vec![0];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed
}

/// The trust domain of the bench's mesh.
const TRUST_DOMAIN: &str = "bench.test";

/// Starts the upstream: nginx, 1 worker, a fixed 3-byte answer that echoes `X-Forwarded-By` back
/// as `X-Seen-Forwarded-By` (how the check proves a request went through a proxy).
pub fn start_upstream(lab: &mut Lab, nginx: &Path) -> Result<Proc> {
    let cgroup = lab.cgroup("upstream")?;
    let dir = lab.dir.join("upstream-nginx");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    fs::write(dir.join("order.bin"), grpc_order())?;
    let d = dir.display();
    let conf = nginx_conf(
        &dir,
        &format!(
            "server {{
        listen {UPSTREAM_PORT} backlog=4096;
        location / {{
            default_type text/plain;
            add_header X-Seen-Forwarded-By $http_x_forwarded_by always;
            return 200 \"ok\\n\";
        }}
    }}
    # A gRPC server of one answer: every call gets order.bin (a framed shop.v1.Order) and
    # grpc-status 0 in the trailers. nginx's static module refuses POST, so the 405 becomes
    # an internal GET of the file.
    server {{
        listen {GRPC_PORT} http2 backlog=4096;
        location / {{
            error_page 405 =200 /order.bin;
            return 405;
        }}
        location = /order.bin {{
            internal;
            root {d};
            default_type application/grpc;
            add_trailer grpc-status 0 always;
        }}
    }}"
        ),
    )?;
    let place = Place {
        net: Net::Up,
        cgroup: cgroup.clone(),
        cpu: lab.cpus.upstream,
        proxy_user: false,
    };
    let mut cmd = lab.command(&place, nginx);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut proc = lab.spawn("upstream nginx", &cgroup, cmd, None)?;
    let pid = proc.pid();
    let ok = lab::poll(READY_TIMEOUT, || {
        proc.exited().is_none() && listening(pid, UPSTREAM_PORT)
    });
    if !ok {
        bail!(
            "the upstream nginx did not listen on :{UPSTREAM_PORT} ({}):\n{}\n{}",
            proc.exited().unwrap_or_else(|| "still running".into()),
            proc.log_tail(),
            lab::tail(&dir.join("error.log"), 20)
        );
    }
    Ok(proc)
}

/// Starts `target` (nothing for `direct`) and waits until a request through it is answered by the
/// upstream, carrying the proxy's header exactly when a proxy is in the path.
pub fn start(
    lab: &mut Lab,
    programs: &Programs,
    tools: &Tools,
    cgroups: &Cgroups,
    target: Target,
) -> Result<Live> {
    let key = target.key();
    let load_place = |net, cgroup: &Path| Place {
        net,
        cgroup: cgroup.to_path_buf(),
        cpu: lab.cpus.load,
        proxy_user: false,
    };
    let upstream_url = format!("http://{UPSTREAM_IP}:{UPSTREAM_PORT}/");
    let local_url = format!("http://127.0.0.1:{}/", target.port());
    let (load, url) = match target {
        Target::Direct => (load_place(Net::Pod, &cgroups.load), upstream_url.clone()),
        // The app asks for the upstream itself; the kernel sends it to the proxy.
        Target::SidecarEbpf | Target::SidecarMtls | Target::SidecarMtlsAuthz => {
            (load_place(Net::Pod, &cgroups.pod_app), upstream_url.clone())
        }
        Target::SidecarEbpfMsg => (
            load_place(Net::Pod, &cgroups.msg_pod_app),
            upstream_url.clone(),
        ),
        Target::SidecarIptables => (
            load_place(Net::Ipt, &cgroups.load),
            format!("http://{IPT_UPSTREAM_IP}:{UPSTREAM_PORT}/"),
        ),
        Target::SidecarInbound => (load_place(Net::Pod, &cgroups.load), upstream_url.clone()),
        Target::SidecarTranscode => (
            load_place(Net::Pod, &cgroups.load),
            format!("http://{UPSTREAM_IP}:{GRPC_PORT}/v1/orders/42"),
        ),
        _ => (load_place(Net::Pod, &cgroups.load), local_url),
    };
    let mut live = Live {
        target,
        proc: None,
        proxy_cgroup: None,
        load,
        url,
        peer: None,
        ebpf_upstream: None,
    };
    match target {
        Target::SidecarMtls => start_mtls_server(lab, programs, &mut live, Some(false))?,
        Target::SidecarMtlsAuthz => start_mtls_server(lab, programs, &mut live, Some(true))?,
        Target::EnvoyMtls => start_mtls_server(lab, programs, &mut live, None)?,
        Target::SidecarInbound => start_inbound_server(lab, programs, &mut live, false)?,
        Target::SidecarTranscode => start_inbound_server(lab, programs, &mut live, true)?,
        _ => {}
    }
    if target.is_proxy() && !target.server_only() {
        let cgroup = match target {
            Target::SidecarEbpf | Target::SidecarMtls | Target::SidecarMtlsAuthz => {
                lab.cgroup(&format!("pod/proxy-{}", next()))?
            }
            Target::SidecarEbpfMsg => lab.cgroup(&format!("msgpod/proxy-{}", next()))?,
            _ => lab.cgroup(&format!("proxy-{key}-{}", next()))?,
        };
        let place = Place {
            net: if target == Target::SidecarIptables {
                Net::Ipt
            } else {
                Net::Pod
            },
            cgroup: cgroup.clone(),
            cpu: lab.cpus.proxy,
            // Both capture mechanisms exempt uid 1337; the others run as root like the load.
            proxy_user: target.sidecar_in_front(),
        };
        let cmd = proxy_command(lab, programs, &place, target, &upstream_url)?;
        live.proc = Some(lab.spawn(key, &cgroup, cmd, None)?);
        live.proxy_cgroup = Some(cgroup);
    }
    wait_answering(lab, tools, &mut live)?;
    Ok(live)
}

/// Mints the bench mesh's identities once (openssl: a P-256 CA, and a leaf per side with a SPIFFE
/// URI SAN, for both TLS uses): `<lab>/mesh/{client,server}/{tls.crt,tls.key,ca.crt}`.
fn identities(lab: &Lab) -> Result<PathBuf> {
    let root = lab.dir.join("mesh");
    if root.join("server").join("tls.crt").exists() {
        return Ok(root);
    }
    fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let openssl = |args: &[&str], dir: &Path| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .context("cannot run openssl (Debian package openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=bench mesh root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        &root,
    )?;
    for side in ["client", "server"] {
        let dir = root.join(side);
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("ext.cnf"),
            format!(
                "subjectAltName=URI:spiffe://{TRUST_DOMAIN}/ns/bench/sa/{side}\n\
                 extendedKeyUsage=serverAuth,clientAuth\n\
                 keyUsage=critical,digitalSignature\n\
                 basicConstraints=critical,CA:FALSE\n"
            ),
        )?;
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "tls.key",
                "-out",
                "leaf.csr",
                "-subj",
                &format!("/CN={side}"),
            ],
            &dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "../ca.crt",
                "-CAkey",
                "../ca.key",
                "-CAcreateserial",
                "-out",
                "tls.crt",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
            ],
            &dir,
        )?;
        fs::copy(root.join("ca.crt"), dir.join("ca.crt"))?;
        // The sidecars run as uid 1337.
        use std::os::unix::fs::PermissionsExt;
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            fs::set_permissions(dir.join(f), fs::Permissions::from_mode(0o644))?;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    for d in [root.clone(), root.join("client"), root.join("server")] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
    }
    Ok(root)
}

/// 50 authorization rules for the server sidecar: default deny, 49 rules that do not match the
/// bench client (other principals, namespaces, paths, a dry-run), and the allow that does, last.
fn authz_rules() -> String {
    let mut text = String::from("[inbound]\ndefault = \"deny\"\n");
    for i in 0..49 {
        let (action, from, to) = match i % 4 {
            0 => (
                "deny",
                format!("from.principals = [\"spiffe://{TRUST_DOMAIN}/ns/other-{i}/*\"]"),
                String::new(),
            ),
            1 => (
                "allow",
                format!("from.namespaces = [\"team-{i}\"]"),
                "to.methods = [\"POST\"]".to_owned(),
            ),
            2 => (
                "deny",
                String::new(),
                format!("to.paths = [\"/admin-{i}/*\"]"),
            ),
            _ => (
                "allow",
                format!("from.principals = [\"*/sa/client-{i}\"]"),
                format!("to.paths = [\"/v{i}/*\"]"),
            ),
        };
        text.push_str(&format!(
            "[[inbound.rule]]\nname = \"rule-{i}\"\naction = \"{action}\"\n{from}\n{to}\n"
        ));
    }
    text.push_str(&format!(
        "[[inbound.rule]]\nname = \"bench-client\"\naction = \"allow\"\nfrom.principals = [\"spiffe://{TRUST_DOMAIN}/ns/bench/sa/client\"]\nto.methods = [\"GET\"]\nto.paths = [\"/*\"]\n"
    ));
    text
}

/// The server side of an mTLS pair, in the upstream's namespace: a sidecar whose inbound capture
/// (`sidecar init --netns` on the upstream's cgroup) takes the connections to the upstream
/// (`Some(with 50 authorization rules)`), or an Envoy terminating mutual TLS on its own port
/// (`None`). Waits until it listens.
fn start_mtls_server(
    lab: &mut Lab,
    programs: &Programs,
    live: &mut Live,
    sidecar_authz: Option<bool>,
) -> Result<()> {
    let sidecar = sidecar_authz.is_some();
    let mesh = identities(lab)?;
    let upstream_cgroup = lab.cgroup_path("upstream");
    let (cgroup, label) = if sidecar {
        (
            lab.cgroup(&format!("upstream/proxy-mtls-{}", next()))?,
            "sidecar-mtls server",
        )
    } else {
        (
            lab.cgroup(&format!("proxy-envoy-mtls-server-{}", next()))?,
            "envoy-mtls server",
        )
    };
    let place = Place {
        net: Net::Up,
        cgroup: cgroup.clone(),
        cpu: lab.cpus.proxy,
        proxy_user: sidecar,
    };
    let (cmd, port) = if sidecar {
        lab.init_ebpf_inbound(&programs.sidecar, &upstream_cgroup, Net::Up, UPSTREAM_IP)?;
        live.ebpf_upstream = Some(upstream_cgroup);
        let mut cmd = lab.command(&place, &programs.sidecar);
        cmd.arg("run")
            .args(["--service-name", "bench-server"])
            .arg("--identity-dir")
            .arg(mesh.join("server"));
        if sidecar_authz == Some(true) {
            let conf = lab.file("sidecar-authz50", "toml");
            fs::write(&conf, authz_rules())?;
            cmd.arg("--config").arg(&conf);
        }
        (cmd, 15006)
    } else {
        let conf = lab.file("envoy-mtls-server", "yaml");
        fs::write(&conf, envoy_mtls_server_conf(&mesh))?;
        let mut cmd = lab.command(&place, &programs.envoy);
        cmd.arg("-c")
            .arg(&conf)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--log-level", "warn", "--base-id", "7"]);
        (cmd, ENVOY_MTLS_SERVER_PORT)
    };
    run_server(lab, live, label, cgroup, cmd, port)
}

/// Starts the server side of a target (in `cgroup`) and waits for it to listen on `port`.
fn run_server(
    lab: &mut Lab,
    live: &mut Live,
    label: &str,
    cgroup: PathBuf,
    cmd: std::process::Command,
    port: u16,
) -> Result<()> {
    let mut proc = lab.spawn(label, &cgroup, cmd, None)?;
    let pid = proc.pid();
    let ok = lab::poll(READY_TIMEOUT, || {
        proc.exited().is_none() && listening(pid, port)
    });
    if !ok {
        bail!(
            "{label} did not listen on :{port} ({}):\n{}",
            proc.exited().unwrap_or_else(|| "still running".into()),
            proc.log_tail()
        );
    }
    live.peer = Some((proc, cgroup));
    Ok(())
}

/// The server's sidecar alone in front of the upstream (sk_lookup inbound capture), with
/// `transcode`: a `[[transcode]]` section for the upstream's gRPC port (the fixture's
/// descriptor set, `tests/fixtures/transcode/orders.pb`).
fn start_inbound_server(
    lab: &mut Lab,
    programs: &Programs,
    live: &mut Live,
    transcode: bool,
) -> Result<()> {
    let upstream_cgroup = lab.cgroup_path("upstream");
    let cgroup = lab.cgroup(&format!("upstream/proxy-inbound-{}", next()))?;
    let place = Place {
        net: Net::Up,
        cgroup: cgroup.clone(),
        cpu: lab.cpus.proxy,
        proxy_user: true,
    };
    lab.init_ebpf_inbound(&programs.sidecar, &upstream_cgroup, Net::Up, UPSTREAM_IP)?;
    live.ebpf_upstream = Some(upstream_cgroup);
    let mut cmd = lab.command(&place, &programs.sidecar);
    cmd.arg("run").args(["--service-name", "bench-server"]);
    if transcode {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/transcode/orders.pb");
        let set = lab.file("orders", "pb");
        fs::copy(&fixture, &set).with_context(|| format!("copy {}", fixture.display()))?;
        let conf = lab.file("sidecar-transcode", "toml");
        fs::write(
            &conf,
            format!(
                "[[transcode]]\nport = {GRPC_PORT}\ndescriptor_set = \"{}\"\n\
                 services = [\"shop.v1.Orders\"]\n",
                set.display()
            ),
        )?;
        cmd.arg("--config").arg(&conf);
    }
    run_server(lab, live, "sidecar inbound server", cgroup, cmd, 15006)
}

fn next() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn proxy_command(
    lab: &mut Lab,
    programs: &Programs,
    place: &Place,
    target: Target,
    upstream_url: &str,
) -> Result<std::process::Command> {
    let upstream = format!("{UPSTREAM_IP}:{UPSTREAM_PORT}");
    let port = target.port();
    Ok(match target {
        Target::Direct | Target::SidecarInbound | Target::SidecarTranscode => {
            bail!("{} has no proxy of its own", target.key())
        }
        Target::SidecarEbpf | Target::SidecarEbpfMsg | Target::SidecarIptables => {
            let mut cmd = lab.command(place, &programs.sidecar);
            // Defaults: outbound 127.0.0.1:15001 (+[::1]), 1 worker; every feature at its default.
            cmd.arg("run").args(["--service-name", "bench"]);
            cmd
        }
        Target::SidecarMtls | Target::SidecarMtlsAuthz => {
            let mesh = lab.dir.join("mesh");
            let conf = lab.file("sidecar-mtls", "toml");
            // `require`: a handshake that failed would show as errors, never as plaintext.
            fs::write(&conf, "[defaults]\nmtls = \"require\"\n")?;
            let mut cmd = lab.command(place, &programs.sidecar);
            cmd.arg("run")
                .args(["--service-name", "bench"])
                .arg("--identity-dir")
                .arg(mesh.join("client"))
                .arg("--config")
                .arg(&conf);
            cmd
        }
        Target::EnvoyMtls => {
            let conf = lab.file("envoy-mtls-client", "yaml");
            fs::write(&conf, envoy_mtls_client_conf(port, &lab.dir.join("mesh")))?;
            let mut cmd = lab.command(place, &programs.envoy);
            cmd.arg("-c")
                .arg(&conf)
                .args(["--concurrency", "1", "--disable-hot-restart"])
                .args(["--log-level", "warn", "--base-id", "8"]);
            cmd
        }
        Target::SidecarAddressed => {
            let mut cmd = lab.command(place, &programs.sidecar);
            cmd.arg("run")
                .args(["--service-name", "bench"])
                .arg("--outbound")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--target")
                .arg(upstream_url.trim_end_matches('/'));
            cmd
        }
        Target::Nginx => {
            let dir = lab.dir.join(format!("nginx-{}", next()));
            let conf = nginx_conf(
                &dir,
                &format!(
                    "upstream up {{
        server {upstream};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-By sidecar;
        }}
    }}"
                ),
            )?;
            let mut cmd = lab.command(place, &programs.nginx);
            cmd.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.join("error.log"));
            cmd
        }
        Target::Haproxy => {
            let conf = lab.file("haproxy", "cfg");
            fs::write(
                &conf,
                format!(
                    "global
    nbthread 1
    # HAProxy wants 2 descriptors per connection and refuses to start if the open-files limit
    # cannot cover maxconn; 5,000 leaves room for the 1,000-connection phase.
    maxconn 5000

defaults
    mode http
    timeout connect 1s
    timeout client 300s
    timeout server 30s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-By sidecar
    default_backend be

backend be
    server up {upstream}
"
                ),
            )?;
            let mut cmd = lab.command(place, &programs.haproxy);
            cmd.arg("-db").arg("-f").arg(&conf);
            cmd
        }
        Target::Envoy => {
            let conf = lab.file("envoy", "yaml");
            fs::write(
                &conf,
                envoy_conf(
                    port,
                    &envoy_cluster("upstream", UPSTREAM_IP, UPSTREAM_PORT, ""),
                ),
            )?;
            let mut cmd = lab.command(place, &programs.envoy);
            cmd.arg("-c")
                .arg(&conf)
                .args(["--concurrency", "1", "--disable-hot-restart"])
                .args(["--log-level", "warn"]);
            cmd
        }
    })
}

/// An nginx main configuration around `http_body`: 1 worker, foreground, every path inside
/// `dir` (nothing of the system nginx is read or written), no access log, long keep-alive.
fn nginx_conf(dir: &Path, http_body: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        format!(
            "worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 20000;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    {http_body}
}}
"
        ),
    )
    .with_context(|| format!("write {}", conf.display()))?;
    Ok(conf)
}

fn envoy_conf(port: u16, clusters: &str) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: bench
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              request_headers_to_add:
              - header: {{ key: x-forwarded-by, value: sidecar }}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{clusters}"#
    )
}

/// One Envoy cluster of a single static endpoint, with the bench's connection limits and an
/// optional transport socket (YAML indented for `clusters:`).
fn envoy_cluster(name: &str, address: &str, port: u16, transport: &str) -> String {
    format!(
        r#"  clusters:
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    # The defaults (1024) would turn the 1,000-connection phase into a test of these limits.
    circuit_breakers:
      thresholds:
      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }}
{transport}    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {address}, port_value: {port} }}
"#
    )
}

/// The common TLS context of one side of `envoy-mtls`: TLS 1.3 only, its certificate, the
/// mesh CA, and the peer's SPIFFE ID required.
fn envoy_tls_context(dir: &Path, peer: &str) -> String {
    let d = dir.display();
    format!(
        r#"common_tls_context:
            tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
            tls_certificates:
            - certificate_chain: {{ filename: "{d}/tls.crt" }}
              private_key: {{ filename: "{d}/tls.key" }}
            validation_context:
              trusted_ca: {{ filename: "{d}/ca.crt" }}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ exact: "spiffe://{TRUST_DOMAIN}/ns/bench/sa/{peer}" }}"#
    )
}

/// The app side of `envoy-mtls`: plain HTTP in, mutual TLS to the server side.
fn envoy_mtls_client_conf(port: u16, mesh: &Path) -> String {
    let tls = envoy_tls_context(&mesh.join("client"), "server");
    let transport = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
"#
    );
    envoy_conf(
        port,
        &envoy_cluster("upstream", UPSTREAM_IP, ENVOY_MTLS_SERVER_PORT, &transport),
    )
}

/// The server side of `envoy-mtls`: mutual TLS in (client certificate required), plain HTTP to
/// the upstream on its own host.
fn envoy_mtls_server_conf(mesh: &Path) -> String {
    let tls = envoy_tls_context(&mesh.join("server"), "client");
    format!(
        r#"static_resources:
  listeners:
  - name: mtls
    address:
      socket_address: {{ address: 0.0.0.0, port_value: {ENVOY_MTLS_SERVER_PORT} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: local }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{local}"#,
        local = envoy_cluster("local", "127.0.0.1", UPSTREAM_PORT, "")
    )
}

/// Polls with one request at a time until the target answers 200 "ok" from the upstream, with
/// the proxy's header when there is a proxy, failing fast if the proxy exits.
fn wait_answering(lab: &mut Lab, tools: &Tools, live: &mut Live) -> Result<()> {
    let started = std::time::Instant::now();
    let mut last;
    loop {
        if let Some(proc) = live.proc.as_mut() {
            if let Some(status) = proc.exited() {
                bail!(
                    "{} exited ({status}) before answering:\n{}",
                    live.target.key(),
                    proc.log_tail()
                );
            }
        }
        match load::check(lab, tools, &live.load, &live.url) {
            // Transcoded: the JSON of the upstream's gRPC message (nginx alone would answer
            // the binary frame, and only to a POST).
            Ok(c) if c.status == 200 && live.target == Target::SidecarTranscode => {
                if c.body.contains("\"item\":\"widget\"") {
                    return Ok(());
                }
                bail!(
                    "{}: {} answered {:?}, not the transcoded order",
                    live.target.key(),
                    live.url,
                    c.body
                );
            }
            Ok(c) if c.status == 200 && c.body == "ok" => {
                let via_proxy = c.forwarded_by.as_deref() == Some("sidecar");
                if via_proxy == live.target.is_proxy() {
                    return Ok(());
                }
                // A request that bypassed the proxy (or a direct one that did not) means the
                // wiring is wrong: measuring it would compare the wrong things.
                bail!(
                    "{}: a request to {} was answered {} the proxy (X-Forwarded-By seen by the \
                     upstream: {:?})",
                    live.target.key(),
                    live.url,
                    if via_proxy { "through" } else { "without" },
                    c.forwarded_by
                );
            }
            Ok(c) => last = format!("HTTP {} {:?}", c.status, c.body),
            Err(e) => last = format!("{e:#}"),
        }
        // Polling interval: the next attempt is another process start.
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > READY_TIMEOUT {
            let log = live.proc.as_ref().map(Proc::log_tail).unwrap_or_default();
            bail!(
                "{} did not answer at {} within {READY_TIMEOUT:?}; last attempt: {last}\n{log}",
                live.target.key(),
                live.url
            );
        }
    }
}

/// True when the network namespace of `pid` has a TCP listener on `port` (/proc/<pid>/net/tcp:
/// local port in hex, state 0A).
fn listening(pid: u32, port: u16) -> bool {
    let want = format!("{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.len() > 3
                    && fields[1].rsplit(':').next() == Some(want.as_str())
                    && fields[3] == "0A"
            })
    })
}

/// Stops a target (its whole cgroup) and removes the cgroup.
pub fn stop(lab: &mut Lab, live: Live) -> Result<()> {
    if let Some(proc) = live.proc {
        lab.stop(proc)?;
    }
    if let Some(cg) = &live.proxy_cgroup {
        lab.remove_cgroup(cg);
    }
    if let Some((proc, cg)) = live.peer {
        lab.stop(proc)?;
        lab.remove_cgroup(&cg);
    }
    if let Some(cg) = &live.ebpf_upstream {
        lab.remove_ebpf(cg)?;
    }
    Ok(())
}
