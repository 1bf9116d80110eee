//! `sidecar doctor`: checks that this node (or this container) has what `sidecar init` needs,
//! and prints one pass/warn/fail line per check with the fix for each failure.
//!
//! Every check only reads: it loads throw-away probe programs and maps (never attached) and queries
//! what is attached to cgroups, nothing else. Exit code: 0 when nothing failed, 1 otherwise, 64 for
//! bad usage.
mod checks;
mod model;

pub use model::{Check, DoctorArgs, Status, DEFAULT_BPFFS};

use std::fmt::Write as _;
use std::process::ExitCode;

use serde::Serialize;

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
