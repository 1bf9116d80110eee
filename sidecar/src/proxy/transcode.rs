//! REST/JSON requests to an inbound gRPC port: the serving half of [`crate::transcode`].
//!
//! A request with `content-type: application/grpc*` is not ours: it goes to the app unchanged
//! (the same port serves native gRPC). Any other request is matched against the port's routes;
//! its body is read (bounded by `max_body_bytes` and the request timeout), turned into the
//! method's message, and sent to the app as a unary gRPC call over the connection's HTTP/2
//! upstream, under the destination's policies (breaker, timeout; retried only when the call
//! never reached the app, as every POST). The answer is read back before the status line is
//! written: a unary answer whole (so a gRPC error is its HTTP status, never a 200), a stream up
//! to its first message (so an immediate error is a non-200 too); then the rest of a stream is
//! written as JSON lines as the messages arrive ([`Streamed`]).
use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, TE};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use prometheus::IntCounterVec;
use tokio::time::Instant;
use tracing::debug;

use super::forward::{strip_hop_by_hop, ProxyBody};
use super::h2::H2Upstream;
use super::route::Route;
use super::shared::Shared;
use crate::error::ProxyError;
use crate::metrics::access::Transcoded;
use crate::policy::exchange::{self, exchange_buffered};
use crate::policy::headers;
use crate::policy::retry::Replay;
use crate::transcode::grpc::{code_name, frame, http_status};
use crate::transcode::stream::{line, Streamed};
use crate::transcode::{BadRequest, Deframer, StatusBody, Transcoder, Unmatched};

static APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
static APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
static APPLICATION_NDJSON: HeaderValue = HeaderValue::from_static("application/x-ndjson");
static TRAILERS: HeaderValue = HeaderValue::from_static("trailers");

/// What became of a request on a transcoded port.
pub(crate) enum Handled<B> {
    /// Not a REST call of this port (native gRPC, or unmatched with `unmatched = "pass"`):
    /// forward it as it is.
    Pass(Request<B>),
    Answer(Response<ProxyBody>),
}

/// Whether a request is native gRPC (`application/grpc`, `application/grpc+proto`, ...).
fn is_grpc<B>(req: &Request<B>) -> bool {
    is_grpc_type(req.headers().get(CONTENT_TYPE).map(HeaderValue::as_bytes))
}

fn is_grpc_type(content_type: Option<&[u8]>) -> bool {
    content_type.is_some_and(|ct| ct.starts_with(b"application/grpc"))
}

/// Whether [`handle`] passes a request through untouched: native gRPC, or a REST call that
/// matches no route while the port passes those. Decided from the head alone, so that an
/// engine can choose before it reads the body.
pub(crate) fn passes(
    transcoder: &Transcoder,
    method: &Method,
    path: &str,
    content_type: Option<&[u8]>,
) -> bool {
    is_grpc_type(content_type)
        || (transcoder.route_index(method, path).is_none()
            && transcoder.settings().unmatched == Unmatched::Pass)
}

/// Serves `req` if it is a REST call of `transcoder`'s routes (see the module documentation).
pub(crate) async fn handle<B>(
    shared: &Shared,
    transcoder: &Arc<Transcoder>,
    conn_route: &Route,
    upstream: &H2Upstream,
    req: Request<B>,
) -> Handled<B>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if is_grpc(&req) {
        return Handled::Pass(req);
    }
    let counter = &shared.telemetry.metrics.transcode;
    let Some((index, bindings)) = transcoder.route_index(req.method(), req.uri().path()) else {
        if transcoder.settings().unmatched == Unmatched::Pass {
            return Handled::Pass(req);
        }
        counter.with_label_values(&["none", "no_route"]).inc();
        let msg = format!("no route for {} {}", req.method(), req.uri().path());
        return Handled::Answer(refusal(ProxyError::TranscodeNoRoute, 5, msg));
    };
    let route = &transcoder.routes()[index];
    let grpc_path = Arc::clone(&route.grpc_path);
    let count = |code: &str| counter.with_label_values(&[&*grpc_path, code]).inc();
    let mut resp = match call(
        shared, transcoder, index, conn_route, upstream, bindings, req,
    )
    .await
    {
        Ok(resp) => resp,
        Err(refused) => {
            count(match refused.err {
                ProxyError::TranscodeTooLarge => "too_large",
                _ => "bad_request",
            });
            refusal(refused.err, 3, refused.message)
        }
    };
    if let Some(code) = resp.extensions_mut().remove::<Code>() {
        count(code_name(code.0));
    }
    resp.extensions_mut().insert(Transcoded(grpc_path));
    Handled::Answer(resp)
}

