//! `sidecar check-config FILE`: the policy file as `sidecar run --config FILE` would read it, for
//! CI pipelines and pre-commit hooks: exit 0 when it is valid, 64 with every bad key (the same
//! lines `sidecar run` prints) when not.
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config_errors::{ConfigError, ConfigErrors};

/// Arguments of `sidecar check-config`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckConfigArgs {
    /// The policy file (TOML) to check, as given to `sidecar run --config`
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// `sidecar check-config`: the policy sections and `[run]`, with `sidecar run`'s own checks of
/// every value (flags and the environment of the caller are not read: the file alone).
pub fn main(args: CheckConfigArgs) -> ExitCode {
    let errors = check(&args.file);
    if errors.is_empty() {
        let rules = crate::policy::config_file::load(Some(&args.file), &[])
            .map(|c| c.destinations.len())
            .unwrap_or_default();
        let _ = writeln!(
            std::io::stdout(),
            "sidecar check-config: {}: valid ([defaults], [run] and {rules} destination rule{})",
            args.file.display(),
            if rules == 1 { "" } else { "s" }
        );
        return ExitCode::SUCCESS;
    }
    let report = ConfigErrors {
        command: "check-config",
        errors,
    };
    let _ = writeln!(std::io::stderr(), "{report}");
    ExitCode::from(crate::EXIT_USAGE)
}

/// Every problem of the file, as `sidecar run --config FILE` would report it.
fn check(file: &std::path::Path) -> Vec<ConfigError> {
    let argv: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into(), file.into()];
    let matches = match super::file_args::run_command(false).try_get_matches_from(argv.clone()) {
        Ok(m) => m,
        Err(e) => return vec![problem(file, e.to_string())],
    };
    let parsed = match <super::RunArgs as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => return vec![problem(file, e.to_string())],
    };
    let (merged, run_file) = match super::file_args::merge_with(parsed, argv, &matches, false) {
        Ok(m) => m,
        Err(errors) => return errors,
    };
    match super::Settings::from_args(&merged, &|_| None) {
        Ok(_) => Vec::new(),
        Err(mut errors) => {
            super::file_args::relabel(&mut errors.errors, &run_file, Some(file));
            errors.errors
        }
    }
}

fn problem(file: &std::path::Path, problem: String) -> ConfigError {
    ConfigError {
        key: "--config / SIDECAR_CONFIG".into(),
        value: file.display().to_string(),
        problem,
    }
}
