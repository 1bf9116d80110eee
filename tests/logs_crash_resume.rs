//! The checkpoint makes `sidecar logs` at-least-once across crashes: a kill -9 in the middle of
//! the stream, with the log rotated while it is down, then a restart, leaves no gap and resends
//! at most the unacknowledged batch. A graceful stop (SIGTERM) sends what it has read, exits 0,
//! and a restart sends nothing twice.
#[path = "logs_support.rs"]
mod support;

use sidecar_tests::eventually;
use support::{summary, wait_for_all, Collector, Forwarder, Scratch, Writer, WAIT};

const BATCH_LINES: u64 = 100;

#[test]
fn kill9_mid_stream_then_restart_leaves_no_gaps() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let batch = BATCH_LINES.to_string();
    let args = ["--batch-lines", batch.as_str()];
    let mut fwd = Forwarder::start(&scratch, &collector, &args);

    app.write(5000);
    // Mid-stream: some batches acknowledged, most of the file still to go.
    assert!(
        eventually(WAIT, || collector.record_count() >= 1000),
        "no progress before the kill"
    );
    fwd.kill9();
    let at_kill = collector.record_count();
    assert!(at_kill < 5000, "the kill came too late to be mid-stream");

    // While it is down the app goes on, and the log is rotated once.
    app.write(500);
    app.rename_to("app.log.1");
    app.reopen();
    let total = app.write(500).end;

    let mut fwd = Forwarder::start(&scratch, &collector, &args);
    wait_for_all(&collector, 0..total, "after the restart");
    let t = collector.tally();
    assert!(
        t.strays(0..total).is_empty(),
        "garbage {}",
        summary(&t.strays(0..total))
    );
    // At-least-once: what was acknowledged but not yet checkpointed comes again; no more than
    // the batch in flight at the kill.
    assert!(
        t.duplicates() as u64 <= BATCH_LINES,
        "{} duplicates, more than one batch: {}",
        t.duplicates(),
        summary(&t.duplicated())
    );
    assert!(
        fwd.stderr_text()
            .contains("finishing a file rotated while the forwarder was stopped"),
        "the rest of the pre-crash file should have come from app.log.1:\n{}",
        fwd.stderr_text()
    );
    fwd.assert_running();
    let status = fwd.terminate(WAIT);
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigterm_flushes_what_was_read_and_a_restart_sends_nothing_twice() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    // A batch is sent only when it has 10 records: without the flush, the last 5 would wait.
    let mut fwd = Forwarder::start(
        &scratch,
        &collector,
        &["--batch-lines", "10", "--batch-wait", "1h"],
    );
    app.write(15);
    wait_for_all(&collector, 0..10, "the full batch");
    let status = fwd.terminate(WAIT);
    assert!(status.success(), "exit status {status}");
    let t = collector.tally();
    assert!(
        t.has_all(0..15),
        "lines written before SIGTERM were not flushed: missing {}",
        summary(&t.missing(0..15))
    );

    let checkpoint = scratch.log_dir().join(".app.log.sidecar-checkpoint");
    assert!(
        checkpoint.is_file(),
        "no checkpoint at {}",
        checkpoint.display()
    );

    let mut fwd = Forwarder::start(&scratch, &collector, &[]);
    let total = app.write(5).end;
    wait_for_all(&collector, 0..total, "after the restart");
    let t = collector.tally();
    assert_eq!(t.duplicates(), 0, "resent {}", summary(&t.duplicated()));
    let status = fwd.terminate(WAIT);
    assert!(status.success(), "exit status {status}");
}
