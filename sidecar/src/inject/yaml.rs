//! A YAML tree that keeps every scalar as it was written (its text and its quoting), and a block
//! emitter for it.
//!
//! Why not a serde YAML crate: those resolve scalars with YAML 1.2 rules and re-quote them on the
//! way out, while Kubernetes reads manifests with YAML 1.1 rules (go-yaml). Round-tripping through
//! them silently changes meaning: `defaultMode: 0644` (1.1: octal 420) comes back as the string
//! `'0644'`, which the API server rejects, and the string `"yes"` comes back as a bare `yes`, which
//! Kubernetes reads as a boolean. Keeping the source text of plain scalars and emitting it
//! verbatim means the output means to Kubernetes exactly what the input meant.
//!
//! Not kept: comments, anchors (aliases are expanded in place), flow style (written back in block
//! style), document directives. None of them change what the API server receives.
//!
//! Size: over 600 lines because it is one small parser and its writer (block style, scalars kept
//! as written), which read together; its tests are in `yaml/tests.rs`.
use std::collections::HashMap;
use std::fmt::Write as _;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span, Tag};

/// How a scalar was (or will be) written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    SingleQuoted,
    DoubleQuoted,
    Literal,
    Folded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar {
    /// The scalar's content (for plain scalars also its source text).
    pub value: String,
    pub style: Style,
    /// The tag as written back (`!!str`), if the source had one.
    pub tag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Scalar(Scalar),
    Seq {
        items: Vec<Node>,
        tag: Option<String>,
    },
    Map {
        entries: Vec<(Node, Node)>,
        tag: Option<String>,
    },
}

/// A parse failure, with the 1-based line and column it was found at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {problem}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub problem: String,
}

impl ParseError {
    fn at(span: Span, problem: impl Into<String>) -> Self {
        ParseError {
            line: span.start.line(),
            column: span.start.col() + 1,
            problem: problem.into(),
        }
    }
}

impl From<ScanError> for ParseError {
    fn from(e: ScanError) -> Self {
        ParseError {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            problem: e.info().to_owned(),
        }
    }
}

/// Upper bound on nodes built from one input: alias expansion can otherwise turn a few lines into
/// gigabytes ("billion laughs").
const MAX_NODES: usize = 1_000_000;

impl Node {
    /// A string scalar, quoted when a YAML 1.1 or 1.2 reader could take it for anything else.
    pub fn str(s: impl Into<String>) -> Node {
        let value = s.into();
        let style = if plain_is_safe(&value) {
            Style::Plain
        } else {
            Style::DoubleQuoted
        };
        Node::Scalar(Scalar {
            value,
            style,
            tag: None,
        })
    }

    pub fn int(n: i64) -> Node {
        Node::Scalar(Scalar {
            value: n.to_string(),
            style: Style::Plain,
            tag: None,
        })
    }

    pub fn bool(b: bool) -> Node {
        Node::Scalar(Scalar {
            value: b.to_string(),
            style: Style::Plain,
            tag: None,
        })
    }

    pub fn map<K: Into<String>>(entries: impl IntoIterator<Item = (K, Node)>) -> Node {
        Node::Map {
            entries: entries
                .into_iter()
                .map(|(k, v)| (Node::str(k), v))
                .collect(),
            tag: None,
        }
    }

    pub fn seq(items: impl IntoIterator<Item = Node>) -> Node {
        Node::Seq {
            items: items.into_iter().collect(),
            tag: None,
        }
    }

