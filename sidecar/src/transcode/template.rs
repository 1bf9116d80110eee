//! `google.api.http` path templates: parsing and matching a request path.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `**` (alone, or inside a variable) matches any number of segments and must come last. A
//! variable without `=` is `{x=*}`: one segment. Values are percent-decoded; a multi-segment
//! value keeps `%2F` encoded (as the specification's reserved expansion says), so that the
//! segments it spans stay visible.

/// One piece of a template, after variables are flattened into the segments they cover.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// `*`: one segment.
    One,
    /// `**`: the rest of the path (zero or more segments).
    Rest,
}

/// A variable: which field it binds, over which pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Var {
    field: Vec<String>,
    start: usize,
    end: usize,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
    vars: Vec<Var>,
    verb: Option<String>,
}

/// A matched variable: the field path and its decoded value.
pub type Binding = (Vec<String>, String);

impl Template {
    /// Parses `text`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Template, String> {
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| format!("path template {text:?} must start with '/'"))?;
        // The verb is the `:LITERAL` after the last segment (a `:` inside `{...}` is not one).
        let (body, verb) = split_verb(rest);
        if let Some(v) = &verb {
            if v.is_empty() || !v.chars().all(is_literal_char) {
                return Err(format!("path template {text:?}: bad verb {v:?}"));
            }
        }
        let mut t = Template {
            pieces: Vec::new(),
            vars: Vec::new(),
            verb,
        };
        let mut chars = body;
        loop {
            if let Some(after) = chars.strip_prefix('{') {
                let close = after
                    .find('}')
                    .ok_or_else(|| format!("path template {text:?}: unclosed '{{'"))?;
                let inner = &after[..close];
                let (field, segs) = match inner.split_once('=') {
                    Some((f, s)) => (f, s),
                    None => (inner, "*"),
                };
                let field =
                    field_path(field).map_err(|e| format!("path template {text:?}: {e}"))?;
                if t.vars.iter().any(|v| v.field == field) {
                    return Err(format!(
                        "path template {text:?}: variable {} appears twice",
                        field.join(".")
                    ));
                }
                let start = t.pieces.len();
                for seg in segs.split('/') {
                    if seg.contains(['{', '}']) {
                        return Err(format!("path template {text:?}: nested variable"));
                    }
                    t.pieces
                        .push(piece(seg).map_err(|e| format!("path template {text:?}: {e}"))?);
                }
                t.vars.push(Var {
                    field,
                    start,
                    end: t.pieces.len(),
                });
                chars = &after[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let seg = &chars[..end];
                if seg.contains(['{', '}']) {
                    return Err(format!(
                        "path template {text:?}: a variable must be a whole segment"
                    ));
                }
                t.pieces
                    .push(piece(seg).map_err(|e| format!("path template {text:?}: {e}"))?);
                chars = &chars[end..];
            }
            match chars.strip_prefix('/') {
                Some(next) => chars = next,
                None if chars.is_empty() => break,
                None => {
                    return Err(format!(
                        "path template {text:?}: a variable must be a whole segment"
                    ))
                }
            }
        }
        if let Some(i) = t.pieces.iter().position(|p| *p == Piece::Rest) {
            if i + 1 != t.pieces.len() {
                return Err(format!(
                    "path template {text:?}: '**' must be the last segment"
                ));
            }
        }
        Ok(t)
    }

    /// Literal segments: a route with more of them is more specific.
    pub fn literals(&self) -> usize {
        self.pieces
            .iter()
            .filter(|p| matches!(p, Piece::Literal(_)))
            .count()
    }

    pub fn has_verb(&self) -> bool {
        self.verb.is_some()
    }

    /// Whether `ends_with_rest`: it matches any number of trailing segments.
    pub fn is_open(&self) -> bool {
        self.pieces.last() == Some(&Piece::Rest)
    }

    /// The variables' field paths.
    pub fn fields(&self) -> impl Iterator<Item = &[String]> {
        self.vars.iter().map(|v| v.field.as_slice())
    }

    /// Matches a request path (no query), returning the variables' values; `None` if it does
    /// not match, `Some(Err)` if it matches but a value is not valid percent-encoding.
    pub fn matches(&self, path: &str) -> Option<Result<Vec<Binding>, String>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => rest.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let segs: Vec<&str> = rest.split('/').collect();
        // Where each piece's segments start (`**` takes what is left).
        let mut spans = Vec::with_capacity(self.pieces.len());
        let mut at = 0;
        for piece in &self.pieces {
            match piece {
                Piece::Rest => {
                    // Zero segments: `/a/**` matches `/a` too (segs would be ["a"]).
                    spans.push((at, segs.len()));
                    at = segs.len();
                }
                Piece::One => {
                    let seg = segs.get(at)?;
                    if seg.is_empty() {
                        return None;
                    }
                    spans.push((at, at + 1));
                    at += 1;
                }
                Piece::Literal(lit) => {
                    if segs.get(at)? != lit {
                        return None;
                    }
                    spans.push((at, at + 1));
                    at += 1;
                }
            }
        }
        if at != segs.len() {
            return None;
        }
        let mut out = Vec::with_capacity(self.vars.len());
        for var in &self.vars {
            let from = spans.get(var.start).map_or(segs.len(), |s| s.0);
            let to = if var.end > var.start {
                spans[var.end - 1].1
            } else {
                from
            };
            let multi =
                self.pieces[var.start..var.end].contains(&Piece::Rest) || var.end - var.start > 1;
            let raw = segs[from..to].join("/");
            match percent_decode(&raw, multi) {
                Ok(v) => out.push((var.field.clone(), v)),
                Err(e) => return Some(Err(format!("{}: {e}", var.field.join(".")))),
            }
        }
        Some(Ok(out))
    }
}

