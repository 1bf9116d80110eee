//! Where the HTTP requests of one downstream connection go, and under which policies.
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;

use super::pool::Host;
use crate::policy::headers::ForwardedClient;
use crate::policy::{Destination, Policies};

/// Where requests of one downstream connection go: the original destination (interception) or
/// the `--target` URL, and under which policies.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    /// Pool key and dial address: an IP literal in interception mode.
    pub(crate) authority: Authority,
    /// Path prefix of a `--target` URL with a path (`http://svc:8080/api`), else `None`.
    pub(crate) prefix: Option<Arc<str>>,
    /// The policies and their state (breaker, budget) for this connection's destination; a
    /// config rule for the request's authority overrides it per request (see `by_name`).
    pub(crate) dest: Arc<Destination>,
    /// Look up name rules by the request's `Host` (outbound and `--target` with name rules).
    pub(crate) by_name: bool,
    /// The port of an authority without one (the connection's destination port).
    pub(crate) default_port: u16,
    /// Requests from other hosts (inbound, `--target`): the client, for `x-forwarded-for`.
    pub(crate) forwarded_for: Option<ForwardedClient>,
    /// HTTP/1: the pool's entry for `authority`, looked up once per connection.
    pub(crate) upstream: Option<Arc<Host>>,
}

impl Route {
    /// The same route for requests of the client at `peer` (adds the forwarding headers).
    pub(crate) fn for_client(&self, peer: SocketAddr) -> Route {
        Route {
            forwarded_for: Some(ForwardedClient::new(peer.ip())),
            ..self.clone()
        }
    }

    /// The destination of one request: a name rule for its authority, else `None` (the
    /// connection's, `dest`).
    pub(crate) fn destination(
        &self,
        policies: &Policies,
        authority: Option<&str>,
    ) -> Option<Arc<Destination>> {
        if !self.by_name {
            return None;
        }
        policies.by_authority(authority?, self.default_port)
    }
}
