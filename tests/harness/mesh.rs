//! Mesh mTLS fixtures: a test CA minting SPIFFE workload certificates (rcgen; test-only, never a
//! CA key in a sidecar), identity directories laid out and rotated the way the kubelet writes
//! projected volumes (a `..data` symlink swapped atomically), a network link between two pods,
//! and a tcpdump capture of that link with the TCP payloads it saw.
use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::Pod;

/// The trust domain of the tests' mesh.
pub const TRUST_DOMAIN: &str = "mesh.test";
/// Addresses of the link between two pods (`link`): the first pod, the second.
pub const LINK_IP_A: &str = "10.77.0.1";
pub const LINK_IP_B: &str = "10.77.0.2";
/// The mesh ALPN protocol (what a sidecar's ClientHello offers).
pub const MESH_ALPN: &str = "sidecar.mesh.dev/mtls-1";

/// `spiffe://mesh.test/ns/<ns>/sa/<sa>`.
pub fn spiffe_id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// A certificate authority of the tests.
pub struct MeshCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A workload certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
    /// As `openssl x509 -serial` prints it (upper-case hex, no colons).
    pub serial: String,
}

impl MeshCa {
    pub fn new(name: &str) -> MeshCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        MeshCa { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `id` valid from an hour ago for a day.
    pub fn leaf(&self, id: &str) -> Leaf {
        let now = SystemTime::now();
        self.leaf_valid(
            id,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(86_400),
        )
    }

    /// A leaf for `id` valid between `from` and `to` (in the past for an expired one).
    pub fn leaf_valid(&self, id: &str, from: SystemTime, to: SystemTime) -> Leaf {
        static SERIAL: AtomicU32 = AtomicU32::new(1);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("an IA5 URI"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = from.into();
        params.not_after = to.into();
        let serial =
            u64::from(SERIAL.fetch_add(1, Ordering::Relaxed)) << 32 | u64::from(std::process::id());
        params.serial_number = Some(serial.to_be_bytes().to_vec().into());
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            serial: format!("{serial:016X}"),
        }
    }
}

/// An identity directory as the kubelet writes a projected volume: the files are symlinks
/// through `..data`, which is swapped atomically on every update.
pub struct IdentityDir {
    dir: PathBuf,
    version: u32,
}

impl IdentityDir {
    /// Creates `dir` with `leaf` and `bundle` (PEM roots).
    pub fn create(dir: &Path, leaf: &Leaf, bundle: &str) -> IdentityDir {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut id = IdentityDir {
            dir: dir.to_owned(),
            version: 0,
        };
        id.write(leaf, bundle);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            symlink(format!("..data/{name}"), dir.join(name))
                .unwrap_or_else(|e| panic!("symlink {name}: {e}"));
        }
        id
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Puts a new version in place with one atomic rename of `..data`.
    pub fn write(&mut self, leaf: &Leaf, bundle: &str) {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let version = self.dir.join(&name);
        fs::create_dir(&version).unwrap_or_else(|e| panic!("create {}: {e}", version.display()));
        for (file, text) in [
            ("tls.crt", leaf.cert.as_str()),
            ("tls.key", leaf.key.as_str()),
            ("ca.crt", bundle),
        ] {
            fs::write(version.join(file), text).unwrap_or_else(|e| panic!("write {file}: {e}"));
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = fs::remove_file(&tmp);
        symlink(&name, &tmp).unwrap_or_else(|e| panic!("symlink ..data_tmp: {e}"));
        fs::rename(&tmp, self.dir.join("..data")).unwrap_or_else(|e| panic!("swap ..data: {e}"));
        if self.version > 1 {
            let _ = fs::remove_dir_all(self.dir.join(format!("..v{}", self.version - 1)));
        }
    }
}

/// Joins the network namespaces of two pods with a veth (`mesh0` in both): `a` gets
/// [`LINK_IP_A`], `b` gets [`LINK_IP_B`]. It goes away with the namespaces.
pub fn link(a: &Pod, b: &Pod) {
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (na, nb) = (a.pod_netns(), b.pod_netns());
    ip(&[
        "-n", na, "link", "add", "mesh0", "type", "veth", "peer", "name", "mesh0", "netns", nb,
    ]);
    ip(&[
        "-n",
        na,
        "addr",
        "add",
        &format!("{LINK_IP_A}/24"),
        "dev",
        "mesh0",
    ]);
    ip(&[
        "-n",
        nb,
        "addr",
        "add",
        &format!("{LINK_IP_B}/24"),
        "dev",
        "mesh0",
    ]);
    for ns in [na, nb] {
        ip(&["-n", ns, "link", "set", "mesh0", "up"]);
    }
    for ns in [na, nb] {
        let up = crate::eventually(Duration::from_secs(10), || {
            Command::new("ip")
                .args(["-n", ns, "-o", "link", "show", "mesh0"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("LOWER_UP"))
                .unwrap_or(false)
        });
        assert!(up, "mesh0 in {ns} has no carrier");
    }
}

/// A running tcpdump on one interface of a network namespace.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

/// One direction of one TCP connection seen on the wire: its bytes in order.
#[derive(Debug, Clone)]
pub struct Flow {
    pub src_port: u16,
    pub dst_port: u16,
    pub bytes: Vec<u8>,
}

impl Capture {
    /// Starts capturing TCP on `iface` in `netns` into `file`; returns once tcpdump listens.
    pub fn start(netns: &str, iface: &str, file: &Path) -> Capture {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-i",
                iface,
                "-n",
                "-U",
                "--immediate-mode",
                "-s",
                "0",
            ])
            .args(["-Z", "root", "-w"])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn tcpdump (is it installed?): {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        // tcpdump prints "listening on <iface>" once the capture is open.
        let mut seen = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(line)) => seen.push(line),
                _ => panic!("tcpdump ended before listening: {seen:?}"),
            }
        }
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Capture {
            child: Some(child),
            file: file.to_owned(),
        }
    }

    /// Stops tcpdump (flushing the file) and returns every TCP flow it saw.
    pub fn stop(mut self) -> Vec<Flow> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
        let data = fs::read(&self.file)
            .unwrap_or_else(|e| panic!("read capture {}: {e}", self.file.display()));
        eprintln!("capture {}: {} bytes", self.file.display(), data.len());
        flows(&data)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses a pcap file (Ethernet, IPv4 or IPv6, TCP) into per-direction byte streams, in
