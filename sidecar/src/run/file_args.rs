//! The config file's `[run]` section: any `sidecar run` flag by its long name, for a pod whose
//! whole configuration lives in one ConfigMap. Precedence, highest first: the command line, the
//! environment, the file's `[run]`, the built-in default. Policy keys are not allowed here: they
//! belong in `[defaults]`, where a reload applies them.
//!
//! ```toml
//! [run]
//! admin = "0.0.0.0:15090"
//! header-timeout = "10s"
//! access-log = true
//! ```
//!
//! `[run]` is read once at start: a reload that finds a `[run]` value changed is rejected with
//! `restart required: run.<key>` (the policies of that file are not applied either, so that what
//! is in force is always one whole file).
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use toml::{Table, Value};

use super::args::RunArgs;
use crate::config_errors::{nearest, ConfigError};
use crate::policy::config_file::KeyError;

/// The `sidecar run` flags that set policy defaults: `[defaults]` keys in the file.
pub const POLICY_FLAGS: &[&str] = &[
    "connect-timeout",
    "request-timeout",
    "idle-timeout",
    "max-connections-per-destination",
    "breaker-consecutive-failures",
    "breaker-failure-rate",
    "breaker-open-time",
    "max-retries",
    "retry-budget-ratio",
    "retry-budget-min-per-second",
];

/// What the `[run]` section did, and where every flag's value comes from.
#[derive(Debug, Clone, Default)]
pub struct RunFile {
    /// `[run]` values in force (`key` -> value as given), for the reload's restart check.
    pub applied: BTreeMap<String, String>,
    /// Every flag's long name -> `flag`, `environment`, `file` or `default`.
    pub origins: BTreeMap<String, &'static str>,
    /// `[run]` keys ignored because a flag or variable sets them.
    pub overridden: Vec<String>,
}

/// `[run]` as arguments (`key`, value; `None` for a flag that takes none), and the keys left
/// out because a flag or variable sets them.
type Section = (Vec<(String, Option<String>)>, Vec<String>);

