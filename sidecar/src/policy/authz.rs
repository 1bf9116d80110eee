//! Inbound authorization: who may call the app, on which port, with which method and path.
//! Evaluated as Istio's AuthorizationPolicy is: any matching `deny` rule denies; otherwise, if
//! `allow` rules apply to the port, one must match; otherwise the default (`allow`, `deny`, or
//! `authenticated`: any client that proved a mesh identity). Dry-run rules are evaluated and
//! counted, never enforced. Opaque TCP is decided once per connection, before the app is dialled:
//! there, a rule with HTTP-only fields (`to.methods`, `to.paths`) never allows and, when its other
//! conditions match, always denies (the safe reading of a rule that cannot be checked). The
//! kubelet's probes (`probe_paths` from `probe_networks`, `GET`/`HEAD`) are answered whatever the
//! rules say, so that default-deny never breaks a pod's probes.
use std::net::IpAddr;
use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::net::Cidr;

/// A request path pattern: exact, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        if !text.starts_with('/') {
            return Err(format!("{text:?} is not a path: it must start with /"));
        }
        if text
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(format!("{text:?} holds spaces or control characters"));
        }
        match text.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => {
                Err(format!("{text:?}: only one '*', at the end"))
            }
            Some(prefix) => Ok(PathPattern::Prefix(prefix.into())),
            None if text.contains('*') => Err(format!("{text:?}: '*' only at the end")),
            None => Ok(PathPattern::Exact(text.into())),
        }
    }

    /// Matches the path without its query.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == &**p,
            PathPattern::Prefix(p) => path.starts_with(&**p),
        }
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Rules at most in one configuration (each is a metrics label value).
pub const MAX_RULES: usize = 256;

/// What applies when no rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultAction {
    /// Today's behaviour without an `[inbound] default`.
    #[default]
    Allow,
    Deny,
    /// Allow clients that proved a mesh identity; deny plaintext ones.
    Authenticated,
}

impl DefaultAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultAction::Allow => "allow",
            DefaultAction::Deny => "deny",
            DefaultAction::Authenticated => "authenticated",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// A principal pattern: exact, `prefix*`, `*suffix`, or `*` (any authenticated client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Any,
}

impl Principal {
    pub fn parse(text: &str) -> Result<Principal, String> {
        if text == "*" {
            return Ok(Principal::Any);
        }
        let stars = text.matches('*').count();
        let shape = "a SPIFFE ID, `prefix*`, `*suffix` or `*`";
        match (stars, text.strip_suffix('*'), text.strip_prefix('*')) {
            (0, _, _) => SpiffeId::parse(text)
                .map(|_| Principal::Exact(text.into()))
                .map_err(|e| format!("{text:?}: {e} (expected {shape})")),
            (1, Some(prefix), _) if !prefix.is_empty() => Ok(Principal::Prefix(prefix.into())),
            (1, _, Some(suffix)) if !suffix.is_empty() => Ok(Principal::Suffix(suffix.into())),
            _ => Err(format!("{text:?}: expected {shape}")),
        }
    }

    fn matches(&self, id: &str) -> bool {
        match self {
            Principal::Exact(p) => id == &**p,
            Principal::Prefix(p) => id.starts_with(&**p),
            Principal::Suffix(s) => id.ends_with(&**s),
            Principal::Any => true,
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Exact(p) => f.write_str(p),
            Principal::Prefix(p) => write!(f, "{p}*"),
            Principal::Suffix(s) => write!(f, "*{s}"),
            Principal::Any => f.write_str("*"),
        }
    }
}

/// One `[[inbound.rule]]`. Empty lists do not constrain; every non-empty one must match.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: Arc<str>,
    pub action: Action,
    pub dry_run: bool,
    pub ports: Vec<u16>,
    pub principals: Vec<Principal>,
    pub namespaces: Vec<Box<str>>,
    pub ip_blocks: Vec<Cidr>,
    /// Upper-case method names.
    pub methods: Vec<Box<str>>,
    pub paths: Vec<PathPattern>,
}

impl Rule {
    /// A rule with no conditions (it matches everything) until some are set.
    pub fn new(name: &str, action: Action) -> Rule {
        Rule {
            name: name.into(),
            action,
            dry_run: false,
            ports: Vec::new(),
            principals: Vec::new(),
            namespaces: Vec::new(),
            ip_blocks: Vec::new(),
            methods: Vec::new(),
            paths: Vec::new(),
        }
    }

