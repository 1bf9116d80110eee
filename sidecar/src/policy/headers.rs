//! Request headers the proxy adds: `x-request-id` (kept when present, else generated), W3C
//! `traceparent` (propagated when valid, else a new trace is started), and, on requests coming in
//! from other hosts, `x-forwarded-for` / `forwarded` / `x-forwarded-proto`.
//!
//! Identifiers come from `fastrand` (a per-thread wyrand generator): unpredictability is not
//! needed for correlation ids, speed is.
use std::net::IpAddr;

use http::header::FORWARDED;
use http::{HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_BY: HeaderName = HeaderName::from_static("x-forwarded-by");
/// On retried attempts only: which attempt this is (2, 3, ...), so the upstream can tell.
pub static X_SIDECAR_ATTEMPT: HeaderName = HeaderName::from_static("x-sidecar-attempt");
static FORWARDED_BY_VALUE: HeaderValue = HeaderValue::from_static("sidecar");
static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");

/// `value` as 32 lowercase hex digits, most significant first: eight nibbles at a time spread
/// into bytes and mapped to ASCII with a few word operations (the ids are made per request).
fn hex32(value: u128) -> [u8; 32] {
    // 0xABCD_EF12 -> 0x0A0B_0C0D_0E0F_0102: each nibble in a byte of its own, in order.
    fn spread(x: u32) -> u64 {
        let x = u64::from(x);
        let x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
        let x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
        (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F
    }
    // Bytes of 0..=15 to '0'..='9', 'a'..='f' (no byte carries into the next).
    fn ascii(n: u64) -> [u8; 8] {
        let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (n + 0x3030_3030_3030_3030 + letters * (u64::from(b'a') - u64::from(b'9') - 1))
            .to_be_bytes()
    }
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&ascii(spread((value >> (96 - 32 * i)) as u32)));
    }
    out
}

/// Writes `value`'s low `out.len()` nibbles (at most 32) as lowercase hex, most significant
/// first.
fn hex_into(out: &mut [u8], value: u128) {
    let digits = hex32(value);
    out.copy_from_slice(&digits[32 - out.len()..]);
}

