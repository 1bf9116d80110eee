//! `sidecar inject`: adds the sidecar to Kubernetes workload manifests, the way `linkerd inject`
//! and `istioctl kube-inject` do: reads YAML documents, adds the privileged init container and the
//! proxy (a native sidecar) to every pod template, and writes everything back, the rest unchanged.
//!
//! Re-injecting replaces what an earlier run added (so changed annotations take effect) and is a
//! no-op on its own output. Nothing is written unless every document was understood.
pub mod pod;
mod yaml;

use std::io::{Read, Write};
use std::process::ExitCode;

pub use pod::{annotation_names, PREFIX as ANNOTATION_PREFIX};
use yaml::Node;

/// The image the injected containers run, unless `--image` or the `image` annotation says
/// otherwise: the name `docker build -t sidecar:<version> -f deploy/Dockerfile .` gives it.
pub const DEFAULT_IMAGE: &str = concat!("sidecar:", env!("CARGO_PKG_VERSION"));

#[derive(clap::Args, Debug, Clone)]
pub struct InjectArgs {
    /// Manifest to read (YAML, one or many documents); "-" or nothing reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub filename: Option<String>,

    /// Same as -f.
    #[arg(value_name = "FILE", conflicts_with = "filename")]
    pub file: Option<String>,

    /// Image of the injected containers (per workload: the sidecar.mesh.dev/image annotation).
    #[arg(long, env = "SIDECAR_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
}

/// The result of injecting one YAML stream.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The documents, written back.
    pub output: String,
    /// One line per workload: what was done, or why it was skipped.
    pub notes: Vec<String>,
    pub injected: usize,
    pub unchanged: usize,
    pub skipped: usize,
    /// Resources that are not workloads (Services, ConfigMaps...), passed through.
    pub others: usize,
}

/// Injects every workload in `text`. On any problem (bad YAML, bad annotations), returns every
/// problem found and no output.
pub fn inject(text: &str, image: &str) -> Result<Outcome, Vec<String>> {
    let mut docs = yaml::parse_documents(text).map_err(|e| vec![yaml_error(text, &e)])?;
    let mut out = Outcome::default();
    let mut errors = Vec::new();
    for doc in &mut docs {
        process(doc, "", image, &mut out, &mut errors);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    out.output = yaml::to_string(&docs);
    Ok(out)
}

/// The parser's message, with the line it points at and a caret under the column.
fn yaml_error(text: &str, e: &yaml::ParseError) -> String {
    let mut message = format!("not valid YAML: {e}");
    if let Some(line) = text.lines().nth(e.line.saturating_sub(1)) {
        let caret = " ".repeat(line.chars().take(e.column.saturating_sub(1)).count());
        message.push_str(&format!("\n      {line}\n      {caret}^"));
    }
    message
}

/// Where, below the resource, its pod template is, and where the annotations that apply to it
/// are (nearest first). None for kinds that have no pods, and for custom resources that reuse a
/// built-in kind's name in another API group (a Volcano `Job` has no `spec.template`).
fn layout(api_version: &str, kind: &str) -> Option<Vec<&'static [&'static str]>> {
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    Some(match (group, kind) {
        ("", "Pod") => vec![&[]],
        ("", "ReplicationController")
        | ("apps" | "extensions", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => vec![&["spec", "template"], &[]],
        ("batch", "CronJob") => vec![
            &["spec", "jobTemplate", "spec", "template"],
            &["spec", "jobTemplate"],
            &[],
        ],
        _ => return None,
    })
}

fn process(
    doc: &mut Node,
    context: &str,
    image: &str,
    out: &mut Outcome,
    errors: &mut Vec<String>,
) {
    let kind = doc
        .get("kind")
        .and_then(Node::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind.ends_with("List") {
        if let Some(items) = doc.get_mut("items").and_then(Node::items_mut) {
            for (i, item) in items.iter_mut().enumerate() {
                process(
                    item,
                    &format!("{context}{kind} item {i}: "),
                    image,
                    out,
                    errors,
                );
            }
            return;
        }
    }
    let api_version = doc
        .get("apiVersion")
        .and_then(Node::as_str)
        .unwrap_or_default();
    let Some(layout) = layout(api_version, &kind) else {
        out.others += 1;
        return;
    };
    let name = doc
        .path(&["metadata", "name"])
        .and_then(Node::as_str)
        .unwrap_or("(unnamed)");
    let label = format!("{context}{}/{name}", kind.to_ascii_lowercase());
    let template_path = layout[0];
    let Some(template) = doc.path(template_path).filter(|t| t.is_map()) else {
        errors.push(format!(
            "{label}: no pod template at {}",
            template_path.join(".")
        ));
        return;
    };
    let Some(spec) = template
        .get("spec")
        .filter(|s| s.get("containers").and_then(Node::items).is_some())
    else {
        errors.push(format!(
            "{label}: no pod spec with containers at {}",
            [template_path, &["spec"]].concat().join(".")
        ));
        return;
    };

    let maps = layout
        .iter()
        .filter_map(|p| {
            doc.path(p)
                .and_then(|o| o.path(&["metadata", "annotations"]))
        })
        .collect();
    let annotations = pod::Annotations::new(maps);
    if let Some(reason) = annotations.opted_out().or_else(|| pod::skip_reason(spec)) {
        out.skipped += 1;
        out.notes.push(format!("{label}: skipped: {reason}"));
        return;
    }
    let clashes = pod::proxy_identity_clashes(spec);
    if !clashes.is_empty() {
        errors.extend(clashes.into_iter().map(|p| format!("{label}: {p}")));
        return;
    }
    let service = [
        &["metadata", "labels", "app.kubernetes.io/name"][..],
        &["metadata", "labels", "app"],
    ]
    .iter()
    .find_map(|p| template.path(p).and_then(Node::as_str))
    .unwrap_or(name)
    .to_owned();
    let probe_paths = template
        .get("spec")
        .map(pod::probe_paths)
        .unwrap_or_default();
    let settings = match pod::Settings::from_annotations(&annotations, image, &service) {
        Ok(s) => pod::Settings { probe_paths, ..s },
        Err(problems) => {
            errors.extend(problems.into_iter().map(|p| format!("{label}: {p}")));
            return;
        }
    };
    let Some(template) = path_mut(doc, template_path) else {
        return;
    };
    let before = template.clone();
    match apply(template, &settings) {
        Ok(note) => {
            if *template == before {
                out.unchanged += 1;
                out.notes
                    .push(format!("{label}: already injected, unchanged"));
            } else {
                out.injected += 1;
                let was = before
                    .path(&["spec", "initContainers"])
                    .and_then(Node::items)
                    .is_some_and(|c| {
                        c.iter().any(|c| {
                            c.get("name").and_then(Node::as_str) == Some(pod::INIT_CONTAINER)
                        })
                    });
                out.notes.push(format!(
                    "{label}: {}{note}",
                    if was { "re-injected" } else { "injected" }
                ));
            }
        }
        Err(problem) => errors.push(format!("{label}: {problem}")),
    }
}

fn path_mut<'a>(node: &'a mut Node, keys: &[&str]) -> Option<&'a mut Node> {
    keys.iter().try_fold(node, |n, k| n.get_mut(k))
}

