//! Where the HTTP requests of one downstream connection go, and under which policies.
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::Authority;

use super::mesh::Plan;
use super::pool::Host;
use super::shares::Shares;
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
    /// The policies and their state (breaker, budget) for this connection's destination, as of
    /// policy generation `generation`; a config rule for the request's authority overrides it
    /// per request (see `by_name`), and a reload makes requests look it up again (`origin`).
    pub(crate) dest: Arc<Destination>,
    pub(crate) generation: u64,
    /// How `dest` was found, to find it again in a newer generation.
    pub(crate) origin: Origin,
    /// Look up name rules by the request's `Host` (outbound and `--target` mode).
    pub(crate) by_name: bool,
    /// The port of an authority without one (the connection's destination port).
    pub(crate) default_port: u16,
    /// Requests from other hosts (inbound, `--target`): the client, for `x-forwarded-for`.
    /// Boxed: an outbound route (none) is then 112 bytes smaller, and there is one per
    /// connection.
    pub(crate) forwarded_for: Option<Box<ForwardedClient>>,
    /// HTTP/1: the pool's entry for `authority`, looked up once per connection.
    pub(crate) upstream: Option<Arc<Host>>,
    /// How upstream connections are made: plaintext or mesh TLS (decided per connection).
    pub(crate) plan: Plan,
}

impl Route {
    /// The same route for requests of the client at `peer` (adds the forwarding headers).
    pub(crate) fn for_client(&self, peer: SocketAddr) -> Route {
        Route {
            forwarded_for: Some(Box::new(ForwardedClient::new(peer.ip()))),
            ..self.clone()
        }
    }

    /// The destination of one request under `policies` (the generation in force when it
    /// started): a name rule for its authority, else the connection's destination, looked up
    /// again when a reload has happened since the connection began. `authority` is asked only
    /// when there are name rules to match it; `label` names a destination first seen now, in
    /// metrics.
    pub(crate) fn destination<'a>(
        &self,
        policies: &Policies,
        authority: impl FnOnce() -> Option<Cow<'a, str>>,
        label: &dyn Fn() -> Arc<str>,
    ) -> Arc<Destination> {
        if self.by_name && policies.has_name_rules() {
            if let Some(d) = authority().and_then(|a| policies.by_authority(&a, self.default_port))
            {
                return d;
            }
        }
        if policies.generation() == self.generation {
            return Arc::clone(&self.dest);
        }
        match self.origin {
            Origin::Outbound(addr) => policies.outbound(addr, Some(label)),
            Origin::Inbound => policies.inbound(),
            Origin::Target => policies.target(self.authority.as_str(), Some(label)),
        }
    }
}

/// A connection's destination as resolved when it began, and the policy generation it is of.
#[derive(Clone, Debug)]
pub(crate) struct Resolved {
    pub(crate) dest: Arc<Destination>,
    pub(crate) generation: u64,
}

impl std::ops::Deref for Resolved {
    type Target = Destination;

    fn deref(&self) -> &Destination {
        &self.dest
    }
}

/// Where a connection's destination comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The original destination of an outbound connection.
    Outbound(SocketAddr),
    /// The app (inbound).
    Inbound,
    /// The `--target` URL.
    Target,
}

/// What makes two connections' routes the same (see [`Routes`]): with the same policy
/// generation and destination, checked when one is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RouteKey {
    /// An outbound connection to this original destination.
    Outbound(SocketAddr),
    /// An inbound connection to this port, from a client at this address (its
    /// `x-forwarded-for`) with no mesh identity.
    Inbound(SocketAddr, IpAddr),
    /// A `--target` connection from a client at this address.
    Target(IpAddr),
}

/// The open connections' routes, shared by those whose routes are the same.
pub(crate) type Routes = Shares<RouteKey, Route>;
