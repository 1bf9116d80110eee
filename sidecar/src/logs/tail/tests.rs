//! Unit tests of [`super`] (`logs/tail.rs`).
use super::*;
use crate::logs::tests::{TempDir, METRICS_LOCK};
use std::io::Write;

pub(crate) fn cfg(path: &Path) -> TailConfig {
    TailConfig {
        path: path.to_path_buf(),
        max_line_bytes: 64,
        rotate_wait: Duration::ZERO,
        read_from: ReadFrom::Beginning,
    }
}

fn limits(lines: usize) -> BatchLimits {
    BatchLimits {
        lines,
        bytes: 1 << 20,
        wait: Duration::from_secs(1),
    }
}

fn append(path: &Path, text: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Steps until idle; returns the messages (or `seq` fields) read, in order.
fn drain(t: &mut Tailer) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let mut b = Batch::new(limits(1000), "s");
        let step = t.step(&mut b, Instant::now());
        if !b.is_empty() {
            let sealed = b.seal("s", SystemTime::now(), false, Vec::new());
            let v: serde_json::Value = serde_json::from_slice(&sealed.body).unwrap_or_default();
            for r in v["logs"].as_array().cloned().unwrap_or_default() {
                out.push(match &r["message"] {
                    serde_json::Value::String(s) => s.clone(),
                    _ => r.to_string(),
                });
            }
        }
        if step == Step::Idle {
            return out;
        }
    }
}

fn lines(range: std::ops::Range<u32>) -> Vec<u8> {
    range
        .map(|i| format!("line {i}\n"))
        .collect::<String>()
        .into_bytes()
}

fn expect(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("line {i}")).collect()
}

#[test]
fn partial_lines_wait_for_their_newline() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-partial");
    let path = dir.path().join("app.log");
    append(&path, b"one\ntw");
    let mut t = Tailer::new(cfg(&path), None);
    assert_eq!(drain(&mut t), ["one"]);
    assert_eq!(
        t.positions()[0].offset,
        4,
        "the checkpoint stops before the partial line"
    );
    append(&path, b"o\n");
    assert_eq!(drain(&mut t), ["two"]);
    assert_eq!(t.positions()[0].offset, 8);
}

#[test]
fn waits_for_a_file_that_does_not_exist_yet() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-missing");
    let path = dir.path().join("app.log");
    let mut t = Tailer::new(cfg(&path), None);
    assert!(drain(&mut t).is_empty());
    append(&path, &lines(0..3));
    assert_eq!(drain(&mut t), expect(0..3));
}

#[test]
fn long_lines_are_cut_and_memory_stays_bounded() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-long");
    let path = dir.path().join("app.log");
    let mut t = Tailer::new(cfg(&path), None);
    // Written in pieces so the line is seen unfinished first.
    append(&path, &[b'x'; 100]);
    assert!(drain(&mut t).is_empty());
    append(&path, &vec![b'y'; 300_000]);
    assert!(drain(&mut t).is_empty());
    assert!(
        t.files[0].buf.capacity() <= 2 * CHUNK + 64,
        "held {} bytes for a line being skipped",
        t.files[0].buf.capacity()
    );
    append(&path, b"\nafter\n");
    let mut b = Batch::new(limits(10), "s");
    t.step(&mut b, Instant::now());
    let sealed = b.seal("s", SystemTime::now(), false, Vec::new());
    let v: serde_json::Value = serde_json::from_slice(&sealed.body).unwrap_or_default();
    assert_eq!(v["logs"][0]["truncated"], true);
    assert_eq!(v["logs"][0]["original_length"], 300_100);
    assert_eq!(v["logs"][0]["message"], "x".repeat(64));
    assert_eq!(v["logs"][1]["message"], "after");
}

#[test]
fn rename_rotation_finishes_the_old_file_first() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-rename");
    let path = dir.path().join("app.log");
    append(&path, &lines(0..5));
    let mut t = Tailer::new(cfg(&path), None);
    assert_eq!(drain(&mut t), expect(0..5));
    // More lines land in the old file, then it is renamed and a new one created.
    append(&path, &lines(5..10));
    let rotated = dir.path().join("app.log.1");
    assert!(fs::rename(&path, &rotated).is_ok());
    append(&path, &lines(10..15));
    assert_eq!(drain(&mut t), expect(0..15)[5..].to_vec());
    assert_eq!(t.files.len(), 1, "the drained old file is let go");
}

#[test]
fn a_rotated_file_still_written_to_is_read_until_quiet() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-rotate-wait");
    let path = dir.path().join("app.log");
    let mut c = cfg(&path);
    c.rotate_wait = Duration::from_secs(3600);
    append(&path, &lines(0..2));
    let mut t = Tailer::new(c, None);
    assert_eq!(drain(&mut t), expect(0..2));
    let rotated = dir.path().join("app.log.1");
    assert!(fs::rename(&path, &rotated).is_ok());
    append(&path, &lines(2..4));
    // The app has not reopened yet: it still appends to the old file.
    append(&rotated, &lines(4..6));
    let got = drain(&mut t);
    let mut sorted = got.clone();
    sorted.sort();
    let mut want = expect(2..6);
    want.sort();
    assert_eq!(sorted, want, "{got:?}");
    assert_eq!(t.positions().len(), 2, "the rotated file is still tracked");
}

