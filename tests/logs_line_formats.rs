//! What `sidecar logs` makes of each kind of line: JSON objects as they are, everything else
//! (plain text, malformed JSON, arrays, invalid UTF-8) as `{"message", "level": "INFO"}`, a huge
//! line truncated with a marker, a partial last line held until its newline. Also the batch
//! envelope, and bad configuration (exit 64, every bad key named).
#[path = "logs_support.rs"]
mod support;

use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sidecar_tests::env::sidecar_bin;
use sidecar_tests::eventually;
use support::{Collector, Forwarder, Scratch, Writer, WAIT};

fn message_of(r: &Value) -> &str {
    r["message"].as_str().unwrap_or_default()
}

#[test]
fn each_kind_of_line_becomes_the_documented_record() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let mut fwd = Forwarder::start(&scratch, &collector, &[]);

    let huge = format!("seq=4 {}", "x".repeat(1 << 20));
    let mut text = Vec::new();
    text.extend_from_slice(b"{\"seq\":0,\"z\":1,\"a\":{\"nested\":[1,2]},\"level\":\"WARN\"}\n");
    text.extend_from_slice(b"plain text seq=1\n");
    text.extend_from_slice(b"{\"seq\": 2, \"broken\n");
    text.extend_from_slice(b"[\"seq=3\", \"an array\"]\n");
    text.extend_from_slice(huge.as_bytes());
    text.push(b'\n');
    text.extend_from_slice(b"\n   \n");
    text.extend_from_slice(b"windows line seq=5\r\n");
    text.extend_from_slice(b"bad utf-8 \xff seq=6\n");
    app.raw(&text);

    assert!(
        eventually(WAIT, || collector.record_count() >= 7),
        "expected 7 records, got {:?}",
        collector.records()
    );
    let records = collector.records();
    assert_eq!(records.len(), 7, "blank lines make no record: {records:#?}");

    // A JSON object arrives as it was written, nothing added (byte for byte: next test).
    assert_eq!(
        records[0],
        json!({"seq": 0, "z": 1, "a": {"nested": [1, 2]}, "level": "WARN"})
    );
    assert_eq!(
        records[1],
        json!({"message": "plain text seq=1", "level": "INFO"})
    );
    assert_eq!(
        records[2],
        json!({"message": "{\"seq\": 2, \"broken", "level": "INFO"}),
        "malformed JSON arrives as a plain message"
    );
    assert_eq!(
        records[3],
        json!({"message": "[\"seq=3\", \"an array\"]", "level": "INFO"})
    );

    let big = &records[4];
    assert_eq!(big["truncated"], true, "{}", &big.to_string()[..200]);
    assert_eq!(big["original_length"], huge.len());
    assert_eq!(big["level"], "INFO");
    assert_eq!(
        message_of(big).len(),
        64 * 1024,
        "cut at the default 64 KiB"
    );
    assert!(huge.starts_with(message_of(big)));

    assert_eq!(
        records[5],
        json!({"message": "windows line seq=5", "level": "INFO"})
    );
    assert_eq!(message_of(&records[6]), "bad utf-8 \u{fffd} seq=6");

    // The envelope.
    let body = &collector.bodies()[0];
    assert_eq!(body["service"], "test");
    let ts = body["timestamp"].as_str().unwrap_or_default();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "RFC 3339 UTC: {ts}"
    );

    // A partial last line waits for its newline: it is read together with the complete line
    // before it, but only that one is sent.
    app.raw(b"complete seq=7\npartial ");
    assert!(eventually(WAIT, || collector.has(7)));
    assert!(
        !collector
            .records()
            .iter()
            .any(|r| message_of(r).starts_with("partial")),
        "a partial line was sent: {:?}",
        collector.records()
    );
    app.raw(b"line seq=8\n");
    assert!(eventually(WAIT, || collector.has(8)));
    let last = collector.records().pop().unwrap_or_default();
    assert_eq!(
        message_of(&last),
        "partial line seq=8",
        "sent whole, once finished"
    );

    let status = fwd.terminate(WAIT);
    assert!(status.success(), "exit status {status}");
}

#[test]
fn json_lines_are_forwarded_byte_for_byte() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let mut fwd = Forwarder::start(&scratch, &collector, &[]);
    // Odd spacing, key order, a number no f64 holds, a trailing zero, an escape: re-serialising
    // would change each of them.
    let line = r#"{"seq":0, "zeta" : 1,"big":12345678901234567890123,"f":1.50,"s":"\u00e9\n","alpha":[ ]}"#;
    app.raw(format!("  {line}  \n").as_bytes());
    assert!(eventually(WAIT, || collector.record_count() >= 1));
    let raw = collector.raw_bodies().concat();
    assert!(
        raw.contains(&format!("\"logs\":[{line}]")),
        "the object was not embedded verbatim (surrounding blanks aside):\n{raw}"
    );
    let status = fwd.terminate(WAIT);
    assert!(status.success(), "exit status {status}");
}

#[test]
fn bad_configuration_exits_64_naming_every_bad_key() {
    let out = Command::new(sidecar_bin())
        .args([
            "logs",
            "--file",
            "/tmp/does-not-matter.log",
            "--endpoint",
            "https://collector.example/logs",
            "--batch-lines",
            "0",
            "--poll-interval",
            "soon",
            "--checkpoint",
            "/nonexistent-sidecar-dir/ckpt",
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("spawn: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr:\n{stderr}");
    for key in [
        "--endpoint",
        "--service",
        "--batch-lines",
        "--poll-interval",
        "--checkpoint",
    ] {
        assert!(stderr.contains(key), "{key} not named:\n{stderr}");
    }
    assert!(stderr.contains("https is not supported"), "{stderr}");
}