/// Adds (or replaces) our containers, volumes and annotations in a pod template. Returns a remark
/// for the user, if any.
fn apply(template: &mut Node, settings: &pod::Settings) -> Result<String, String> {
    let ours = [pod::INIT_CONTAINER, pod::PROXY_CONTAINER];
    let is_ours = |c: &Node| {
        c.get("name")
            .and_then(Node::as_str)
            .is_some_and(|n| ours.contains(&n))
    };
    let spec = template.get_mut("spec").ok_or("no pod spec")?;
    if let Some(taken) = spec
        .get("containers")
        .and_then(Node::items)
        .and_then(|c| c.iter().find(|c| is_ours(c)))
    {
        return Err(format!(
            "an application container is named {:?}, a name the sidecar needs; rename it",
            taken.get("name").and_then(Node::as_str).unwrap_or_default()
        ));
    }
    let inits = spec
        .seq_entry_before("initContainers", "containers")
        .ok_or("spec.initContainers is not a list")?;
    inits.retain(|c| !is_ours(c));
    // First, so the app's own init containers already run with the proxy in place.
    if settings.cni {
        inits.insert(0, pod::proxy_container(settings));
    } else {
        inits.insert(0, pod::init_container(settings));
        inits.insert(1, pod::proxy_container(settings));
    }
    let volumes = spec
        .seq_entry("volumes")
        .ok_or("spec.volumes is not a list")?;
    for volume in pod::volumes(settings) {
        let volume = match volume {
            Ok(v) => v,
            Err(stale) => {
                volumes.retain(|v| v.get("name").and_then(Node::as_str) != Some(stale));
                continue;
            }
        };
        let name = volume.get("name").and_then(Node::as_str).map(str::to_owned);
        match volumes
            .iter_mut()
            .find(|v| v.get("name").and_then(Node::as_str) == name.as_deref())
        {
            Some(existing) => *existing = volume,
            None => volumes.push(volume),
        }
    }
    let annotations = template
        .map_entry_before("metadata", "spec")
        .and_then(|m| m.map_entry("annotations"))
        .ok_or("metadata.annotations is not a mapping")?;
    let (port_key, port) = pod::SCRAPE_ANNOTATIONS[1];
    let theirs = pod::SCRAPE_ANNOTATIONS
        .iter()
        .any(|(k, _)| annotations.get(k).is_some())
        && annotations.get(port_key).and_then(Node::as_str) != Some(port);
    if theirs {
        return Ok(" (kept the pod's own prometheus.io/* annotations: the proxy's metrics are on port 15090)".into());
    }
    for (key, value) in pod::SCRAPE_ANNOTATIONS {
        annotations.set(key, Node::str(value));
    }
    Ok(String::new())
}

/// `sidecar inject` entry point.
pub fn main(args: InjectArgs) -> ExitCode {
    let source = args
        .filename
        .or(args.file)
        .unwrap_or_else(|| "-".to_owned());
    let (name, text) = if source == "-" {
        let mut text = String::new();
        match std::io::stdin().read_to_string(&mut text) {
            Ok(_) => ("standard input".to_owned(), text),
            Err(e) => {
                eprintln!("sidecar inject: error: cannot read standard input: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        match std::fs::read_to_string(&source) {
            Ok(text) => (source.clone(), text),
            Err(e) => {
                eprintln!("sidecar inject: error: cannot read {source}: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    match inject(&text, &args.image) {
        Ok(outcome) => {
            if let Err(e) = std::io::stdout()
                .lock()
                .write_all(outcome.output.as_bytes())
            {
                eprintln!("sidecar inject: error: cannot write the output: {e}");
                return ExitCode::FAILURE;
            }
            for note in &outcome.notes {
                eprintln!("sidecar inject: {note}");
            }
            eprintln!(
                "sidecar inject: {} injected, {} already injected, {} skipped, {} other resources passed through",
                outcome.injected, outcome.unchanged, outcome.skipped, outcome.others
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!(
                "sidecar inject: error: {name}: {} problem(s), nothing written:",
                problems.len()
            );
            for p in problems {
                eprintln!("  - {p}");
            }
            ExitCode::FAILURE
        }
    }
}