/// sequence order (retransmitted bytes counted once).
fn flows(pcap: &[u8]) -> Vec<Flow> {
    assert!(pcap.len() >= 24, "capture too short: {} bytes", pcap.len());
    let magic = u32::from_le_bytes(pcap[..4].try_into().unwrap());
    assert_eq!(magic, 0xa1b2_c3d4, "a little-endian microsecond pcap");
    let link = u32::from_le_bytes(pcap[20..24].try_into().unwrap());
    assert_eq!(link, 1, "Ethernet capture");
    let mut pos = 24;
    let mut order: Vec<(u16, u16)> = Vec::new();
    let mut streams: HashMap<(u16, u16), (Option<u32>, Vec<u8>)> = HashMap::new();
    while pos + 16 <= pcap.len() {
        let incl = u32::from_le_bytes(pcap[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let frame = &pcap[pos + 16..(pos + 16 + incl).min(pcap.len())];
        pos += 16 + incl;
        let Some((src, dst, seq, syn, payload)) = tcp_of(frame) else {
            continue;
        };
        let entry = streams.entry((src, dst)).or_insert_with(|| {
            order.push((src, dst));
            (None, Vec::new())
        });
        if syn {
            entry.0 = Some(seq.wrapping_add(1));
            continue;
        }
        let next = *entry.0.get_or_insert(seq);
        if payload.is_empty() || seq != next {
            // Empty, or a retransmission / out of order (not expected on a veth).
            continue;
        }
        entry.1.extend_from_slice(payload);
        entry.0 = Some(next.wrapping_add(payload.len() as u32));
    }
    order
        .into_iter()
        .map(|(src, dst)| Flow {
            src_port: src,
            dst_port: dst,
            bytes: streams.remove(&(src, dst)).map(|s| s.1).unwrap_or_default(),
        })
        .collect()
}

/// (source port, destination port, sequence number, SYN, payload) of an Ethernet frame.
fn tcp_of(frame: &[u8]) -> Option<(u16, u16, u32, bool, &[u8])> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = frame.get(14..)?;
    let tcp = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes(ip.get(2..4)?.try_into().ok()?));
            if *ip.get(9)? != 6 {
                return None;
            }
            ip.get(ihl..total)?
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes(ip.get(4..6)?.try_into().ok()?));
            ip.get(40..40 + len)?
        }
        _ => return None,
    };
    let src = u16::from_be_bytes(tcp.get(0..2)?.try_into().ok()?);
    let dst = u16::from_be_bytes(tcp.get(2..4)?.try_into().ok()?);
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    let syn = tcp.get(13)? & 0x02 != 0;
    Some((src, dst, seq, syn, tcp.get(offset..)?))
}

/// Splits `bytes` into TLS records; `Err` names the first byte that is not a record header (a
/// plaintext byte on the wire).
pub fn tls_records(bytes: &[u8]) -> Result<Vec<(u8, usize)>, String> {
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(head) = bytes.get(pos..pos + 5) else {
            return Err(format!("a cut record header at byte {pos}"));
        };
        let kind = head[0];
        if !matches!(kind, 20..=23) || head[1] != 3 || !(1..=4).contains(&head[2]) {
            let shown = String::from_utf8_lossy(&bytes[pos..(pos + 40).min(bytes.len())]);
            return Err(format!("byte {pos} does not start a TLS record: {shown:?}"));
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        records.push((kind, len));
        pos += 5 + len;
    }
    Ok(records)
}

