//! `sidecar-demo`: a narrated end-to-end run on this machine. Builds a throwaway pod (network
//! namespaces + cgroup), runs `sidecar init` and `sidecar run`, starts upstreams in the "remote"
//! namespace, sends real traffic from an unmodified app, and tells what each side saw. Cleans up
//! after itself; exits non-zero if anything did not behave. Needs root (like the tests).
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use sidecar_tests::bpf::cgroup_programs;
use sidecar_tests::mesh::{link, spiffe_id, Capture, IdentityDir, MeshCa, LINK_IP_B};
use sidecar_tests::metrics::value;
use sidecar_tests::{
    EchoReply, GreetingReply, HttpReply, Pod, SeenRequest, Upstream, POD_IP4, POD_IP6, PROXY_UID,
};

/// Collects the checks so that the story runs to the end and the summary says what failed.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        if ok {
            self.passed += 1;
            println!("     ok    {what}");
        } else {
            println!("     FAIL  {what}");
            self.failed.push(what);
        }
    }
}

/// Two pods, each with its sidecar and a SPIFFE identity from a throw-away CA (minted here by
/// rcgen, as csi-driver-spiffe would write it): A's app calls B's over plain HTTP; the wire
/// between them carries only TLS. Returns the pods (dropped by the caller, after the summary).
fn mtls_leg(checks: &mut Checks) -> Vec<Pod> {
    println!("\n== mutual TLS between two pods ==");
    let ca = MeshCa::new("demo mesh root");
    let mut a = Pod::new();
    let mut b = Pod::new();
    link(&a, &b);
    let app_b = b.app_http_server("0.0.0.0:8080", "app-b");
    let id_a = spiffe_id("shop", "frontend");
    let id_b = spiffe_id("shop", "orders");
    let dir_a = IdentityDir::create(&a.log_dir().join("identity"), &ca.leaf(&id_a), &ca.pem());
    let dir_b = IdentityDir::create(&b.log_dir().join("identity"), &ca.leaf(&id_b), &ca.pem());
    println!(
        "pods {} (A, {id_a}) and {} (B, {id_b}) joined by mesh0; identities in tls.crt/tls.key/ca.crt",
        a.name(),
        b.name()
    );
    a.init_with_netns(&[]);
    b.init_with_netns(&[]);
    let (path_a, path_b) = (
        dir_a.path().display().to_string(),
        dir_b.path().display().to_string(),
    );
    a.start_proxy_with_inbound(&["--identity-dir", &path_a]);
    b.start_proxy_with_inbound(&["--identity-dir", &path_b]);
    let capture = Capture::start(a.pod_netns(), "mesh0", &a.log_dir().join("mesh0.pcap"));
    println!("\n-- app A: GET http://{LINK_IP_B}:8080/ (plain HTTP; tcpdump on mesh0)");
    let reply = app::<HttpReply>(&a, &["http", "--connect", &format!("{LINK_IP_B}:8080")]);
    let flows = capture.stop();
    match reply {
        Ok(reply) => {
            println!("   A got: {} {:?}", reply.status, reply.body.trim_end());
            checks.check(reply.status == 200, "A's plain request reached B's app");
        }
        Err(e) => checks.check(false, format!("A -> B: {e}")),
    }
    let xfcc = app_b
        .requests()
        .last()
        .and_then(|r| r.header("x-forwarded-client-cert").map(str::to_owned));
    println!(
        "   B's app saw x-forwarded-client-cert: {}",
        xfcc.as_deref().unwrap_or("(none)")
    );
    checks.check(
        xfcc.is_some_and(|v| v.contains(&format!("URI={id_a}"))),
        "B's app learns A's verified SPIFFE ID",
    );
    let wire: Vec<u8> = flows.iter().flat_map(|f| f.bytes.clone()).collect();
    let records = flows
        .iter()
        .all(|f| sidecar_tests::mesh::tls_records(&f.bytes).is_ok());
    println!(
        "   on the wire: {} bytes in {} flows, {}",
        wire.len(),
        flows.len(),
        if records {
            "all TLS records"
        } else {
            "NOT all TLS"
        }
    );
    checks.check(
        records && !wire.is_empty() && !String::from_utf8_lossy(&wire).contains("HTTP/1.1"),
        "only TLS 1.3 records crossed the wire, no plaintext HTTP",
    );
    checks.check(
        value(
            &b,
            r#"sidecar_mtls_handshakes_total{direction="inbound",result="ok"}"#,
        ) == 1.0,
        "B counted one verified mesh handshake",
    );
    drop(app_b);
    drop((dir_a, dir_b));
    vec![a, b]
}