/// `[run]` of `text` as `--key=value` arguments, checked against `sidecar run`'s flags; keys
/// `explicit` (set on the command line or in the environment) are left out (they win).
fn section_args(
    name: &str,
    text: &str,
    explicit: &dyn Fn(&str) -> bool,
) -> Result<Section, Vec<KeyError>> {
    let Ok(table) = text.parse::<Table>() else {
        // Invalid TOML: the policy reader reports it.
        return Ok((Vec::new(), Vec::new()));
    };
    let Some(section) = table.get("run") else {
        return Ok((Vec::new(), Vec::new()));
    };
    let bad = |key: String, value: String, problem: String| KeyError {
        key: format!("{name}: [run] {key}"),
        value,
        problem,
    };
    let Value::Table(section) = section else {
        return Err(vec![bad(
            String::new(),
            section.to_string(),
            "expected a [run] table".into(),
        )]);
    };
    let command = RunArgs::augment_args(clap::Command::new("run"));
    let longs: Vec<&str> = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .collect();
    let mut errors = Vec::new();
    let mut args = Vec::new();
    let mut overridden = Vec::new();
    for (key, value) in section {
        let shown = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if POLICY_FLAGS.contains(&key.as_str()) {
            let path = key.replace('-', "_");
            errors.push(bad(
                key.clone(),
                shown,
                format!(
                    "a policy default: set it in [defaults] (as {path}), where a reload applies it"
                ),
            ));
            continue;
        }
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
        else {
            let hint = match nearest(longs.iter().copied(), key) {
                Some(known) => format!("did you mean {known}?"),
                None => "keys are `sidecar run` flags without the leading --".into(),
            };
            errors.push(bad(key.clone(), shown, format!("unknown key; {hint}")));
            continue;
        };
        if explicit(arg.get_id().as_str()) {
            overridden.push(key.clone());
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        match (value, takes_value) {
            (Value::Boolean(true), false) => args.push((key.clone(), None)),
            (Value::Boolean(false), false) => {}
            (_, false) => errors.push(bad(key.clone(), shown, "expected true or false".into())),
            (Value::String(_) | Value::Integer(_) | Value::Float(_), true) => {
                args.push((key.clone(), Some(shown)));
            }
            (_, true) => errors.push(bad(
                key.clone(),
                shown,
                "expected a string (or a number)".into(),
            )),
        }
    }
    if errors.is_empty() {
        Ok((args, overridden))
    } else {
        Err(errors)
    }
}

/// The arguments of `sidecar run` with the file's `[run]` merged in (see the module docs).
/// `argv` is the command line from `run` on; `matches` its parse (to tell what was explicit).
pub fn merge(
    args: RunArgs,
    argv: Vec<OsString>,
    matches: &ArgMatches,
) -> Result<(RunArgs, RunFile), Vec<ConfigError>> {
    merge_with(args, argv, matches, true)
}

/// `sidecar run`'s flags; without the environment for `check-config` (the file alone).
pub fn run_command(read_env: bool) -> clap::Command {
    let command = RunArgs::augment_args(clap::Command::new("run"));
    if read_env {
        command
    } else {
        command.mut_args(|a| a.env(None))
    }
}

/// [`merge`], reading the environment or not.
pub fn merge_with(
    args: RunArgs,
    argv: Vec<OsString>,
    matches: &ArgMatches,
    read_env: bool,
) -> Result<(RunArgs, RunFile), Vec<ConfigError>> {
    let explicit = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let mut file = RunFile::default();
    let text = args
        .config
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
        .and_then(|p| {
            crate::policy::config_file::read(p)
                .ok()
                .map(|t| (p.to_owned(), t))
        });
    let mut merged = args;
    if let Some((path, text)) = text {
        let (extra, overridden) = match section_args(&path.display().to_string(), &text, &explicit)
        {
            Ok(found) => found,
            Err(errors) => {
                // Every bad key at once: the policy sections' too.
                let mut all = to_config(errors);
                if let Err(policy) = crate::policy::config_file::load(Some(&path), &[]) {
                    all.extend(to_config(policy));
                }
                return Err(all);
            }
        };
        file.overridden = overridden;
        if !extra.is_empty() {
            let mut full = argv;
            for (key, value) in &extra {
                full.push(match value {
                    Some(v) => format!("--{key}={v}").into(),
                    None => format!("--{key}").into(),
                });
                file.applied
                    .insert(key.clone(), value.clone().unwrap_or_else(|| "true".into()));
            }
            let reparsed = run_command(read_env)
                .try_get_matches_from(full)
                .map_err(|e| {
                    vec![ConfigError {
                        key: format!("{}: [run]", path.display()).into(),
                        value: String::new(),
                        problem: e.to_string().lines().next().unwrap_or_default().to_owned(),
                    }]
                })?;
            merged = RunArgs::from_arg_matches(&reparsed).map_err(|e| {
                vec![ConfigError {
                    key: format!("{}: [run]", path.display()).into(),
                    value: String::new(),
                    problem: e.to_string(),
                }]
            })?;
        }
    }
    let command = RunArgs::augment_args(clap::Command::new("run"));
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let origin = if file.applied.contains_key(long) {
            "file"
        } else {
            match matches.value_source(arg.get_id().as_str()) {
                Some(ValueSource::CommandLine) => "flag",
                Some(ValueSource::EnvVariable) => "environment",
                _ => "default",
            }
        };
        file.origins.insert(long.to_owned(), origin);
    }
    Ok((merged, file))
}

/// The reload's check: `[run]` in `text` must say what it said at start (else a restart is
/// needed for it to take effect). Keys set by flags are ignored (flags win anyway).
pub fn restart_required(name: &Path, text: &str, at_start: &RunFile) -> Vec<KeyError> {
    let explicit = |_: &str| false;
    let (now, _) = match section_args(&name.display().to_string(), text, &explicit) {
        Ok(found) => found,
        Err(errors) => return errors,
    };
    let now: BTreeMap<String, String> = now
        .into_iter()
        .filter(|(k, _)| !at_start.overridden.contains(k))
        .map(|(k, v)| (k, v.unwrap_or_else(|| "true".into())))
        .collect();
    let keys: std::collections::BTreeSet<&String> =
        now.keys().chain(at_start.applied.keys()).collect();
    keys.into_iter()
        .filter(|k| now.get(*k) != at_start.applied.get(*k))
        .map(|k| KeyError {
            key: format!("{}: [run] {k}", name.display()),
            value: now.get(k).cloned().unwrap_or_else(|| "(removed)".into()),
            problem: format!(
                "restart required: run.{k} is read once at start (in force: {}); restart the proxy, or put the old value back to reload the rest",
                at_start.applied.get(k).map_or("the flag's or built-in default", String::as_str)
            ),
        })
        .collect()
}

