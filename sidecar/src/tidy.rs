//! The layering of `sidecar/src`, checked on the sources (rust-analyzer's `tidy.rs` is the model):
//! a module may only import modules of a lower layer (ARCHITECTURE.md, "Layers"), the proxy's
//! files only those below them in the proxy's own order, and no files import each other in a
//! cycle. A failure names the file, the line and the import, and says which rule it breaks.
//!
//! What counts as an import: `crate::a::...` and `super::...` paths and `use child::...` of a
//! declared child module, anywhere in non-test code (comments, string literals and test modules
//! are skipped: tests may reach anywhere to set things up). Declaring a child module (`mod x;`) is
//! not an import of it.
//!
//! Also: a file over [`LONG_FILE`] lines says at its top why it is one file.
//!
//! Size: a little over 600 lines: the source reader, the import parser, the two checks and the
//! checker's own test of its parser belong together (it is test code as a whole).
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The crate's modules, lowest layer first. A module may import modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    // The bottom: what everything may use. Each imports nothing from the crate.
    &[
        "error",
        "units",
        "cli",
        "net",
        "config_errors",
        "orig_dst",
        "pins",
        "bpf",
    ],
    // Telemetry: depends only on the error and its own types.
    &["metrics"],
    // Workload identity for mesh TLS (certificates from files, peer verification).
    &["identity"],
    // REST/JSON to gRPC: descriptor sets, routes, messages (pure conversion, no I/O but reading
    // the descriptor set).
    &["transcode"],
    // What happens to each request (breaker, retries, timeouts, headers) and its defaults.
    &["policy"],
    // Reading the policy file again and swapping the policies in force.
    &["reload"],
    // Readiness and the drain: the proxy reports to it; it never imports the proxy.
    &["lifecycle"],
    // Per-connection mechanics.
    &["proxy"],
    // Subsystems beside the proxy.
    &["admin", "logs", "intercept"],
    // Commands built on the init step's configuration.
    &["inject", "doctor"],
    // The CNI plugin: init's install, with the injector's reading of a pod's annotations.
    &["cni"],
    // `sidecar run`: wires everything together.
    &["run"],
];

/// Inside `proxy`, lowest first: a file may import only files of lower rank (the root, proxy.rs,
/// is above all of them).
const PROXY_LAYERS: &[&[&str]] = &[
    &["config", "detect"],
    &["mesh"],
    &["connect"],
    &["pool"],
    &["route"],
    &["h2"],
    &["shared"],
    &["forward"],
    &["serve", "authorize", "transcode"],
    &["h1"],
    &["transparent", "target"],
];

/// Files outside the layers: the crate roots (they declare and wire everything) and this test.
const EXEMPT: &[&str] = &["lib", "main", "tidy"];

/// One source file as a module: `proxy::forward` for `src/proxy/forward.rs`, `proxy` for
/// `src/proxy.rs`.
#[derive(Debug)]
struct Source {
    module: Vec<String>,
    path: PathBuf,
    text: String,
}

/// A reference from one file to a module of the crate.
#[derive(Debug, Clone)]
struct Import {
    line: usize,
    text: String,
    /// The module referred to, as precisely as the known modules allow.
    target: Vec<String>,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn sources() -> Vec<Source> {
    let root = src_dir();
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(&root).expect("under src");
                let mut module: Vec<String> = rel
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if module.last().is_some_and(|m| m == "mod") {
                    module.pop();
                }
                let text = fs::read_to_string(&path).expect("read source");
                out.push(Source { module, path, text });
            }
        }
    }
    out.sort_by(|a, b| a.module.cmp(&b.module));
    out
}

/// Modules declared `#[cfg(test)] mod name;` in `text`: their whole file is test code.
fn test_children(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for pair in lines.windows(2) {
        if pair[0].trim() == "#[cfg(test)]" {
            let decl = pair[1].trim();
            let decl = decl.strip_prefix("pub ").unwrap_or(decl);
            if let Some(name) = decl.strip_prefix("mod ").and_then(|d| d.strip_suffix(';')) {
                out.push(name.trim().to_owned());
            }
        }
    }
    out
}

/// The non-test code of a file, with comments and string literals blanked out (line numbers
/// kept): everything from a top-level `#[cfg(test)]` item with a body (`mod tests { ... }`, by
/// convention last in the file) on is test code.
fn code_of(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_end().ends_with('{'))
        {
            break;
        }
        out.push(blank_comments_and_strings(line));
    }
    out
}

