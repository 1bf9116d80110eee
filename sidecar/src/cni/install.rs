//! `sidecar cni install`: what the node DaemonSet runs. It copies this binary into the runtime's
//! CNI binary directory as `sidecar-cni`, chains the plugin into the network configuration the
//! runtime uses (the first `*.conflist` / `*.conf` of the directory by name, as CNI runtimes pick
//! it; a single-plugin `.conf` becomes a `.conflist`), keeps it chained (a primary CNI that
//! rewrites its file drops us: we are put back within `--interval`), runs the node's pin garbage
//! collection (`sidecar cleanup`'s), and on SIGTERM / SIGINT takes itself out again (the entry,
//! then the binary) before exiting. `sidecar cni installed` exits 0 only while the entry is in
//! place: the DaemonSet's readiness probe.
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// `sidecar cni [install | installed]`.
#[derive(Args, Debug)]
pub struct CniArgs {
    #[command(subcommand)]
    pub action: Option<CniAction>,
}

#[derive(Subcommand, Debug)]
pub enum CniAction {
    /// Install the plugin on this node and keep it chained until SIGTERM (the node DaemonSet).
    Install(InstallArgs),
    /// Exit 0 while the plugin is installed and chained (the DaemonSet's readiness probe).
    Installed(InstallArgs),
}

/// `sidecar cni`: the plugin itself without a subcommand.
pub fn dispatch(args: CniArgs) -> ExitCode {
    match args.action {
        None => super::main(),
        Some(CniAction::Install(a)) => install_main(a),
        Some(CniAction::Installed(a)) => installed_main(a),
    }
}

/// The plugin's `type` (and binary name).
pub const PLUGIN: &str = "sidecar-cni";

#[derive(Args, Debug, Clone)]
pub struct InstallArgs {
    /// The runtime's CNI binary directory, as mounted from the host.
    #[arg(long, env = "SIDECAR_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// The runtime's CNI configuration directory, as mounted from the host.
    #[arg(
        long,
        env = "SIDECAR_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    pub cni_conf_dir: PathBuf,

    /// The plugin's `sidecar` section, JSON (`{"namespaces": ["shop"], "init_args": [...]}`).
    #[arg(long, env = "SIDECAR_CNI_SETTINGS", default_value = "{}")]
    pub settings: String,

    /// How often the chaining is checked (and the node's stale pins collected).
    #[arg(long, env = "SIDECAR_CNI_INTERVAL", default_value = "5s")]
    pub interval: String,

    /// The node's pin root, for garbage collection (as this container mounts it).
    #[arg(long, env = "SIDECAR_PIN_ROOT", default_value = crate::intercept::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,

    /// Install once and exit (no watching, no removal): for tests and one-off repairs.
    #[arg(long)]
    pub once: bool,
}

/// One line to the container's log (a closed stderr is not worth a panic).
fn say(line: String) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// What went wrong, and what to do.
fn fail(what: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(io::stderr(), "sidecar cni install: error: {what}");
    ExitCode::from(crate::EXIT_USAGE)
}

/// The configuration file the runtime uses: the first `.conflist`, `.conf` or `.json` by name
/// that is not ours to ignore.
pub fn active_conf(dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

/// `conf` with our plugin last in its chain (replacing an earlier entry of ours); a single-plugin
/// configuration is turned into a list.
pub fn chained(conf: &Value, settings: &Value) -> Result<Value, String> {
    let mut list = match conf.get("plugins") {
        Some(Value::Array(_)) => conf.clone(),
        Some(_) => return Err("its \"plugins\" is not a list".into()),
        None if conf.get("type").is_some() => {
            let mut single = conf.clone();
            let map = single.as_object_mut().ok_or("not a JSON object")?;
            let version = map.remove("cniVersion").unwrap_or_else(|| json!("1.0.0"));
            let name = map
                .remove("name")
                .unwrap_or_else(|| json!("k8s-pod-network"));
            json!({"cniVersion": version, "name": name, "plugins": [single]})
        }
        None => return Err("neither a plugin list nor a plugin".into()),
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("its \"plugins\" is not a list")?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN));
    if plugins.is_empty() {
        return Err("it has no plugin to chain after".into());
    }
    // The runtime passes each pod's annotations (which pods are injected, their init settings).
    plugins.push(json!({
        "type": PLUGIN,
        "capabilities": {super::POD_ANNOTATIONS: true},
        "sidecar": settings
    }));
    Ok(list)
}

/// `conf` without our plugin.
pub fn unchained(conf: &Value) -> Value {
    let mut conf = conf.clone();
    if let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN));
    }
    conf
}

fn has_us(conf: &Value) -> bool {
    conf.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|p| {
            p.iter()
                .any(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN))
        })
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("sidecar-tmp");
    fs::write(&tmp, bytes)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)
}

