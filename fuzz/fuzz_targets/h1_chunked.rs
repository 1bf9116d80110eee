//! The native HTTP/1 engine's chunked decoder: the same data, end and refusal wherever the
//! input is split across reads (the split points come from the input); never more data than
//! input; where the body ends is where a well-formed body ends (re-encoding the data the
//! engine's way and decoding it again gives the data back, ending exactly). (Bare CR and LF in
//! the framing are refused by the decoder's unit tests, input by input.)
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::proxy::h1_fuzzing::{chunked, encode};

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, body)) = data.split_first() else {
        return;
    };
    let whole = chunked(&[body]);
    // Up to eight split points, spread by the first byte.
    let mut pieces = Vec::new();
    let mut at = 0;
    for i in 0..8u32 {
        if cuts >> i & 1 == 0 || at >= body.len() {
            continue;
        }
        let next =
            (at + 1 + (cuts as usize * (i as usize + 3)) % (body.len() - at)).min(body.len());
        pieces.push(&body[at..next]);
        at = next;
    }
    pieces.push(&body[at..]);
    // The decoder uses every byte it is given until the body ends, and both reads see the
    // same bytes in the same order: the same data, end and refusal, however they are split.
    assert_eq!(chunked(&pieces), whole);
    if let Ok((data, end)) = &whole {
        assert!(data.len() <= body.len());
        if let Some(end) = end {
            assert!(*end <= body.len());
            let again = encode(data);
            assert_eq!(chunked(&[&again]), Ok((data.clone(), Some(again.len()))));
        }
    }
});