/// Runs the app in the pod; a failure is part of the story, not a crash.
fn app<T: DeserializeOwned>(pod: &Pod, args: &[&str]) -> Result<T, String> {
    let run = pod.run_app_raw(args);
    if !run.status.success() {
        return Err(format!("{} {}", run.stdout.trim(), run.stderr.trim()));
    }
    serde_json::from_value(run.json.clone()).map_err(|e| format!("{}: {e}", run.json))
}

fn describe_seen(upstream: &Upstream) -> Option<SeenRequest> {
    let seen = upstream.requests().pop();
    match &seen {
        Some(req) => println!(
            "   {} saw: {} {} from {}, X-Forwarded-By: {}",
            upstream.name,
            req.method,
            req.path,
            req.peer,
            req.header("x-forwarded-by").unwrap_or("(none)")
        ),
        None => println!("   {} saw: nothing", upstream.name),
    }
    seen
}

fn http_step(pod: &Pod, checks: &mut Checks, upstream: &Upstream) {
    let addr = upstream.addr.to_string();
    println!("\n-- app: GET http://{addr}/  (plain std socket, no proxy settings)");
    match app::<HttpReply>(pod, &["http", "--connect", &addr]) {
        Ok(reply) => {
            println!("   app got: {} {:?}", reply.status, reply.body.trim_end());
            println!(
                "   app's getpeername(): {}   getsockname(): {}",
                reply.peer, reply.local
            );
            checks.check(
                reply.status == 200 && reply.body == format!("hello from {}\n", upstream.name),
                format!(
                    "{} answered the app itself (original destination recovered)",
                    upstream.name
                ),
            );
            checks.check(
                reply.peer == addr,
                format!("getpeername() shows {addr}, not the proxy"),
            );
        }
        Err(e) => checks.check(false, format!("app request to {addr}: {e}")),
    }
    let seen = describe_seen(upstream);
    checks.check(
        seen.as_ref().and_then(|r| r.header("x-forwarded-by")) == Some("sidecar"),
        format!(
            "{} received it through the proxy (X-Forwarded-By: sidecar)",
            upstream.name
        ),
    );
}

