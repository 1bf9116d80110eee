//! What can go wrong in the init step (and `status`, `trace`, `cleanup`), each with what to do.
use std::io;
use std::path::PathBuf;

use crate::config_errors::ConfigErrors;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("cgroup {path}: {problem}\n  fix: {fix}")]
    Cgroup {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("network namespace {path}: {problem}\n  fix: {fix}")]
    Netns {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("missing capabilities: {missing}\n  fix: run `sidecar init` as root, or in a privileged init container with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN")]
    Capabilities { missing: String },
    #[error("this sidecar binary was built without its eBPF object\n  fix: run `cargo xtask build-ebpf`, then rebuild the sidecar")]
    NoObject,
    #[error("the kernel refused to {what}: {detail}\n  fix: {fix}")]
    Kernel {
        what: String,
        detail: String,
        fix: String,
    },
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
}

impl InitError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |error| InitError::Io { what, error }
    }

    pub(crate) fn kernel(
        what: impl Into<String>,
        fix: impl Into<String>,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        let (what, fix) = (what.into(), fix.into());
        move |source| {
            // The whole chain, so that errno and the verifier log reach the operator.
            let mut detail = source.to_string();
            let mut next = source.source();
            while let Some(s) = next {
                let text = s.to_string();
                if !detail.contains(&text) {
                    detail.push_str(": ");
                    detail.push_str(&text);
                }
                next = s.source();
            }
            InitError::Kernel { what, detail, fix }
        }
    }

    /// Exit code: 64 for bad usage (sysexits EX_USAGE), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            InitError::Config(_) | InitError::Cgroup { .. } | InitError::Netns { .. } => {
                crate::EXIT_USAGE
            }
            _ => 1,
        }
    }
}
