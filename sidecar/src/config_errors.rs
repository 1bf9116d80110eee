//! Configuration errors shared by the subcommands that read many keys (`run`, `logs`): every bad
//! key is collected and reported at once, in one format, and the process exits 64.
use std::{borrow::Cow, fmt};

/// One bad configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// A flag / variable pair (`--x / SIDECAR_X`), or a config file section and key.
    pub key: Cow<'static, str>,
    pub value: String,
    pub problem: String,
}

/// Writes the report for `sidecar <command>`: one line per bad key, then what to do.
pub fn report(f: &mut fmt::Formatter<'_>, command: &str, errors: &[ConfigError]) -> fmt::Result {
    writeln!(f, "sidecar {command}: invalid configuration:")?;
    for e in errors {
        writeln!(f, "  {} = {:?}: {}", e.key, e.value, e.problem)?;
    }
    write!(
        f,
        "fix the values above (flags or environment variables) and start again; \
         `sidecar {command} --help` lists every key"
    )
}
