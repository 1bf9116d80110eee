//! Dynamic configuration: the policy file (`--config`) is the source of truth, read again when it
//! changes, on `SIGHUP` and on `POST /reload`. Every trigger goes through [`Reloader::reload`]:
//! read, validate, then swap the policies whole ([`PolicyStore::replace`]); a request already
//! running finishes under the policies it started with. A file that cannot be read or is invalid
//! changes nothing: the last good configuration stays in force, every bad key is reported (once
//! per distinct problem) in the log, in `/config` and as a rejected reload in the metrics.
//!
//! | trigger | how it is noticed |
//! |---|---|
//! | the file changes | polled every [`POLL`] by content (so an atomic rename, an in-place write and the kubelet's `..data` symlink swap of a mounted ConfigMap are all seen), applied once it has been still for [`SETTLE`] (a burst of writes is one reload) |
//! | `SIGHUP` | at once |
//! | `POST /reload` on the admin port | at once; only from the proxy's own uid (see [`crate::admin`]); answers with the outcome |
//!
//! The workload identity (`--identity-dir`, see [`crate::identity`]) reloads the same way: its
//! three files are polled by content (settled like the config file), and `SIGHUP` and
//! `/reload` read them again too. A bad set keeps the identity in force.
//!
//! The descriptor sets named by `[[transcode]]` sections are polled with the file: replacing a
//! set alone reloads too (and a set that does not compile is rejected like a bad key).
//!
//! A file mounted with `subPath` is a bind mount of one file, which the kubelet never updates:
//! [`Watch::describe`] says so (log at start, `/config`), and `SIGHUP`/`/reload` still work.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use sha2::{Digest, Sha256};
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::identity::IdentityStore;
use crate::policy::config_file::{KeyError, PolicySource};
use crate::policy::{Changes, PolicyStore};

/// How often the file is looked at: a change arrives within about this plus [`SETTLE`].
pub const POLL: Duration = Duration::from_secs(1);
/// A changed file is read once it has stayed the same this long (a burst of writes is one
/// reload; a writer that truncates then writes is not caught half-way).
pub const SETTLE: Duration = Duration::from_millis(200);
/// While settling, the file is looked at this often.
const SETTLE_STEP: Duration = Duration::from_millis(50);
/// A file that never settles is read anyway after this.
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    File,
    Signal,
    Admin,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::File => "file change",
            Cause::Signal => "SIGHUP",
            Cause::Admin => "POST /reload",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new configuration is in force.
    Applied(Changes),
    /// The file says what is already in force (maybe with other comments or layout).
    Unchanged,
    /// Not applied: the configuration in force stays. Every problem found.
    Rejected(Vec<KeyError>),
}

impl Outcome {
    /// The `result` label of `sidecar_config_reloads_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied(_) => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Rejected(_) => "rejected",
        }
    }

    /// One line per problem, or what changed.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Applied(c) => format!(
                "applied: {} rule(s) kept with their state, {} new or changed, {} removed{}",
                c.kept,
                c.replaced,
                c.removed,
                if c.defaults_changed {
                    "; [defaults] changed (destinations without a rule start afresh)"
                } else {
                    ""
                }
            ),
            Outcome::Unchanged => "unchanged: the configuration in force already says this".into(),
            Outcome::Rejected(errors) => {
                let mut s = String::from(
                    "rejected; the configuration in force stays. Fix these and save again:",
                );
                for e in errors {
                    s.push_str(&format!("\n  {}: {:?}: {}", e.key, e.value, e.problem));
                }
                s
            }
        }
    }
}

/// The metric families of reloads.
struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: IntGauge,
    last_ok: IntGauge,
    info: IntGaugeVec,
}

