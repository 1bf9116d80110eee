//! SPIFFE IDs (what peers are identified by, from their certificates' URI SAN): parsing never
//! panics, an accepted ID prints back as itself, its trust domain and path put it back together,
//! and the namespace (Istio form) is a segment of the path.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = SpiffeId::parse(text) else {
        return;
    };
    assert_eq!(id.as_str(), text);
    assert_eq!(id.to_string(), text);
    assert_eq!(
        format!("spiffe://{}{}", id.trust_domain(), id.path()),
        text
    );
    assert!(!id.trust_domain().is_empty());
    assert!(id.path().starts_with('/') && id.path().len() > 1);
    assert!(id
        .trust_domain()
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)));
    if let Some(ns) = id.namespace() {
        assert!(id.path().starts_with(&format!("/ns/{ns}")));
        assert!(!ns.is_empty() && !ns.contains('/'));
    }
    assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
});