/// A third-party server (redis-server, openssl s_server) run in a network namespace; killed when
/// dropped.
pub struct NetnsServer {
    child: Child,
    what: String,
}

impl NetnsServer {
    /// Starts `cmd args` in `netns` and waits until `addr` accepts connections there.
    pub fn start(netns: &str, addr: &str, cmd: &str, args: &[&str]) -> NetnsServer {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, cmd])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd} (is it installed?): {e}"));
        let server = NetnsServer {
            child,
            what: format!("{cmd} on {addr} in {netns}"),
        };
        let target: std::net::SocketAddr = addr.parse().expect("an address");
        let netns_name = netns.to_owned();
        let up = crate::eventually(Duration::from_secs(10), || {
            crate::netns::in_netns(&netns_name, move || {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
            })
            .unwrap_or(false)
        });
        assert!(up, "{} did not start listening", server.what);
        server
    }
}

impl Drop for NetnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serial numbers compared as numbers (DER drops leading zero bytes; tools print colons or not).
pub fn same_serial(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(char::is_ascii_hexdigit)
            .collect::<String>()
            .to_ascii_uppercase()
            .trim_start_matches('0')
            .to_owned()
    };
    norm(a) == norm(b)
}

/// A mesh TLS client that is not a sidecar: `openssl s_client` from `netns` to `addr`, offering
/// the mesh ALPN (TLS 1.3) with `leaf`, trusting `bundle`, with `extra` arguments; writes `input`
/// then closes its stdin. Returns (stdout, stderr). `dir` holds the key files.
pub fn openssl_s_client(
    netns: &str,
    addr: &str,
    dir: &Path,
    leaf: &Leaf,
    bundle: &str,
    extra: &[&str],
    input: &[u8],
) -> (String, String) {
    use std::io::Write;
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    fs::write(dir.join("c.crt"), &leaf.cert).expect("write c.crt");
    fs::write(dir.join("c.key"), &leaf.key).expect("write c.key");
    fs::write(dir.join("ca.pem"), bundle).expect("write ca.pem");
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", netns, "openssl", "s_client", "-connect", addr,
        ])
        .args(["-alpn", MESH_ALPN, "-tls1_3"])
        .arg("-cert")
        .arg(dir.join("c.crt"))
        .arg("-key")
        .arg(dir.join("c.key"))
        .arg("-CAfile")
        .arg(dir.join("ca.pem"))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(input);
    drop(stdin);
    let out = child.wait_with_output().expect("openssl s_client");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`openssl_s_client`] sending `request` (raw bytes, e.g. an HTTP/1.1 request with
/// `Connection: close`); what came back (empty when the connection was refused).
pub fn openssl_mesh_request(
    netns: &str,
    addr: &str,
    dir: &Path,
    leaf: &Leaf,
    bundle: &str,
    request: &[u8],
) -> String {
    openssl_s_client(netns, addr, dir, leaf, bundle, &["-quiet"], request).0
}

/// Two linked pods with their sidecars running and identities from `ca`: A, the caller
/// (`a_id`), and B, the callee (`b_id`, `b_config` as its config file, access log on). `b_apps`
/// starts B's servers before `init` (so the kernel knows them as the app's listeners).
pub struct MeshPair {
    pub a: Pod,
    pub b: Pod,
    pub a_identity: IdentityDir,
    pub b_identity: IdentityDir,
    /// The leaves the identities started with.
    pub a_leaf: Leaf,
    pub b_leaf: Leaf,
}

impl MeshPair {
    pub fn start<T>(
        ca: &MeshCa,
        (a_id, b_id): (&str, &str),
        b_config: &str,
        b_apps: impl FnOnce(&Pod) -> T,
    ) -> (MeshPair, T) {
        let mut a = Pod::new();
        let mut b = Pod::new();
        link(&a, &b);
        let apps = b_apps(&b);
        let (a_leaf, b_leaf) = (ca.leaf(a_id), ca.leaf(b_id));
        let a_identity = IdentityDir::create(&a.log_dir().join("identity"), &a_leaf, &ca.pem());
        let b_identity = IdentityDir::create(&b.log_dir().join("identity"), &b_leaf, &ca.pem());
        let b_conf = b.log_dir().join("sidecar.toml");
        fs::write(&b_conf, b_config).unwrap_or_else(|e| panic!("write {}: {e}", b_conf.display()));
        a.init_with_netns(&[]);
        b.init_with_netns(&[]);
        let a_dir = a_identity.path().display().to_string();
        let b_dir = b_identity.path().display().to_string();
        let b_conf = b_conf.display().to_string();
        a.start_proxy_with_inbound(&["--identity-dir", &a_dir]);
        b.start_proxy_with_inbound(&[
            "--identity-dir",
            &b_dir,
            "--config",
            &b_conf,
            "--access-log",
        ]);
        (
            MeshPair {
                a,
                b,
                a_identity,
                b_identity,
                a_leaf,
                b_leaf,
            },
            apps,
        )
    }
}
