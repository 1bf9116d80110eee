//! The inbound side's look at a client's first TLS record (`client_hello`): never panics; the
//! answer for a prefix never contradicts the answer for more bytes (`NeedMore(n)` asks for more
//! than it has, and once the first record is complete nothing after it changes the answer);
//! and, against rustls' own ClientHello parser as the oracle, a hello that rustls accepts as
//! offering the mesh ALPN in its first record is never missed (a sidecar's connection is never
//! relayed to the app as if it were the app's own TLS).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::identity::MESH_ALPN;
use sidecar::proxy::{client_hello, Hello, MAX_HELLO_RECORD};

/// What rustls says: `Some(offers our ALPN)` when it parses a ClientHello from `data`.
fn rustls_offers_mesh(data: &[u8]) -> Option<bool> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut cursor = std::io::Cursor::new(data);
    acceptor.read_tls(&mut cursor).ok()?;
    let accepted = acceptor.accept().ok()??;
    let hello = accepted.client_hello();
    Some(hello.alpn().is_some_and(|mut list| list.any(|p| p == MESH_ALPN)))
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HELLO_RECORD + 64)];
    let full = client_hello(data, MESH_ALPN);
    // Prefix consistency.
    let mut decided: Option<Hello> = None;
    for n in 0..=data.len() {
        let now = client_hello(&data[..n], MESH_ALPN);
        match now {
            Hello::NeedMore(want) => {
                assert!(want > n, "NeedMore({want}) with {n} bytes");
                assert!(want <= MAX_HELLO_RECORD, "NeedMore({want}) beyond one record");
                assert!(decided.is_none(), "decided {decided:?}, then NeedMore at {n}");
            }
            answer => match decided {
                Some(first) => assert_eq!(first, answer, "changed at {n} bytes"),
                None => decided = Some(answer),
            },
        }
    }
    // The oracle: rustls parsing one record that holds the whole hello.
    if data.len() >= 5 && data[0] == 22 {
        let record_end = 5 + usize::from(u16::from_be_bytes([data[3], data[4]]));
        if record_end <= data.len() && rustls_offers_mesh(&data[..record_end]) == Some(true) {
            assert_eq!(full, Hello::Mesh, "rustls sees the mesh ALPN offered; we did not");
        }
    }
});
