//! `sidecar`: one binary, one subcommand per job (init step, proxy).
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sidecar",
    version,
    about = "eBPF-assisted transparent interception sidecar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the interception programs and attach them to one pod's cgroup (privileged init step).
    Init(sidecar::intercept::InitArgs),
    /// Run the proxy that receives the intercepted connections.
    Run(Box<sidecar::run::RunArgs>),
    /// Check a policy file (`sidecar run --config FILE`) without starting anything; exit 0 or 64.
    CheckConfig(sidecar::run::check::CheckConfigArgs),
    /// Wait until the running sidecar reports ready (for an app's entrypoint or a postStart hook).
    WaitReady(sidecar::lifecycle::client::WaitReadyArgs),
    /// Ask the running sidecar to drain and exit (a preStop hook in the proxy's container).
    Shutdown(sidecar::lifecycle::client::ShutdownArgs),
    /// Ask the running sidecar to read its config file again now (run as the proxy's uid).
    Reload(sidecar::lifecycle::client::ShutdownArgs),
    /// Show what is attached for a pod, the configuration in force and the kernel counters.
    Status(sidecar::intercept::StatusArgs),
    /// Print the kernel-side debug records of a pod initialised with --debug-log.
    Trace(sidecar::intercept::TraceArgs),
    /// Remove pins left by pods that are gone (node-level garbage collection).
    Cleanup(sidecar::intercept::CleanupArgs),
    /// Forward the application's log file to an HTTP collector (at least once, through rotations).
    Logs(sidecar::logs::LogsArgs),
    /// The chained CNI plugin (what the container runtime runs as `sidecar-cni`: CNI_COMMAND and
    /// the network configuration on stdin); `cni install` is the node DaemonSet's installer.
    Cni(sidecar::cni::install::CniArgs),
    /// Add the sidecar to Kubernetes workload manifests (reads YAML, writes YAML).
    Inject(sidecar::inject::InjectArgs),
    /// Check that this node has what the sidecar needs (kernel, cgroup v2, bpffs, capabilities).
    Doctor(sidecar::doctor::DoctorArgs),
}

fn main() -> ExitCode {
    // The container runtime runs CNI plugins by file name, with no arguments: a copy or link of
    // this binary named `sidecar-cni` is the plugin.
    let invoked_as = std::env::args_os().next().map(std::path::PathBuf::from);
    if invoked_as
        .as_deref()
        .and_then(std::path::Path::file_name)
        .is_some_and(|n| n == "sidecar-cni")
    {
        return sidecar::cni::main();
    }
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(pair) => pair,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; bad usage exits 64 (EX_USAGE).
            return if e.use_stderr() {
                ExitCode::from(sidecar::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Init(args) => sidecar::intercept::main(args),
        Command::Cni(args) => sidecar::cni::install::dispatch(args),
        Command::Run(args) => {
            // The config file's [run] section fills what the command line and the environment
            // leave unset: `run` needs to know which those were, and the command line itself.
            let Some(run) = matches.subcommand_matches("run") else {
                unreachable!("the run subcommand was parsed")
            };
            sidecar::run::main(*args, std::env::args_os().skip(1).collect(), run)
        }
        Command::CheckConfig(args) => sidecar::run::check::main(args),
        Command::WaitReady(args) => sidecar::lifecycle::client::wait_ready_main(args),
        Command::Shutdown(args) => sidecar::lifecycle::client::shutdown_main(args),
        Command::Reload(args) => sidecar::lifecycle::client::reload_main(args),
        Command::Status(args) => sidecar::intercept::status_main(args),
        Command::Trace(args) => sidecar::intercept::trace_main(args),
        Command::Cleanup(args) => sidecar::intercept::cleanup_main(args),
        Command::Logs(args) => sidecar::logs::main(args),
        Command::Inject(args) => sidecar::inject::main(args),
        Command::Doctor(args) => sidecar::doctor::main(args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks flag names and ids only when a subcommand is parsed, at run time; this checks
    /// every subcommand at once (flattened argument structs must not clash).
    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
