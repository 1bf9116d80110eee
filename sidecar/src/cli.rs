//! What every long-running subcommand (`run`, `logs`, `cleanup --interval`) sets up the same
//! way: logging to stderr, the tokio runtime, and the SIGTERM/SIGINT pair. Imports nothing from
//! the crate.
use std::io::{self, IsTerminal};

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

impl LogFormat {
    /// `plain` (or `text`) or `json`.
    pub fn parse(value: &str) -> Result<LogFormat, String> {
        match value.trim() {
            "plain" | "text" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected plain or json".to_owned()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Plain => "plain",
            LogFormat::Json => "json",
        }
    }
}

/// The log filter from `SIDECAR_LOG`, else `RUST_LOG`, else `info`: (the variable it came from,
/// the filter). Blank values count as unset.
pub fn log_filter(env: &dyn Fn(&str) -> Option<String>) -> (&'static str, String) {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    match set("SIDECAR_LOG") {
        Some(f) => ("SIDECAR_LOG", f),
        None => match set("RUST_LOG") {
            Some(f) => ("RUST_LOG", f),
            None => ("SIDECAR_LOG", "info".to_owned()),
        },
    }
}

/// Checks a tracing filter; the error says what is wrong.
pub fn check_filter(filter: &str) -> Result<(), String> {
    EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("not a log filter ({e}); e.g. info or warn,access=info"))
}

/// Logs to stderr in `format`, filtered by `filter` (checked already; `info` if not).
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Container log collectors store escape codes verbatim: colour only on a terminal.
        .with_ansi(io::stderr().is_terminal());
    // `try_init` fails only if a subscriber is already installed (embedding): keep that one.
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The runtime: single-threaded for `workers == 1` (a sidecar should be small), else a
/// multi-threaded one with that many workers.
pub fn runtime(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("sidecar-worker")
            .enable_all()
            .build()
    }
}

/// SIGTERM and SIGINT, registered at once (before listening, so that a signal right after
/// start-up is not lost). Call inside the runtime.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The name of the next signal to arrive.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