    /// The content of a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Scalar(s) => Some(&s.value),
            _ => None,
        }
    }

    /// True for a plain scalar that YAML 1.1 (Kubernetes) reads as boolean true.
    pub fn is_true(&self) -> bool {
        matches!(self, Node::Scalar(s) if s.style == Style::Plain
            && s.tag.is_none()
            && ["true", "yes", "on", "y"].contains(&s.value.to_ascii_lowercase().as_str()))
    }

    /// True for an empty plain scalar, `~` or `null`: what YAML reads as null.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar(s) if s.style == Style::Plain
            && s.tag.is_none()
            && ["", "~", "null"].contains(&s.value.to_ascii_lowercase().as_str()))
    }

    pub fn items(&self) -> Option<&[Node]> {
        match self {
            Node::Seq { items, .. } => Some(items),
            _ => None,
        }
    }

    pub fn items_mut(&mut self) -> Option<&mut Vec<Node>> {
        match self {
            Node::Seq { items, .. } => Some(items),
            _ => None,
        }
    }

    pub fn is_map(&self) -> bool {
        matches!(self, Node::Map { .. })
    }

    /// The value under `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        match self {
            Node::Map { entries, .. } => entries
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// `get(a).get(b)...`
    pub fn path(&self, keys: &[&str]) -> Option<&Node> {
        keys.iter().try_fold(self, |node, key| node.get(key))
    }

    /// Sets `key` in a mapping: replaced in place if present (so key order is kept), else appended.
    /// Returns false (and does nothing) on a non-mapping.
    pub fn set(&mut self, key: &str, value: Node) -> bool {
        match self {
            Node::Map { entries, .. } => {
                match entries.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
                    Some((_, v)) => *v = value,
                    None => entries.push((Node::str(key), value)),
                }
                true
            }
            _ => false,
        }
    }

    /// Inserts an empty `value` under `key` just before `before` (where a person would write it)
    /// when `key` is absent; does nothing otherwise.
    fn insert_before(&mut self, key: &str, before: &str, value: Node) {
        if let Node::Map { entries, .. } = self {
            if !entries.iter().any(|(k, _)| k.as_str() == Some(key)) {
                let at = entries
                    .iter()
                    .position(|(k, _)| k.as_str() == Some(before))
                    .unwrap_or(entries.len());
                entries.insert(at, (Node::str(key), value));
            }
        }
    }

    /// Like [`Node::seq_entry`], but a new key goes just before `before` instead of at the end.
    pub fn seq_entry_before(&mut self, key: &str, before: &str) -> Option<&mut Vec<Node>> {
        self.insert_before(key, before, Node::seq([]));
        self.seq_entry(key)
    }

    /// Like [`Node::map_entry`], but a new key goes just before `before` instead of at the end.
    pub fn map_entry_before(&mut self, key: &str, before: &str) -> Option<&mut Node> {
        self.insert_before(
            key,
            before,
            Node::Map {
                entries: Vec::new(),
                tag: None,
            },
        );
        self.map_entry(key)
    }

    /// The mapping under `key`, created (empty) when absent or null. None when something else is
    /// there, or `self` is not a mapping.
    pub fn map_entry(&mut self, key: &str) -> Option<&mut Node> {
        if !self.is_map() {
            return None;
        }
        if self.get(key).is_none_or(Node::is_null) {
            self.set(
                key,
                Node::Map {
                    entries: Vec::new(),
                    tag: None,
                },
            );
        }
        self.get_mut(key).filter(|n| n.is_map())
    }

    /// The sequence under `key`, created (empty) when absent or null.
    pub fn seq_entry(&mut self, key: &str) -> Option<&mut Vec<Node>> {
        if !self.is_map() {
            return None;
        }
        if self.get(key).is_none_or(Node::is_null) {
            self.set(
                key,
                Node::Seq {
                    items: Vec::new(),
                    tag: None,
                },
            );
        }
        self.get_mut(key).and_then(Node::items_mut)
    }
}

