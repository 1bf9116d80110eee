//! The native HTTP/1 engine's request head reader against hyper's (issue 19's "never more
//! lenient", as a fuzz target). hyper reads a head with httparse, then builds the method, the URI
//! and each header with the `http` crate, and frames the body by `Transfer-Encoding` /
//! `Content-Length`. For every input the engine accepts:
//!
//! - httparse accepts it too, with the same head length, method, target and lines;
//! - the `http` crate accepts the method, the target and every header name and value;
//! - the framing is one hyper would give it, never a second reading: a length only from exactly
//!   one `Content-Length` of digits and no `Transfer-Encoding`; chunked only from exactly one
//!   `Transfer-Encoding: chunked` and no `Content-Length`, and never on HTTP/1.0;
//! - what it forwards (the lines minus the hop-by-hop ones) re-parses as a head httparse reads
//!   the same way;
//! - and reading a prefix never gives a different answer: incomplete until the head ends.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::proxy::h1_fuzzing::{request, Read};

fn oracle(data: &[u8], ours: &Read) {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("engine accepted what httparse does not: {other:?}"),
    };
    assert_eq!(n, ours.len);
    assert_eq!(req.method, Some(ours.method.as_str()));
    assert_eq!(req.path.map(str::as_bytes), Some(&ours.target[..]));
    http::Method::from_bytes(ours.method.as_bytes()).expect("a method hyper accepts");
    http::Uri::try_from(&ours.target[..]).expect("a target hyper accepts");
    assert_eq!(req.headers.len(), ours.lines.len());
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    for (h, (name, value)) in req.headers.iter().zip(&ours.lines) {
        assert_eq!(h.name.as_bytes(), &name[..]);
        assert_eq!(h.value, &value[..]);
        http::HeaderName::from_bytes(name).expect("a name hyper accepts");
        http::HeaderValue::from_bytes(value).expect("a value hyper accepts");
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value.clone());
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings.push(value.clone());
        }
    }
    match ours.length {
        Some(Some(n)) => {
            assert!(
                codings.is_empty() && lengths.len() == 1,
                "{lengths:?} {codings:?}"
            );
            assert_eq!(
                std::str::from_utf8(&lengths[0])
                    .unwrap()
                    .trim()
                    .parse::<u64>()
                    .ok(),
                Some(n)
            );
        }
        Some(None) => {
            assert!(lengths.is_empty() && codings.len() == 1 && ours.version == 1);
            assert!(codings[0].trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        None => {
            assert!(codings.is_empty(), "{codings:?}");
            assert!(lengths.len() <= 1);
        }
    }
    // What goes upstream re-parses the same way (the engine appends its own lines after these).
    let mut again = Vec::new();
    again.extend_from_slice(ours.method.as_bytes());
    again.push(b' ');
    again.extend_from_slice(&ours.target);
    again.extend_from_slice(b" HTTP/1.1\r\n");
    for line in &ours.forwarded {
        again.extend_from_slice(line);
        again.extend_from_slice(b"\r\n");
    }
    again.extend_from_slice(b"\r\n");
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    assert_eq!(
        req.parse(&again),
        Ok(httparse::Status::Complete(again.len()))
    );
    assert_eq!(req.headers.len(), ours.forwarded.len());
}

fuzz_target!(|data: &[u8]| {
    let full = request(data);
    if let Ok(Some(read)) = &full {
        oracle(data, read);
    }
    // Split reads: a prefix is incomplete, or (once the head is in it) read the same.
    for n in (0..data.len()).step_by(1 + data.len() / 64) {
        match (request(&data[..n]), &full) {
            (Ok(None), _) => {}
            (Ok(Some(p)), Ok(Some(f))) => assert_eq!(&p, f, "prefix {n}"),
            (Err(_), Err(_)) => {}
            (p, f) => panic!("prefix {n}: {p:?}, whole: {f:?}"),
        }
    }
});
