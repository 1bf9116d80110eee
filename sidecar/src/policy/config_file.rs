//! Policy configuration: the defaults from flags / environment and from the `[defaults]` section
//! of the config file (`--config FILE`, `SIDECAR_CONFIG`), and per-destination overrides from its
//! `[[destination]]` sections. Every bad key is reported at once (`sidecar run` exits 64).
//!
//! Precedence, lowest first: built-in defaults, the file's `[defaults]`, flags / environment
//! variables that are set, a matching `[[destination]]` (first match in file order wins).
//!
//! ```toml
//! [defaults]
//! request_timeout = "10s"
//! breaker.consecutive_failures = 5
//!
//! [[destination]]
//! match = "10.0.0.7:80"           # original destination address, or
//! request_timeout = "2s"
//! [destination.breaker]
//! open_time = "30s"
//! failure_on = ["connect", "timeout", "503"]
//!
//! [[destination]]
//! match = "api.example:443"       # a request authority (Host / :authority)
//! retry = { max_retries = 0 }
//! ```
//!
//! | key | type | default | flag / environment | meaning |
//! |---|---|---|---|---|
//! | `connect_timeout` | duration | `1s` | `--connect-timeout` / `SIDECAR_CONNECT_TIMEOUT` | TCP connect to the upstream; a timeout answers 504 (opaque TCP: reset) |
//! | `request_timeout` | duration | `30s` | `--request-timeout` / `SIDECAR_REQUEST_TIMEOUT` | request head to response head, retries included; answers 504 |
//! | `idle_timeout` | duration | `1h` | `--idle-timeout` / `SIDECAR_IDLE_TIMEOUT` | opaque TCP and upgraded (WebSocket) connections with no bytes either way are closed |
//! | `max_connections` | integer | `128` | `--max-connections-per-destination` / `SIDECAR_MAX_CONNECTIONS_PER_DESTINATION` | upstream HTTP/1 connections per destination (and direction); past it requests queue, within the request timeout, for the next free connection. Connections are pooled by address, so a name rule (`match = "api.example:443"`) does not change it except in `--target` mode |
//! | `breaker.consecutive_failures` | integer | `5` | `--breaker-consecutive-failures` / `SIDECAR_BREAKER_CONSECUTIVE_FAILURES` | failures in a row that open the breaker; 0 = never |
//! | `breaker.failure_rate` | number or `"off"` | off | `--breaker-failure-rate` / `SIDECAR_BREAKER_FAILURE_RATE` | fraction (0 < r <= 1) of failures in the window that opens the breaker |
//! | `breaker.failure_rate_window` | duration | `10s` | | the sliding window of the failure rate |
//! | `breaker.failure_rate_min_requests` | integer | `20` | | outcomes needed in the window before the rate counts |
//! | `breaker.open_time` | duration | `10s` | `--breaker-open-time` / `SIDECAR_BREAKER_OPEN_TIME` | how long the breaker stays open (answering 503) after a trip |
//! | `breaker.max_open_time` | duration | `5m` | | the open time doubles on each re-trip up to this |
//! | `breaker.half_open_probes` | integer | `1` | | requests let through at once while half-open |
//! | `breaker.failure_on` | list | `["connect", "reset", "timeout", "5xx"]` (5xx without 501, 505) | | what counts as a failure: `connect`, `reset`, `timeout`, `5xx`, or status codes `500`..`599` |
//! | `retry.max_retries` | integer | `2` | `--max-retries` / `SIDECAR_MAX_RETRIES` | retries per request (idempotent methods only); 0 = none |
//! | `retry.on` | list | `["connect", "reset", "503"]` | | what is retried: `connect`, `reset`, `5xx`, or status codes |
//! | `retry.budget_ratio` | number | `0.2` | `--retry-budget-ratio` / `SIDECAR_RETRY_BUDGET_RATIO` | retries allowed per request over the window (0.2 = 20 %) |
//! | `retry.budget_min_per_second` | integer | `10` | `--retry-budget-min-per-second` / `SIDECAR_RETRY_BUDGET_MIN_PER_SECOND` | retries always allowed per second of the window |
//! | `retry.budget_window` | duration | `10s` | | the budget's sliding window |
//! | `retry.max_body_bytes` | integer | `65536` | | request bodies up to this size (with a known length) are kept for replay; larger ones are not retried |
//! | `retry.backoff` | duration | `25ms` | | base of the jittered exponential pause between attempts (`0s`: none) |
//! | `mtls` | `off`, `opportunistic` or `require` | `opportunistic` | | mesh TLS to destinations inside `[mtls] mesh_networks` when the proxy has an identity (`--identity-dir`); opportunistic falls back to plaintext for a peer that is not a sidecar, require never does (HTTP 502, TCP reset). Decided per connection by address, so only `[defaults]` and address rules apply |
//! | `server_identities` | list of SPIFFE IDs | none | | the server must prove one of these (else 502 / reset, `result="identity_mismatch"`) |
//!
//! The `[mtls]` and `[inbound]` sections are described in [`mesh`], `[[transcode]]` in
//! `transcode.rs`.
//!
//! Durations are strings with a unit: `500ms`, `2s`, `1m`, `1h`. Lists may also be given as one
//! comma-separated string (that is how flags and environment variables give them).
//!
//! Size: about 600 lines, most of it the key table (`KEYS`): one entry per key, by design, so that
//! every key is documented, parsed and reported the same way.
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::model::{
    DestinationPolicy, DestinationRule, InboundConfig, Match, MeshConfig, PolicyConfig,
};

