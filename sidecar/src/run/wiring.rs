//! The pieces `sidecar run` wires around the proxy: telemetry (the metric families and
//! collectors), the admin listeners, the readiness checks, the drain triggers and the log
//! forwarder. Each is started here and owned by the script in [`super`].
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::settings::{LifecycleSettings, Settings};
use crate::lifecycle::{self, Readiness, Trigger};
use crate::metrics::ProxyMetrics;
use crate::proxy::{Proxy, Telemetry};
use crate::reload::Reloader;

/// The proxy's metric families and the process and kernel collectors, in the default registry
/// (what `/metrics` serves).
pub(super) fn telemetry(settings: &Settings) -> (Registry, Telemetry) {
    let life = &settings.lifecycle;
    let registry = prometheus::default_registry().clone();
    let service = settings.proxy.service_name.as_deref().unwrap_or("");
    let metrics = match ProxyMetrics::new(&registry, service, life.max_destinations) {
        Ok(m) => m,
        Err(e) => {
            // Only possible when embedded twice in one process: count, export the first.
            warn!(error = %e, "proxy metrics already registered; these are not exported");
            ProxyMetrics::unregistered()
        }
    };
    match crate::metrics::process::ProcessCollector::new() {
        Ok(c) => crate::metrics::register(&registry, Box::new(c), "process"),
        Err(e) => warn!(error = %e, "process metrics unavailable"),
    }
    if let Some(dir) = &life.pin_dir {
        match crate::metrics::ebpf::EbpfCollector::new(dir) {
            Ok(c) => crate::metrics::register(&registry, Box::new(c), "ebpf"),
            Err(e) => warn!(error = %e, "kernel counter metrics unavailable"),
        }
    }
    let telemetry = Telemetry {
        metrics,
        access_log: life.access_log,
    };
    (registry, telemetry)
}

/// What starts the drain besides signals: `POST /shutdown`, the app exiting, the shutdown file.
pub(super) struct Triggers {
    tx: mpsc::UnboundedSender<Trigger>,
    rx: mpsc::UnboundedReceiver<Trigger>,
}

impl Triggers {
    pub(super) fn new() -> Triggers {
        let (tx, rx) = mpsc::unbounded_channel();
        Triggers { tx, rx }
    }

    /// Starts watching the app (`--exit-with-app`) and the shutdown file. The returned future
    /// resolves once the watched app has exited, or once it turns out it cannot be watched
    /// (then the drain does not wait for it).
    pub(super) fn watch(&self, life: &LifecycleSettings) -> impl std::future::Future<Output = ()> {
        let (app_done_tx, mut app_done_rx) = tokio::sync::watch::channel(false);
        let interval = life.probe_interval;
        if let Some(target) = life.exit_with_app.clone() {
            let triggers = self.tx.clone();
            info!(app = %target, "will drain and exit when the app exits");
            tokio::spawn(async move {
                match lifecycle::watch_app(target, interval).await {
                    Ok(pid) => {
                        let _ = triggers.send(Trigger::AppExited(pid));
                    }
                    Err(e) => warn!(error = %e, "not watching the app (--exit-with-app)"),
                }
                let _ = app_done_tx.send(true);
            });
        }
        if let Some(path) = life.shutdown_file.clone() {
            let triggers = self.tx.clone();
            tokio::spawn(async move {
                let path = lifecycle::watch_shutdown_file(path, interval).await;
                let _ = triggers.send(Trigger::ShutdownFile(path));
            });
        }
        async move {
            let _ = app_done_rx.wait_for(|done| *done).await;
        }
    }

    /// The next trigger.
    pub(super) async fn next(&mut self) -> Option<Trigger> {
        self.rx.recv().await
    }
}