impl ReloadMetrics {
    fn new(registry: &Registry) -> ReloadMetrics {
        // Constant, valid definitions: creating them cannot fail.
        let reloads = IntCounterVec::new(
            Opts::new(
                "sidecar_config_reloads_total",
                "Configuration reloads, by result: applied, rejected (the old one stays), unchanged",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let last_success = IntGauge::new(
            "sidecar_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (Unix time)",
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let last_ok = IntGauge::new(
            "sidecar_config_last_reload_successful",
            "1 if the last reload was applied or unchanged, 0 if it was rejected",
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let info = IntGaugeVec::new(
            Opts::new(
                "sidecar_config_info",
                "The configuration in force: its file's SHA-256 (sha256sum gives the same) and its generation",
            ),
            &["sha256", "generation"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        for result in ["applied", "rejected", "unchanged"] {
            reloads.with_label_values(&[result]);
        }
        crate::metrics::register(registry, Box::new(reloads.clone()), "config reloads");
        crate::metrics::register(registry, Box::new(last_success.clone()), "config reloads");
        crate::metrics::register(registry, Box::new(last_ok.clone()), "config reloads");
        crate::metrics::register(registry, Box::new(info.clone()), "config reloads");
        ReloadMetrics {
            reloads,
            last_success,
            last_ok,
            info,
        }
    }
}

/// The state `/config` reports.
#[derive(Debug, Clone)]
struct Status {
    /// SHA-256 of the file in force (`None`: no file).
    sha256: Option<String>,
    generation: u64,
    loaded_at: SystemTime,
    /// The file's text in force (for where each value comes from).
    text: Option<String>,
    last_attempt: Option<(SystemTime, Cause, &'static str)>,
    /// The problems of the last rejected reload, until one is applied or finds the file fixed.
    last_error: Option<Vec<KeyError>>,
}

/// A check of a new file's text beyond the policies (`sidecar run`'s `[run]` section, which
/// needs a restart): the problems, if any, reject the reload.
pub type Guard = Box<dyn Fn(&Path, &str) -> Vec<KeyError> + Send + Sync>;

/// The one reload path (see the module documentation).
pub struct Reloader {
    source: PolicySource,
    guard: Option<Guard>,
    identity: Option<Arc<IdentityStore>>,
    store: Arc<PolicyStore>,
    status: Mutex<Status>,
    metrics: ReloadMetrics,
    watch: Watch,
}

impl Reloader {
    /// `store` was built from `source`'s first reading, `text` (the file's text then).
    pub fn new(
        source: PolicySource,
        store: Arc<PolicyStore>,
        text: Option<String>,
        guard: Option<Guard>,
        registry: &Registry,
    ) -> Reloader {
        let metrics = ReloadMetrics::new(registry);
        let now = SystemTime::now();
        let sha256 = text.as_deref().map(sha256_hex);
        let generation = store.load().generation();
        metrics.last_ok.set(1);
        metrics.last_success.set(unix_seconds(now));
        metrics
            .info
            .with_label_values(&[sha256.as_deref().unwrap_or(""), &generation.to_string()])
            .set(1);
        let watch = Watch::of(source.file.as_deref());
        Reloader {
            source,
            guard,
            identity: None,
            store,
            status: Mutex::new(Status {
                sha256,
                generation,
                loaded_at: now,
                text,
                last_attempt: None,
                last_error: None,
            }),
            metrics,
            watch,
        }
    }

    /// Reloads `identity` too (on `SIGHUP`, `/reload`, and when its files change).
    pub fn with_identity(mut self, identity: Option<Arc<IdentityStore>>) -> Reloader {
        self.identity = identity;
        self
    }

    /// Reads the file again and puts it in force if it is valid (see the module documentation);
    /// on `SIGHUP` and `/reload`, the identity too. Blocking (file I/O); reloads run one at a
    /// time.
    pub fn reload(&self, cause: Cause) -> Outcome {
        if cause != Cause::File {
            if let Some(identity) = &self.identity {
                identity.reload();
            }
        }
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let loaded = self.source.load();
        let text = loaded.text.and_then(Result::ok);
        let guarded = match (&self.guard, &self.source.file, &text) {
            (Some(guard), Some(path), Some(text)) => guard(path, text),
            _ => Vec::new(),
        };
        let outcome = match loaded.result {
            Err(mut errors) => {
                errors.extend(guarded);
                Outcome::Rejected(errors)
            }
            Ok(_) if !guarded.is_empty() => Outcome::Rejected(guarded),
            Ok(config) if config == *self.store.load().config() => Outcome::Unchanged,
            Ok(config) => Outcome::Applied(self.store.replace(&config)),
        };
        let now = SystemTime::now();
        status.last_attempt = Some((now, cause, outcome.label()));
        self.metrics
            .reloads
            .with_label_values(&[outcome.label()])
            .inc();
        match &outcome {
            Outcome::Rejected(errors) => {
                self.metrics.last_ok.set(0);
                // Reported once per distinct set of problems: a watched file that stays broken
                // is not logged again on every SIGHUP or poll.
                if status.last_error.as_ref() != Some(errors) {
                    warn!(
                        cause = cause.as_str(),
                        "config reload {}",
                        outcome.describe()
                    );
                }
                status.last_error = Some(errors.clone());
            }
            Outcome::Unchanged => {
                self.metrics.last_ok.set(1);
                if status.last_error.take().is_some() {
                    info!(
                        cause = cause.as_str(),
                        "config file fixed; it says what is in force"
                    );
                }
                self.set_file(&mut status, text);
            }
            Outcome::Applied(_) => {
                self.metrics.last_ok.set(1);
                status.last_error = None;
                status.generation = self.store.load().generation();
                status.loaded_at = now;
                self.metrics.last_success.set(unix_seconds(now));
                self.set_file(&mut status, text);
                info!(
                    cause = cause.as_str(),
                    generation = status.generation,
                    sha256 = status.sha256.as_deref().unwrap_or("-"),
                    "config reload {}",
                    outcome.describe()
                );
            }
        }
        outcome
    }

    /// Records the file text in force (hash, info metric).
    fn set_file(&self, status: &mut Status, text: Option<String>) {
        let sha256 = text.as_deref().map(sha256_hex);
        // One series: the configuration in force.
        self.metrics.info.reset();
        self.metrics
            .info
            .with_label_values(&[
                sha256.as_deref().unwrap_or(""),
                &status.generation.to_string(),
            ])
            .set(1);
        status.sha256 = sha256;
        status.text = text;
    }

    /// `/config`'s `config_file` section: the file, its hash and load time, the last attempt
    /// and its problems, how changes are noticed, and where each default comes from.
    pub fn status_json(&self) -> serde_json::Value {
        let status = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let sources: serde_json::Map<String, serde_json::Value> = self
            .source
            .sources(status.text.as_deref())
            .into_iter()
            .map(|(k, v)| (format!("defaults.{k}"), v.into()))
            .collect();
        serde_json::json!({
            "file": self.source.file.as_ref().map(|p| p.display().to_string()),
            "sha256": status.sha256,
            "generation": status.generation,
            "loaded_at_unix": unix_seconds(status.loaded_at),
            "last_attempt": status.last_attempt.map(|(at, cause, result)| serde_json::json!({
                "at_unix": unix_seconds(at),
                "cause": cause.as_str(),
                "result": result,
            })),
            "last_error": status.last_error.as_ref().map(|errors| errors.iter().map(|e| serde_json::json!({
                "key": e.key,
                "value": e.value,
                "problem": e.problem,
            })).collect::<Vec<_>>()),
            "watch": self.watch.describe(),
            "sources": sources,
            "identity": self.identity.as_ref().map(|i| i.status_json()),
        })
    }

    /// How file changes are noticed (or why they are not).
    pub fn watch(&self) -> &Watch {
        &self.watch
    }
}

/// How the file is watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// No `--config`: nothing to watch.
    NoFile,
    /// Polled by content.
    Polled(PathBuf),
    /// A bind mount of one file (a Kubernetes `subPath`): never updated by the kubelet.
    SubPath(PathBuf),
}

impl Watch {
    fn of(file: Option<&Path>) -> Watch {
        match file {
            None => Watch::NoFile,
            Some(path) => {
                let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                if is_mount_point(&mountinfo, path) {
                    Watch::SubPath(path.to_owned())
                } else {
                    Watch::Polled(path.to_owned())
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Watch::NoFile => "no --config file; SIGHUP and POST /reload re-read the flags' policy (unchanged)".into(),
            Watch::Polled(p) => format!(
                "{} is read every {:?} and applied once unchanged for {:?}; also SIGHUP, POST /reload",
                p.display(),
                POLL,
                SETTLE
            ),
            Watch::SubPath(p) => format!(
                "{} is a mount point of its own (a Kubernetes subPath mount), which the kubelet never updates: mount the ConfigMap as a directory and point --config into it. Still polled; SIGHUP and POST /reload apply a change made in place",
                p.display()
            ),
        }
    }
}

/// True if `path` is the mount point of a mount in `mountinfo` (`/proc/self/mountinfo`'s text).
fn is_mount_point(mountinfo: &str, path: &Path) -> bool {
    sidecar_common::mountinfo::parse(mountinfo)
        .iter()
        .any(|m| m.mount_point == path)
}

fn sha256_hex(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

use crate::units::unix_seconds;

/// The digest of a file's first `max + 1` bytes (or why it cannot be read).
fn file_digest(path: &Path, max: u64) -> Result<[u8; 32], std::io::ErrorKind> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.kind())?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.kind())?;
    Ok(Sha256::digest(&bytes).into())
}

/// The file's digest combined with those of the descriptor sets its `[[transcode]]` sections
/// name (`None`: unreadable).
fn with_sets(text: [u8; 32], sets: impl Iterator<Item = Option<[u8; 32]>>) -> [u8; 32] {
    let mut all = Sha256::new();
    all.update(text);
    for set in sets {
        match set {
            Some(digest) => all.update(digest),
            None => all.update([0u8]),
        }
    }
    all.finalize().into()
}

/// What the poller compares: the file's content and the descriptor sets of the sections in
/// force (so replacing a set alone reloads too), or why the file cannot be read.
fn snapshot(path: &Path, store: &PolicyStore) -> Result<[u8; 32], std::io::ErrorKind> {
    let text = file_digest(path, crate::policy::config_file::MAX_FILE_BYTES)?;
    let policies = store.load();
    let sets = policies.config().transcode.iter().map(|t| {
        file_digest(
            &t.settings().descriptor_set,
            crate::transcode::MAX_DESCRIPTOR_SET_BYTES,
        )
        .ok()
    });
    Ok(with_sets(text, sets))
}

/// Runs the triggers until `stop`: the file poller (when there is a file) and `hangups`
/// (`SIGHUP`, registered by the caller as early as it can).
pub fn start(reloader: &Arc<Reloader>, mut hangups: Signal, stop: &CancellationToken) {
    let on_signal = Arc::clone(reloader);
    let stop_signal = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_signal.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            run_blocking(&on_signal, Cause::Signal).await;
        }
    });
    if let Some(identity) = reloader.identity.clone() {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = poll_identity(&identity) => {}
            }
        });
    }
    if let Watch::Polled(path) | Watch::SubPath(path) = reloader.watch.clone() {
        if let Watch::SubPath(_) = reloader.watch {
            warn!("{}", reloader.watch.describe());
        }
        let reloader = Arc::clone(reloader);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = poll(&reloader, &path) => {}
            }
        });
    }
}

