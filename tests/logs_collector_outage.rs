//! When the collector fails (503, then resets, then down altogether) `sidecar logs` keeps
//! retrying, stops reading the file instead of buffering it, and once the collector is back
//! delivers everything exactly once. 429 + Retry-After is honoured; a batch refused with a 4xx is
//! dropped (logged, counted) and does not block the lines after it.
#[path = "logs_support.rs"]
mod support;

use std::time::Duration;

use sidecar_tests::eventually;
use support::{
    summary, wait_for_all, wait_for_seq, Collector, Forwarder, Mode, Scratch, Writer, WAIT,
};

#[test]
fn collector_outage_loses_nothing_and_memory_stays_bounded() {
    let scratch = Scratch::new();
    let mut collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let mut fwd = Forwarder::start(
        &scratch,
        &collector,
        &["--batch-lines", "500", "--batch-bytes", "64KiB"],
    );

    let warmup = app.write(200);
    wait_for_all(&collector, warmup, "before the outage");

    // 503s: the same batch is retried.
    collector.set_mode(Mode::Fail(503, None));
    app.write(300);
    assert!(
        eventually(WAIT, || collector.count_answers(503) >= 3),
        "the forwarder should retry after 503"
    );

    // Resets: the collector accepts and hangs up. Meanwhile the app writes 8 MiB (a forwarder
    // that buffered would read it all within a few poll intervals).
    collector.set_mode(Mode::Reset);
    let resets_before = collector.resets();
    assert!(eventually(WAIT, || collector.resets() > resets_before));
    let (rchar_before, rss_before) = (fwd.rchar(), fwd.rss_kib());
    let written_before = std::fs::metadata(scratch.log())
        .map(|m| m.len())
        .unwrap_or(0);
    while std::fs::metadata(scratch.log())
        .map(|m| m.len())
        .unwrap_or(0)
        - written_before
        < 8 << 20
    {
        app.write(10_000);
    }
    let written = std::fs::metadata(scratch.log())
        .map(|m| m.len())
        .unwrap_or(0)
        - written_before;
    // Ten more failed attempts (about a second of backoff, some fifty poll intervals): ample
    // time for a forwarder that buffers to read all of it.
    let resets_mid = collector.resets();
    assert!(
        eventually(WAIT, || collector.resets() >= resets_mid + 10),
        "the forwarder should keep retrying"
    );
    let read = fwd.rchar() - rchar_before;
    let grown_kib = fwd.rss_kib().saturating_sub(rss_before);
    // One batch in flight + one being filled (64 KiB each) + read-ahead of a 64 KiB chunk per
    // file: a few hundred KiB whatever the backlog; 1 MiB leaves room for the loader and libc.
    assert!(
        read < 1 << 20,
        "the forwarder read {read} bytes of the {written} written while the collector was failing: it must stop reading"
    );
    assert!(
        grown_kib < 4 * 1024,
        "RSS grew by {grown_kib} KiB during the outage"
    );

    // Down: connection refused.
    collector.stop();
    let tail = app.write(200);
    assert!(
        eventually(WAIT, || fwd
            .stderr_text()
            .to_lowercase()
            .contains("connection refused")),
        "the forwarder should have met a refused connection"
    );
    fwd.assert_running();

    collector.set_mode(Mode::Accept);
    collector.restart();
    wait_for_all(&collector, 0..tail.end, "after the collector came back");
    let t = collector.tally();
    assert_eq!(t.duplicates(), 0, "duplicated {}", summary(&t.duplicated()));
    assert_eq!(collector.record_count() as u64, tail.end);

    let status = fwd.terminate(WAIT);
    assert!(status.success(), "exit status {status}");
}

#[test]
fn retry_after_is_honoured_and_a_refused_batch_does_not_block_the_rest() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let mut fwd = Forwarder::start(&scratch, &collector, &[]);

    // 429 with Retry-After: 1 s. The retry must not come sooner (backoff alone would be
    // at most 200 ms here).
    collector.set_mode(Mode::Fail(429, Some(1)));
    app.write(10);
    assert!(eventually(WAIT, || collector.count_answers(429) >= 1));
    collector.set_mode(Mode::Accept);
    wait_for_all(&collector, 0..10, "after the 429");
    let answers = collector.answers();
    let limited = answers.iter().find(|(s, _)| *s == 429).map(|(_, t)| *t);
    let accepted = answers.iter().find(|(s, _)| *s == 200).map(|(_, t)| *t);
    if let (Some(limited), Some(accepted)) = (limited, accepted) {
        assert!(
            accepted.duration_since(limited) >= Duration::from_millis(950),
            "retried {:?} after a Retry-After: 1",
            accepted.duration_since(limited)
        );
    }

    // 400: dropped, logged, and the next lines still go through.
    collector.set_mode(Mode::Fail(400, None));
    let refused = app.write(10);
    assert!(eventually(WAIT, || collector.count_answers(400) >= 1));
    collector.set_mode(Mode::Accept);
    let after = app.write(10);
    wait_for_all(&collector, after.clone(), "after the refused batch");
    assert!(
        fwd.stderr_text().contains("DROPPING"),
        "a dropped batch is logged loudly:\n{}",
        fwd.stderr_text()
    );
    let t = collector.tally();
    // Batches go out in order: had the refused one been retried, it would be here by now.
    assert!(
        refused.clone().all(|n| !t.has(n)),
        "the refused lines are dropped, not retried"
    );
    wait_for_seq(&collector, after.end - 1, "last");

    let status = fwd.terminate(WAIT);
    assert!(status.success(), "exit status {status}");
}