/// The answer to a REST call whose body is over the port's `max_body_bytes`, counted and
/// marked as [`handle`] does it, for an engine that reads the body itself (and stops reading at
/// the limit).
pub(crate) fn too_large(
    shared: &Shared,
    transcoder: &Transcoder,
    method: &Method,
    path: &str,
) -> Response<ProxyBody> {
    let message = over_limit(transcoder.settings().max_body_bytes);
    let mut resp = refusal(ProxyError::TranscodeTooLarge, 3, message);
    if let Some((index, _)) = transcoder.route_index(method, path) {
        let grpc_path = Arc::clone(&transcoder.routes()[index].grpc_path);
        shared
            .telemetry
            .metrics
            .transcode
            .with_label_values(&[&*grpc_path, "too_large"])
            .inc();
        resp.extensions_mut().insert(Transcoded(grpc_path));
    }
    resp
}

/// What a caller is told of a body over the port's limit.
fn over_limit(max: usize) -> String {
    format!("the request body is over {max} bytes (max_body_bytes)")
}

/// The gRPC status a finished answer carries, to be counted.
#[derive(Clone, Copy)]
struct Code(u32);

/// A request refused before anything went to the app.
struct Refused {
    err: ProxyError,
    message: String,
}

impl Refused {
    fn new(err: ProxyError, message: impl Into<String>) -> Refused {
        Refused {
            err,
            message: message.into(),
        }
    }
}

/// The local answer to a transcoded request: the error's status and `x-sidecar-error`, with a
/// JSON status body (`code` is the gRPC code it stands for).
fn refusal(err: ProxyError, code: u32, message: String) -> Response<ProxyBody> {
    let mut resp = crate::error::local_response(err);
    let body = StatusBody::new(code, message).to_json(None);
    resp.headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON.clone());
    resp.map(|_| Either::Right(Full::new(Bytes::from(body))))
}

/// Reads the request, calls the method, and reads the answer as far as its status line needs.
async fn call<B>(
    shared: &Shared,
    transcoder: &Arc<Transcoder>,
    index: usize,
    proxy_route: &Route,
    upstream: &H2Upstream,
    bindings: Result<Vec<crate::transcode::template::Binding>, String>,
    mut req: Request<B>,
) -> Result<Response<ProxyBody>, Refused>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let route = &transcoder.routes()[index];
    let settings = transcoder.settings();
    let bindings = bindings.map_err(|e| Refused::new(ProxyError::TranscodeBadRequest, e))?;
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| req.uri().authority().cloned())
        .unwrap_or_else(|| proxy_route.authority.clone());
    let dest = shared.destination(proxy_route, || Some(Cow::Borrowed(host.as_str())));
    let deadline = Instant::now() + dest.policy().request_timeout;

    let too_large = || {
        Refused::new(
            ProxyError::TranscodeTooLarge,
            over_limit(settings.max_body_bytes),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body_bytes as u64) {
        return Err(too_large());
    }
    strip_hop_by_hop(req.headers_mut(), false, true);
    let query = req.uri().query().map(str::to_owned);
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout_at(
        deadline,
        Limited::new(body, settings.max_body_bytes).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => {
            return Err(Refused::new(
                ProxyError::DownstreamBody,
                format!("the request body broke off: {e}"),
            ))
        }
        Err(_) => {
            return Err(Refused::new(
                ProxyError::DownstreamTimeout,
                "the request body did not arrive within the request timeout",
            ))
        }
    };
    let message = transcoder
        .request(route, bindings, query.as_deref(), &body)
        .map_err(|BadRequest(e)| Refused::new(ProxyError::TranscodeBadRequest, e))?;

    // The call: metadata from the caller's headers, the policy headers, the gRPC ones.
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 4);
    for (name, value) in &parts.headers {
        let n = name.as_str();
        let ours = n.starts_with("grpc-")
            || n.ends_with("-bin")
            || matches!(
                n,
                "content-type" | "content-length" | "host" | "accept-encoding" | "accept"
            );
        if !ours {
            headers.append(name.clone(), value.clone());
        }
    }
    let request_id = headers::apply(&mut headers, proxy_route.forwarded_for.as_deref());
    headers.insert(CONTENT_TYPE, APPLICATION_GRPC.clone());
    headers.insert(TE, TRAILERS.clone());
    let left = deadline.saturating_duration_since(Instant::now());
    headers.insert("grpc-timeout", grpc_timeout(left));
    let uri = Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(&*route.grpc_path)
        .build()
        .map_err(|e| Refused::new(ProxyError::TranscodeBadRequest, e.to_string()))?;
    let mut call = Request::new(());
    *call.method_mut() = Method::POST;
    *call.uri_mut() = uri;
    *call.headers_mut() = headers;
    *call.version_mut() = http::Version::HTTP_2;
    let (head, ()) = call.into_parts();
    let replay = Replay::new(frame(&message), None);
    let result = exchange_buffered(&dest, head, replay, |req| upstream.send(req)).await;
    let resp = match result {
        Ok(resp) => resp,
        Err(f) => {
            let code = match f.err.status() {
                StatusCode::GATEWAY_TIMEOUT => 4,
                _ => 14,
            };
            let message = f.err.message().trim_end().to_owned();
            let resp = exchange::answer(f, &dest, &request_id);
            let mut resp = as_json(
                resp.map(|_| ()),
                StatusBody::new(code, message).to_json(None),
            );
            resp.extensions_mut().insert(Code(code));
            return Ok(resp);
        }
    };
    let counter = &shared.telemetry.metrics.transcode;
    Ok(answer(transcoder, index, counter, resp, deadline).await)
}