/// Reloads on the blocking pool (file I/O, building the new policies).
pub async fn run_blocking(reloader: &Arc<Reloader>, cause: Cause) -> Outcome {
    let reloader = Arc::clone(reloader);
    tokio::task::spawn_blocking(move || reloader.reload(cause))
        .await
        .unwrap_or_else(|e| {
            Outcome::Rejected(vec![KeyError {
                key: "reload".into(),
                value: String::new(),
                problem: format!("the reload task failed: {e}"),
            }])
        })
}

/// Polls `path` by content; a change is applied once the file has settled.
async fn poll(reloader: &Arc<Reloader>, path: &Path) {
    // Compared with the text in force, not with a first look: a change made between the start
    // and this task's first turn is a change too.
    let in_force = reloader
        .status
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .text
        .as_ref()
        .map(|text| {
            let policies = reloader.store.load();
            let sets = policies.config().transcode.iter().map(|t| Some(t.digest()));
            with_sets(Sha256::digest(text.as_bytes()).into(), sets)
        });
    let store = &reloader.store;
    let mut seen = match in_force {
        Some(digest) => Ok(digest),
        None => snapshot(path, store),
    };
    loop {
        seen = next_change(seen, || snapshot(path, store)).await;
        run_blocking(reloader, Cause::File).await;
    }
}