    fn applies_to(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }

    fn has_http_fields(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }

    fn caller_matches(&self, peer: &Peer<'_>) -> bool {
        let id = peer.principal.map(SpiffeId::as_str);
        (self.principals.is_empty()
            || id.is_some_and(|id| self.principals.iter().any(|p| p.matches(id))))
            && (self.namespaces.is_empty()
                || peer
                    .principal
                    .and_then(SpiffeId::namespace)
                    .is_some_and(|ns| self.namespaces.iter().any(|n| &**n == ns)))
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|c| c.contains(peer.ip)))
    }

    /// Whether the rule matches: `request` is `None` for opaque TCP (see the module doc).
    fn matches(&self, peer: &Peer<'_>, request: Option<&Request<'_>>) -> bool {
        if !self.applies_to(peer.port) || !self.caller_matches(peer) {
            return false;
        }
        match request {
            Some(r) => {
                (self.methods.is_empty() || self.methods.iter().any(|m| &**m == r.method))
                    && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(r.path)))
            }
            None if self.has_http_fields() => self.action == Action::Deny,
            None => true,
        }
    }
}

/// The `[inbound]` authorization settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthzConfig {
    pub default: DefaultAction,
    pub rules: Vec<Rule>,
    /// Answers carry `x-sidecar-authz-rule` naming the deciding rule (off: it tells a caller
    /// about the policy).
    pub expose_rule: bool,
    /// Where the kubelet's probes come from (default: anywhere).
    pub probe_networks: Vec<Cidr>,
}

/// Who is calling.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The verified SPIFFE ID of a mesh TLS client.
    pub principal: Option<&'a SpiffeId>,
    pub ip: IpAddr,
    /// The app port called.
    pub port: u16,
}

/// What is called (HTTP).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
}

/// A decision: allowed or not, and why (the deciding rule's name, `default` or `probe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Arc<str>,
    /// The deciding rule's action (`allow`, `deny`), or the default's (`allow`, `deny`,
    /// `authenticated`).
    pub action: &'static str,
    /// Dry-run rules that matched: (name, action).
    pub dry_run: Vec<(Arc<str>, Action)>,
}

impl Decision {
    /// The `result` label: `allow` or `deny`.
    pub fn result(&self) -> &'static str {
        if self.allowed {
            "allow"
        } else {
            "deny"
        }
    }
}

impl AuthzConfig {
    /// True if anything can deny a connection to `port` (then the app is not dialled before an
    /// L4 decision).
    pub fn gates(&self, port: u16) -> bool {
        self.default != DefaultAction::Allow
            || self.rules.iter().any(|r| !r.dry_run && r.applies_to(port))
    }

    /// True if any rule or default is configured at all (evaluation and counting are needed).
    pub fn is_active(&self, port: u16) -> bool {
        self.gates(port) || self.rules.iter().any(|r| r.applies_to(port))
    }

    fn is_probe_source(&self, ip: IpAddr) -> bool {
        self.probe_networks.is_empty() || self.probe_networks.iter().any(|c| c.contains(ip))
    }

    /// Decides one HTTP request, or (`request: None`) one opaque TCP connection. `probe` is true
    /// for a `GET`/`HEAD` to one of the `[inbound] probe_paths`.
    pub fn decide(&self, peer: &Peer<'_>, request: Option<&Request<'_>>, probe: bool) -> Decision {
        let dry_run: Vec<(Arc<str>, Action)> = self
            .rules
            .iter()
            .filter(|r| r.dry_run && r.matches(peer, request))
            .map(|r| (Arc::clone(&r.name), r.action))
            .collect();
        let decided = |allowed, rule: &Arc<str>, action| Decision {
            allowed,
            rule: Arc::clone(rule),
            action,
            dry_run: dry_run.clone(),
        };
        if probe && self.is_probe_source(peer.ip) {
            return decided(true, &PROBE, "allow");
        }
        let enforced = || self.rules.iter().filter(|r| !r.dry_run);
        if let Some(rule) =
            enforced().find(|r| r.action == Action::Deny && r.matches(peer, request))
        {
            return decided(false, &rule.name, "deny");
        }
        let mut allows = enforced()
            .filter(|r| r.action == Action::Allow && r.applies_to(peer.port))
            .peekable();
        if allows.peek().is_some() {
            return match allows.find(|r| r.matches(peer, request)) {
                Some(rule) => decided(true, &rule.name, "allow"),
                None => decided(false, &DEFAULT, "deny"),
            };
        }
        let allowed = match self.default {
            DefaultAction::Allow => true,
            DefaultAction::Deny => false,
            DefaultAction::Authenticated => peer.principal.is_some(),
        };
        decided(allowed, &DEFAULT, self.default.as_str())
    }
}