/// Replaces `// ...` comments and the insides of `"..."` literals with spaces.
fn blank_comments_and_strings(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '\\' => {
                    chars.next();
                    out.push_str("  ");
                }
                '"' => {
                    in_string = false;
                    out.push('"');
                }
                _ => out.push(' '),
            }
        } else if c == '"' {
            in_string = true;
            out.push('"');
        } else if c == '/' && chars.peek() == Some(&'/') {
            break;
        } else {
            out.push(c);
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first path segments after `prefix` at byte `at` of `code`: one name, or each name of a
/// `{a::x, b}` group (the statement may go on over the following lines: `rest`).
fn first_segments(after: &str) -> Vec<String> {
    let after = after.trim_start();
    if let Some(group) = after.strip_prefix('{') {
        let mut names = Vec::new();
        let mut depth = 0usize;
        let mut current = String::new();
        let mut at_start = true;
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    at_start = true;
                    continue;
                }
                _ => {}
            }
            if depth == 0 && at_start {
                if is_ident(c) {
                    current.push(c);
                    continue;
                } else if !current.is_empty() {
                    names.push(std::mem::take(&mut current));
                    at_start = false;
                }
            }
        }
        if !current.is_empty() {
            names.push(current);
        }
        names
    } else {
        let name: String = after.chars().take_while(|c| is_ident(*c)).collect();
        if name.is_empty() {
            Vec::new()
        } else {
            vec![name]
        }
    }
}

/// Resolves `base::name...` to the most precise known module: `base::name` if it is a module,
/// else `base` (an item of it).
fn resolve(known: &BTreeSet<Vec<String>>, base: &[String], name: &str) -> Vec<String> {
    let mut candidate = base.to_vec();
    candidate.push(name.to_owned());
    if known.contains(&candidate) {
        candidate
    } else {
        base.to_vec()
    }
}

/// Every reference of `source` to another module of the crate.
fn imports(source: &Source, known: &BTreeSet<Vec<String>>) -> Vec<Import> {
    let lines = code_of(&source.text);
    // A statement can span lines (`use super::{\n a,\n b,\n};`): look at the joined text
    // from each occurrence on.
    let joined: String = lines.join("\n");
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(joined.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let line_of = |at: usize| line_starts.partition_point(|s| *s <= at);
    let parent: Vec<String> = source.module[..source.module.len() - 1].to_vec();
    let children: BTreeSet<&str> = known
        .iter()
        .filter(|m| m.len() == source.module.len() + 1 && m.starts_with(&source.module))
        .map(|m| m[m.len() - 1].as_str())
        .collect();
    let mut out = Vec::new();
    let mut push = |at: usize, target: Vec<String>| {
        let line = line_of(at);
        out.push(Import {
            line,
            text: lines[line - 1].trim().to_owned(),
            target,
        });
    };
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent.clone())] {
        for (at, _) in joined.match_indices(prefix) {
            // `super::super::` and `crate::` inside a longer identifier are not ours to judge.
            if at > 0 && is_ident(joined[..at].chars().last().unwrap_or(' ')) {
                continue;
            }
            let after = &joined[at + prefix.len()..];
            if after.starts_with("super::") {
                continue;
            }
            let grouped = after.trim_start().starts_with('{');
            for name in first_segments(after) {
                let target = resolve(known, &base, &name);
                if target.is_empty() {
                    // An item of the crate root (`crate::EXIT_USAGE`): allowed everywhere.
                    continue;
                }
                // `crate::proxy::pool::X`: as precise as the known modules allow.
                let mut deeper = Vec::new();
                if target.len() > base.len() && !grouped {
                    let rest = &after.trim_start()[name.len()..];
                    if let Some(rest) = rest.strip_prefix("::") {
                        for sub in first_segments(rest) {
                            let d = resolve(known, &target, &sub);
                            if d.len() > target.len() {
                                deeper.push(d);
                            }
                        }
                    }
                }
                if deeper.is_empty() {
                    push(at, target);
                } else {
                    for d in deeper {
                        push(at, d);
                    }
                }
            }
        }
    }
    // `child::...` of a declared child module, in a `use` or in code (`tail::Filler::new()`).
    for child in &children {
        let pattern = format!("{child}::");
        for (at, _) in joined.match_indices(&pattern) {
            let before = joined[..at].chars().last().unwrap_or(' ');
            if is_ident(before) || before == ':' || before == '.' {
                continue;
            }
            let mut target = source.module.clone();
            target.push((*child).to_owned());
            push(at, target);
        }
    }
    out
}

