//! `GET /config`: the configuration in force, as bound (listener ports resolved), as JSON.
use std::net::SocketAddr;

use super::settings::Settings;
use crate::policy::{Policies, PolicyConfig};
use crate::proxy::{self, Target};
use crate::reload::Reloader;
use crate::units::fmt_duration;

/// The policies in force: defaults and the destination rules (of `--config`).
fn policy_json(policy: &PolicyConfig) -> serde_json::Value {
    let one = |p: &crate::policy::DestinationPolicy| {
        serde_json::json!({
            "connect_timeout": fmt_duration(p.connect_timeout),
            "request_timeout": fmt_duration(p.request_timeout),
            "idle_timeout": fmt_duration(p.idle_timeout),
            "max_connections": p.max_connections,
            "breaker": {
                "consecutive_failures": p.breaker.consecutive_failures,
                "failure_rate": p.breaker.failure_rate,
                "failure_rate_window": fmt_duration(p.breaker.failure_rate_window),
                "failure_rate_min_requests": p.breaker.failure_rate_min_requests,
                "open_time": fmt_duration(p.breaker.open_time),
                "max_open_time": fmt_duration(p.breaker.max_open_time),
                "half_open_probes": p.breaker.half_open_probes,
                "failure_on": p.failure_on.describe(),
            },
            "retry": {
                "max_retries": p.retry.max_retries,
                "on": p.retry.on.describe(),
                "budget_ratio": p.retry.budget.ratio,
                "budget_min_per_second": p.retry.budget.min_per_second,
                "budget_window": fmt_duration(p.retry.budget.window),
                "max_body_bytes": p.retry.max_body_bytes,
                "backoff": fmt_duration(p.retry.backoff),
            },
            "mtls": p.mtls.as_str(),
            "server_identities": p.server_identities.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        })
    };
    let destinations: Vec<_> = policy
        .destinations
        .iter()
        .map(|rule| {
            let mut v = one(&rule.policy);
            v["match"] = serde_json::Value::String(rule.matcher.to_string());
            v
        })
        .collect();
    let mesh = &policy.mesh;
    let inbound = &policy.inbound;
    serde_json::json!({
        "defaults": one(&policy.defaults),
        "destinations": destinations,
        "mtls": {
            "mesh_networks": mesh.networks.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "fallback_ttl": fmt_duration(mesh.fallback_ttl),
            "expiry_margin": fmt_duration(mesh.expiry_margin),
        },
        "inbound": {
            "mtls": inbound.mtls.as_str(),
            "ports": inbound.ports.iter().map(|(p, m)| (p.to_string(), serde_json::Value::from(m.as_str()))).collect::<serde_json::Map<_, _>>(),
            "probe_paths": inbound.probe_paths.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "default": inbound.authz.default.as_str(),
            "expose_rule": inbound.authz.expose_rule,
            "probe_networks": inbound.authz.probe_networks.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "rules": inbound.authz.rules.iter().map(|r| serde_json::json!({
                "name": &*r.name,
                "action": r.action.as_str(),
                "dry_run": r.dry_run,
                "ports": r.ports,
                "from": {
                    "principals": r.principals.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "namespaces": r.namespaces.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                    "ip_blocks": r.ip_blocks.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                },
                "to": {
                    "methods": r.methods.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                    "paths": r.paths.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                },
            })).collect::<Vec<_>>(),
        },
        "transcode": policy.transcode.iter().map(|t| {
            let s = t.settings();
            serde_json::json!({
                "port": s.port,
                "descriptor_set": s.descriptor_set.display().to_string(),
                "descriptor_set_sha256": t.digest_hex(),
                "services": s.services,
                "unknown_fields": s.unknown_fields.as_str(),
                "json_names": s.json_names.as_str(),
                "print_defaults": s.print_defaults,
                "max_body_bytes": s.max_body_bytes,
                "max_message_bytes": s.max_message_bytes,
                "unmatched": s.unmatched.as_str(),
                "routes": t.routes().iter().map(|r| serde_json::json!({
                    "http": r.pattern,
                    "grpc": &*r.grpc_path,
                    "server_streaming": r.server_streaming(),
                })).collect::<Vec<_>>(),
                "skipped": t.skipped(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// `/config`: the configuration in force, as bound (listener ports resolved).
pub fn config_json(settings: &Settings, proxy: &proxy::Proxy) -> serde_json::Value {
    let p = &settings.proxy;
    let life = &settings.lifecycle;
    let addrs = |a: &[SocketAddr]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
    serde_json::json!({
        "mode": if p.target.is_some() { "target" } else { "intercept" },
        "outbound": addrs(proxy.local_addrs()),
        "inbound": addrs(proxy.inbound_addrs()),
        "target": p.target.as_ref().map(Target::as_str),
        "service_name": p.service_name,
        "connect_timeout": fmt_duration(p.policy.defaults.connect_timeout),
        "request_timeout": fmt_duration(p.policy.defaults.request_timeout),
        "policy": policy_json(&p.policy),
        "detect_timeout": fmt_duration(p.detect_timeout),
        "pool_idle_timeout": fmt_duration(p.pool_idle_timeout),
        "header_timeout": fmt_duration(p.http.header_timeout),
        "max_header_bytes": p.http.max_header_bytes,
        "http2_max_concurrent_streams": p.http.h2_max_concurrent_streams,
        "http2_keepalive": fmt_duration(p.http.h2_keepalive),
        "http2_idle_timeout": fmt_duration(p.http.h2_idle_timeout),
        "park_idle_after": fmt_duration(p.http.park_idle_after.unwrap_or_default()),
        "max_downstream_connections": p.max_connections,
        "inbound_max_connections": p.inbound_max_connections,
        "workers": settings.workers,
        "drain_timeout": fmt_duration(settings.drain_timeout),
        "drain_min": fmt_duration(life.drain_min),
        "admin": life.admin.iter().map(|l| l.addr.to_string()).collect::<Vec<_>>(),
        "readiness": {
            "listeners": "required",
            "interception": match &life.pin_dir {
                Some(dir) => format!("required: link pins in {}", dir.display()),
                None => "not checked (no --pin-dir)".to_owned(),
            },
            "app": match &life.app_probe {
                Some(probe) => format!("required: {probe}"),
                None => "not checked (no --app-probe)".to_owned(),
            },
            "interval": fmt_duration(life.probe_interval),
        },
        "ebpf_counters": match &life.pin_dir {
            Some(dir) => format!("exported when readable: {}", crate::pins::map(dir, sidecar_common::maps::STATS).display()),
            None => "not exported (no --pin-dir)".to_owned(),
        },
        "exit_with_app": life.exit_with_app.as_ref().map(ToString::to_string),
        "shutdown_file": life.shutdown_file.as_ref().map(|p| p.display().to_string()),
        "access_log": life.access_log,
        "max_destinations": life.max_destinations,
        "logs": settings.logs.as_ref().map(|l| serde_json::json!({
            "file": l.file.display().to_string(),
            // Anyone who reaches the admin port reads this: no credentials, no tokens.
            "endpoint": crate::units::redact_url(&l.endpoint.to_string()),
            "service": l.service,
            "checkpoint": l.checkpoint.display().to_string(),
        })),
        "log_format": settings.log_format.as_str(),
        "log_filter": settings.log_filter,
    })
}

/// `/config` now: `base` ([`config_json`] at start) with the policies in force and the state of
/// the config file (hash, load time, last error, where each default comes from).
pub fn current(
    base: &serde_json::Value,
    policies: &Policies,
    reloader: &Reloader,
) -> serde_json::Value {
    let mut v = base.clone();
    let config = policies.config();
    v["policy"] = policy_json(config);
    v["connect_timeout"] = fmt_duration(config.defaults.connect_timeout).into();
    v["request_timeout"] = fmt_duration(config.defaults.request_timeout).into();
    v["config_file"] = reloader.status_json();
    v["identity"] = v["config_file"]["identity"].take();
    v
}
