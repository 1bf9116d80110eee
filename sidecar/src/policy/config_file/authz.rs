//! The authorization keys of `[inbound]`: `default`, `expose_rule`, `probe_networks` and the
//! `[[inbound.rule]]` list (see [`crate::policy::authz`] for how they are evaluated).
//!
//! ```toml
//! [inbound]
//! default = "deny"                   # allow (no [inbound]: today's behaviour), deny, authenticated
//!
//! [[inbound.rule]]
//! name = "orders-readers"
//! action = "allow"
//! ports = [8080]
//! from.principals = ["spiffe://cluster.local/ns/shop/sa/*"]
//! to.methods = ["GET"]
//! to.paths = ["/orders/*"]
//!
//! [[inbound.rule]]
//! name = "no-admin"
//! action = "deny"
//! to.paths = ["/admin/*"]
//! ```
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `[inbound] default` | `allow`, `deny` or `authenticated` | `allow` | what applies when no rule decided; `authenticated`: clients with a mesh identity |
//! | `[inbound] expose_rule` | bool | `false` | answers carry `x-sidecar-authz-rule` naming the deciding rule |
//! | `[inbound] probe_networks` | list of CIDRs | anywhere | where the kubelet's probes (`probe_paths`) come from; set it to the node network |
//! | `rule.name` | string `[A-Za-z0-9._-]`, unique | required | the rule in metrics, logs and the access log |
//! | `rule.action` | `allow` or `deny` | required | |
//! | `rule.dry_run` | bool | `false` | evaluated and counted (`result="dry_run_deny"` / `"dry_run_allow"`), never enforced |
//! | `rule.ports` | list of ports | all | the app ports it applies to |
//! | `rule.from.principals` | list: SPIFFE ID, `prefix*`, `*suffix`, `*` | any client | the caller's verified identity (plaintext callers have none) |
//! | `rule.from.namespaces` | list of names | any | the namespace in the caller's ID (`/ns/<ns>/`) |
//! | `rule.from.ip_blocks` | list of CIDRs | any | the caller's address |
//! | `rule.to.methods` | list of methods | any | HTTP only |
//! | `rule.to.paths` | list of paths: exact, or prefix ending in `*` | any | HTTP only, without the query |
use toml::{Table, Value};

use super::values::{count, KeyError, Raw};
use crate::net::Cidr;
use crate::policy::authz::PathPattern;
use crate::policy::authz::{Action, DefaultAction, Principal, Rule, MAX_RULES};

pub(super) fn default_action(v: Raw<'_>) -> Result<DefaultAction, String> {
    match v.text().map(str::trim) {
        Some("allow") => Ok(DefaultAction::Allow),
        Some("deny") => Ok(DefaultAction::Deny),
        Some("authenticated") => Ok(DefaultAction::Authenticated),
        _ => Err("expected \"allow\", \"deny\" or \"authenticated\"".to_owned()),
    }
}

pub(super) fn boolean(v: Raw<'_>) -> Result<bool, String> {
    match v {
        Raw::Toml(Value::Boolean(b)) => Ok(*b),
        _ => match v.text().map(str::trim) {
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            _ => Err("expected true or false".to_owned()),
        },
    }
}

/// A list of strings, or one comma-separated string.
pub(super) fn strings(v: Raw<'_>) -> Result<Vec<String>, String> {
    match (v, v.text()) {
        (_, Some(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()),
        (Raw::Toml(Value::Array(items)), _) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.trim().to_owned()),
                _ => Err("expected a list of strings".to_owned()),
            })
            .collect(),
        _ => Err("expected a list of strings".to_owned()),
    }
}

pub(super) fn cidrs(v: Raw<'_>) -> Result<Vec<Cidr>, String> {
    strings(v)?.iter().map(|s| Cidr::parse(s)).collect()
}

fn ports(v: Raw<'_>) -> Result<Vec<u16>, String> {
    let one = |raw: Raw<'_>| count(raw, 1, 65_535).map(|n| n as u16);
    match v {
        Raw::Toml(Value::Array(items)) => items.iter().map(|i| one(Raw::Toml(i))).collect(),
        _ => one(v).map(|p| vec![p]),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name != "default"
        && name != "probe"
}

/// `[[inbound.rule]]` entries, each checked; every problem is reported with its rule.
pub(super) fn rules(list: &Value, label: &str, errors: &mut Vec<KeyError>) -> Vec<Rule> {
    let Value::Array(items) = list else {
        errors.push(KeyError {
            key: format!("{label} rule"),
            value: list.to_string(),
            problem: "expected [[inbound.rule]] sections (an array of tables)".to_owned(),
        });
        return Vec::new();
    };
    if items.len() > MAX_RULES {
        errors.push(KeyError {
            key: format!("{label} rule"),
            value: format!("{} rules", items.len()),
            problem: format!("at most {MAX_RULES} rules"),
        });
    }
    let mut out: Vec<Rule> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let here = format!("{label} rule #{}", i + 1);
        let Value::Table(t) = item else {
            errors.push(KeyError {
                key: here,
                value: item.to_string(),
                problem: "expected a table".to_owned(),
            });
            continue;
        };
        if let Some(rule) = rule(t, &here, errors) {
            if out.iter().any(|r| r.name == rule.name) {
                errors.push(KeyError {
                    key: format!("{here} name"),
                    value: rule.name.to_string(),
                    problem: "another rule above has the same name".to_owned(),
                });
            } else {
                out.push(rule);
            }
        }
    }
    out
}

