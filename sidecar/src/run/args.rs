//! The flags of `sidecar run` (clap; every one also an environment variable). Values stay
//! strings here: [`super::settings`] checks them all and reports every bad key at once.
use std::path::PathBuf;
use std::time::Duration;

/// Default listeners: the addresses the eBPF programs redirect to (IPv4 and IPv6).
pub const DEFAULT_OUTBOUND: &str = "127.0.0.1:15001,[::1]:15001";
/// Inbound listeners: any address, because sk_lookup hands over SYNs for the pod's addresses
/// (Istio's 15006). Only steered connections arrive: nothing else dials this port.
pub const DEFAULT_INBOUND: &str = "0.0.0.0:15006,[::]:15006";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `sidecar run`. Values are parsed and checked by [`Settings::from_args`] rather
/// than by clap, so that every bad key is reported at once with exit code 64.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Listen addresses for redirected outbound connections, comma-separated
    /// [default: 127.0.0.1:15001,[::1]:15001]
    #[arg(long, env = "SIDECAR_OUTBOUND", value_name = "ADDR[,ADDR...]")]
    pub outbound: Option<String>,

    /// Listen addresses for captured inbound connections, comma-separated, or `none`
    /// [default: 0.0.0.0:15006,[::]:15006]
    #[arg(long, env = "SIDECAR_INBOUND", value_name = "ADDR[,ADDR...]|none")]
    pub inbound: Option<String>,

    /// Reverse-proxy mode: send every request to this http:// URL instead of the original
    /// destination (also read from TARGET_URL)
    #[arg(long, env = "SIDECAR_TARGET", value_name = "URL")]
    pub target: Option<String>,

    /// Name of the service this sidecar belongs to (also read from SERVICE_NAME)
    #[arg(long, env = "SIDECAR_SERVICE_NAME", value_name = "NAME")]
    pub service_name: Option<String>,

    /// Policy file (TOML): [defaults] and per-destination [[destination]] overrides of
    /// timeouts, circuit breaker and retries
    #[arg(long, env = "SIDECAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Workload identity for mesh mTLS: a directory holding tls.crt (leaf and chain), tls.key
    /// and ca.crt (trust bundle), as csi-driver-spiffe, SPIRE or a TLS Secret write them;
    /// reloaded when they change. Without it there is no mesh TLS
    #[arg(long, env = "SIDECAR_IDENTITY_DIR", value_name = "DIR")]
    pub identity_dir: Option<PathBuf>,

    /// The kubelet's probe paths (comma-separated; `sidecar inject` sets them from the pod's
    /// httpGet probes): added to the config file's [inbound] probe_paths, answered on strict
    /// mTLS ports and under default-deny authorization
    #[arg(long, env = "SIDECAR_PROBE_PATHS", value_name = "PATHS")]
    pub probe_paths: Option<String>,

    /// Upstream connect timeout [default: 1s]
    #[arg(long, env = "SIDECAR_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,

    /// Time allowed until the upstream's response head, retries included [default: 30s]
    #[arg(long, env = "SIDECAR_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,

    /// Opaque TCP and upgraded (WebSocket) connections idle this long are closed [default: 1h]
    #[arg(long, env = "SIDECAR_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,

    /// Failures in a row that open a destination's circuit breaker; 0: never [default: 5]
    #[arg(long, env = "SIDECAR_BREAKER_CONSECUTIVE_FAILURES", value_name = "N")]
    pub breaker_consecutive_failures: Option<String>,

    /// Failure rate (0-1, or N%) over the breaker window that opens it, or off [default: off]
    #[arg(long, env = "SIDECAR_BREAKER_FAILURE_RATE", value_name = "RATE|off")]
    pub breaker_failure_rate: Option<String>,

    /// How long an open circuit breaker answers 503 before probing [default: 10s]
    #[arg(long, env = "SIDECAR_BREAKER_OPEN_TIME", value_name = "DURATION")]
    pub breaker_open_time: Option<String>,

    /// Retries per request (idempotent ones; others only after a failed connect); 0: none
    /// [default: 2]
    #[arg(long, env = "SIDECAR_MAX_RETRIES", value_name = "N")]
    pub max_retries: Option<String>,

    /// Retries allowed as a fraction of requests (0-1, or N%) [default: 0.2]
    #[arg(long, env = "SIDECAR_RETRY_BUDGET_RATIO", value_name = "RATIO")]
    pub retry_budget_ratio: Option<String>,

    /// Retries always allowed per second, whatever the traffic [default: 10]
    #[arg(long, env = "SIDECAR_RETRY_BUDGET_MIN_PER_SECOND", value_name = "N")]
    pub retry_budget_min_per_second: Option<String>,

    /// How long a partial client preface may take to become recognisable (no timeout applies
    /// while neither side has sent anything)
    #[arg(
        long,
        env = "SIDECAR_DETECT_TIMEOUT",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub detect_timeout: String,

    /// Idle upstream connections are closed after this
    #[arg(
        long,
        env = "SIDECAR_POOL_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub pool_idle_timeout: String,

    /// Who serves HTTP/1 clients: `native` (heads forwarded as their bytes, header case and
    /// order kept, strict framing) or `hyper` (hyper's server and client)
    #[arg(
        long,
        env = "SIDECAR_HTTP1_ENGINE",
        value_name = "ENGINE",
        default_value = "native"
    )]
    pub http1_engine: String,

    /// HTTP/1: a request head must be complete within this, counted from when the connection
    /// starts waiting for it (so it is also the keep-alive idle timeout)
    #[arg(
        long,
        env = "SIDECAR_HEADER_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub header_timeout: String,

    /// HTTP/1: the largest request head (start line and headers); larger gets 431; also the
    /// HTTP/2 header list limit
    #[arg(
        long,
        env = "SIDECAR_MAX_HEADER_BYTES",
        value_name = "SIZE",
        default_value = "32KiB"
    )]
    pub max_header_bytes: String,

    /// HTTP/2: streams one client connection may have open at once
    #[arg(
        long,
        env = "SIDECAR_HTTP2_MAX_CONCURRENT_STREAMS",
        value_name = "N",
        default_value = "100"
    )]
    pub http2_max_concurrent_streams: String,

    /// HTTP/2: a quiet connection is pinged after this; no answer within as long closes it
    #[arg(
        long,
        env = "SIDECAR_HTTP2_KEEPALIVE",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub http2_keepalive: String,

    /// HTTP/2: a connection with no stream open for this long is closed (GOAWAY)
    #[arg(
        long,
        env = "SIDECAR_HTTP2_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "5m"
    )]
    pub http2_idle_timeout: String,

    /// HTTP/1: a kept-alive client connection silent this long after an answer is parked, kept
    /// in a compact form (about 0.4 KiB) until it speaks again (0s: never)
    #[arg(
        long,
        env = "SIDECAR_PARK_IDLE_AFTER",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub park_idle_after: String,

    /// Downstream connections per direction (outbound, inbound); past it new ones are reset at
    /// accept and counted
    #[arg(
        long,
        env = "SIDECAR_MAX_DOWNSTREAM_CONNECTIONS",
        value_name = "N",
        default_value = "10000"
    )]
    pub max_downstream_connections: String,

    /// Upstream HTTP/1 connections to the app (inbound); further requests queue for one
    #[arg(
        long,
        env = "SIDECAR_INBOUND_MAX_CONNECTIONS",
        value_name = "N",
        default_value = "1024"
    )]
    pub inbound_max_connections: String,

    /// Upstream HTTP/1 connections per destination; further requests queue for one [default: 128]
    #[arg(
        long,
        env = "SIDECAR_MAX_CONNECTIONS_PER_DESTINATION",
        value_name = "N"
    )]
    pub max_connections_per_destination: Option<String>,

    /// Runtime worker threads (1: single-threaded)
    #[arg(long, env = "SIDECAR_WORKERS", value_name = "N", default_value = "1")]
    pub workers: String,

    /// On SIGTERM/SIGINT, how long in-flight connections may take to finish
    #[arg(
        long,
        env = "SIDECAR_DRAIN_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub drain_timeout: String,

    /// Log format: plain or json (level from SIDECAR_LOG or RUST_LOG, default info)
    #[arg(
        long,
        env = "SIDECAR_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "plain"
    )]
    pub log_format: String,

    /// Outbound stays open at least this long once a drain starts (for apps stopped at the same
    /// time that still call out)
    #[arg(
        long,
        env = "SIDECAR_DRAIN_MIN",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub drain_min: String,

    /// Admin listeners (/live /ready /metrics /config, POST /shutdown), comma-separated, or
    /// `none`
    #[arg(
        long,
        env = "SIDECAR_ADMIN",
        value_name = "ADDR[,ADDR...]|none",
        default_value = crate::admin::DEFAULT_ADMIN
    )]
    pub admin: String,

    /// /ready also requires the app: http://HOST:PORT/PATH (200-399) or tcp://HOST:PORT
    #[arg(long, env = "SIDECAR_APP_PROBE", value_name = "URL")]
    pub app_probe: Option<String>,

    /// How often the app probe and the interception check run
    #[arg(
        long,
        env = "SIDECAR_APP_PROBE_INTERVAL",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub app_probe_interval: String,

    /// This pod's pin directory (<pin root>/<pod id>): /ready requires the interception there,
    /// and its kernel counters are exported
    #[arg(long, env = "SIDECAR_PIN_DIR", value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Drain and exit when this process exits: a PID, or an absolute path to a pidfile
    #[arg(long, env = "SIDECAR_EXIT_WITH_APP", value_name = "PID|PIDFILE")]
    pub exit_with_app: Option<String>,

    /// Drain and exit when this file appears
    #[arg(long, env = "SIDECAR_SHUTDOWN_FILE", value_name = "PATH")]
    pub shutdown_file: Option<PathBuf>,

    /// Log one line per request (tracing target `access`)
    #[arg(long, env = "SIDECAR_ACCESS_LOG")]
    pub access_log: bool,

    /// Distinct destinations labelled in metrics before the rest become `other`
    #[arg(
        long,
        env = "SIDECAR_MAX_DESTINATIONS",
        value_name = "N",
        default_value = "100"
    )]
    pub max_destinations: String,

    /// The log forwarder, run inside the proxy when `--logs-file` / `SIDECAR_LOGS_FILE` is set
    /// (same keys as `sidecar logs`, prefixed `--logs-`).
    #[command(flatten)]
    pub logs: crate::logs::LogsConfig,
}
