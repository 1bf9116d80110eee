//! The sidecar: an init step that loads and attaches the eBPF interception programs for one pod
//! (`intercept`), and the proxy that receives the steered connections (`run`, `proxy`).
pub mod admin;
pub mod bpf;
pub mod cli;
pub mod cni;
pub mod config_errors;
pub mod doctor;
pub mod error;
pub mod identity;
pub mod inject;
pub mod intercept;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod orig_dst;
pub mod pins;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod run;
#[cfg(test)]
mod tidy;
pub mod transcode;
pub mod units;

/// Exit code for bad configuration or usage (sysexits.h `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
