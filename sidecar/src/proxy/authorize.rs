//! Inbound authorization on the connection path ([`crate::policy::authz`] decides): once per
//! opaque connection, before the app is dialled ([`connection`]), and per HTTP request
//! ([`request`]). Every decision is counted in `sidecar_authz_decisions_total` with its deciding
//! rule; dry-run rules are counted and never enforced. A denied request gets 403
//! `inbound-authz-denied` (gRPC: `grpc-status: 7` in a trailers-only answer, so a gRPC client
//! sees PERMISSION_DENIED and an HTTP/2 connection's other streams go on); a denied connection is
//! reset.
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use tracing::info;

use super::forward::{error_response, ProxyBody};
use super::shared::Shared;
use crate::error::ProxyError;
use crate::identity::SpiffeId;
use crate::metrics::access::AuthzRule;
use crate::policy::authz::{Decision, Peer, Request as Called};

/// Names the deciding rule on answers, when `[inbound] expose_rule` is on.
static X_SIDECAR_AUTHZ_RULE: HeaderName = HeaderName::from_static("x-sidecar-authz-rule");

/// Who is calling the app, as far as the connection tells.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) id: Option<SpiffeId>,
    pub(crate) ip: IpAddr,
    /// The app port called.
    pub(crate) port: u16,
}

impl Caller {
    fn peer(&self) -> Peer<'_> {
        Peer {
            principal: self.id.as_ref(),
            ip: self.ip,
            port: self.port,
        }
    }
}

/// Denials logged per second at most: a caller retrying in a loop cannot flood the log (the
/// metrics and the access log still see every one).
const DENIAL_LOGS_PER_SECOND: u64 = 10;

/// True if one more denial may be logged this second.
fn may_log_denial() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    // The current second (high 44 bits) and the count logged in it (low 20 bits).
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut current = WINDOW.load(Ordering::Relaxed);
    loop {
        let (second, logged) = (current >> 20, current & 0xf_ffff);
        let next = if second == now {
            if logged >= DENIAL_LOGS_PER_SECOND {
                return false;
            }
            current + 1
        } else {
            now << 20 | 1
        };
        match WINDOW.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(seen) => current = seen,
        }
    }
}

fn count(shared: &Shared, d: &Decision) {
    let decisions = &shared.telemetry.metrics.authz;
    decisions
        .with_label_values(&[&*d.rule, d.action, d.result()])
        .inc();
    for (rule, action) in &d.dry_run {
        let result = match action {
            crate::policy::authz::Action::Deny => "dry_run_deny",
            crate::policy::authz::Action::Allow => "dry_run_allow",
        };
        decisions
            .with_label_values(&[&**rule, action.as_str(), result])
            .inc();
    }
}

/// The L4 decision for an opaque connection; `None` when no authorization applies to the port.
pub(crate) fn connection(shared: &Shared, caller: &Caller) -> Option<Decision> {
    let policies = shared.policies.load();
    let authz = &policies.config().inbound.authz;
    if !authz.is_active(caller.port) {
        return None;
    }
    let d = authz.decide(&caller.peer(), None, false);
    count(shared, &d);
    if !d.allowed && may_log_denial() {
        info!(peer = %caller.ip, port = caller.port, rule = %d.rule, principal = ?caller.id, "inbound connection denied");
    }
    Some(d)
}

/// An allowed request's decision, to mark its answer with ([`mark`]).
pub(crate) struct Allowed {
    decision: Decision,
    expose: bool,
}

impl Allowed {
    pub(crate) fn mark(&self, resp: &mut Response<ProxyBody>) {
        mark(resp, &self.decision, self.expose);
    }

    /// The rule that allowed the request.
    pub(crate) fn rule(&self) -> &Arc<str> {
        &self.decision.rule
    }

    /// Whether answers name the deciding rule (`x-sidecar-authz-rule`).
    pub(crate) fn exposed(&self) -> bool {
        self.expose
    }
}

/// A plaintext request a strict port still serves: a kubelet probe path (`[inbound]
/// probe_paths`).
pub(crate) fn is_probe<B>(shared: &Shared, req: &Request<B>) -> bool {
    shared
        .policies
        .load()
        .config()
        .inbound
        .is_probe(req.method(), req.uri().path())
}

/// The decision for one request: `Ok` with the deciding rule (or `None`: nothing configured),
/// or the answer of a denial.
pub(crate) fn request<B>(
    shared: &Shared,
    caller: &Caller,
    req: &Request<B>,
) -> Result<Option<Allowed>, Box<Response<ProxyBody>>> {
    let policies = shared.policies.load();
    let inbound = &policies.config().inbound;
    let authz = &inbound.authz;
    if !authz.is_active(caller.port) {
        return Ok(None);
    }
    let path = req.uri().path();
    let probe = inbound.is_probe(req.method(), path);
    let called = Called {
        method: req.method().as_str(),
        path,
    };
    let d = authz.decide(&caller.peer(), Some(&called), probe);
    count(shared, &d);
    if d.allowed {
        return Ok(Some(Allowed {
            decision: d,
            expose: authz.expose_rule,
        }));
    }
    if may_log_denial() {
        info!(peer = %caller.ip, port = caller.port, rule = %d.rule, principal = ?caller.id, method = %req.method(), path, "inbound request denied");
    }
    let is_grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let mut resp = if is_grpc {
        grpc_denied()
    } else {
        error_response(ProxyError::InboundAuthzDenied)
    };
    mark(&mut resp, &d, authz.expose_rule);
    Err(Box::new(resp))
}

/// Records the deciding rule on an answer (the access log; the header when exposed).
fn mark(resp: &mut Response<ProxyBody>, d: &Decision, expose: bool) {
    if expose {
        if let Ok(v) = HeaderValue::from_str(&d.rule) {
            resp.headers_mut().insert(X_SIDECAR_AUTHZ_RULE.clone(), v);
        }
    }
    resp.extensions_mut().insert(AuthzRule(Arc::clone(&d.rule)));
}

/// gRPC's PERMISSION_DENIED as a trailers-only answer (HTTP 200, the status in the headers).
fn grpc_denied() -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from_static("7"));
    h.insert(
        "grpc-message",
        HeaderValue::from_static("sidecar:%20denied%20by%20the%20inbound%20authorization%20policy"),
    );
    h.insert(
        crate::error::X_SIDECAR_ERROR.clone(),
        HeaderValue::from_static(ProxyError::InboundAuthzDenied.code()),
    );
    resp.extensions_mut().insert(ProxyError::InboundAuthzDenied);
    resp
}
