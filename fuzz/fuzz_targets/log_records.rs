//! The log forwarder's records: every line, whole or cut, becomes exactly one JSON object (what
//! the collector parses), whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    sidecar::logs::encode_line(data, &mut out);
    let _: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out)
        .unwrap_or_else(|e| {
            panic!(
                "not a JSON object ({e}): {:?}",
                String::from_utf8_lossy(&out)
            )
        });
    let mut cut = Vec::new();
    let half = &data[..data.len() / 2];
    sidecar::logs::encode_truncated(half, data.len() as u64, &mut cut);
    let _: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&cut)
        .unwrap_or_else(|e| {
            panic!(
                "cut record not JSON ({e}): {:?}",
                String::from_utf8_lossy(&cut)
            )
        });
});