#[test]
fn copytruncate_reads_the_rest_from_the_copy() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-copytruncate");
    let path = dir.path().join("app.log");
    append(&path, &lines(0..5));
    let mut t = Tailer::new(cfg(&path), None);
    assert_eq!(drain(&mut t), expect(0..5));
    append(&path, &lines(5..10));
    // copytruncate: copy, then truncate in place, and the app goes on writing.
    assert!(fs::copy(&path, dir.path().join("app.log.1")).is_ok());
    assert!(fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(0))
        .is_ok());
    append(&path, &lines(10..12));
    assert_eq!(drain(&mut t), expect(5..12));
}

#[test]
fn copytruncate_rewritten_past_our_offset_is_seen_by_its_first_bytes() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-copytruncate-grown");
    let path = dir.path().join("app.log");
    append(&path, &lines(0..3));
    let mut t = Tailer::new(cfg(&path), None);
    assert_eq!(drain(&mut t), expect(0..3));
    assert!(fs::copy(&path, dir.path().join("app.log.1")).is_ok());
    assert!(fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(0))
        .is_ok());
    append(&path, &lines(100..110));
    assert_eq!(drain(&mut t), expect(100..110));
}

/// Writes lines 0..5, tails them, and returns the checkpoint a stopping forwarder would save.
fn checkpoint_after_first_five(path: &Path) -> Checkpoint {
    append(path, &lines(0..5));
    let mut t = Tailer::new(cfg(path), None);
    assert_eq!(drain(&mut t), expect(0..5));
    Checkpoint::new(path.to_path_buf(), t.positions())
}

#[test]
fn resumes_from_a_checkpoint_without_repeating_or_skipping() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-resume");
    let path = dir.path().join("app.log");
    let ckpt = checkpoint_after_first_five(&path);
    append(&path, &lines(5..8));
    let mut t = Tailer::new(cfg(&path), Some(ckpt));
    assert_eq!(drain(&mut t), expect(5..8));
}

#[test]
fn resumes_a_file_rotated_while_stopped() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-resume-rotated");
    let path = dir.path().join("app.log");
    let ckpt = checkpoint_after_first_five(&path);
    append(&path, &lines(5..8));
    assert!(fs::rename(&path, dir.path().join("app.log.1")).is_ok());
    append(&path, &lines(8..10));
    let mut t = Tailer::new(cfg(&path), Some(ckpt));
    assert_eq!(drain(&mut t), expect(5..10));
}

#[test]
fn resumes_a_file_copytruncated_while_stopped() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-resume-copy");
    let path = dir.path().join("app.log");
    let ckpt = checkpoint_after_first_five(&path);
    append(&path, &lines(5..8));
    assert!(fs::copy(&path, dir.path().join("app.log.1")).is_ok());
    assert!(fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(0))
        .is_ok());
    append(&path, &lines(8..20));
    let mut t = Tailer::new(cfg(&path), Some(ckpt));
    assert_eq!(drain(&mut t), expect(5..20));
}

#[test]
fn a_new_file_on_a_reused_inode_is_not_resumed_mid_way() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-inode-reuse");
    let path = dir.path().join("app.log");
    append(&path, &lines(0..5));
    let mut t = Tailer::new(cfg(&path), None);
    assert_eq!(drain(&mut t), expect(0..5));
    let mut ckpt = Checkpoint::new(path.clone(), t.positions());
    drop(t);
    // Same identity, other content: simulated by rewriting the file in place.
    assert!(fs::write(&path, lines(50..60)).is_ok());
    ckpt.files[0].ino = fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
    let mut t = Tailer::new(cfg(&path), Some(ckpt));
    assert_eq!(drain(&mut t), expect(50..60));
}

#[test]
fn read_from_end_skips_history_only_without_a_checkpoint() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-end");
    let path = dir.path().join("app.log");
    append(&path, &lines(0..5));
    let mut c = cfg(&path);
    c.read_from = ReadFrom::End;
    let mut t = Tailer::new(c, None);
    assert!(drain(&mut t).is_empty());
    append(&path, &lines(5..7));
    assert_eq!(drain(&mut t), expect(5..7));
}

#[test]
fn batches_split_exactly_at_line_boundaries() {
    let _turn = METRICS_LOCK.blocking_lock();
    let dir = TempDir::new("tail-split");
    let path = dir.path().join("app.log");
    append(&path, &lines(0..10));
    let mut t = Tailer::new(cfg(&path), None);
    let mut b = Batch::new(limits(4), "s");
    assert_eq!(t.step(&mut b, Instant::now()), Step::Full);
    assert_eq!(b.len(), 4);
    assert_eq!(
        t.positions()[0].offset,
        lines(0..4).len() as u64,
        "positions cover exactly the lines in the batch"
    );
    assert_eq!(drain(&mut t), expect(4..10));
}
