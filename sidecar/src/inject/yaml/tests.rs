//! Unit tests of [`super`] (`inject/yaml.rs`).
use super::*;

fn roundtrip(text: &str) -> String {
    to_string(&parse_documents(text).unwrap())
}

#[test]
fn scalars_keep_their_meaning_for_yaml_1_1_readers() {
    let text = "\
a: 0644
b: '0644'
c: \"yes\"
d: yes
e: 12:30
f: 0x1F
g: ~
h: 1e3
i: 'it''s'
j: \"tab\\there\"
k:
l: !!str 10
";
    assert_eq!(roundtrip(text), text);
}

#[test]
fn block_style_and_kubernetes_indentation() {
    let text = "\
spec:
  containers:
  - name: app
    args:
    - --port
    - \"80\"
    env: []
  - - nested
    - seq
  empty: {}
";
    assert_eq!(roundtrip(text), text);
}

#[test]
fn odd_keys_stay_on_one_line() {
    assert_eq!(roundtrip(": null key\n"), "~: null key\n");
    assert_eq!(roundtrip("? |\n  block\n: v\n"), "\"block\\n\": v\n");
    assert_eq!(
        roundtrip("'quoted key': v\n\"a\\tb\": w\n"),
        "'quoted key': v\n\"a\\tb\": w\n"
    );
}

#[test]
fn flow_style_becomes_block_style() {
    assert_eq!(
        roundtrip("a: {b: [1, 'x'], c: {}}\n"),
        "a:\n  b:\n  - 1\n  - 'x'\n  c: {}\n"
    );
}

#[test]
fn block_scalars() {
    let text = "\
a: |
  line 1
    indented
  last
b: |-
  no newline
c: |+
  keep

d:
- |
  in a list
";
    assert_eq!(roundtrip(text), text);
    // Folded scalars are written as literal ones with the same content.
    assert_eq!(roundtrip("a: >\n  one\n  two\n"), "a: |\n  one two\n");
    // Content a literal block cannot carry goes double-quoted.
    assert_eq!(roundtrip("a: |2\n    leading\n"), "a: \"  leading\\n\"\n");
    assert_eq!(roundtrip("a: \"x\\r\\ny\"\n"), "a: \"x\\r\\ny\"\n");
}

#[test]
fn block_scalar_at_the_end_of_input_without_a_line_break() {
    let docs = parse_documents("a:\n  b: |\n    one\n    two").unwrap();
    assert_eq!(
        docs[0].path(&["a", "b"]).and_then(Node::as_str),
        Some("one\ntwo")
    );
    let docs = parse_documents("a: |\n  one\n").unwrap();
    assert_eq!(docs[0].get("a").and_then(Node::as_str), Some("one\n"));
}

#[test]
fn multiline_quoted_strings_stay_strings() {
    assert_eq!(roundtrip("a: 'one\n\n  two'\n"), "a: \"one\\ntwo\"\n");
}

#[test]
fn documents_and_aliases() {
    let text = "---\na: &x\n  k: v\nb: *x\n---\n---\nnull\n---\n- 1\n";
    assert_eq!(roundtrip(text), "a:\n  k: v\nb:\n  k: v\n---\n- 1\n");
}

#[test]
fn errors_name_the_line() {
    let e = parse_documents("a: b\nc: [d\n").unwrap_err();
    assert!(e.line >= 2, "{e}");
    let e = parse_documents("a: 1\nb: 2\na: 3\n").unwrap_err();
    assert_eq!(e.line, 3);
    assert!(e.problem.contains("duplicate key \"a\""), "{e}");
    let e = parse_documents("? [a]\n: b\n").unwrap_err();
    assert!(e.problem.contains("keys must be scalars"), "{e}");
}

#[test]
fn billion_laughs_is_refused() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let prev = i - 1;
        let _ = writeln!(
                text,
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]"
            );
    }
    let e = parse_documents(&text).unwrap_err();
    assert!(e.problem.contains("too many nodes"), "{e}");
}