/// Parses every document of a YAML stream. Empty documents (`---` with nothing, or `null`) are
/// dropped, as kubectl drops them.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, ParseError> {
    let mut builder = Builder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event?;
        builder.event(event, span)?;
    }
    let mut documents = builder.documents;
    // A block scalar that runs to the end of a file without a final line break has no trailing
    // newline (YAML spec, and libyaml, which Kubernetes' reader follows); the parser adds one.
    let last_line = text.rsplit('\n').next().unwrap_or_default().trim();
    if !text.ends_with('\n') && !last_line.is_empty() && !last_line.starts_with('#') {
        if let Some(s) = documents.last_mut().and_then(last_scalar) {
            if matches!(s.style, Style::Literal | Style::Folded) && s.value.ends_with('\n') {
                s.value.pop();
            }
        }
    }
    Ok(documents)
}

/// The scalar written last (the last value of the last entry, recursively), if it is one.
fn last_scalar(node: &mut Node) -> Option<&mut Scalar> {
    match node {
        Node::Scalar(s) => Some(s),
        Node::Seq { items, .. } => items.last_mut().and_then(last_scalar),
        Node::Map { entries, .. } => entries.last_mut().and_then(|(_, v)| last_scalar(v)),
    }
}

enum Open {
    Seq {
        items: Vec<Node>,
        tag: Option<String>,
        anchor: usize,
    },
    Map {
        entries: Vec<(Node, Node)>,
        tag: Option<String>,
        anchor: usize,
        key: Option<(Node, Span)>,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    documents: Vec<Node>,
    nodes: usize,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), ParseError> {
        if let Event::Scalar(.., Some(tag))
        | Event::SequenceStart(_, Some(tag))
        | Event::MappingStart(_, Some(tag)) = &event
        {
            // The parser decodes a tag's %-escapes of multi-byte characters inconsistently with
            // its own reading of them (found by fuzzing): such a tag could not be written back.
            // Kubernetes manifests use no tags of their own.
            if !tag.handle.is_ascii() || !tag.suffix.is_ascii() {
                return Err(ParseError::at(
                    span,
                    "a tag with characters beyond ASCII is not supported",
                ));
            }
        }
        match event {
            Event::Scalar(value, style, anchor, tag) => {
                let style = match style {
                    ScalarStyle::Plain => Style::Plain,
                    ScalarStyle::SingleQuoted => Style::SingleQuoted,
                    ScalarStyle::DoubleQuoted => Style::DoubleQuoted,
                    ScalarStyle::Literal => Style::Literal,
                    ScalarStyle::Folded => Style::Folded,
                };
                let node = Node::Scalar(Scalar {
                    value: value.into_owned(),
                    style,
                    tag: tag.as_deref().map(tag_text),
                });
                self.finish(node, anchor, span)
            }
            Event::SequenceStart(anchor, tag) => {
                self.stack.push(Open::Seq {
                    items: Vec::new(),
                    tag: tag.as_deref().map(tag_text),
                    anchor,
                });
                Ok(())
            }
            Event::MappingStart(anchor, tag) => {
                self.stack.push(Open::Map {
                    entries: Vec::new(),
                    tag: tag.as_deref().map(tag_text),
                    anchor,
                    key: None,
                });
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Open::Seq { items, tag, anchor }) => {
                    self.finish(Node::Seq { items, tag }, anchor, span)
                }
                Some(Open::Map {
                    entries,
                    tag,
                    anchor,
                    ..
                }) => self.finish(Node::Map { entries, tag }, anchor, span),
                None => Err(ParseError::at(span, "unbalanced collection end")),
            },
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(node) => {
                    let node = node.clone();
                    self.count(&node, span)?;
                    self.finish(node, 0, span)
                }
                None => Err(ParseError::at(span, "alias to an unknown anchor")),
            },
            Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart(_)
            | Event::DocumentEnd
            | Event::Nothing => Ok(()),
        }
    }

    fn count(&mut self, node: &Node, span: Span) -> Result<(), ParseError> {
        fn size(n: &Node) -> usize {
            match n {
                Node::Scalar(_) => 1,
                Node::Seq { items, .. } => 1 + items.iter().map(size).sum::<usize>(),
                Node::Map { entries, .. } => {
                    1 + entries
                        .iter()
                        .map(|(k, v)| size(k) + size(v))
                        .sum::<usize>()
                }
            }
        }
        self.nodes += size(node);
        if self.nodes > MAX_NODES {
            return Err(ParseError::at(
                span,
                "too many nodes once aliases are expanded",
            ));
        }
        Ok(())
    }

    /// A complete node: goes into its parent collection, or becomes a document.
    fn finish(&mut self, node: Node, anchor: usize, span: Span) -> Result<(), ParseError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(ParseError::at(span, "too many nodes"));
        }
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if !node.is_null() {
                    self.documents.push(node);
                }
                Ok(())
            }
            Some(Open::Seq { items, .. }) => {
                items.push(node);
                Ok(())
            }
            Some(Open::Map { entries, key, .. }) => match key.take() {
                None => {
                    if !matches!(node, Node::Scalar(_)) {
                        return Err(ParseError::at(span, "mapping keys must be scalars"));
                    }
                    *key = Some((node, span));
                    Ok(())
                }
                Some((k, key_span)) => {
                    if entries
                        .iter()
                        .any(|(existing, _)| key_identity(existing) == key_identity(&k))
                    {
                        return Err(ParseError::at(
                            key_span,
                            format!(
                                "duplicate key {:?} in one mapping",
                                k.as_str().unwrap_or_default()
                            ),
                        ));
                    }
                    entries.push((k, node));
                    Ok(())
                }
            },
        }
    }
}

