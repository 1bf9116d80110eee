//! `sidecar inject` on arbitrary YAML: never panics; what it writes, injected again, is the same
//! text (injection is idempotent, and it keeps every scalar's source text).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(first) = sidecar::inject::inject(text, "sidecar:fuzz") else {
        return;
    };
    let again = sidecar::inject::inject(&first.output, "sidecar:fuzz")
        .unwrap_or_else(|e| panic!("its own output refused: {e:?}\n{}", first.output));
    assert_eq!(again.output, first.output, "not idempotent");
    assert_eq!(again.injected, 0, "injected again: {:?}", again.notes);
});