/// Binds the admin listeners and serves them until `stop`. Returns the bound addresses, or
/// `Err` (logged) when a required one cannot be bound.
pub(super) fn start_admin(
    life: &LifecycleSettings,
    readiness: &Arc<Readiness>,
    registry: Registry,
    config: crate::admin::ConfigView,
    reloader: &Arc<Reloader>,
    triggers: &Triggers,
    stop: &CancellationToken,
) -> Result<Vec<SocketAddr>, ()> {
    let state = Arc::new(crate::admin::AdminState::new(
        Arc::clone(readiness),
        registry,
        config,
        triggers.tx.clone(),
        Some(Arc::clone(reloader)),
    ));
    let mut bound = Vec::new();
    for l in &life.admin {
        let listener = match crate::net::bind(l.addr) {
            Ok(listener) => listener,
            Err(e) if !l.required => {
                warn!(addr = %l.addr, error = %e, "optional admin listener not bound (IPv6 disabled?); continuing without it");
                continue;
            }
            Err(e) => {
                error!(addr = %l.addr, error = %e, hint = %crate::net::bind_hint(&e), "cannot listen on the admin address (--admin)");
                return Err(());
            }
        };
        bound.push(l.addr);
        tokio::spawn(crate::admin::serve(
            listener,
            Arc::clone(&state),
            stop.clone(),
        ));
    }
    if bound.is_empty() {
        warn!("no admin listener (--admin none): no probes, metrics or /shutdown");
    }
    Ok(bound)
}

/// Keeps the interception and app readiness conditions up to date until `stop`.
pub(super) fn keep_checking(
    life: &LifecycleSettings,
    readiness: &Arc<Readiness>,
    proxy: &Proxy,
    identity: Option<Arc<crate::identity::IdentityStore>>,
    stop: &CancellationToken,
) {
    let load = proxy.inbound_load();
    let policies = Arc::clone(proxy.policies());
    let identity = move || {
        let Some(store) = &identity else {
            return Ok(());
        };
        let policies = policies.load();
        let config = policies.config();
        if !config.inbound.any_strict() {
            return Ok(());
        }
        match store.ready_problem(config.mesh.expiry_margin) {
            Some(problem) => Err(format!("{problem} (a strict mTLS port needs one)")),
            None => Ok(()),
        }
    };
    let inbound_listeners = proxy.inbound_addrs().len();
    let readiness = Arc::clone(readiness);
    let (pin_dir, probe, interval) = (
        life.pin_dir.clone(),
        life.app_probe.clone(),
        life.probe_interval,
    );
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = lifecycle::keep_checking(&readiness, pin_dir, inbound_listeners, probe, interval, load, identity) => {}
        }
    });
}

/// The "listening" line: every bound address, the mode, the service.
pub(super) fn log_listening(settings: &Settings, proxy: &Proxy, admin: &[SocketAddr]) {
    let list = |addrs: &[SocketAddr]| {
        if addrs.is_empty() {
            "-".to_owned()
        } else {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let mode = match &settings.proxy.target {
        Some(t) => format!("target {}", t.as_str()),
        None => "intercept".to_owned(),
    };
    info!(
        addresses = %list(proxy.local_addrs()),
        inbound = %list(proxy.inbound_addrs()),
        admin = %list(admin),
        %mode,
        service = settings.proxy.service_name.as_deref().unwrap_or("-"),
        workers = settings.workers,
        "listening"
    );
}

/// The log forwarder beside the proxy (`--logs-file`): it runs until [`LogForwarder::stop`],
/// then flushes what it has read (bounded by its own `--logs-shutdown-timeout`).
pub(super) struct LogForwarder {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LogForwarder {
    pub(super) fn start(settings: Option<crate::logs::Settings>) -> LogForwarder {
        let stop = CancellationToken::new();
        let task = settings.map(|logs| {
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::logs::forward(logs, stop).await {
                    error!(error = %e, "log forwarder stopped");
                }
            })
        });
        LogForwarder { stop, task }
    }

    pub(super) async fn stop(self) {
        if let Some(task) = self.task {
            self.stop.cancel();
            let _ = task.await;
        }
    }
}