/// What a mapping key is, for the duplicate check: its text, except that every spelling of null
/// (an empty plain key, `~`, `null`) is one key, as it is to every YAML reader (found by fuzzing:
/// `:` and `~:` in one mapping were accepted, and written back as two `~:`).
fn key_identity(node: &Node) -> Option<&str> {
    match node {
        Node::Scalar(s)
            if s.style == Style::Plain
                && s.tag.is_none()
                && ["", "~", "null", "Null", "NULL"].contains(&s.value.as_str()) =>
        {
            Some("\0null")
        }
        other => other.as_str(),
    }
}

fn tag_text(tag: &Tag) -> String {
    match (tag.handle.as_str(), tag.suffix.as_str()) {
        ("tag:yaml.org,2002:", suffix) => format!("!!{}", escape_tag(suffix, false)),
        ("!", suffix) => format!("!{}", escape_tag(suffix, false)),
        ("", "!") => "!".to_owned(),
        (handle, suffix) => format!(
            "!<{}{}>",
            escape_tag(handle, true),
            escape_tag(suffix, true)
        ),
    }
}

/// A tag as YAML writes it: the parser hands tags over with their `%XX` escapes decoded, so
/// what a tag may not hold as it is (`ns-tag-char`, or `ns-uri-char` in the `!<...>` form) is
/// escaped again; else the written document would not parse (found by fuzzing).
fn escape_tag(text: &str, verbatim: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        let allowed = ch.is_ascii_alphanumeric()
            || "-#;/?:@&=+$_.~*'()".contains(ch)
            || (verbatim && ",[]!".contains(ch));
        if allowed {
            out.push(ch);
        } else {
            let mut buf = [0u8; 4];
            for b in ch.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// Whether a new string may be written plain: only simple words and paths that no YAML 1.1 or 1.2
/// resolver reads as a number, boolean or null.
fn plain_is_safe(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok = match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '/' || c == '_' => true,
        // `--flag` and `-x` are plain in YAML; `-1` and `- x` are not strings or not plain.
        Some('-') => s[1..].starts_with(|c: char| c == '-' || c.is_ascii_alphabetic()),
        _ => false,
    };
    let keyword = ["y", "n", "yes", "no", "on", "off", "true", "false", "null"]
        .contains(&s.to_ascii_lowercase().as_str());
    first_ok
        && !keyword
        && !s.ends_with(':')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=@+-".contains(c))
        && !s.contains(": ")
}

/// Writes documents separated by `---`, in block style with Kubernetes' indentation (sequence
/// items at the indentation of their key).
pub fn to_string(documents: &[Node]) -> String {
    let mut out = String::new();
    for (i, doc) in documents.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        emit_document(doc, &mut out);
    }
    out
}