static DEFAULT: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("default"));
static PROBE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("probe"));

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, action: Action, f: impl FnOnce(&mut Rule)) -> Rule {
        let mut r = Rule::new(name, action);
        f(&mut r);
        r
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn istio_order_deny_then_allow_then_default() {
        let a = id("spiffe://td/ns/shop/sa/a");
        let b = id("spiffe://td/ns/other/sa/b");
        let config = AuthzConfig {
            default: DefaultAction::Deny,
            rules: vec![
                rule("no-admin", Action::Deny, |r| {
                    r.paths = vec![PathPattern::parse("/admin/*").unwrap()];
                }),
                rule("a-reads-orders", Action::Allow, |r| {
                    r.principals = vec![Principal::parse("spiffe://td/ns/shop/*").unwrap()];
                    r.methods = vec!["GET".into()];
                    r.paths = vec![PathPattern::parse("/orders/*").unwrap()];
                }),
                rule("watch", Action::Deny, |r| {
                    r.dry_run = true;
                    r.namespaces = vec!["shop".into()];
                }),
            ],
            ..AuthzConfig::default()
        };
        fn peer(p: Option<&SpiffeId>) -> Peer<'_> {
            Peer {
                principal: p,
                ip: "10.0.0.9".parse().unwrap(),
                port: 8080,
            }
        }
        let get = |path| Request {
            method: "GET",
            path,
        };
        let d = config.decide(&peer(Some(&a)), Some(&get("/orders/1")), false);
        assert_eq!((d.allowed, &*d.rule), (true, "a-reads-orders"));
        assert_eq!(d.dry_run, vec![(Arc::from("watch"), Action::Deny)]);
        let post = Request {
            method: "POST",
            path: "/orders/1",
        };
        let d = config.decide(&peer(Some(&a)), Some(&post), false);
        assert_eq!((d.allowed, &*d.rule), (false, "default"));
        assert!(
            !config
                .decide(&peer(Some(&b)), Some(&get("/orders/1")), false)
                .allowed
        );
        assert!(
            !config
                .decide(&peer(None), Some(&get("/orders/1")), false)
                .allowed
        );
        let d = config.decide(&peer(Some(&a)), Some(&get("/admin/x")), false);
        assert_eq!((d.allowed, &*d.rule), (false, "no-admin"));
        // Opaque TCP: the allow rule has HTTP fields, so it never allows; the deny rule with
        // HTTP fields denies.
        let d = config.decide(&peer(Some(&a)), None, false);
        assert_eq!((d.allowed, &*d.rule), (false, "no-admin"));
        // Probes pass whatever the rules say.
        let d = config.decide(&peer(None), Some(&get("/admin/x")), true);
        assert_eq!((d.allowed, &*d.rule), (true, "probe"));
        assert!(config.gates(8080) && config.gates(9090));
    }

    #[test]
    fn the_default_alone() {
        let a = id("spiffe://td/ns/shop/sa/a");
        fn peer(p: Option<&SpiffeId>) -> Peer<'_> {
            Peer {
                principal: p,
                ip: "10.0.0.9".parse().unwrap(),
                port: 1,
            }
        }
        let authenticated = AuthzConfig {
            default: DefaultAction::Authenticated,
            ..AuthzConfig::default()
        };
        assert!(authenticated.decide(&peer(Some(&a)), None, false).allowed);
        assert!(!authenticated.decide(&peer(None), None, false).allowed);
        let open = AuthzConfig::default();
        assert!(!open.gates(80) && !open.is_active(80));
        assert!(open.decide(&peer(None), None, false).allowed);
    }

    #[test]
    fn principal_patterns() {
        assert_eq!(Principal::parse("*"), Ok(Principal::Any));
        assert!(Principal::parse("spiffe://td/ns/a/*").is_ok());
        assert!(Principal::parse("*/sa/admin").is_ok());
        for bad in ["", "**", "a*b", "*a*", "spiffe://TD/x", "not-an-id"] {
            assert!(Principal::parse(bad).is_err(), "{bad}");
        }
    }
}
