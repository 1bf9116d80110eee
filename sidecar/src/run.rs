//! `sidecar run`: the proxy with its admin port, readiness, drain and (optionally) the log
//! forwarder. Its configuration (flags and `SIDECAR_*` environment), signals and triggers:
//!
//! | flag | environment | default | why |
//! |---|---|---|---|
//! | `--outbound` | `SIDECAR_OUTBOUND` | `127.0.0.1:15001,[::1]:15001` | where the eBPF connect hooks send captured connections; loopback only, never `0.0.0.0`. The default `[::1]` is skipped with a warning if IPv6 is off. |
//! | `--inbound` | `SIDECAR_INBOUND` | `0.0.0.0:15006,[::]:15006` | where sk_lookup steers connections to the app's captured ports; `none` turns inbound off. The default `[::]` is skipped with a warning if IPv6 is off. Not used with `--target`. |
//! | `--target` | `SIDECAR_TARGET`, `TARGET_URL` | none | reverse-proxy mode (no interception): every request goes to this `http://` URL |
//! | `--service-name` | `SIDECAR_SERVICE_NAME`, `SERVICE_NAME` | none | names this workload in logs (and metrics) |
//! | `--config` | `SIDECAR_CONFIG` | none | config file (TOML): `[defaults]` and per-destination `[[destination]]` timeouts, breaker and retries (format in [`crate::policy::config_file`]; its `[defaults]` yield to the flags below when those are set), and `[run]`, any other flag by its long name (below flags and the environment; [`file_args`]). Reloaded while running (see [`crate::reload`]): policies apply, a changed `[run]` key is rejected as needing a restart |
//! | `--connect-timeout` | `SIDECAR_CONNECT_TIMEOUT` | `1s` | see [`crate::policy::DEFAULT_CONNECT_TIMEOUT`]; a timeout answers 504 |
//! | `--request-timeout` | `SIDECAR_REQUEST_TIMEOUT` | `30s` | request head to response head, retries included, as in the seed proxy; answers 504 |
//! | `--idle-timeout` | `SIDECAR_IDLE_TIMEOUT` | `1h` | opaque TCP and upgraded (WebSocket) connections with no bytes either way are closed (see [`crate::policy::DEFAULT_IDLE_TIMEOUT`]) |
//! | `--breaker-consecutive-failures` | `SIDECAR_BREAKER_CONSECUTIVE_FAILURES` | `5` | failures in a row that open a destination's circuit breaker (the seed's 5); `0` turns it off |
//! | `--breaker-failure-rate` | `SIDECAR_BREAKER_FAILURE_RATE` | `off` | also open on this failure rate (`0.5`, `50%`) over 10 s with at least 20 requests |
//! | `--breaker-open-time` | `SIDECAR_BREAKER_OPEN_TIME` | `10s` | how long an open breaker answers 503 before it lets a probe through (the seed's 10 s); doubles on each re-trip up to 5 min |
//! | `--max-retries` | `SIDECAR_MAX_RETRIES` | `2` | retries of idempotent requests on connect failure, reset or 503 (other requests only after a failed connect: they never arrived); `0` turns retries off |
//! | `--retry-budget-ratio` | `SIDECAR_RETRY_BUDGET_RATIO` | `0.2` | retries may add at most this fraction of requests per destination (linkerd's budget) |
//! | `--retry-budget-min-per-second` | `SIDECAR_RETRY_BUDGET_MIN_PER_SECOND` | `10` | retries always allowed per second, so quiet destinations can retry |
//! | `--detect-timeout` | `SIDECAR_DETECT_TIMEOUT` | `1s` | wait for the rest of a partial client preface; never applied while nobody has sent anything |
//! | `--pool-idle-timeout` | `SIDECAR_POOL_IDLE_TIMEOUT` | `30s` | see [`crate::proxy::DEFAULT_POOL_IDLE_TIMEOUT`] |
//! | `--max-connections-per-destination` | `SIDECAR_MAX_CONNECTIONS_PER_DESTINATION` | `128` | upstream HTTP/1 connections per destination (outbound; inbound has `--inbound-max-connections`); past it requests queue (within the request timeout) for the next free connection: bounds the upstream's sockets and the proxy's memory (see [`crate::policy::DEFAULT_MAX_CONNECTIONS_PER_DESTINATION`]); per destination: `max_connections` in the config file |
//! | `--header-timeout` | `SIDECAR_HEADER_TIMEOUT` | `30s` | HTTP/1: a request head must be complete within this from when the connection starts waiting for it (also the keep-alive idle timeout); a stalled or slow head is closed |
//! | `--max-header-bytes` | `SIDECAR_MAX_HEADER_BYTES` | `32KiB` | HTTP/1: the largest request head, larger gets 431; also the HTTP/2 header list limit |
//! | `--http2-max-concurrent-streams` | `SIDECAR_HTTP2_MAX_CONCURRENT_STREAMS` | `100` | HTTP/2 streams one client connection may have open |
//! | `--http2-keepalive` | `SIDECAR_HTTP2_KEEPALIVE` | `30s` | HTTP/2: ping a quiet connection after this; no answer within as long closes it |
//! | `--park-idle-after` | `SIDECAR_PARK_IDLE_AFTER` | `1s` | HTTP/1: a kept-alive client connection silent this long after an answer is parked, kept in a compact form (about 0.4 KiB) until it speaks (`0s`: never) |
//! | `--http2-idle-timeout` | `SIDECAR_HTTP2_IDLE_TIMEOUT` | `5m` | HTTP/2: a connection with no stream open for this long is closed (GOAWAY) |
//! | `--max-downstream-connections` | `SIDECAR_MAX_DOWNSTREAM_CONNECTIONS` | `10000` | connections per direction; past it new ones are reset at accept (`sidecar_tcp_connections_refused_total`) |
//! | `--inbound-max-connections` | `SIDECAR_INBOUND_MAX_CONNECTIONS` | `1024` | upstream HTTP/1 connections to the app; past it requests queue for one. Separate from outbound's per-destination limit: slow inbound clients cannot starve outbound, nor (up to this many) other inbound clients |
//! | `--workers` | `SIDECAR_WORKERS` | `1` | a sidecar should be small: 1 = single-threaded runtime |
//! | `--drain-timeout` | `SIDECAR_DRAIN_TIMEOUT` | `30s` | bound on the whole drain (Kubernetes' default grace period) |
//! | `--drain-min` | `SIDECAR_DRAIN_MIN` | `0s` | outbound stays open at least this long after the drain starts; `0s` suits native sidecars (the app has exited before the proxy gets SIGTERM); classic sidecars, whose app gets SIGTERM at the same time, want a few seconds (Istio uses 5 s) |
//! | `--admin` | `SIDECAR_ADMIN` | `0.0.0.0:15090,[::]:15090` | admin listeners: `/live`, `/ready`, `/metrics`, `/config`, `POST /shutdown`, `POST /reload` (see [`crate::admin`]); `none` turns them off. Never captured by the kernel programs (`sidecar init --admin-port`). The default `[::]` is skipped with a warning if IPv6 is off |
//! | `--app-probe` | `SIDECAR_APP_PROBE` | none | `/ready` also needs the app: `http://HOST:PORT/PATH` (200-399) or `tcp://HOST:PORT`; use a loopback address (a pod IP would go through inbound capture) |
//! | `--app-probe-interval` | `SIDECAR_APP_PROBE_INTERVAL` | `1s` | how often the app probe and the interception check run |
//! | `--pin-dir` | `SIDECAR_PIN_DIR` | none | this pod's pin directory (`<pin root>/<pod id>`): `/ready` also needs the interception (the link pins present), and the kernel counters are exported when the stats map pin is readable. Without it neither is checked (`/config` says so) |
//! | `--exit-with-app` | `SIDECAR_EXIT_WITH_APP` | none | drain and exit when this process exits: a PID, or an absolute path to a pidfile (waited for). Needs a shared PID namespace in Kubernetes (`shareProcessNamespace: true`); also makes the drain wait for the app |
//! | `--shutdown-file` | `SIDECAR_SHUTDOWN_FILE` | none | drain and exit when this file appears (a Job's app `touch`es it in a shared `emptyDir` as its last step) |
//! | `--access-log` | `SIDECAR_ACCESS_LOG` | off | one line per request under the tracing target `access`: direction, method, authority, path, status, duration, upstream, peer, error reason |
//! | `--max-destinations` | `SIDECAR_MAX_DESTINATIONS` | `100` | distinct `destination` label values in metrics; later ones are `other` |
//! | `--log-format` | `SIDECAR_LOG_FORMAT` | `plain` | `plain` or `json` |
//! | | `SIDECAR_LOG`, else `RUST_LOG` | `info` | tracing-subscriber filter |
//!
//! Signals and other triggers:
//!
//! | trigger | behaviour |
//! |---|---|
//! | SIGTERM, SIGINT, `POST /shutdown` (the proxy's uid, on loopback), `--exit-with-app` process exits, `--shutdown-file` appears | drain (see [`crate::lifecycle`]): `/ready` turns 503, inbound stops accepting (already queued connections are served) and finishes in-flight requests, outbound keeps working until inbound is done, `--drain-min` has passed and the app has no outbound connection open; then exit 0 |
//! | `--drain-timeout` passes during the drain | what is still open is closed; exit 0 |
//! | a second SIGTERM or SIGINT during the drain | exit 0 at once, closing everything |
//! | SIGHUP, `POST /reload` (the proxy's uid), the `--config` file changes | reload the config file ([`crate::reload`]); nothing drains, no connection closes |
//!
//! Bad configuration: every bad key is reported at once, exit 64.
//!
//! The code: [`args`] (the flags), [`file_args`] (the config file's `[run]`), [`settings`]
//! (checking them), [`wiring`] (telemetry, admin, readiness checks, drain triggers),
//! [`config_json`] (`/config`), [`check`] (`sidecar check-config`); this file is the script.
pub mod args;
pub mod check;
pub mod config_json;
pub mod file_args;
pub mod settings;
mod wiring;