fn split_verb(rest: &str) -> (&str, Option<String>) {
    let last = rest.rfind('/').map_or(0, |i| i + 1);
    let tail = &rest[last..];
    // `{name=*}` style tails: the verb follows the closing brace.
    let from = tail.rfind('}').map_or(0, |i| i + 1);
    match tail[from..].rfind(':') {
        Some(i) => {
            let at = last + from + i;
            (&rest[..at], Some(rest[at + 1..].to_owned()))
        }
        None => (rest, None),
    }
}

fn piece(seg: &str) -> Result<Piece, String> {
    match seg {
        "*" => Ok(Piece::One),
        "**" => Ok(Piece::Rest),
        "" => Err("empty segment".to_owned()),
        lit if lit.chars().all(is_literal_char) => Ok(Piece::Literal(lit.to_owned())),
        lit => Err(format!("bad literal segment {lit:?}")),
    }
}

/// RFC 3986 unreserved characters, sub-delims, `@`, `:` and `%` (a literal may be
/// percent-encoded).
fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=@%".contains(c)
}

fn field_path(text: &str) -> Result<Vec<String>, String> {
    let parts: Vec<String> = text.split('.').map(str::to_owned).collect();
    let ident = |p: &String| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    };
    if parts.iter().all(ident) {
        Ok(parts)
    } else {
        Err(format!("bad field path {text:?}"))
    }
}

/// Decodes `%XX` escapes; `keep_slash` leaves `%2F` as is. Fails on a bad escape or on bytes
/// that are not UTF-8 (a `string` field could not hold them).
pub fn percent_decode(text: &str, keep_slash: bool) -> Result<String, String> {
    if !text.contains('%') {
        return Ok(text.to_owned());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {text:?}"))?;
            if keep_slash && hex == b'/' {
                out.extend_from_slice(&bytes[i..i + 3]);
            } else {
                out.push(hex);
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = Template::parse(t).unwrap();
        t.matches(path).map(|r| {
            r.unwrap()
                .into_iter()
                .map(|(f, v)| (f.join("."), v))
                .collect()
        })
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            p.iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn variables_bind_one_segment() {
        assert_eq!(
            bind("/v1/orders/{id}", "/v1/orders/42"),
            pairs(&[("id", "42")])
        );
        assert_eq!(bind("/v1/orders/{id}", "/v1/orders/42/x"), None);
        assert_eq!(bind("/v1/orders/{id}", "/v1/orders/"), None);
        assert_eq!(bind("/v1/orders/{id}", "/v1/orders"), None);
        assert_eq!(
            bind("/v1/shops/{shop}/orders/{o.id}", "/v1/shops/a%20b/orders/7"),
            pairs(&[("shop", "a b"), ("o.id", "7")])
        );
    }

    #[test]
    fn rest_and_multi_segment_variables() {
        assert_eq!(
            bind("/v1/files/{path=**}", "/v1/files/a/b/c%2Fd"),
            pairs(&[("path", "a/b/c%2Fd")])
        );
        assert_eq!(
            bind("/v1/files/{path=**}", "/v1/files"),
            pairs(&[("path", "")])
        );
        assert_eq!(
            bind("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2"),
            pairs(&[("name", "shelves/1/books/2")])
        );
        assert_eq!(
            bind("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/x/2"),
            None
        );
        assert_eq!(bind("/v1/*/x", "/v1/anything/x"), pairs(&[]));
    }

    #[test]
    fn verbs() {
        assert_eq!(
            bind("/v1/orders/{id}:ship", "/v1/orders/42:ship"),
            pairs(&[("id", "42")])
        );
        assert_eq!(bind("/v1/orders/{id}:ship", "/v1/orders/42"), None);
        assert_eq!(bind("/v1/orders/{id}:ship", "/v1/orders/42:cancel"), None);
        assert_eq!(
            bind("/v1/{name=x/*}:get", "/v1/x/1:get"),
            pairs(&[("name", "x/1")])
        );
        assert_eq!(
            bind("/v1/files/{path=**}:read", "/v1/files/a/b:read"),
            pairs(&[("path", "a/b")])
        );
    }

    #[test]
    fn bad_templates_are_named() {
        for bad in [
            "v1/x",
            "/v1/{id",
            "/v1/{a.}",
            "/v1/**/x",
            "/v1/x{id}",
            "/v1//x",
            "/v1/{id}/{id}",
            "/v1/x:",
            "/v1/{a={b}}",
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains("path template"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_escapes_are_errors_not_panics() {
        let t = Template::parse("/v1/{id}").unwrap();
        assert!(t.matches("/v1/%zz").unwrap().is_err());
        assert!(t.matches("/v1/%ff").unwrap().is_err());
        assert!(t.matches("/v1/%4").unwrap().is_err());
    }
}