#[test]
fn new_strings_are_quoted_when_needed() {
    let text = |s: &str| {
        scalar_text(
            match &Node::str(s) {
                Node::Scalar(s) => s,
                _ => unreachable!(),
            },
            0,
        )
    };
    assert_eq!(text("sidecar-proxy"), "sidecar-proxy");
    assert_eq!(text("--cgroup"), "--cgroup");
    assert_eq!(text("/sys/fs/bpf"), "/sys/fs/bpf");
    assert_eq!(text("sidecar:0.1.0"), "sidecar:0.1.0");
    assert_eq!(text("15090"), "\"15090\"");
    assert_eq!(text("100m"), "\"100m\"");
    assert_eq!(text("true"), "\"true\"");
    assert_eq!(text("on"), "\"on\"");
    assert_eq!(text("-1"), "\"-1\"");
    assert_eq!(text("a b"), "\"a b\"");
    assert_eq!(text(""), "\"\"");
    assert_eq!(text("10.0.0.0/8"), "\"10.0.0.0/8\"");
}

/// Found by fuzzing (fuzz/corpus/inject_yaml): a tag with a `%00` escape was written back
/// decoded, a NUL byte, which is not YAML.
#[test]
fn escaped_tags_stay_escaped() {
    let first = crate::inject::inject("!!%00", "sidecar:test").unwrap();
    assert!(first.output.contains("!!%00"), "{}", first.output);
    let again = crate::inject::inject(&first.output, "sidecar:test").unwrap();
    assert_eq!(again.output, first.output);
}

/// Found by fuzzing: a tagged empty key was written as `!!000:`, which reads as the tag `000:`;
/// a control character in a plain scalar was written as it was, which YAML does not allow.
#[test]
fn tagged_empty_keys_and_control_characters_round_trip() {
    let first = crate::inject::inject("!!0003 \u{13}:\r!!000 :\r\r\r\r", "sidecar:test").unwrap();
    let again = crate::inject::inject(&first.output, "sidecar:test")
        .unwrap_or_else(|e| panic!("{e:?}\n{}", first.output));
    assert_eq!(again.output, first.output);
}

/// Found by fuzzing: a key longer than YAML's 1024-character limit for implicit keys was written
/// as one; it is written as an explicit key (`? key` / `: value`).
#[test]
fn long_keys_are_written_as_explicit_keys() {
    let key = "k".repeat(1500);
    let text = format!("a:\n  ? {key}\n  : v\n  b: c\n");
    let first = crate::inject::inject(&text, "sidecar:test").unwrap();
    assert!(
        first.output.contains(&format!("? {key}\n")),
        "{}",
        first.output
    );
    let again = crate::inject::inject(&first.output, "sidecar:test")
        .unwrap_or_else(|e| panic!("{e:?}\n{}", first.output));
    assert_eq!(again.output, first.output);
}

/// Found by fuzzing: a plain scalar from flow context (`[?]`) was written plain in block context,
/// where `?` starts an explicit key.
#[test]
fn plain_scalars_that_would_read_otherwise_are_quoted() {
    for text in ["[\t?]", "# c\n   ---\nVea", "{a: [x, \"- y\"]}"] {
        let first = crate::inject::inject(text, "sidecar:test").unwrap();
        let again = crate::inject::inject(&first.output, "sidecar:test")
            .unwrap_or_else(|e| panic!("{text:?}: {e:?}\n{}", first.output));
        assert_eq!(again.output, first.output, "{text:?}");
    }
}

/// Found by fuzzing: an empty key and `~` in one mapping are the same (null) key: refused as a
/// duplicate, not written back as two `~:`.
#[test]
fn null_keys_in_every_spelling_are_one_key() {
    let refused = crate::inject::inject(":\n\t\r~:\n\t", "sidecar:test").unwrap_err();
    assert!(
        refused.iter().any(|e| e.contains("duplicate key")),
        "{refused:?}"
    );
    assert!(crate::inject::inject("a: 1\n\"~\": 2\n~: 3\n", "sidecar:test").is_ok());
}

/// Found by fuzzing: a tag %-escaping a multi-byte character came back in a form the parser
/// itself refused; such tags are refused up front.
#[test]
fn tags_beyond_ascii_are_refused() {
    let refused = crate::inject::inject("!!%d0%A0", "sidecar:test").unwrap_err();
    assert!(
        refused.iter().any(|e| e.contains("beyond ASCII")),
        "{refused:?}"
    );
}