use std::process::ExitCode;

use tracing::{error, info, warn};

pub use args::{RunArgs, DEFAULT_DRAIN_TIMEOUT, DEFAULT_INBOUND, DEFAULT_OUTBOUND};
pub use config_json::config_json;
pub use settings::{ConfigError, ConfigErrors, LifecycleSettings, Settings};

use crate::cli::{self, Signals};
use crate::lifecycle::{self, DrainOutcome, DrainPlan, Readiness};
use crate::metrics::Dir;
use crate::proxy;
use crate::reload::{self, Reloader};
use std::sync::Arc;

/// `sidecar run`: `argv` is the command line from `run` on, `matches` its parse (the config
/// file's `[run]` section fills only what neither sets).
pub fn main(args: RunArgs, argv: Vec<std::ffi::OsString>, matches: &clap::ArgMatches) -> ExitCode {
    let (args, run_file) = match file_args::merge(args, argv, matches) {
        Ok(merged) => merged,
        Err(errors) => {
            eprintln!(
                "{}",
                ConfigErrors {
                    command: "run",
                    errors
                }
            );
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    let settings = match Settings::from_args(&args, &|name| std::env::var(name).ok()) {
        Ok(s) => s,
        Err(mut errors) => {
            file_args::relabel(&mut errors.errors, &run_file, args.config.as_deref());
            eprintln!("{errors}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    cli::init_logging(settings.log_format, &settings.log_filter);
    let runtime = match cli::runtime(settings.workers) {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(settings, run_file));
    // Connections still running after the drain deadline are dropped here, without waiting.
    runtime.shutdown_background();
    code
}

/// Start, serve until a trigger, drain, exit.
async fn run(settings: Settings, run_file: file_args::RunFile) -> ExitCode {
    // Registered before listening so that a signal right after start-up is not lost.
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP reloads; its default action would end the process, so it is caught from the start.
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install the SIGHUP handler");
            return ExitCode::FAILURE;
        }
    };
    let life = settings.lifecycle.clone();
    let (registry, telemetry) = wiring::telemetry(&settings);
    let mut readiness = Readiness::new(life.pin_dir.is_some(), life.app_probe.is_some());
    let identity = settings
        .identity_dir
        .clone()
        .map(|dir| Arc::new(crate::identity::IdentityStore::new(dir, &registry)));
    if identity.is_some() {
        readiness = readiness.with_identity();
    }
    let readiness = Arc::new(readiness);
    let mut proxy_config = settings.proxy.clone();
    proxy_config.identity = identity.clone();
    crate::metrics::register(
        &registry,
        Box::new(lifecycle::gauges::ReadinessCollector::new(Arc::clone(
            &readiness,
        ))),
        "readiness",
    );
    // Beside the proxy until the drain is over, then it flushes what it has read.
    let logs = wiring::LogForwarder::start(settings.logs.clone());

    let resolvers = proxy::Resolvers::kernel();
    let proxy = match proxy::start_observed(proxy_config, resolvers, telemetry).await {
        Ok(p) => p,
        Err(e) => {
            error!(error = %e, "cannot start the proxy");
            return ExitCode::FAILURE;
        }
    };
    readiness.set_listening();

    let mut triggers = wiring::Triggers::new();
    let background = tokio_util::sync::CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let origins = run_file.origins.clone();
    let reloader = Arc::new(
        Reloader::new(
            settings.policy_source.clone(),
            Arc::clone(proxy.policies()),
            settings.policy_text.clone(),
            Some(Box::new(move |path, text| {
                file_args::restart_required(path, text, &run_file)
            })),
            &registry,
        )
        .with_identity(identity.clone()),
    );
    reload::start(&reloader, hangups, &background);
    let view = {
        let mut base = config_json(&settings, &proxy);
        base["sources"] = serde_json::json!(origins);
        let store = Arc::clone(proxy.policies());
        let reloader = Arc::clone(&reloader);
        Box::new(move || config_json::current(&base, &store.load(), &reloader).to_string())
    };
    let Ok(admin_addrs) = wiring::start_admin(
        &life,
        &readiness,
        registry,
        view,
        &reloader,
        &triggers,
        &background,
    ) else {
        return ExitCode::FAILURE;
    };
    wiring::keep_checking(&life, &readiness, &proxy, identity, &background);
    let app_done = triggers.watch(&life);
    wiring::log_listening(&settings, &proxy, &admin_addrs);

    let trigger = tokio::select! {
        signal = signals.next() => lifecycle::Trigger::Signal(signal),
        Some(trigger) = triggers.next() => trigger,
    };
    info!(
        trigger = %trigger,
        drain_timeout = ?settings.drain_timeout,
        "draining: not ready, inbound closed, outbound open until the app is done"
    );
    let plan = DrainPlan {
        deadline: settings.drain_timeout,
        min: life.drain_min,
    };
    let watching_app = life.exit_with_app.is_some();
    let force = signals.next();
    match lifecycle::drain(&proxy, &readiness, &plan, app_done, watching_app, force).await {
        DrainOutcome::Drained => info!("drained; exiting"),
        DrainOutcome::DeadlineReached { inbound, outbound } => warn!(
            inbound,
            outbound, "drain timeout reached; closing the connections still open"
        ),
        DrainOutcome::Forced(signal) => warn!(
            signal,
            inbound = proxy.active(Dir::Inbound).get(),
            outbound = proxy.active(Dir::Outbound).get(),
            "second signal: exiting at once, closing what is still open"
        ),
    }
    logs.stop().await;
    ExitCode::SUCCESS
}
