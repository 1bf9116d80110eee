//! `sidecar doctor`: checks that this node (or this container) has what `sidecar init` needs,
//! and prints one pass/warn/fail line per check with the fix for each failure.
//!
//! Every check only reads: it loads throw-away probe programs and maps (never attached) and queries
//! what is attached to cgroups, nothing else. Exit code: 0 when nothing failed, 1 otherwise, 64 for
//! bad usage.
mod checks;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

/// Where bpffs is expected: the pins live below it.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// The cgroup v2 hierarchy to check (default: the cgroup2 mount found in /proc/self/mountinfo).
    /// In a container, the node's hierarchy mounted from the host (e.g. /host/sys/fs/cgroup).
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// The bpf filesystem the pins go to.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,

    /// Also check this pod cgroup and its ancestors for programs that conflict with ours.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Works, with a limitation the operator should know about.
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// What to do about a failure or warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// True when no check failed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Report {
        Report {
            ok: checks.iter().all(|c| c.status != Status::Fail),
            checks,
        }
    }

    pub fn table(&self) -> String {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = String::new();
        let _ = writeln!(s, "{:<width$}  {:<6}  DETAIL", "CHECK", "RESULT");
        for c in &self.checks {
            let result = match c.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(s, "{:<width$}  {result:<6}  {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                let label = if c.status == Status::Fail {
                    "fix"
                } else {
                    "note"
                };
                let _ = writeln!(s, "{:<width$}  {:<6}  {label}: {fix}", "", "");
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        let warned = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        let _ = writeln!(s);
        if failed == 0 {
            let _ = writeln!(
                s,
                "result: pass ({warned} warning(s)): this node can run the sidecar"
            );
        } else {
            let _ = writeln!(
                s,
                "result: FAIL ({failed} failed, {warned} warning(s)): fix the failures above before injecting pods on this node"
            );
        }
        s
    }
}

/// Runs every check.
pub fn run(args: &DoctorArgs) -> Report {
    Report::new(checks::all(args))
}

/// `sidecar doctor` entry point.
pub fn main(args: DoctorArgs) -> ExitCode {
    let report = run(&args);
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("sidecar doctor: error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.table());
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