fn emit_document(node: &Node, out: &mut String) {
    match node {
        Node::Map { entries, tag } if !entries.is_empty() => {
            if let Some(tag) = tag {
                let _ = writeln!(out, "{tag}");
            }
            emit_entries(entries, 0, false, out);
        }
        Node::Seq { items, tag } if !items.is_empty() => {
            if let Some(tag) = tag {
                let _ = writeln!(out, "{tag}");
            }
            emit_items(items, 0, false, out);
        }
        other => {
            emit_inline(other, 0, out);
            out.push('\n');
        }
    }
}

fn indent(n: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// Mapping entries at column `col`; with `first_inline` the first entry continues the current line
/// (after `- `).
fn emit_entries(entries: &[(Node, Node)], col: usize, first_inline: bool, out: &mut String) {
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 || !first_inline {
            indent(col, out);
        }
        match key {
            Node::Scalar(s) => {
                let text = key_text(s);
                // YAML limits an implicit key to 1024 characters; a longer one is written as an
                // explicit key (`? key` then `: value`) (found by fuzzing).
                if text.chars().count() > 1000 {
                    out.push_str("? ");
                    out.push_str(&text);
                    out.push('\n');
                    indent(col, out);
                } else {
                    out.push_str(&text);
                }
            }
            // The parser accepts scalar keys only.
            other => emit_inline(other, col, out),
        }
        out.push(':');
        match value {
            Node::Map { entries, tag } if !entries.is_empty() => {
                if let Some(tag) = tag {
                    let _ = write!(out, " {tag}");
                }
                out.push('\n');
                emit_entries(entries, col + 2, false, out);
            }
            Node::Seq { items, tag } if !items.is_empty() => {
                if let Some(tag) = tag {
                    let _ = write!(out, " {tag}");
                }
                out.push('\n');
                emit_items(items, col, false, out);
            }
            other => {
                if !is_bare_null(other) {
                    out.push(' ');
                    emit_inline(other, col, out);
                }
                out.push('\n');
            }
        }
    }
}

/// Sequence items at column `col`.
fn emit_items(items: &[Node], col: usize, first_inline: bool, out: &mut String) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 || !first_inline {
            indent(col, out);
        }
        out.push('-');
        match item {
            Node::Map { entries, tag: None } if !entries.is_empty() => {
                out.push(' ');
                emit_entries(entries, col + 2, true, out);
            }
            Node::Seq { items, tag: None } if !items.is_empty() => {
                out.push(' ');
                emit_items(items, col + 2, true, out);
            }
            Node::Map {
                entries,
                tag: Some(tag),
            } if !entries.is_empty() => {
                let _ = writeln!(out, " {tag}");
                emit_entries(entries, col + 2, false, out);
            }
            Node::Seq {
                items,
                tag: Some(tag),
            } if !items.is_empty() => {
                let _ = writeln!(out, " {tag}");
                emit_items(items, col + 2, false, out);
            }
            other => {
                if !is_bare_null(other) {
                    out.push(' ');
                    emit_inline(other, col, out);
                }
                out.push('\n');
            }
        }
    }
}

fn is_bare_null(node: &Node) -> bool {
    matches!(node, Node::Scalar(s) if s.style == Style::Plain && s.tag.is_none() && s.value.is_empty())
}

/// A scalar or an empty collection, on the current line (a block scalar continues on the next
/// lines, indented from `col`).
fn emit_inline(node: &Node, col: usize, out: &mut String) {
    match node {
        Node::Scalar(s) => out.push_str(&scalar_text(s, col)),
        Node::Map { tag, .. } => push_tagged(tag, "{}", out),
        Node::Seq { tag, .. } => push_tagged(tag, "[]", out),
    }
}

