//! Configuration errors shared by the subcommands that read many keys (`run`, `logs`): every bad
//! key is collected and reported at once, in one format, and the process exits 64. Also the
//! "did you mean" lookup every config reader (policy file, `sidecar inject` annotations) uses.
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
        "fix the values above (flags, environment variables or the config file) and try again; \
         `sidecar {command} --help` lists every key; docs/operator-guide.md the config file's"
    )
}

/// Every bad key of one `sidecar <command>`, for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub command: &'static str,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        report(f, self.command, &self.errors)
    }
}

impl std::error::Error for ConfigErrors {}

/// The known name closest to `given`, if it is a likely typo of it (at most 3 edits away).
pub fn nearest<'a>(known: impl IntoIterator<Item = &'a str>, given: &str) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (edit_distance(k, given), k))
        .min()
        .filter(|(d, _)| *d <= 3)
        .map(|(_, k)| k)
}

/// Levenshtein distance, for "did you mean" on typos.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_are_close() {
        assert_eq!(
            edit_distance("exclude-outbound-port", "exclude-outbound-ports"),
            1
        );
        assert_eq!(edit_distance("image", "image"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            nearest(["request_timeout", "idle_timeout"], "request_timout"),
            Some("request_timeout")
        );
        assert_eq!(nearest(["request_timeout"], "colour"), None);
    }
}