fn rule(t: &Table, here: &str, errors: &mut Vec<KeyError>) -> Option<Rule> {
    let before = errors.len();
    let mut push = |key: &str, v: &Value, problem: String| {
        errors.push(KeyError {
            key: format!("{here} {key}"),
            value: Raw::Toml(v).shown(),
            problem,
        });
    };
    let mut name = None;
    let mut action = None;
    let mut r = Rule::new("", Action::Allow);
    for (k, v) in t {
        let raw = Raw::Toml(v);
        let result = match (k.as_str(), v) {
            ("name", _) => match v.as_str() {
                Some(n) if valid_name(n) => {
                    name = Some(n.to_owned());
                    Ok(())
                }
                _ => Err("expected a name of letters, digits, '.', '_' and '-' (not \"default\" or \"probe\")".to_owned()),
            },
            ("action", _) => match v.as_str() {
                Some("allow") => {
                    action = Some(Action::Allow);
                    Ok(())
                }
                Some("deny") => {
                    action = Some(Action::Deny);
                    Ok(())
                }
                _ => Err("expected \"allow\" or \"deny\"".to_owned()),
            },
            ("dry_run", _) => boolean(raw).map(|b| r.dry_run = b),
            ("ports", _) => ports(raw).map(|p| r.ports = p),
            ("from", Value::Table(from)) => {
                for (fk, fv) in from {
                    let raw = Raw::Toml(fv);
                    let result = match fk.as_str() {
                        "principals" => strings(raw).and_then(|list| {
                            list.iter().map(|p| Principal::parse(p)).collect::<Result<_, _>>()
                        }).map(|p| r.principals = p),
                        "namespaces" => strings(raw).and_then(|list| {
                            list.into_iter()
                                .map(|n| {
                                    if !n.is_empty() && n.len() <= 63 && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                                        Ok(n.into_boxed_str())
                                    } else {
                                        Err(format!("{n:?} is not a namespace name"))
                                    }
                                })
                                .collect::<Result<_, _>>()
                        }).map(|n| r.namespaces = n),
                        "ip_blocks" => cidrs(raw).map(|c| r.ip_blocks = c),
                        _ => Err(unknown(fk, &["principals", "namespaces", "ip_blocks"])),
                    };
                    if let Err(problem) = result {
                        push(&format!("from.{fk}"), fv, problem);
                    }
                }
                Ok(())
            }
            ("to", Value::Table(to)) => {
                for (tk, tv) in to {
                    let raw = Raw::Toml(tv);
                    let result = match tk.as_str() {
                        "methods" => strings(raw).and_then(|list| {
                            list.into_iter()
                                .map(|m| {
                                    let upper = m.to_ascii_uppercase();
                                    if !upper.is_empty() && upper.bytes().all(|b| b.is_ascii_uppercase()) {
                                        Ok(upper.into_boxed_str())
                                    } else {
                                        Err(format!("{m:?} is not a method"))
                                    }
                                })
                                .collect::<Result<_, _>>()
                        }).map(|m| r.methods = m),
                        "paths" => strings(raw).and_then(|list| {
                            list.iter().map(|p| PathPattern::parse(p)).collect::<Result<_, _>>()
                        }).map(|p| r.paths = p),
                        _ => Err(unknown(tk, &["methods", "paths"])),
                    };
                    if let Err(problem) = result {
                        push(&format!("to.{tk}"), tv, problem);
                    }
                }
                Ok(())
            }
            ("from" | "to", _) => Err(format!("expected a table: {k}.<key> = ...")),
            _ => Err(unknown(k, &["name", "action", "dry_run", "ports", "from", "to"])),
        };
        if let Err(problem) = result {
            push(k, v, problem);
        }
    }
    match &name {
        Some(n) => r.name = n.as_str().into(),
        None => push(
            "name",
            &Value::String(String::new()),
            "missing; every rule needs a name".to_owned(),
        ),
    }
    match action {
        Some(a) => r.action = a,
        None => push(
            "action",
            &Value::String(String::new()),
            "missing; \"allow\" or \"deny\"".to_owned(),
        ),
    }
    (errors.len() == before).then_some(r)
}

pub(super) fn unknown(key: &str, valid: &[&str]) -> String {
    match crate::config_errors::nearest(valid.iter().copied(), key) {
        Some(near) => format!("unknown key; did you mean {near}?"),
        None => format!("unknown key; valid keys here: {}", valid.join(", ")),
    }
}
