//! Protocol detection on the first bytes of a connection: never panics, and a decision does not
//! depend on how the bytes were split across reads. Once `classify` answers for a prefix, every
//! longer prefix gets the same answer, with one deliberate exception: a bare word that is no
//! standard method's start is answered `Opaque` at once (a client of another protocol is not
//! kept waiting), while the same word followed by a request line is HTTP. Opaque is the safe
//! side of that (bytes are relayed untouched). Prefixes go up to `MAX_DETECT_LEN`, all the proxy
//! ever peeks. The first input byte chooses the direction.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::proxy::{classify, Detection, MAX_DETECT_LEN};

/// `tchar` of RFC 9110, as detection reads a method token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn bare_word(prefix: &[u8]) -> bool {
    let line = {
        let mut l = prefix;
        while let Some(rest) = l.strip_prefix(b"\r\n").or_else(|| l.strip_prefix(b"\n")) {
            l = rest;
        }
        l
    };
    !line.is_empty() && line.iter().all(|b| is_tchar(*b))
}

fuzz_target!(|data: &[u8]| {
    let Some((&dir, bytes)) = data.split_first() else {
        return;
    };
    let inbound = dir & 1 == 1;
    // The proxy never peeks more than this: detection's contract ends there.
    let bytes = &bytes[..bytes.len().min(MAX_DETECT_LEN)];
    let mut decided: Option<(usize, Detection)> = None;
    for n in 0..=bytes.len() {
        let now = classify(&bytes[..n], inbound);
        match decided {
            Some((at, first)) => assert_eq!(
                now,
                first,
                "{:?} decided {first:?} at {at} bytes, {now:?} at {n}",
                String::from_utf8_lossy(bytes)
            ),
            None if now == Detection::Opaque && bare_word(&bytes[..n]) => {}
            None if now != Detection::NeedMore => decided = Some((n, now)),
            None => {}
        }
    }
});
