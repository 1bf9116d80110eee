//! `sidecar logs` delivers every line exactly once while the app's log is rotated several times,
//! both ways logrotate does it: rename + create (the app writing on to the old file until it
//! reopens) and copytruncate. Each rotation comes right after a burst, so the forwarder is still
//! behind in the old file when it happens.
#[path = "logs_support.rs"]
mod support;

use support::{summary, wait_for_all, wait_for_seq, Collector, Forwarder, Scratch, Writer};

const ROUNDS: u64 = 5;
const BURST: u64 = 400;

/// Every number in `0..total` exactly once, nothing else.
fn assert_exactly_once(collector: &Collector, total: u64) {
    let t = collector.tally();
    assert!(
        t.missing(0..total).is_empty(),
        "missing {}",
        summary(&t.missing(0..total))
    );
    assert_eq!(t.duplicates(), 0, "duplicated {}", summary(&t.duplicated()));
    assert!(
        t.strays(0..total).is_empty(),
        "unexpected numbers {}",
        summary(&t.strays(0..total))
    );
    assert_eq!(collector.record_count() as u64, total);
}

#[test]
fn rename_and_create_rotations_deliver_every_line_exactly_once() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let mut fwd = Forwarder::start(&scratch, &collector, &[]);
    // The forwarder must have opened the file before it is first rotated (a file rotated away
    // before the forwarder ever saw it cannot be found: the documented limit).
    let first = app.write(1).start;
    wait_for_seq(&collector, first, "start-up");

    for round in 0..ROUNDS {
        app.write(BURST);
        // logrotate renames the file (over the previous app.log.1, as `rotate 1` does)...
        app.rename_to("app.log.1");
        // ...the app logs a little more to its old descriptor before it gets the signal...
        app.write(5);
        // ...then reopens: a new file at the path.
        app.reopen();
        let first_new = app.write(1).start;
        // Rotations further apart than the poll interval (the documented limit): the next one
        // waits until the forwarder has read from the new file.
        wait_for_seq(&collector, first_new, &format!("round {round}"));
        fwd.assert_running();
    }
    let total = app.write(50).end;
    wait_for_all(&collector, 0..total, "after the last rotation");
    assert_exactly_once(&collector, total);

    let status = fwd.terminate(support::WAIT);
    assert!(status.success(), "exit status {status}");
    assert_exactly_once(&collector, total);
}

#[test]
fn copytruncate_rotations_deliver_every_line_exactly_once() {
    let scratch = Scratch::new();
    let collector = Collector::start();
    let mut app = Writer::create(&scratch.log());
    let mut fwd = Forwarder::start(&scratch, &collector, &[]);
    // The forwarder must have opened the file before it is first rotated (a file rotated away
    // before the forwarder ever saw it cannot be found: the documented limit).
    let first = app.write(1).start;
    wait_for_seq(&collector, first, "start-up");

    for round in 0..ROUNDS {
        app.write(BURST);
        // The tail of the burst is usually not read yet: it must come from the copy.
        app.copytruncate("app.log.1");
        let first_after = app.write(1).start;
        wait_for_seq(&collector, first_after, &format!("round {round}"));
        fwd.assert_running();
    }
    let total = app.write(50).end;
    wait_for_all(&collector, 0..total, "after the last truncation");
    assert_exactly_once(&collector, total);

    let status = fwd.terminate(support::WAIT);
    assert!(status.success(), "exit status {status}");
}