fn push_tagged(tag: &Option<String>, text: &str, out: &mut String) {
    if let Some(tag) = tag {
        out.push_str(tag);
        out.push(' ');
    }
    out.push_str(text);
}

/// A mapping key: always on one line (a block scalar or multi-line key is written double-quoted;
/// an empty plain key, which is null, as `~`).
fn key_text(s: &Scalar) -> String {
    match s.style {
        Style::Plain if s.value.is_empty() && s.tag.is_none() => "~".to_owned(),
        // A tag alone: the ':' that follows must not read as part of it (found by fuzzing).
        Style::Plain if s.value.is_empty() => format!("{} ", scalar_text(s, 0)),
        Style::Literal | Style::Folded => {
            let quoted = Scalar {
                style: Style::DoubleQuoted,
                ..s.clone()
            };
            scalar_text(&quoted, 0)
        }
        _ => scalar_text(s, 0),
    }
}

fn scalar_text(s: &Scalar, col: usize) -> String {
    let body = match s.style {
        // The source text of a single-line plain scalar IS its value: written back verbatim it is
        // resolved exactly as before, whatever the reader's YAML version.
        Style::Plain if printable_line(&s.value) && plain_in_block(&s.value) => s.value.clone(),
        Style::SingleQuoted if printable_line(&s.value) => {
            format!("'{}'", s.value.replace('\'', "''"))
        }
        Style::Literal | Style::Folded => {
            literal_block(&s.value, col + 2).unwrap_or_else(|| double_quoted(&s.value))
        }
        _ => double_quoted(&s.value),
    };
    match &s.tag {
        Some(tag) if s.value.is_empty() && s.style == Style::Plain => tag.clone(),
        Some(tag) => format!("{tag} {body}"),
        None => body,
    }
}

/// Whether a plain scalar's text reads the same written plain in block context (it may come from
/// flow context, or from a parser more lenient than the writer's readers): no leading indicator,
/// no `: ` or ` #` inside, no surrounding blanks (found by fuzzing: `[?]` was written `- ?`).
fn plain_in_block(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return true;
    };
    let second = chars.next();
    let indicator = match first {
        '-' | '?' | ':' => second.is_none_or(char::is_whitespace),
        c => ",[]{}#&*!|>'\"%@`".contains(c),
    };
    // A line of its own that starts with `---` or `...` is a document marker.
    let marker = ["---", "..."].iter().any(|m| {
        s.strip_prefix(m)
            .is_some_and(|rest| rest.chars().next().is_none_or(char::is_whitespace))
    });
    !indicator
        && !marker
        && !s.contains('\n')
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.ends_with(':')
        && s.trim() == s
}

fn printable_line(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_control() || is_yaml_break(c) || c == '\u{feff}')
}

fn is_yaml_break(c: char) -> bool {
    matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// `|`, `|-` or `|+` followed by the content indented to `content_col`; None when the value cannot
/// be written that way without changing it (leading spaces or blank first line would need an
/// indentation indicator, carriage returns and control characters would be normalised).
fn literal_block(value: &str, content_col: usize) -> Option<String> {
    let core = value.trim_end_matches('\n');
    let trailing = value.len() - core.len();
    if core.is_empty()
        || core.starts_with(' ')
        || core.starts_with('\n')
        || value.chars().any(|c| {
            (c.is_control() && c != '\n' && c != '\t') || is_yaml_break(c) || c == '\u{feff}'
        })
    {
        return None;
    }
    let chomp = match trailing {
        0 => "-",
        1 => "",
        _ => "+",
    };
    let mut out = format!("|{chomp}");
    for line in core.split('\n') {
        out.push('\n');
        if !line.is_empty() {
            indent(content_col, &mut out);
            out.push_str(line);
        }
    }
    for _ in 1..trailing {
        out.push('\n');
    }
    Some(out)
}

fn double_quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            '\u{85}' => out.push_str("\\N"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            c if c.is_control() || c == '\u{feff}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
