//! Durations, sizes and address lists as operators write them: never panic; a duration that
//! parses prints back to text that parses to the same duration.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::units::{fmt_duration, parse_addrs, parse_duration, parse_size};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(text) {
        let shown = fmt_duration(d);
        assert_eq!(parse_duration(&shown), Ok(d), "{text:?} -> {shown:?}");
    }
    let _ = parse_size(text);
    let _ = parse_addrs(text);
});
