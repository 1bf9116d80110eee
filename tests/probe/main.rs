//! `sidecar-probe`: the "application" the integration tests run inside the pod. Plain blocking
//! std sockets, no knowledge of the mesh; prints exactly one JSON object on stdout.
//!
//! ```text
//! sidecar-probe http      --connect ADDR [--path /x] [--host H] [--method M] [--header 'N: v']... [--body B]
//!                                                                  -> {status, headers, body, peer, local}
//! sidecar-probe grpc      --connect ADDR --message M              -> {status, grpc_status, message, headers, trailers}
//! sidecar-probe websocket --connect ADDR --message M              -> {status, accept_ok, echoed, peer}
//! sidecar-probe tcp-idle  --connect ADDR --timeout-ms T           -> {echoed, ended, after_ms}
//! sidecar-probe tcp-echo  --connect ADDR --bytes N                -> {ok, sent, received, peer, ...}
//! sidecar-probe greeting  --connect ADDR --timeout-ms T           -> {line, peer, local}
//! sidecar-probe whoami                                             -> {uid, gid, groups, cgroup, netns}
//! sidecar-probe listen    --listen ADDR                           -> {bound} (binds and listens, then exits)
//! sidecar-probe serve     --listen ADDR                           -> {listening}, then serves until killed:
//!                                                                    every request gets 200 and the peer it came from
//! ```
//! On failure: `{"error": "..."}` and a non-zero exit (1 for a failed exchange, 64 for bad usage).
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use sidecar_tests::client;

const USAGE: &str = "usage: sidecar-probe http --connect ADDR [--path /x] [--host H] [--method M] \
                     [--header 'N: v']... [--body B]\n\
                     \x20      sidecar-probe tcp-echo --connect ADDR --bytes N\n\
                     \x20      sidecar-probe greeting --connect ADDR --timeout-ms T\n\
                     \x20      sidecar-probe grpc --connect ADDR --message M\n\
                     \x20      sidecar-probe websocket --connect ADDR --message M\n\
                     \x20      sidecar-probe tcp-idle --connect ADDR --timeout-ms T";

enum Failure {
    Usage(String),
    Exchange(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(msg)) => {
            println!("{}", serde_json::json!({ "error": msg }));
            eprintln!("{USAGE}");
            ExitCode::from(64)
        }
        Err(Failure::Exchange(msg)) => {
            println!("{}", serde_json::json!({ "error": msg }));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, Failure> {
    let (command, rest) = args
        .split_first()
        .ok_or_else(|| Failure::Usage("missing subcommand".to_string()))?;
    if command == "whoami" {
        return whoami();
    }
    let opts = Options::parse(rest)?;
    if command == "serve" {
        let addr: SocketAddr = opts
            .required("--listen")?
            .parse()
            .map_err(|e| Failure::Usage(format!("--listen: {e}")))?;
        return serve(addr);
    }
    if command == "listen" {
        let addr: SocketAddr = opts
            .required("--listen")?
            .parse()
            .map_err(|e| Failure::Usage(format!("--listen: {e}")))?;
        return match std::net::TcpListener::bind(addr) {
            Ok(l) => Ok(serde_json::json!({ "bound": l.local_addr().map(|a| a.to_string()).unwrap_or_default() }).to_string()),
            Err(e) => Err(Failure::Exchange(format!("bind {addr}: {e}"))),
        };
    }
    let addr: SocketAddr = opts
        .required("--connect")?
        .parse()
        .map_err(|e| Failure::Usage(format!("--connect: {e}")))?;
    match command.as_str() {
        "http" => {
            let headers = opts.all("--header");
            let request = client::HttpRequest {
                method: opts.get("--method").unwrap_or("GET"),
                path: opts.get("--path").unwrap_or("/"),
                host: opts.get("--host"),
                headers: &headers,
                body: opts.get("--body").unwrap_or(""),
            };
            to_json(client::http_request(addr, &request))
        }
        "grpc" => to_json(client::grpc_unary(addr, opts.required("--message")?)),
        "websocket" => to_json(client::websocket(addr, opts.required("--message")?)),
        "tcp-idle" => {
            let ms = opts.number("--timeout-ms")?;
            to_json(client::tcp_idle(addr, Duration::from_millis(ms)))
        }
        "tcp-echo" => {
            let n = opts.number("--bytes")?;
            let reply = client::tcp_echo(addr, n as usize).map_err(Failure::Exchange)?;
            let ok = reply.ok;
            let json = to_json(Ok(reply))?;
            if ok {
                Ok(json)
            } else {
                // Still print what came back: the test shows where the bytes diverged.
                Err(Failure::Exchange(format!("echo mismatch: {json}")))
            }
        }
        "greeting" => {
            let ms = opts.number("--timeout-ms")?;
            to_json(client::greeting(addr, Duration::from_millis(ms)))
        }
        other => Err(Failure::Usage(format!("unknown subcommand {other:?}"))),
    }
}

/// An app server in the pod (a process of its cgroup, as a pod's app is): answers every request
/// with 200 and, as its body, the peer address it saw. Prints one line once it listens.
fn serve(addr: SocketAddr) -> Result<String, Failure> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Failure::Exchange(format!("bind {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("{}", serde_json::json!({ "listening": bound }));
    let _ = std::io::stdout().flush();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(&stream);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let mut out = &stream;
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{peer}",
                peer.len()
            );
        });
    }
    Ok(String::new())
}

/// Where this process runs: lets the harness check its own plumbing (cgroup, netns, credentials).
fn whoami() -> Result<String, Failure> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| Failure::Exchange(format!("read /proc/self/status: {e}")))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Failure::Exchange(format!("read /proc/self/cgroup: {e}")))?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| Failure::Exchange(format!("readlink /proc/self/ns/net: {e}")))?;
    let json = serde_json::json!({
        "uid": field("Uid:").first(),
        "gid": field("Gid:").first(),
        "groups": field("Groups:"),
        "cgroup": cgroup,
        "netns": netns,
    });
    Ok(json.to_string())
}

fn to_json<T: Serialize>(result: Result<T, String>) -> Result<String, Failure> {
    let value = result.map_err(Failure::Exchange)?;
    serde_json::to_string(&value).map_err(|e| Failure::Exchange(format!("encode output: {e}")))
}

/// `--flag value` pairs.
struct Options<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Options<'a> {
    fn parse(args: &'a [String]) -> Result<Self, Failure> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if !flag.starts_with("--") {
                return Err(Failure::Usage(format!("unexpected argument {flag:?}")));
            }
            let value = it
                .next()
                .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))?;
            pairs.push((flag.as_str(), value.as_str()));
        }
        Ok(Options(pairs))
    }

    fn get(&self, flag: &str) -> Option<&'a str> {
        self.0.iter().find(|(f, _)| *f == flag).map(|(_, v)| *v)
    }

    /// Every value of a repeatable flag, in order.
    fn all(&self, flag: &str) -> Vec<&'a str> {
        self.0
            .iter()
            .filter(|(f, _)| *f == flag)
            .map(|(_, v)| *v)
            .collect()
    }

    fn required(&self, flag: &str) -> Result<&'a str, Failure> {
        self.get(flag)
            .ok_or_else(|| Failure::Usage(format!("missing {flag}")))
    }

    fn number(&self, flag: &str) -> Result<u64, Failure> {
        self.required(flag)?
            .parse()
            .map_err(|e| Failure::Usage(format!("{flag}: {e}")))
    }
}