fn layer_of(table: &[&[&str]], name: &str) -> Option<usize> {
    table.iter().position(|layer| layer.contains(&name))
}

/// Everything the tidy test looks at: the modules, their files, and each file's imports.
struct Tree {
    sources: Vec<Source>,
    /// Per file (index into `sources`): its imports of other modules.
    imports: Vec<Vec<Import>>,
}

impl Tree {
    fn read() -> Tree {
        let mut sources = sources();
        // Drop files that are test code as a whole.
        let mut test_files: BTreeSet<Vec<String>> = BTreeSet::new();
        for s in &sources {
            for child in test_children(&s.text) {
                let mut m = s.module.clone();
                m.push(child);
                test_files.insert(m);
            }
        }
        // Children of test files are test code too (`run/settings/tests.rs` etc.).
        sources.retain(|s| !test_files.iter().any(|t| s.module.starts_with(t)));
        let known: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
        let imports = sources.iter().map(|s| imports(s, &known)).collect();
        Tree { sources, imports }
    }

    fn rel(&self, i: usize) -> String {
        self.sources[i]
            .path
            .strip_prefix(src_dir().parent().unwrap_or(Path::new("")))
            .unwrap_or(&self.sources[i].path)
            .display()
            .to_string()
    }

    /// Imports that break the crate's layers or the proxy's order.
    fn upward_imports(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, source) in self.sources.iter().enumerate() {
            let top = source.module[0].as_str();
            if EXEMPT.contains(&top) {
                continue;
            }
            let Some(own) = layer_of(LAYERS, top) else {
                problems.push(format!(
                    "{}: module `{top}` is in no layer: add it to LAYERS in sidecar/src/tidy.rs and \
                     to ARCHITECTURE.md",
                    self.rel(i)
                ));
                continue;
            };
            for import in &self.imports[i] {
                let target = import.target[0].as_str();
                if target == top {
                    if top == "proxy" {
                        problems.extend(self.proxy_order(i, import));
                    }
                    continue;
                }
                match layer_of(LAYERS, target) {
                    Some(layer) if layer < own => {}
                    Some(layer) => problems.push(format!(
                        "{}:{}: `{}` imports `{target}` (layer {layer}) from `{top}` (layer {own}): \
                         a module may only import lower layers (ARCHITECTURE.md, Layers)",
                        self.rel(i),
                        import.line,
                        import.text
                    )),
                    None if EXEMPT.contains(&target) => problems.push(format!(
                        "{}:{}: `{}` imports the crate root's module `{target}`",
                        self.rel(i),
                        import.line,
                        import.text
                    )),
                    None => {}
                }
            }
        }
        problems
    }

    /// Inside `proxy`: files only import files below them.
    fn proxy_order(&self, i: usize, import: &Import) -> Option<String> {
        let module = &self.sources[i].module;
        let own = match module.get(1) {
            None => PROXY_LAYERS.len(),
            Some(name) => layer_of(PROXY_LAYERS, name)?,
        };
        let target = match import.target.get(1) {
            None => PROXY_LAYERS.len(),
            Some(name) => layer_of(PROXY_LAYERS, name)?,
        };
        (target >= own && import.target.len() <= 2 && import.target != *module).then(|| {
            format!(
                "{}:{}: `{}` imports `{}` from `{}`: inside the proxy a file may only import \
                 the files below it (PROXY_LAYERS in sidecar/src/tidy.rs; the root, proxy.rs, is \
                 the top)",
                self.rel(i),
                import.line,
                import.text,
                import.target.join("::"),
                module.join("::")
            )
        })
    }

    /// Import cycles between files, each as the files in it.
    fn cycles(&self) -> Vec<String> {
        let index: BTreeMap<&[String], usize> = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.module.as_slice(), i))
            .collect();
        let edges: Vec<BTreeSet<usize>> = self
            .imports
            .iter()
            .enumerate()
            .map(|(i, imports)| {
                imports
                    .iter()
                    .filter_map(|imp| index.get(imp.target.as_slice()).copied())
                    .filter(|j| *j != i)
                    .collect()
            })
            .collect();
        strongly_connected(&edges)
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|c| {
                let files: Vec<String> = c.iter().map(|i| self.rel(*i)).collect();
                let mut why = Vec::new();
                for &i in &c {
                    for imp in &self.imports[i] {
                        let inside = index
                            .get(imp.target.as_slice())
                            .is_some_and(|j| c.contains(j) && *j != i);
                        if inside {
                            why.push(format!("{}:{}: {}", self.rel(i), imp.line, imp.text));
                        }
                    }
                }
                format!(
                    "import cycle between {}:\n    {}",
                    files.join(", "),
                    why.join("\n    ")
                )
            })
            .collect()
    }
}

