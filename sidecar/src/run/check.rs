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

/// `sidecar check-config`.
pub fn main(args: CheckConfigArgs) -> ExitCode {
    match crate::policy::config_file::load(Some(&args.file), &[]) {
        Ok(config) => {
            let _ = writeln!(
                std::io::stdout(),
                "sidecar check-config: {}: valid ([defaults] and {} destination rule{})",
                args.file.display(),
                config.destinations.len(),
                if config.destinations.len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            let report = ConfigErrors {
                command: "check-config",
                errors: problems
                    .into_iter()
                    .map(|e| ConfigError {
                        key: e.key.into(),
                        value: e.value,
                        problem: e.problem,
                    })
                    .collect(),
            };
            let _ = writeln!(std::io::stderr(), "{report}");
            ExitCode::from(crate::EXIT_USAGE)
        }
    }
}
