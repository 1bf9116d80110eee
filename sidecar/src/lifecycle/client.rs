//! `sidecar wait-ready`, `sidecar shutdown` and `sidecar reload`: small clients of a running sidecar's admin port,
//! for an app's entrypoint (`sidecar wait-ready && exec app`), a postStart hook, or a Job's last
//! step (`app; sidecar shutdown`). Blocking std sockets: they run once and exit.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use crate::units::parse_duration;

/// Where the clients look by default: the admin port on loopback (`/shutdown` answers only there).
pub const DEFAULT_ADMIN_CLIENT: &str = "127.0.0.1:15090";
/// Each exchange is bounded so that a wedged peer cannot hang a pod's start or a Job's end.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often `wait-ready` asks again: quick enough that the app starts promptly.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Args)]
pub struct WaitReadyArgs {
    /// The sidecar's admin address
    #[arg(long, env = "SIDECAR_ADMIN", value_name = "ADDR", default_value = DEFAULT_ADMIN_CLIENT)]
    pub admin: String,
    /// Give up (exit 1) after this long
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub timeout: String,
}

#[derive(Debug, Clone, Args)]
pub struct ShutdownArgs {
    /// The sidecar's admin address (a loopback address: /shutdown and /reload refuse other
    /// peers, and other uids than the proxy's)
    #[arg(long, env = "SIDECAR_ADMIN", value_name = "ADDR", default_value = DEFAULT_ADMIN_CLIENT)]
    pub admin: String,
}

/// One answer: status code and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// An admin address to connect to: the listener's `0.0.0.0`/`[::]` means this host's loopback.
/// `SIDECAR_ADMIN` is shared with `sidecar run`, which takes a list (`0.0.0.0:15090,[::]:15090`):
/// the first address of a list is used.
fn admin_addr(value: &str) -> Result<SocketAddr, String> {
    let first = value
        .split(',')
        .map(str::trim)
        .find(|a| !a.is_empty())
        .unwrap_or_default();
    let addr = first
        .to_socket_addrs()
        .map_err(|e| {
            format!("--admin {value:?}: {e}; expected HOST:PORT, e.g. {DEFAULT_ADMIN_CLIENT}")
        })?
        .next()
        .ok_or_else(|| format!("--admin {value:?}: no address"))?;
    Ok(match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    })
}

fn exchange(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sidecar\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    // Admin answers are a few lines; the bound keeps a confused peer from filling memory.
    stream.take(64 * 1024).read_to_end(&mut raw)?;
    let status = super::parse_status(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
    })?;
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| String::from_utf8_lossy(&raw[i + 4..]).trim().to_owned())
        .unwrap_or_default();
    Ok(Answer { status, body })
}

/// `sidecar wait-ready`: 0 once `/ready` answers 200; 1 at the timeout (saying what was last
/// seen); 64 bad usage.
pub fn wait_ready_main(args: WaitReadyArgs) -> ExitCode {
    let (addr, timeout) = match (admin_addr(&args.admin), parse_duration(&args.timeout)) {
        (Ok(a), Ok(t)) => (a, t),
        (Err(e), _) => return usage(&e),
        (_, Err(e)) => return usage(&format!("--timeout {:?}: {e}", args.timeout)),
    };
    let deadline = Instant::now() + timeout;
    loop {
        let last = match exchange(addr, "GET", "/ready") {
            Ok(Answer { status: 200, .. }) => {
                eprintln!("sidecar wait-ready: {addr} is ready");
                return ExitCode::SUCCESS;
            }
            Ok(a) => format!("{} {}", a.status, a.body),
            Err(e) => format!("{addr}: {e}"),
        };
        if Instant::now() >= deadline {
            eprintln!("sidecar wait-ready: not ready after {timeout:?}; last answer: {last}");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// `sidecar shutdown`: 0 when the sidecar accepted (or nothing listens: it is already gone, which
/// is what a Job's last step wants); 1 when it refused; 64 bad usage.
pub fn shutdown_main(args: ShutdownArgs) -> ExitCode {
    let addr = match admin_addr(&args.admin) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    match exchange(addr, "POST", "/shutdown") {
        Ok(a) if (200..300).contains(&a.status) => {
            eprintln!("sidecar shutdown: {addr}: {}", a.body);
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("sidecar shutdown: {addr} refused: {} {}", a.status, a.body);
            ExitCode::FAILURE
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            eprintln!(
                "sidecar shutdown: nothing listens on {addr}; the sidecar has already stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sidecar shutdown: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `sidecar reload`: 0 when the sidecar applied the config file (or found it unchanged), 1 when
/// it rejected it (the problems are printed; the old configuration stays) or refused the
/// caller, or nothing listens; 64 bad usage.
pub fn reload_main(args: ShutdownArgs) -> ExitCode {
    let addr = match admin_addr(&args.admin) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    match exchange(addr, "POST", "/reload") {
        Ok(a) if a.status == 200 => {
            eprintln!("sidecar reload: {addr}: {}", a.body);
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("sidecar reload: {addr}: {} {}", a.status, a.body);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sidecar reload: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("sidecar: invalid arguments: {message}");
    ExitCode::from(crate::EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        assert_eq!(
            admin_addr("0.0.0.0:15090").unwrap(),
            "127.0.0.1:15090".parse().unwrap()
        );
        assert_eq!(admin_addr("[::]:1").unwrap(), "[::1]:1".parse().unwrap());
        assert_eq!(
            admin_addr("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(admin_addr("nonsense").is_err());
        // The list form `sidecar run` takes from the same SIDECAR_ADMIN: the first one.
        assert_eq!(
            admin_addr("0.0.0.0:15090,[::]:15090").unwrap(),
            "127.0.0.1:15090".parse().unwrap()
        );
    }
}