pub use values::KeyError;
use values::{count, duration, failure_set, positive_duration, rate, ratio, Raw};

type Apply = fn(&mut DestinationPolicy, Raw<'_>) -> Result<(), String>;

/// One setting of a `[defaults]` or `[[destination]]` section.
struct Key {
    /// The key inside a section (`breaker.open_time`).
    path: &'static str,
    apply: Apply,
}

/// A flag / environment variable that sets one key of the defaults.
#[derive(Debug, Clone, Copy)]
pub struct Flag<'a> {
    /// The key it sets, as in the table above.
    pub path: &'static str,
    /// How it is named in errors (`--breaker-open-time / SIDECAR_BREAKER_OPEN_TIME`).
    pub name: &'static str,
    /// `None`: not given (the file's or the built-in default applies).
    pub value: Option<&'a str>,
    /// Where the value came from: `flag` or `environment` (for `/config`).
    pub source: &'static str,
}

const KEYS: &[Key] = &[
    Key {
        path: "connect_timeout",
        apply: |p, v| positive_duration(v).map(|d| p.connect_timeout = d),
    },
    Key {
        path: "request_timeout",
        apply: |p, v| positive_duration(v).map(|d| p.request_timeout = d),
    },
    Key {
        path: "idle_timeout",
        apply: |p, v| positive_duration(v).map(|d| p.idle_timeout = d),
    },
    Key {
        path: "max_connections",
        apply: |p, v| count(v, 1, 65_536).map(|n| p.max_connections = n as usize),
    },
    Key {
        path: "breaker.consecutive_failures",
        apply: |p, v| count(v, 0, 1_000_000).map(|n| p.breaker.consecutive_failures = n),
    },
    Key {
        path: "breaker.failure_rate",
        apply: |p, v| rate(v).map(|r| p.breaker.failure_rate = r),
    },
    Key {
        path: "breaker.failure_rate_window",
        apply: |p, v| positive_duration(v).map(|d| p.breaker.failure_rate_window = d),
    },
    Key {
        path: "breaker.failure_rate_min_requests",
        apply: |p, v| count(v, 1, 1_000_000).map(|n| p.breaker.failure_rate_min_requests = n),
    },
    Key {
        path: "breaker.open_time",
        apply: |p, v| positive_duration(v).map(|d| p.breaker.open_time = d),
    },
    Key {
        path: "breaker.max_open_time",
        apply: |p, v| positive_duration(v).map(|d| p.breaker.max_open_time = d),
    },
    Key {
        path: "breaker.half_open_probes",
        apply: |p, v| count(v, 1, 10_000).map(|n| p.breaker.half_open_probes = n),
    },
    Key {
        path: "breaker.failure_on",
        apply: |p, v| failure_set(v, true).map(|s| p.failure_on = s),
    },
    Key {
        path: "retry.max_retries",
        apply: |p, v| count(v, 0, 10).map(|n| p.retry.max_retries = n),
    },
    Key {
        path: "retry.on",
        apply: |p, v| failure_set(v, false).map(|s| p.retry.on = s),
    },
    Key {
        path: "retry.budget_ratio",
        apply: |p, v| ratio(v).map(|r| p.retry.budget.ratio = r),
    },
    Key {
        path: "retry.budget_min_per_second",
        apply: |p, v| count(v, 0, 1_000_000).map(|n| p.retry.budget.min_per_second = n),
    },
    Key {
        path: "retry.budget_window",
        apply: |p, v| positive_duration(v).map(|d| p.retry.budget.window = d),
    },
    Key {
        path: "retry.max_body_bytes",
        apply: |p, v| count(v, 0, 64 * 1024 * 1024).map(|n| p.retry.max_body_bytes = n as usize),
    },
    Key {
        path: "retry.backoff",
        apply: |p, v| duration(v).map(|d| p.retry.backoff = d),
    },
    Key {
        path: "mtls",
        apply: |p, v| mesh::mtls_mode(v).map(|m| p.mtls = m),
    },
    Key {
        path: "server_identities",
        apply: |p, v| mesh::spiffe_ids(v).map(|ids| p.server_identities = ids),
    },
];