/// Polls `look` every [`POLL`] until it differs from `seen`, then until it has stayed the same
/// for [`SETTLE`] (at most [`SETTLE_MAX`]): a burst of writes is one change. Returns the settled
/// value.
async fn next_change<T: PartialEq>(seen: T, look: impl Fn() -> T) -> T {
    loop {
        tokio::time::sleep(POLL).await;
        let now = look();
        if now == seen {
            continue;
        }
        let started = tokio::time::Instant::now();
        let mut last = now;
        let mut still_since = tokio::time::Instant::now();
        while still_since.elapsed() < SETTLE && started.elapsed() < SETTLE_MAX {
            tokio::time::sleep(SETTLE_STEP).await;
            let next = look();
            if next != last {
                last = next;
                still_since = tokio::time::Instant::now();
            }
        }
        return last;
    }
}

/// Polls the identity files by content; a change is read once they have settled (a
/// `..data` swap changes all three at once; a writer that replaces them one by one is waited for).
async fn poll_identity(identity: &Arc<IdentityStore>) {
    // Compared with the files in force, so that a change made before this task's first turn is
    // a change too.
    let mut seen = match identity.current() {
        Some(current) => Ok(current.digest()),
        None => identity.snapshot(),
    };
    loop {
        seen = next_change(seen, || identity.snapshot()).await;
        let store = Arc::clone(identity);
        let _ = tokio::task::spawn_blocking(move || store.reload()).await;
    }
}

#[cfg(test)]
mod tests;