/// `grpc-timeout` for `left`: at most 8 digits, in milliseconds while they fit, else seconds.
fn grpc_timeout(left: std::time::Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ms = left.as_millis().max(1);
    let text = if ms <= MAX {
        format!("{ms}m")
    } else {
        format!("{}S", left.as_secs().min(MAX as u64))
    };
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("1S"))
}

/// A local answer's head with a JSON body.
fn as_json(resp: Response<()>, body: Vec<u8>) -> Response<ProxyBody> {
    let mut resp = resp.map(|()| Either::Right(Full::new(Bytes::from(body))));
    resp.headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON.clone());
    resp.headers_mut().remove(CONTENT_LENGTH);
    resp
}

/// The app's response metadata as response headers (the gRPC protocol's own headers dropped).
fn metadata(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let n = name.as_str();
        if n.starts_with("grpc-")
            || n.ends_with("-bin")
            || matches!(n, "content-type" | "content-length" | "te" | "trailer")
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// The answer to a transcoded call, from the app's gRPC response.
async fn answer(
    transcoder: &Arc<Transcoder>,
    index: usize,
    counter: &IntCounterVec,
    resp: Response<Incoming>,
    deadline: Instant,
) -> Response<ProxyBody> {
    let route = &transcoder.routes()[index];
    let (parts, mut body) = resp.into_parts();
    let grpc = parts.status == StatusCode::OK
        && parts
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return upstream_error(format!(
            "the app did not answer as gRPC (HTTP {}, content-type {:?})",
            parts.status.as_u16(),
            parts.headers.get(CONTENT_TYPE)
        ));
    }
    let mut out_headers = HeaderMap::new();
    metadata(&parts.headers, &mut out_headers);
    let streaming = route.server_streaming();
    // A trailers-only answer: the status is in the head.
    if let Some(status) = StatusBody::from_headers(&parts.headers) {
        if status.code == 0 && !streaming {
            return upstream_error("the app sent no message for a unary method".to_owned());
        }
        return status_answer(transcoder, status, out_headers, Vec::new(), streaming);
    }
    let mut deframer = Deframer::new(transcoder.settings().max_message_bytes);
    let mut lines: Vec<Bytes> = Vec::new();
    let mut messages = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let mut resp = refusal(
                    ProxyError::UpstreamTimeout,
                    4,
                    "the app did not answer within the request timeout".to_owned(),
                );
                resp.extensions_mut().insert(Code(4));
                return resp;
            }
            Ok(None) => {
                return upstream_error(if deframer.is_empty() {
                    "the app ended its answer without a grpc-status".to_owned()
                } else {
                    "the app ended its answer inside a message".to_owned()
                })
            }
            Ok(Some(Err(e))) => {
                return upstream_error(format!(
                    "the app's answer broke off: {}",
                    crate::error::Chain(&e)
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                deframer.push(&data);
                loop {
                    match deframer.next_message() {
                        Ok(Some(msg)) => {
                            messages += 1;
                            if !streaming && messages > 1 {
                                return upstream_error(
                                    "the app sent more than one message for a unary method"
                                        .to_owned(),
                                );
                            }
                            match line(transcoder, route, &msg) {
                                Ok(l) => lines.push(l),
                                Err(e) => return upstream_error(e),
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return upstream_error(e),
                    }
                }
                if streaming && !lines.is_empty() {
                    // The first message is here: the status line can go.
                    // Counted when the stream ends, with the status it ends with.
                    let counter = counter.clone();
                    let grpc_path = Arc::clone(&route.grpc_path);
                    let on_end = Box::new(move |code: u32| {
                        counter
                            .with_label_values(&[&*grpc_path, code_name(code)])
                            .inc();
                    });
                    let stream =
                        Streamed::new(body, deframer, Arc::clone(transcoder), index, lines, on_end);
                    let mut resp = Response::new(Either::Left(Either::Right(Box::new(stream))));
                    *resp.headers_mut() = out_headers;
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, APPLICATION_NDJSON.clone());
                    return resp;
                }
                continue;
            }
            Err(frame) => frame,
        };
        let Ok(trailers) = frame.into_trailers() else {
            continue;
        };
        metadata(&trailers, &mut out_headers);
        let status = StatusBody::from_headers(&trailers)
            .unwrap_or_else(|| StatusBody::new(13, "the app's trailers carry no grpc-status"));
        if status.code == 0 && !streaming && messages != 1 {
            return upstream_error("the app sent no message for a unary method".to_owned());
        }
        return status_answer(transcoder, status, out_headers, lines, streaming);
    }
}