/// The sub-tables a section may have.
const SUBTABLES: &[&str] = &["breaker", "retry"];

fn key(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// Checks rules between keys of one resolved section.
fn check(policy: &DestinationPolicy) -> Vec<(&'static str, String, String)> {
    let mut problems = Vec::new();
    if policy.breaker.max_open_time < policy.breaker.open_time {
        problems.push((
            "breaker.max_open_time",
            format!("{:?}", policy.breaker.max_open_time),
            format!(
                "must not be shorter than breaker.open_time ({:?})",
                policy.breaker.open_time
            ),
        ));
    }
    problems
}

/// What the policies are built from, kept for reloads: the file and the flags' values.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    pub file: Option<PathBuf>,
    pub flags: Vec<OwnedFlag>,
}

/// A [`Flag`] that owns its value.
#[derive(Debug, Clone)]
pub struct OwnedFlag {
    pub path: &'static str,
    pub name: &'static str,
    pub value: Option<String>,
    pub source: &'static str,
}

/// One reading of a [`PolicySource`].
#[derive(Debug)]
pub struct Loaded {
    /// The file's text as read (`None`: no file).
    pub text: Option<Result<String, KeyError>>,
    pub result: Result<PolicyConfig, Vec<KeyError>>,
}

impl PolicySource {
    pub fn flags(&self) -> Vec<Flag<'_>> {
        self.flags
            .iter()
            .map(|f| Flag {
                path: f.path,
                name: f.name,
                value: f.value.as_deref(),
                source: f.source,
            })
            .collect()
    }

    /// Reads the file (if any) and builds the configuration with the flags.
    pub fn load(&self) -> Loaded {
        let text = self.file.as_deref().map(read);
        let result = from_file_text(self.file.as_deref().zip(text.as_ref()), &self.flags());
        Loaded { text, result }
    }

    /// Where each `[defaults]` value comes from (see [`sources`]).
    pub fn sources(&self, text: Option<&str>) -> Vec<(&'static str, &'static str)> {
        sources(text, &self.flags())
    }
}