/// Names the file, not the flag, in errors about values that came from `[run]`.
pub fn relabel(errors: &mut [ConfigError], file: &RunFile, path: Option<&Path>) {
    let Some(path) = path else { return };
    for e in errors {
        let flag = e
            .key
            .strip_prefix("--")
            .and_then(|k| k.split([' ', '/']).next())
            .unwrap_or_default()
            .to_owned();
        if file.applied.contains_key(&flag) {
            e.key = format!("{}: [run] {flag}", path.display()).into();
        }
    }
}

fn to_config(errors: Vec<KeyError>) -> Vec<ConfigError> {
    errors
        .into_iter()
        .map(|e| ConfigError {
            key: e.key.into(),
            value: e.value,
            problem: e.problem,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> (RunArgs, ArgMatches, Vec<OsString>) {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let matches = RunArgs::augment_args(clap::Command::new("run"))
            .try_get_matches_from(argv.clone())
            .unwrap();
        (RunArgs::from_arg_matches(&matches).unwrap(), matches, argv)
    }

    fn file(text: &str) -> (tempdir::Dir, String) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("p.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path.display().to_string())
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("sidecar-file-args-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn file_values_fill_what_flags_do_not_set() {
        let (_d, path) = file(
            "[run]\nheader-timeout = \"7s\"\nworkers = 2\naccess-log = true\nadmin = \"127.0.0.1:19090\"\n",
        );
        let (args, matches, argv) = parse(&["run", "--config", &path, "--admin", "127.0.0.1:1"]);
        let (merged, file) = merge(args, argv, &matches).unwrap();
        assert_eq!(merged.header_timeout, "7s");
        assert_eq!(merged.workers, "2");
        assert!(merged.access_log);
        assert_eq!(merged.admin, "127.0.0.1:1", "the flag wins");
        assert_eq!(file.origins["header-timeout"], "file");
        assert_eq!(file.origins["admin"], "flag");
        assert_eq!(file.origins["detect-timeout"], "default");
        assert_eq!(file.overridden, vec!["admin".to_owned()]);

        // A reload: the same [run] is fine; a changed one needs a restart; an overridden key
        // changes nothing.
        let same = std::fs::read_to_string(&path).unwrap();
        assert!(restart_required(Path::new(&path), &same, &file).is_empty());
        let changed = same
            .replace("7s", "9s")
            .replace("127.0.0.1:19090", "127.0.0.1:2");
        let errors = restart_required(Path::new(&path), &changed, &file);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0]
            .problem
            .starts_with("restart required: run.header-timeout"));
        let removed = same.replace("workers = 2\n", "");
        let errors = restart_required(Path::new(&path), &removed, &file);
        assert!(errors[0].problem.contains("run.workers"), "{errors:?}");
    }

    #[test]
    fn bad_run_keys_are_named() {
        let (_d, path) =
            file("[run]\nheader-timout = \"7s\"\nrequest-timeout = \"1s\"\naccess-log = \"yes\"\n");
        let (args, matches, argv) = parse(&["run", "--config", &path]);
        let errors = merge(args, argv, &matches).unwrap_err();
        let text: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.key, e.problem))
            .collect();
        assert_eq!(errors.len(), 3, "{text:?}");
        assert!(
            text.iter()
                .any(|t| t.contains("did you mean header-timeout")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("set it in [defaults] (as request_timeout)")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("access-log") && t.contains("true or false")),
            "{text:?}"
        );
    }
}