/// The answer once the app's status is known: 200 with the message(s), or the status's HTTP
/// code with the JSON status body.
fn status_answer(
    transcoder: &Transcoder,
    status: StatusBody,
    headers: HeaderMap,
    lines: Vec<Bytes>,
    streaming: bool,
) -> Response<ProxyBody> {
    let code = status.code;
    let mut resp = if code == 0 {
        // A unary message (its line without the newline), or a stream of zero messages.
        let body = match lines.as_slice() {
            [one] => one.slice(..one.len() - 1),
            _ => Bytes::new(),
        };
        let mut resp = Response::new(Either::Right(Full::new(body)));
        *resp.headers_mut() = headers;
        resp
    } else {
        let mut resp = json_status(http_status(code), &status, transcoder);
        for (name, value) in &headers {
            resp.headers_mut().append(name.clone(), value.clone());
        }
        resp
    };
    if code == 0 {
        // A stream that ended with no message is an empty list of lines.
        let ct = if streaming {
            &APPLICATION_NDJSON
        } else {
            &APPLICATION_JSON
        };
        resp.headers_mut().insert(CONTENT_TYPE, ct.clone());
    }
    resp.extensions_mut().insert(Code(code));
    resp
}

fn json_status(
    status: StatusCode,
    body: &StatusBody,
    transcoder: &Transcoder,
) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(
        transcoder.status_body(body),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON.clone());
    resp
}

/// 502 `upstream-protocol-error`: the app's answer could not be transcoded.
fn upstream_error(message: String) -> Response<ProxyBody> {
    debug!(error = %message, "transcoded call failed");
    let mut resp = refusal(ProxyError::UpstreamProtocol, 13, message);
    resp.extensions_mut().insert(Code(13));
    resp
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::grpc_timeout;

    #[test]
    fn grpc_timeout_fits_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_secs(30)), "30000m");
        assert_eq!(grpc_timeout(Duration::ZERO), "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(99_999)), "99999000m");
        assert_eq!(grpc_timeout(Duration::from_secs(100_000)), "100000S");
        assert_eq!(grpc_timeout(Duration::from_secs(u64::MAX / 2)), "99999999S");
    }
}