/// The largest config file read: a policy file is a few KiB; anything this big is a mistake
/// (a wrong path, a log file), and reading it twice a second would cost.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Reads the optional config file and the flags into a [`PolicyConfig`], or every problem found.
pub fn load(file: Option<&Path>, flags: &[Flag<'_>]) -> Result<PolicyConfig, Vec<KeyError>> {
    let text = file.map(read);
    from_file_text(file.zip(text.as_ref()), flags)
}

/// The config file's text (at most [`MAX_FILE_BYTES`]), or why it cannot be read.
pub fn read(path: &Path) -> Result<String, KeyError> {
    use std::io::Read as _;
    let problem = |problem: String| KeyError {
        key: "--config / SIDECAR_CONFIG".to_owned(),
        value: path.display().to_string(),
        problem,
    };
    let file = std::fs::File::open(path)
        .map_err(|e| problem(format!("cannot read the config file: {e}")))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| problem(format!("cannot read the config file: {e}")))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(problem(format!(
            "larger than {} KiB: is this the policy file?",
            MAX_FILE_BYTES / 1024
        )));
    }
    Ok(text)
}

/// [`load`] from a file's text as [`read`] returned it.
pub fn from_file_text(
    file: Option<(&Path, &Result<String, KeyError>)>,
    flags: &[Flag<'_>],
) -> Result<PolicyConfig, Vec<KeyError>> {
    let mut errors = Vec::new();
    let parsed = match file {
        None => None,
        Some((_, Err(e))) => {
            errors.push(e.clone());
            None
        }
        Some((path, Ok(text))) => match text.parse::<Table>() {
            Ok(table) => Some((path.display().to_string(), table)),
            Err(e) => {
                errors.push(KeyError {
                    key: "--config / SIDECAR_CONFIG".to_owned(),
                    value: path.display().to_string(),
                    problem: format!("not valid TOML: {}", e.to_string().trim_end()),
                });
                None
            }
        },
    };
    let config = parse_layers(
        parsed.as_ref().map(|(n, t)| (n.as_str(), t)),
        flags,
        &mut errors,
    );
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// Where each `[defaults]` value in force comes from: `flag`, `environment` (as the flags say),
/// `file` (the file's `[defaults]`) or `default` (built in). Keys in the table's order.
pub fn sources(file_text: Option<&str>, flags: &[Flag<'_>]) -> Vec<(&'static str, &'static str)> {
    let table = file_text.and_then(|t| t.parse::<Table>().ok());
    let defaults = table
        .as_ref()
        .and_then(|t| t.get("defaults"))
        .and_then(Value::as_table);
    let in_file = |path: &str| {
        let Some(section) = defaults else {
            return false;
        };
        match path.split_once('.') {
            None => section.contains_key(path),
            Some((sub, k)) => {
                section.contains_key(path)
                    || section
                        .get(sub)
                        .and_then(Value::as_table)
                        .is_some_and(|t| t.contains_key(k))
            }
        }
    };
    KEYS.iter()
        .map(|k| {
            let flag = flags.iter().find(|f| f.path == k.path && f.value.is_some());
            let source = match flag {
                Some(f) => f.source,
                None if in_file(k.path) => "file",
                None => "default",
            };
            (k.path, source)
        })
        .collect()
}

/// [`load`] from text (tests, and anyone embedding the proxy).
pub fn from_str(name: &str, text: &str, flags: &[Flag<'_>]) -> Result<PolicyConfig, Vec<KeyError>> {
    let mut errors = Vec::new();
    let table = match text.parse::<Table>() {
        Ok(t) => t,
        Err(e) => {
            return Err(vec![KeyError {
                key: name.to_owned(),
                value: String::new(),
                problem: format!("not valid TOML: {}", e.to_string().trim_end()),
            }])
        }
    };
    let config = parse_layers(Some((name, &table)), flags, &mut errors);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

fn parse_layers(
    file: Option<(&str, &Table)>,
    flags: &[Flag<'_>],
    errors: &mut Vec<KeyError>,
) -> PolicyConfig {
    let mut defaults = DestinationPolicy::default();
    let mut rules: Vec<(String, Match, &Table)> = Vec::new();
    let mut mesh = MeshConfig::default();
    let mut inbound = InboundConfig::default();
    let mut transcode = Vec::new();
    if let Some((name, table)) = file {
        for (k, v) in table {
            match (k.as_str(), v) {
                ("mtls", Value::Table(section)) => {
                    mesh::mesh_section(&mut mesh, section, &format!("{name}: [mtls]"), errors);
                }
                ("inbound", Value::Table(section)) => {
                    mesh::inbound_section(
                        &mut inbound,
                        section,
                        &format!("{name}: [inbound]"),
                        errors,
                    );
                }
                ("transcode", list) => {
                    transcode = transcode::sections(list, name, errors);
                }
                ("mtls" | "inbound", other) => errors.push(KeyError {
                    key: format!("{name}: {k}"),
                    value: other.to_string(),
                    problem: format!("expected a [{k}] table"),
                }),
                ("defaults", Value::Table(section)) => {
                    apply_section(
                        &mut defaults,
                        section,
                        &format!("{name}: [defaults]"),
                        errors,
                    );
                }
                ("destination", Value::Array(list)) => {
                    for (i, item) in list.iter().enumerate() {
                        let label = format!("{name}: [[destination]] #{}", i + 1);
                        let Value::Table(section) = item else {
                            errors.push(KeyError {
                                key: label,
                                value: item.to_string(),
                                problem: "expected a table".to_owned(),
                            });
                            continue;
                        };
                        match section.get("match") {
                            Some(Value::String(m)) => match Match::parse(m) {
                                Ok(matcher) => {
                                    let label = format!("{label} ({m})");
                                    if rules.iter().any(|(_, other, _)| *other == matcher) {
                                        errors.push(KeyError {
                                            key: format!("{label} match"),
                                            value: m.clone(),
                                            problem: "another [[destination]] above has the same match"
                                                .to_owned(),
                                        });
                                    } else {
                                        rules.push((label, matcher, section));
                                    }
                                }
                                Err(problem) => errors.push(KeyError {
                                    key: format!("{label} match"),
                                    value: m.clone(),
                                    problem,
                                }),
                            },
                            Some(other) => errors.push(KeyError {
                                key: format!("{label} match"),
                                value: other.to_string(),
                                problem: "expected a string like \"10.0.0.7:80\" or \"api.example:443\""
                                    .to_owned(),
                            }),
                            None => errors.push(KeyError {
                                key: format!("{label} match"),
                                value: String::new(),
                                problem: "missing; every [[destination]] needs match = \"IP:PORT\" or \"HOST:PORT\""
                                    .to_owned(),
                            }),
                        }
                    }
                }
                ("defaults", other) => errors.push(KeyError {
                    key: format!("{name}: defaults"),
                    value: other.to_string(),
                    problem: "expected a [defaults] table".to_owned(),
                }),
                ("destination", other) => errors.push(KeyError {
                    key: format!("{name}: destination"),
                    value: other.to_string(),
                    problem: "expected [[destination]] sections (an array of tables)".to_owned(),
                }),
                // `sidecar run`'s own keys: checked there (`run/file_args.rs`).
                ("run", _) => {}
                (other, v) => errors.push(KeyError {
                    key: format!("{name}: {other}"),
                    value: Raw::Toml(v).shown(),
                    problem:
                        "unknown section; expected [defaults], [[destination]], [mtls], [inbound], [[transcode]] or [run]"
                            .to_owned(),
                }),
            }
        }
    }
    for flag in flags {
        let Some(value) = flag.value else {
            continue;
        };
        if flag.path == "inbound.probe_paths" {
            // Added to the file's: the pod's own probes (`sidecar inject` writes them).
            for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match super::authz::PathPattern::parse(item) {
                    Ok(p) if !inbound.probe_paths.contains(&p) => inbound.probe_paths.push(p),
                    Ok(_) => {}
                    Err(problem) => errors.push(KeyError {
                        key: flag.name.to_owned(),
                        value: value.to_owned(),
                        problem,
                    }),
                }
            }
            continue;
        }
        let Some(k) = key(flag.path) else {
            continue;
        };
        if let Err(problem) = (k.apply)(&mut defaults, Raw::Text(value)) {
            errors.push(KeyError {
                key: flag.name.to_owned(),
                value: value.to_owned(),
                problem,
            });
        }
    }
    let defaults_label = match file {
        Some((name, _)) => format!("{name}: [defaults] (with flags)"),
        None => "flags".to_owned(),
    };
    for (k, v, problem) in check(&defaults) {
        errors.push(KeyError {
            key: format!("{defaults_label} {k}"),
            value: v,
            problem,
        });
    }
    let mut destinations = Vec::with_capacity(rules.len());
    for (label, matcher, section) in rules {
        let mut policy = defaults.clone();
        let before = errors.len();
        apply_section(&mut policy, section, &label, errors);
        if errors.len() == before {
            for (k, v, problem) in check(&policy) {
                errors.push(KeyError {
                    key: format!("{label} {k}"),
                    value: v,
                    problem,
                });
            }
        }
        destinations.push(DestinationRule { matcher, policy });
    }
    PolicyConfig {
        defaults,
        destinations,
        mesh,
        inbound,
        transcode,
    }
}

/// Applies every key of one section (and its `breaker` / `retry` sub-tables).
fn apply_section(
    policy: &mut DestinationPolicy,
    section: &Table,
    label: &str,
    errors: &mut Vec<KeyError>,
) {
    for (k, v) in section {
        if k == "match" && label.contains("[[destination]]") {
            continue;
        }
        match v {
            Value::Table(sub) if SUBTABLES.contains(&k.as_str()) => {
                for (sk, sv) in sub {
                    apply_key(policy, &format!("{k}.{sk}"), sv, label, errors);
                }
            }
            Value::Table(_) => errors.push(KeyError {
                key: format!("{label} {k}"),
                value: "(a table)".to_owned(),
                problem: format!("unknown table; valid tables here: {}", SUBTABLES.join(", ")),
            }),
            _ => apply_key(policy, k, v, label, errors),
        }
    }
}

fn apply_key(
    policy: &mut DestinationPolicy,
    path: &str,
    value: &Value,
    label: &str,
    errors: &mut Vec<KeyError>,
) {
    let raw = Raw::Toml(value);
    match key(path) {
        Some(k) => {
            if let Err(problem) = (k.apply)(policy, raw) {
                errors.push(KeyError {
                    key: format!("{label} {path}"),
                    value: raw.shown(),
                    problem,
                });
            }
        }
        None => errors.push(KeyError {
            key: format!("{label} {path}"),
            value: raw.shown(),
            problem: unknown_key(path),
        }),
    }
}

/// "unknown key", with the closest valid key when one is near (a typo), else the valid ones at
/// that level.
fn unknown_key(path: &str) -> String {
    let (prefix, _) = path.rsplit_once('.').unwrap_or(("", path));
    let siblings: Vec<&str> = KEYS
        .iter()
        .map(|k| k.path)
        .filter(|p| p.rsplit_once('.').map_or("", |(pre, _)| pre) == prefix)
        .collect();
    match crate::config_errors::nearest(KEYS.iter().map(|k| k.path), path) {
        Some(near) => format!("unknown key; did you mean {near}?"),
        None if prefix.is_empty() => format!(
            "unknown key; valid keys here: {}, and the tables breaker and retry",
            siblings.join(", ")
        ),
        None if siblings.is_empty() => {
            format!("unknown key; valid tables: {}", SUBTABLES.join(", "))
        }
        None => format!("unknown key; valid keys here: {}", siblings.join(", ")),
    }
}

mod authz;
pub mod mesh;
#[cfg(test)]
mod tests;
mod transcode;
mod values;