/// A random UUID (version 4, RFC 9562) as `x-request-id` value, built on the stack.
fn request_id_bytes(random: u128) -> [u8; 36] {
    // Version 4 in bits 76..80, variant 0b10 in bits 62..64.
    let id = (random & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let digits = hex32(id);
    let mut buf = [b'-'; 36];
    buf[0..8].copy_from_slice(&digits[0..8]);
    buf[9..13].copy_from_slice(&digits[8..12]);
    buf[14..18].copy_from_slice(&digits[12..16]);
    buf[19..23].copy_from_slice(&digits[16..20]);
    buf[24..36].copy_from_slice(&digits[20..32]);
    buf
}

fn new_request_id(random: u128) -> HeaderValue {
    // Only hex digits and dashes: always a valid header value.
    HeaderValue::from_bytes(&request_id_bytes(random))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// A new `x-request-id` value (for engines that write header lines themselves).
pub fn fresh_request_id() -> HeaderValue {
    new_request_id(fastrand::u128(..))
}

/// [`fresh_request_id`]'s bytes, without a heap copy.
pub fn fresh_request_id_bytes() -> [u8; 36] {
    request_id_bytes(fastrand::u128(..))
}

/// A new `traceparent` value's bytes: a trace rooted here (see [`ensure_traceparent`]).
pub fn fresh_traceparent_bytes() -> [u8; 55] {
    let trace = loop {
        let t = fastrand::u128(..);
        if t != 0 {
            break t;
        }
    };
    let parent = fastrand::u64(1..);
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&mut buf[3..35], trace);
    hex_into(&mut buf[36..52], u128::from(parent));
    buf
}

/// A new `traceparent` value: a trace rooted here (see [`ensure_traceparent`]).
pub fn fresh_traceparent() -> HeaderValue {
    HeaderValue::from_bytes(&fresh_traceparent_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Keeps the request's `x-request-id` or adds a new one; returns the value in force (for the
/// proxy's own error answers, so a failed request can be found in both sides' logs).
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID) {
        if !id.is_empty() {
            return id.clone();
        }
    }
    let id = new_request_id(fastrand::u128(..));
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// True for a `traceparent` this proxy can propagate (W3C Trace Context level 1, section 3.2):
/// `version-traceid-parentid-flags`, lowercase hex, version not `ff`, ids not all zeros; a future
/// version may append fields after the flags.
pub fn is_valid_traceparent(value: &[u8]) -> bool {
    fn hex(s: &[u8]) -> bool {
        s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    if value.len() < 55 {
        return false;
    }
    let (version, trace, parent, flags) =
        (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
    let dashes = value[2] == b'-' && value[35] == b'-' && value[52] == b'-';
    let shape = dashes && hex(version) && hex(trace) && hex(parent) && hex(flags);
    let rest_ok = match version {
        b"00" => value.len() == 55,
        _ => value.len() == 55 || value[55] == b'-',
    };
    shape
        && version != b"ff"
        && rest_ok
        && trace.iter().any(|b| *b != b'0')
        && parent.iter().any(|b| *b != b'0')
}

/// Propagates a valid `traceparent` untouched; otherwise starts a trace: a new trace id and
/// parent id, flags `01` (sampled: the proxy is the trace's root and lets the services record
/// it). An invalid or orphaned `tracestate` is dropped with it, as the specification asks.
pub fn ensure_traceparent(headers: &mut HeaderMap) {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let valid = match (all.next(), all.next()) {
        (Some(only), None) => is_valid_traceparent(only.as_bytes()),
        _ => false,
    };
    if valid {
        return;
    }
    headers.remove(&TRACESTATE);
    headers.insert(TRACEPARENT.clone(), fresh_traceparent());
}

/// The request headers every forwarded request gets: `x-forwarded-by`, an `x-request-id` and a
/// `traceparent` if missing, and for requests from other hosts the forwarding headers. Returns
/// the request id (the local answer to a failed request carries it too).
pub fn apply(headers: &mut HeaderMap, forwarded_for: Option<&ForwardedClient>) -> HeaderValue {
    headers.insert(X_FORWARDED_BY.clone(), FORWARDED_BY_VALUE.clone());
    let id = ensure_request_id(headers);
    ensure_traceparent(headers);
    if let Some(client) = forwarded_for {
        add_forwarded_client(headers, client);
    }
    id
}

/// A client's address as the forwarding headers write it, formatted once per connection (the
/// request path then only copies reference-counted values).
#[derive(Clone, Debug)]
pub struct ForwardedClient {
    /// The address alone: the `x-forwarded-for` element.
    addr: HeaderValue,
    /// `for=...;proto=http`: the `forwarded` element.
    element: HeaderValue,
    /// `By=<own SPIFFE ID>;URI=<client's>`: the `x-forwarded-client-cert` of a client that
    /// proved its identity over mesh TLS. Any other client's is removed (it could be forged).
    client_cert: Option<HeaderValue>,
}

/// Envoy's header naming the client's certificate identity to the app.
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

impl ForwardedClient {
    pub fn new(client: IpAddr) -> Self {
        let client = client.to_canonical();
        let element = match client {
            IpAddr::V4(ip) => format!("for={ip};proto=http"),
            // RFC 7239 6: IPv6 addresses are bracketed and quoted.
            IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto=http"),
        };
        // An address and these fixed characters are always valid header values.
        let value = |s: String| {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(s))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        };
        ForwardedClient {
            addr: value(client.to_string()),
            element: value(element),
            client_cert: None,
        }
    }

    /// The `x-forwarded-for` element.
    pub fn addr(&self) -> &HeaderValue {
        &self.addr
    }

    /// The `forwarded` element.
    pub fn element(&self) -> &HeaderValue {
        &self.element
    }

    /// The `x-forwarded-client-cert` value of a client proven over mesh TLS.
    pub fn client_cert(&self) -> Option<&HeaderValue> {
        self.client_cert.as_ref()
    }

    /// The client proved `uri` over mesh TLS to this proxy, `by`. (SPIFFE IDs hold only
    /// URI-safe ASCII, so the value is always valid.)
    pub fn with_client_cert(mut self, by: Option<&str>, uri: &str) -> Self {
        let value = match by {
            Some(by) => format!("By={by};URI={uri}"),
            None => format!("URI={uri}"),
        };
        self.client_cert = HeaderValue::try_from(value).ok();
        self
    }
}

/// Records the client of a request coming from another host: appends its address to
/// `x-forwarded-for` (as Go's and nginx's reverse proxies do) and to `forwarded` (RFC 7239), and
/// sets `x-forwarded-proto: http` unless present.
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr) {
    add_forwarded_client(headers, &ForwardedClient::new(client));
}

/// [`add_forwarded`] with the client's values already formatted.
pub fn add_forwarded_client(headers: &mut HeaderMap, client: &ForwardedClient) {
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    if let Some(cert) = &client.client_cert {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), cert.clone());
    }
    let mut earlier = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            let s = s.trim();
            if !s.is_empty() {
                earlier.push_str(s);
                earlier.push_str(", ");
            }
        }
    }
    let xff = if earlier.is_empty() {
        Some(client.addr.clone())
    } else {
        earlier.push_str(client.addr.to_str().unwrap_or("unknown"));
        HeaderValue::try_from(earlier).ok()
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.append(FORWARDED, client.element.clone());
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), PROTO_HTTP.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_are_most_significant_first() {
        let v = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210_u128;
        let mut out = [0u8; 32];
        hex_into(&mut out, v);
        assert_eq!(&out, b"0123456789abcdeffedcba9876543210");
        let mut out = [0u8; 5];
        hex_into(&mut out, v);
        assert_eq!(&out, b"43210");
        let mut out = [0u8; 12];
        hex_into(&mut out, v >> 64);
        assert_eq!(&out, b"456789abcdef");
    }

    #[test]
    fn hex_digits_agree_with_the_formatter() {
        let mut rng = fastrand::Rng::with_seed(19);
        let edges = [0, u128::MAX, 0xa, 0x9 << 124, 0xf0f0 << 64];
        for v in edges
            .into_iter()
            .chain(std::iter::repeat_with(|| rng.u128(..)).take(10_000))
        {
            assert_eq!(hex32(v), format!("{v:032x}").as_bytes(), "{v:#x}");
        }
    }

    #[test]
    fn request_ids_are_uuid_v4_and_kept_when_present() {
        let id = new_request_id(u128::MAX);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let id = new_request_id(0);
        assert_eq!(id, "00000000-0000-4000-8000-000000000000");

        let mut h = HeaderMap::new();
        let generated = ensure_request_id(&mut h);
        assert_eq!(generated.len(), 36);
        assert_eq!(h[&X_REQUEST_ID], generated);
        let again = ensure_request_id(&mut h);
        assert_eq!(again, generated, "kept");

        let mut h = HeaderMap::new();
        h.insert(
            X_REQUEST_ID.clone(),
            HeaderValue::from_static("client-chosen"),
        );
        assert_eq!(ensure_request_id(&mut h), "client-chosen");
        assert_ne!(
            ensure_request_id(&mut HeaderMap::new()),
            ensure_request_id(&mut HeaderMap::new())
        );
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_validation() {
        assert!(is_valid_traceparent(VALID.as_bytes()));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(bad.as_bytes()), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(is_valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
    }

    #[test]
    fn valid_traceparent_is_propagated_untouched() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static(VALID));
        h.insert(&TRACESTATE, HeaderValue::from_static("vendor=1"));
        ensure_traceparent(&mut h);
        assert_eq!(h[&TRACEPARENT], VALID);
        assert_eq!(h[&TRACESTATE], "vendor=1");
    }

    #[test]
    fn missing_or_invalid_traceparent_starts_a_trace() {
        let mut h = HeaderMap::new();
        ensure_traceparent(&mut h);
        let started = h[&TRACEPARENT].to_str().unwrap().to_owned();
        assert!(is_valid_traceparent(started.as_bytes()), "{started}");
        assert!(started.starts_with("00-") && started.ends_with("-01"));

        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(&TRACESTATE, HeaderValue::from_static("vendor=1"));
        ensure_traceparent(&mut h);
        assert!(is_valid_traceparent(h[&TRACEPARENT].as_bytes()));
        assert!(
            !h.contains_key(&TRACESTATE),
            "tracestate of a broken trace is dropped"
        );
    }

    #[test]
    fn forwarded_headers_are_appended() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "10.0.0.9".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        assert_eq!(h[FORWARDED], "for=10.0.0.9;proto=http");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");

        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        add_forwarded(&mut h, "fd00::9".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, fd00::9");
        assert_eq!(h[FORWARDED], "for=\"[fd00::9]\";proto=http");
        assert_eq!(h[&X_FORWARDED_PROTO], "https", "kept");

        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::ffff:10.0.0.9".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9", "v4-mapped shown as IPv4");
    }
}