/// Tarjan's strongly connected components.
fn strongly_connected(edges: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        edges: &'a [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State<'_>, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in s.edges[v].iter() {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            component.sort_unstable();
            s.out.push(component);
        }
    }
    let n = edges.len();
    let mut s = State {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn modules_import_only_lower_layers() {
    let problems = Tree::read().upward_imports();
    assert!(
        problems.is_empty(),
        "{} upward import(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn no_import_cycles_between_files() {
    let cycles = Tree::read().cycles();
    assert!(cycles.is_empty(), "{}", cycles.join("\n"));
}

/// Past this many lines a file says at its top why it is one file (`//! Size: ...`).
const LONG_FILE: usize = 620;

#[test]
fn long_files_say_why() {
    let mut long = Vec::new();
    for source in sources() {
        let lines = source.text.lines().count();
        let says_why = source
            .text
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .any(|l| l.starts_with("//! Size:"));
        if lines > LONG_FILE && !says_why {
            long.push(format!("{} ({lines} lines)", source.path.display()));
        }
    }
    assert!(
        long.is_empty(),
        "files over {LONG_FILE} lines without a `//! Size:` reason at the top (split them, or say \
         why they are one file):\n  {}",
        long.join("\n  ")
    );
}

#[test]
fn the_checker_sees_imports() {
    // The parser itself, on a sample: grouped, nested, multi-line, in comments and strings.
    let known: BTreeSet<Vec<String>> = [
        vec!["policy".to_owned()],
        vec!["proxy".to_owned()],
        vec!["proxy".to_owned(), "pool".to_owned()],
        vec!["proxy".to_owned(), "forward".to_owned()],
        vec!["metrics".to_owned()],
    ]
    .into_iter()
    .collect();
    let source = Source {
        module: vec!["proxy".to_owned(), "forward".to_owned()],
        path: PathBuf::from("proxy/forward.rs"),
        text: "use super::pool::Host;\nuse crate::{metrics::Dir,\n    policy};\n\
               // crate::run is a comment\nlet s = \"crate::admin\";\n\
               fn f() { crate::proxy::pool::x(); }\n#[cfg(test)]\nmod tests {\n    use crate::run;\n}\n"
            .to_owned(),
    };
    let found: Vec<(usize, String)> = imports(&source, &known)
        .into_iter()
        .map(|i| (i.line, i.target.join("::")))
        .collect();
    assert_eq!(
        found,
        [
            (2, "metrics".to_owned()),
            (2, "policy".to_owned()),
            (6, "proxy::pool".to_owned()),
            (1, "proxy::pool".to_owned()),
        ]
    );
    // A child module used by path in code, without a `use`.
    let known: BTreeSet<Vec<String>> = [
        vec!["logs".to_owned()],
        vec!["logs".to_owned(), "tail".to_owned()],
    ]
    .into_iter()
    .collect();
    let root = Source {
        module: vec!["logs".to_owned()],
        path: PathBuf::from("logs.rs"),
        text: "fn f() { let t = tail::Filler::new(); let u = x.tail::<u8>(); }\n".to_owned(),
    };
    let found: Vec<String> = imports(&root, &known)
        .into_iter()
        .map(|i| i.target.join("::"))
        .collect();
    assert_eq!(found, ["logs::tail"]);
    let edges = vec![
        BTreeSet::from([1]),
        BTreeSet::from([2]),
        BTreeSet::from([0]),
        BTreeSet::new(),
    ];
    assert_eq!(
        strongly_connected(&edges)
            .iter()
            .filter(|c| c.len() > 1)
            .count(),
        1
    );
}
