//! The native HTTP/1 engine's response head reader against httparse and hyper's framing rules:
//! a head it accepts is one httparse reads the same way; its framing is never a second reading
//! (a length only from exactly one `Content-Length`, chunked only from exactly one
//! `Transfer-Encoding: chunked` on HTTP/1.1, neither with the other); a HEAD's, 1xx, 204 and
//! 304 answers have no body; a close-delimited body never lets the connection be reused; and a
//! prefix is incomplete or read the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::proxy::h1_fuzzing::response;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let head = flags & 1 == 1;
    let full = response(data, head);
    if let Ok(Some(ours)) = &full {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(data) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("engine accepted what httparse does not: {other:?}"),
        };
        assert_eq!(n, ours.len);
        assert_eq!(resp.code, Some(ours.status));
        let count = |name: &[u8]| {
            resp.headers
                .iter()
                .filter(|h| h.name.as_bytes().eq_ignore_ascii_case(name))
                .count()
        };
        let (lengths, codings) = (count(b"content-length"), count(b"transfer-encoding"));
        assert!(!(lengths > 0 && codings > 0), "CL and TE accepted");
        assert!(lengths <= 1 && codings <= 1);
        let bodiless = head || ours.status < 200 || ours.status == 204 || ours.status == 304;
        if bodiless {
            assert_eq!(ours.length, None);
            assert!(!ours.until_close);
        }
        match ours.length {
            Some(Some(_)) => assert_eq!(lengths, 1),
            Some(None) => assert!(codings == 1 && ours.version == 1),
            None => {}
        }
        if ours.until_close {
            assert!(
                !ours.keep_alive,
                "a close-delimited body on a reusable connection"
            );
        }
    }
    for n in (0..data.len()).step_by(1 + data.len() / 64) {
        match (response(&data[..n], head), &full) {
            (Ok(None), _) => {}
            (Ok(Some(p)), Ok(Some(f))) => assert_eq!(&p, f, "prefix {n}"),
            (Err(_), Err(_)) => {}
            (p, f) => panic!("prefix {n}: {p:?}, whole: {f:?}"),
        }
    }
});
