//! Where the HTTP requests of one downstream connection go, and under which policies.
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use http::uri::Authority;

use super::mesh::Plan;
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

/// What makes two connections' routes the same (see [`Routes`]).
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

/// The routes of the open connections, shared by the connections whose routes are the same:
/// one allocation for a thousand connections to one destination, and none in each parked
/// connection. Held weakly: a route lives as long as a connection on it. At most twice as many
/// entries as there were live routes at the last sweep (plus 64), so a stream of new
/// destinations or clients cannot grow it.
#[derive(Default)]
pub(crate) struct Routes {
    inner: Mutex<RouteMap>,
}

#[derive(Default)]
struct RouteMap {
    map: HashMap<RouteKey, Weak<Route>>,
    /// Entries at the last sweep.
    swept: usize,
}

impl Routes {
    /// The route for `key` that connections on it hold, if it is still `fits`; else `make`'s,
    /// from now on the one for `key`.
    pub(crate) fn share(
        &self,
        key: RouteKey,
        fits: impl FnOnce(&Route) -> bool,
        make: impl FnOnce() -> Route,
    ) -> Arc<Route> {
        let found = self.lock().map.get(&key).and_then(Weak::upgrade);
        if let Some(route) = found.filter(|r| fits(r)) {
            return route;
        }
        let route = Arc::new(make());
        let mut routes = self.lock();
        if routes.map.len() > 2 * routes.swept + 64 {
            routes.map.retain(|_, r| r.strong_count() > 0);
            routes.swept = routes.map.len();
        }
        routes.map.insert(key, Arc::downgrade(&route));
        route
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouteMap> {
        // Nothing under the lock can panic half-way.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The routes connections hold now.
    #[cfg(test)]
    pub(crate) fn live(&self) -> Vec<Arc<Route>> {
        self.lock().map.values().filter_map(Weak::upgrade).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyConfig;

    /// A route to `dst`, as an outbound connection's.
    fn route(policies: &Policies, dst: SocketAddr) -> Route {
        Route {
            authority: Authority::try_from(dst.to_string()).unwrap(),
            prefix: None,
            dest: policies.outbound(dst, None),
            generation: policies.generation(),
            origin: Origin::Outbound(dst),
            by_name: true,
            default_port: dst.port(),
            forwarded_for: None,
            upstream: None,
            plan: Plan::Plain,
        }
    }

    /// Connections to ever new destinations (a scan, a crawler) leave at most twice as many
    /// entries as there are routes in use (plus 64); a route in use is found again.
    #[test]
    fn new_destinations_keep_the_routes_bounded() {
        let policies = Policies::new(&PolicyConfig::default());
        let routes = Routes::default();
        let dst = |port: u16| SocketAddr::from(([10, 0, 0, 1], port));
        let mut held = Vec::new();
        for port in 1..=5000 {
            let key = RouteKey::Outbound(dst(port));
            let r = routes.share(key, |_| true, || route(&policies, dst(port)));
            if port % 250 == 0 {
                held.push(r);
            }
            let entries = routes.lock().map.len();
            assert!(
                entries <= 2 * held.len() + 64 + 1,
                "{entries} entries at {port}"
            );
        }
        assert_eq!(held.len(), 20);
        let again = routes.share(
            RouteKey::Outbound(dst(250)),
            |_| true,
            || unreachable!("in use, so shared"),
        );
        assert!(Arc::ptr_eq(&again, &held[0]));
        // One that does not fit (another generation's, say) is replaced.
        let fresh = routes.share(
            RouteKey::Outbound(dst(250)),
            |_| false,
            || route(&policies, dst(250)),
        );
        assert!(!Arc::ptr_eq(&fresh, &held[0]));
        assert!(routes.live().iter().any(|r| Arc::ptr_eq(r, &fresh)));
    }
}