fn main() -> ExitCode {
    println!("== sidecar demo: transparent outbound and inbound interception with eBPF ==\n");
    let mut checks = Checks::default();
    let mut pod = Pod::new();
    println!(
        "pod: netns {} ({POD_IP4}, {POD_IP6}) --veth-- netns {} (10.200.0.1, 10.200.0.3, fd00:200::1)",
        pod.pod_netns(),
        pod.remote_netns()
    );
    println!("pod cgroup: {}", pod.cgroup().display());

    let alpha = pod.http_upstream("10.200.0.1:8080", "alpha");
    let beta = pod.http_upstream("10.200.0.3:9090", "beta");
    let echo = pod.echo_upstream("10.200.0.1:7000", "echo");
    let greeter = pod.greeting_upstream("10.200.0.1:2525", "greeter");
    println!(
        "remote: HTTP alpha {}, HTTP beta {}, TCP echo {}, server-speaks-first {}",
        alpha.addr, beta.addr, echo.addr, greeter.addr
    );

    // The app's own server, inside the pod (for inbound).
    let app_server = pod.app_http_server("0.0.0.0:8080", "app");

    println!(
        "\n-- sidecar init --cgroup {} --netns {} --pod-ip {POD_IP4},{POD_IP6}",
        pod.cgroup().display(),
        pod.netns_path().display()
    );
    pod.init_with_netns(&[]);
    for program in cgroup_programs(pod.cgroup()) {
        println!(
            "   attached: {:<14} id {:<6} {}",
            program.attach_type, program.id, program.name
        );
    }

    println!("\n-- sidecar run (in the pod, as uid {PROXY_UID})");
    let pid = pod.start_proxy_with_inbound(&[]);
    println!(
        "   proxy pid {pid} listening on 127.0.0.1:15001 (outbound) and 0.0.0.0:15006 (inbound)"
    );

    http_step(&pod, &mut checks, &alpha);
    http_step(&pod, &mut checks, &beta);

    println!(
        "\n-- app: 64 KiB of binary (non-HTTP) data to the echo server at {}",
        echo.addr
    );
    match app::<EchoReply>(
        &pod,
        &[
            "tcp-echo",
            "--connect",
            "10.200.0.1:7000",
            "--bytes",
            "65536",
        ],
    ) {
        Ok(reply) => {
            println!(
                "   sent {} bytes, got {} back; app's getpeername(): {}",
                reply.sent, reply.received, reply.peer
            );
            checks.check(reply.ok, "bytes came back byte-exact");
            let upstream_peer = echo.connections().first().map(ToString::to_string);
            println!(
                "   echo saw a connection from {}",
                upstream_peer.as_deref().unwrap_or("(none)")
            );
            checks.check(
                upstream_peer.is_some_and(|p| p != reply.local),
                "relayed by the proxy (the echo server saw another socket than the app's)",
            );
        }
        Err(e) => checks.check(false, format!("echo exchange: {e}")),
    }

    println!(
        "\n-- app: connect to {} and wait for the server to speak first",
        greeter.addr
    );
    match app::<GreetingReply>(
        &pod,
        &[
            "greeting",
            "--connect",
            "10.200.0.1:2525",
            "--timeout-ms",
            "5000",
        ],
    ) {
        Ok(reply) => {
            println!("   app read: {:?}", reply.line);
            checks.check(reply.line == "220 greeting", "the greeting reached the app");
        }
        Err(e) => checks.check(false, format!("greeting: {e}")),
    }

    println!(
        "\n-- a process OUTSIDE the pod cgroup (same netns): GET http://{}/",
        alpha.addr
    );
    let before = alpha.requests().len();
    let direct = pod.outside_http(&alpha.addr.to_string());
    println!("   it got: {} {:?}", direct.status, direct.body.trim_end());
    let seen = alpha.requests();
    let last = seen.get(before);
    if let Some(req) = last {
        println!(
            "   alpha saw: from {}, X-Forwarded-By: {}",
            req.peer,
            req.header("x-forwarded-by").unwrap_or("(none)")
        );
    }
    checks.check(
        last.is_some_and(|r| r.header("x-forwarded-by").is_none()),
        "not intercepted: only the pod's cgroup is captured",
    );

    println!(
        "\n-- inbound: a client in the remote netns: GET http://{POD_IP4}:8080/ (the app's port)"
    );
    match pod.try_remote_http(&format!("{POD_IP4}:8080")) {
        Ok(reply) => {
            println!(
                "   client got: {} {:?}",
                reply.status,
                reply.body.trim_end()
            );
            let seen = app_server.requests();
            if let Some(req) = seen.last() {
                println!(
                    "   the app saw: GET {} from {}, X-Forwarded-By: {}",
                    req.path,
                    req.peer,
                    req.header("x-forwarded-by").unwrap_or("(none)")
                );
            }
            checks.check(
                seen.last().is_some_and(|r| {
                    r.peer.ip().to_string() == "127.0.0.6"
                        && r.header("x-forwarded-by") == Some("sidecar")
                }),
                "inbound went through the proxy (sk_lookup steered the SYN; the app sees 127.0.0.6)",
            );
        }
        Err(e) => checks.check(false, format!("inbound request: {e}")),
    }

    println!("\n-- sidecar status --cgroup {}", pod.cgroup().display());
    for line in pod.status_table().lines() {
        println!("   {line}");
    }

    let log_lines = pod.proxy_log().lines().count();
    println!("\n(proxy wrote {log_lines} log lines; they are printed if the demo fails)");

    drop((alpha, beta, echo, greeter, app_server));
    let mesh_pods = mtls_leg(&mut checks);
    println!("\n-- cleaning up (init --remove, netns, cgroup)");
    let failed = !checks.failed.is_empty();
    if failed {
        for mut p in mesh_pods {
            p.mark_failed();
        }
        // The pod guard then prints the proxy log and keeps the log dir.
        eprintln!("\n{} check(s) failed:", checks.failed.len());
        for what in &checks.failed {
            eprintln!("  - {what}");
        }
        pod.mark_failed();
        drop(pod);
        return ExitCode::FAILURE;
    }
    drop(pod);
    println!("\nall {} checks passed", checks.passed);
    ExitCode::SUCCESS
}
