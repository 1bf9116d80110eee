//! The mesh sections of the config file: `[mtls]` (where outbound mesh TLS is tried) and
//! `[inbound]` (what the app's ports accept). Both reload like the rest of the file.
//!
//! ```toml
//! [mtls]
//! mesh_networks = ["10.0.0.0/8", "fd00::/8"]
//! fallback_ttl = "5m"
//!
//! [inbound]
//! mtls = "permissive"             # every port without its own entry
//! probe_paths = ["/healthz", "/ready*"]
//! [inbound.port.8080]
//! mtls = "strict"
//! ```
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `[mtls] mesh_networks` | list of CIDRs | `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, `100.64.0.0/10`, `fd00::/8` | outbound destinations here are mesh candidates (Linkerd's cluster networks); anything else is never mesh TLS |
//! | `[mtls] fallback_ttl` | duration | `5m` | how long a destination found not to be a sidecar is dialled in plaintext before mesh TLS is tried again |
//! | `[mtls] expiry_margin` | duration | `5m` | `/ready` fails while a strict port has no identity, or the certificate expires within this |
//! | `[inbound] mtls` | `permissive` or `strict` | `permissive` | permissive takes mesh TLS and plaintext; strict refuses plaintext (HTTP 403 `inbound-mtls-required`, TCP reset) |
//! | `[inbound] probe_paths` | list of paths (exact, or a prefix ending in `*`) | none | plaintext `GET`/`HEAD` requests to these pass on strict ports (kubelet probes; `sidecar inject` writes them) |
//! | `[inbound.port.N] mtls` | `permissive` or `strict` | `[inbound] mtls` | the mode of app port N |
use std::time::Duration;

use toml::{Table, Value};

use super::authz::{boolean, cidrs, default_action, rules, strings, unknown};
use super::values::{count, duration, positive_duration, KeyError, Raw};
use crate::identity::SpiffeId;
use crate::policy::authz::PathPattern;
use crate::policy::model::{InboundConfig, InboundMtls, MeshConfig, MtlsMode};

pub(super) fn mtls_mode(v: Raw<'_>) -> Result<MtlsMode, String> {
    match v.text().map(str::trim) {
        Some("off") => Ok(MtlsMode::Off),
        Some("opportunistic") => Ok(MtlsMode::Opportunistic),
        Some("require") => Ok(MtlsMode::Require),
        _ => Err("expected \"off\", \"opportunistic\" or \"require\"".to_owned()),
    }
}

fn inbound_mode(v: Raw<'_>) -> Result<InboundMtls, String> {
    match v.text().map(str::trim) {
        Some("permissive") => Ok(InboundMtls::Permissive),
        Some("strict") => Ok(InboundMtls::Strict),
        _ => Err("expected \"permissive\" or \"strict\"".to_owned()),
    }
}

pub(super) fn spiffe_ids(v: Raw<'_>) -> Result<Vec<SpiffeId>, String> {
    strings(v)?
        .iter()
        .map(|s| SpiffeId::parse(s).map_err(|e| format!("{s:?}: {e}")))
        .collect()
}

fn paths(v: Raw<'_>) -> Result<Vec<PathPattern>, String> {
    strings(v)?.iter().map(|s| PathPattern::parse(s)).collect()
}

fn push(errors: &mut Vec<KeyError>, label: &str, key: &str, v: &Value, problem: String) {
    errors.push(KeyError {
        key: format!("{label} {key}"),
        value: Raw::Toml(v).shown(),
        problem,
    });
}

pub(super) fn mesh_section(
    mesh: &mut MeshConfig,
    section: &Table,
    label: &str,
    errors: &mut Vec<KeyError>,
) {
    for (k, v) in section {
        let raw = Raw::Toml(v);
        let result = match k.as_str() {
            "mesh_networks" => cidrs(raw).map(|c| mesh.networks = c),
            "fallback_ttl" => positive_duration(raw).map(|d| mesh.fallback_ttl = d),
            "expiry_margin" => duration(raw).map(|d| mesh.expiry_margin = d),
            _ => Err(unknown(
                k,
                &["mesh_networks", "fallback_ttl", "expiry_margin"],
            )),
        };
        if let Err(problem) = result {
            push(errors, label, k, v, problem);
        }
    }
    if mesh.expiry_margin > Duration::from_secs(365 * 86_400) {
        errors.push(KeyError {
            key: format!("{label} expiry_margin"),
            value: format!("{:?}", mesh.expiry_margin),
            problem: "longer than a year: no certificate would ever be ready".to_owned(),
        });
    }
}

pub(super) fn inbound_section(
    inbound: &mut InboundConfig,
    section: &Table,
    label: &str,
    errors: &mut Vec<KeyError>,
) {
    for (k, v) in section {
        let raw = Raw::Toml(v);
        let result = match (k.as_str(), v) {
            ("mtls", _) => inbound_mode(raw).map(|m| inbound.mtls = m),
            ("probe_paths", _) => paths(raw).map(|p| inbound.probe_paths = p),
            ("default", _) => default_action(raw).map(|d| inbound.authz.default = d),
            ("expose_rule", _) => boolean(raw).map(|b| inbound.authz.expose_rule = b),
            ("probe_networks", _) => cidrs(raw).map(|c| inbound.authz.probe_networks = c),
            ("rule", list) => {
                inbound.authz.rules = rules(list, label, errors);
                Ok(())
            }
            ("port", Value::Table(ports)) => {
                for (port, entry) in ports {
                    let port_label = format!("{label} port.{port}");
                    let Ok(number) = count(Raw::Text(port), 1, 65_535) else {
                        push(
                            errors,
                            label,
                            &format!("port.{port}"),
                            entry,
                            "expected a port number 1-65535: [inbound.port.8080]".to_owned(),
                        );
                        continue;
                    };
                    let Value::Table(entry) = entry else {
                        push(
                            errors,
                            label,
                            &format!("port.{port}"),
                            entry,
                            "expected a table: [inbound.port.8080] with mtls = ...".to_owned(),
                        );
                        continue;
                    };
                    for (pk, pv) in entry {
                        let result = match pk.as_str() {
                            "mtls" => inbound_mode(Raw::Toml(pv)).map(|m| {
                                inbound.ports.push((number as u16, m));
                            }),
                            _ => Err(unknown(pk, &["mtls"])),
                        };
                        if let Err(problem) = result {
                            push(errors, &port_label, pk, pv, problem);
                        }
                    }
                }
                Ok(())
            }
            ("port", _) => Err("expected tables: [inbound.port.8080]".to_owned()),
            _ => Err(unknown(
                k,
                &[
                    "mtls",
                    "probe_paths",
                    "port",
                    "default",
                    "expose_rule",
                    "probe_networks",
                    "rule",
                ],
            )),
        };
        if let Err(problem) = result {
            push(errors, label, k, v, problem);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::config_file::from_str;
    use crate::policy::{InboundMtls, MtlsMode};

    #[test]
    fn mesh_sections_parse_and_name_bad_keys() {
        let c = from_str(
            "f",
            r#"
            [defaults]
            mtls = "require"
            [[destination]]
            match = "10.0.0.7:80"
            mtls = "off"
            server_identities = ["spiffe://td/ns/a/sa/b"]
            [mtls]
            mesh_networks = ["10.1.0.0/16"]
            fallback_ttl = "1m"
            [inbound]
            mtls = "strict"
            probe_paths = ["/healthz", "/ready*"]
            [inbound.port.9090]
            mtls = "permissive"
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(c.defaults.mtls, MtlsMode::Require);
        assert_eq!(c.destinations[0].policy.mtls, MtlsMode::Off);
        assert_eq!(c.destinations[0].policy.server_identities.len(), 1);
        assert!(c.mesh.in_mesh("10.1.2.3".parse().unwrap()));
        assert!(!c.mesh.in_mesh("10.2.0.1".parse().unwrap()));
        assert_eq!(c.inbound.mtls_for(8080), InboundMtls::Strict);
        assert_eq!(c.inbound.mtls_for(9090), InboundMtls::Permissive);
        assert!(c.inbound.is_probe(&http::Method::GET, "/ready/deep"));
        assert!(!c.inbound.is_probe(&http::Method::POST, "/healthz"));
        assert!(!c.inbound.is_probe(&http::Method::GET, "/healthz/x"));

        let errors = from_str(
            "f",
            r#"
            [defaults]
            mtls = "on"
            server_identities = ["https://x"]
            [mtls]
            mesh_network = ["10.0.0.0/8"]
            fallback_ttl = "0s"
            [inbound]
            mtls = "strictly"
            probe_paths = ["healthz"]
            [inbound.port.http]
            mtls = "strict"
            [inbound.port.80]
            mode = "strict"
            "#,
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for expected in [
            "f: [defaults] mtls",
            "f: [defaults] server_identities",
            "f: [mtls] mesh_network",
            "f: [mtls] fallback_ttl",
            "f: [inbound] mtls",
            "f: [inbound] probe_paths",
            "f: [inbound] port.http",
            "f: [inbound] port.80 mode",
        ] {
            assert!(keys.contains(&expected), "{expected} not in {keys:?}");
        }
        let typo = errors
            .iter()
            .find(|e| e.key == "f: [mtls] mesh_network")
            .unwrap();
        assert!(typo.problem.contains("mesh_networks"), "{}", typo.problem);
    }

    #[test]
    fn authorization_rules_parse_and_name_bad_keys() {
        use crate::policy::authz::{Action, DefaultAction};
        let c = from_str(
            "f",
            r#"
            [inbound]
            default = "deny"
            expose_rule = true
            probe_networks = ["10.0.0.0/8"]
            [[inbound.rule]]
            name = "orders"
            action = "allow"
            ports = [8080]
            from.principals = ["spiffe://td/ns/shop/*"]
            to.methods = ["get"]
            to.paths = ["/orders/*"]
            [[inbound.rule]]
            name = "watch"
            action = "deny"
            dry_run = true
            from.namespaces = ["other"]
            from.ip_blocks = ["10.1.0.0/16"]
            "#,
            &[],
        )
        .unwrap();
        let authz = &c.inbound.authz;
        assert_eq!(authz.default, DefaultAction::Deny);
        assert!(authz.expose_rule);
        assert_eq!(authz.rules.len(), 2);
        assert_eq!(authz.rules[0].action, Action::Allow);
        assert_eq!(&*authz.rules[0].methods[0], "GET");
        assert!(authz.rules[1].dry_run);

        let errors = from_str(
            "f",
            r#"
            [inbound]
            default = "closed"
            [[inbound.rule]]
            action = "permit"
            from.principal = ["spiffe://td/x"]
            to.paths = ["orders"]
            [[inbound.rule]]
            name = "a"
            action = "deny"
            [[inbound.rule]]
            name = "a"
            action = "deny"
            ports = [0]
            [[inbound.rule]]
            name = "a"
            action = "allow"
            [[inbound.rule]]
            name = "default"
            action = "allow"
            from.principals = ["a*b"]
            "#,
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for expected in [
            "f: [inbound] default",
            "f: [inbound] rule #1 action",
            "f: [inbound] rule #1 from.principal",
            "f: [inbound] rule #1 to.paths",
            "f: [inbound] rule #1 name",
            "f: [inbound] rule #3 ports",
            "f: [inbound] rule #4 name",
            "f: [inbound] rule #5 name",
            "f: [inbound] rule #5 from.principals",
        ] {
            assert!(keys.contains(&expected), "{expected} not in {keys:?}");
        }
    }
}