/// Makes sure our entry is in the active configuration; returns whether it wrote.
fn ensure_chained(dir: &Path, settings: &Value) -> Result<bool, String> {
    let Some(path) = active_conf(dir).map_err(|e| format!("read {}: {e}", dir.display()))? else {
        return Err(format!(
            "{} has no CNI configuration yet (is the network plugin installed?)",
            dir.display()
        ));
    };
    let text = fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let conf: Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let want = chained(&conf, settings).map_err(|e| format!("{}: {e}", path.display()))?;
    if want == conf {
        return Ok(false);
    }
    // A `.conf` becomes a `.conflist` of the same name (the runtime then reads the list).
    let target = if path.extension().is_some_and(|e| e == "conflist") {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    let text = serde_json::to_string_pretty(&want).unwrap_or_default();
    write_atomic(&target, text.as_bytes(), 0o644)
        .map_err(|e| format!("write {}: {e}", target.display()))?;
    if target != path {
        fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    }
    Ok(true)
}

/// Takes our entry out of the active configuration and our binary out of the directory.
fn uninstall(args: &InstallArgs) {
    if let Ok(Some(path)) = active_conf(&args.cni_conf_dir) {
        if let Some(conf) = fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        {
            if has_us(&conf) {
                let text = serde_json::to_string_pretty(&unchained(&conf)).unwrap_or_default();
                let _ = write_atomic(&path, text.as_bytes(), 0o644);
            }
        }
    }
    let _ = fs::remove_file(args.cni_bin_dir.join(PLUGIN));
}

/// `sidecar cni install`.
pub fn install_main(args: InstallArgs) -> ExitCode {
    let settings: Value = match serde_json::from_str(&args.settings) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return fail("--settings / SIDECAR_CNI_SETTINGS must be a JSON object"),
        Err(e) => {
            return fail(format!(
                "--settings / SIDECAR_CNI_SETTINGS is not JSON: {e}"
            ))
        }
    };
    // The plugin's own parser checks the section, so a typo fails here, not at every pod start.
    if let Err(e) = super::check_settings(&settings) {
        return fail(format!("--settings: {}: {}", e.msg, e.details));
    }
    let interval = match crate::units::parse_duration(&args.interval) {
        Ok(d) if !d.is_zero() => d,
        _ => return fail("--interval: expected a duration such as 5s"),
    };
    // The binary first (atomically: the runtime may exec it at any moment), then the entry.
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot find this binary: {e}")),
    };
    let target = args.cni_bin_dir.join(PLUGIN);
    let tmp = args.cni_bin_dir.join(format!(".{PLUGIN}.tmp"));
    let copied = fs::copy(&exe, &tmp).and_then(|_| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &target)
    });
    if let Err(e) = copied {
        return fail(format!("install {}: {e}", target.display()));
    }
    match ensure_chained(&args.cni_conf_dir, &settings) {
        Ok(_) => say(format!(
            "sidecar cni install: {} installed and chained in {}",
            target.display(),
            args.cni_conf_dir.display()
        )),
        Err(e) if args.once => return fail(e),
        // The network plugin may install its configuration after us: keep trying.
        Err(e) => say(format!("sidecar cni install: waiting: {e}")),
    }
    if args.once {
        return ExitCode::SUCCESS;
    }
    watch(&args, &settings, interval)
}

fn watch(args: &InstallArgs, settings: &Value, interval: Duration) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if signals.thread_block().is_err() {
        return fail("cannot block SIGTERM");
    }
    loop {
        // Wait for a signal at most `interval`.
        let ts = nix::sys::time::TimeSpec::from_duration(interval);
        let got = sigtimedwait(&signals, &ts);
        if got {
            uninstall(args);
            say(format!(
                "sidecar cni install: removed from {}",
                args.cni_conf_dir.display()
            ));
            return ExitCode::SUCCESS;
        }
        match ensure_chained(&args.cni_conf_dir, settings) {
            Ok(true) => {
                say("sidecar cni install: chained again (the configuration was rewritten)".into());
            }
            Ok(false) => {}
            Err(e) => say(format!("sidecar cni install: waiting: {e}")),
        }
        let removed = crate::intercept::collect_garbage(&args.pin_root);
        if !removed.is_empty() {
            say(format!(
                "sidecar cni install: removed {} stale pin directories",
                removed.len()
            ));
        }
    }
}

/// `sigtimedwait(2)`: whether one of `set` arrived within `timeout`.
fn sigtimedwait(set: &nix::sys::signal::SigSet, timeout: &nix::sys::time::TimeSpec) -> bool {
    // SAFETY: both pointers are to live values of the types the call expects; no siginfo is
    // asked for.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), timeout.as_ref()) };
    r > 0
}

/// `sidecar cni installed`: exit 0 while the plugin is chained and its binary in place.
pub fn installed_main(args: InstallArgs) -> ExitCode {
    let binary = args.cni_bin_dir.join(PLUGIN).is_file();
    let chained = active_conf(&args.cni_conf_dir)
        .ok()
        .flatten()
        .and_then(|p| fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|c| has_us(&c));
    if binary && chained {
        ExitCode::SUCCESS
    } else {
        let _ = writeln!(
            io::stderr(),
            "sidecar cni installed: binary {}, chained {}",
            if binary { "present" } else { "missing" },
            if chained { "yes" } else { "no" }
        );
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaining_appends_once_and_converts_a_single_plugin() {
        let list = json!({"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]});
        let settings = json!({"namespaces": ["shop"]});
        let once = chained(&list, &settings).unwrap();
        assert_eq!(
            once["plugins"][1],
            json!({"type": PLUGIN, "capabilities": {super::super::POD_ANNOTATIONS: true}, "sidecar": settings})
        );
        assert_eq!(chained(&once, &settings).unwrap(), once, "idempotent");
        assert_eq!(unchained(&once), list);
        let single =
            json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"});
        let converted = chained(&single, &settings).unwrap();
        assert_eq!(converted["cniVersion"], "0.4.0");
        assert_eq!(
            converted["plugins"][0],
            json!({"type": "bridge", "bridge": "cni0"})
        );
        assert_eq!(converted["plugins"][1]["type"], PLUGIN);
        assert!(chained(&json!({"name": "x"}), &settings).is_err());
        assert!(chained(&json!({"plugins": []}), &settings).is_err());
    }
}
