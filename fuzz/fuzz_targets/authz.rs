//! Inbound authorization rules, structure-aware: arbitrary rule sets (written as the config file
//! text an operator would write, so the parser is exercised too) against arbitrary callers.
//! Invariants: a generated file always parses; dry-run rules never change a decision; a decision
//! names a rule that exists (or `default`, `probe`) with the action it reports; opaque TCP is never
//! allowed by a rule with HTTP-only fields; and a probe from the probe networks is always
//! allowed.
#![no_main]
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sidecar::identity::SpiffeId;
use sidecar::policy::authz::{Action, Peer, Request};
use sidecar::policy::config_file;

const PRINCIPALS: &[&str] = &[
    "spiffe://td/ns/a/sa/a",
    "spiffe://td/ns/a/*",
    "*/sa/b",
    "*",
    "spiffe://td/ns/b/sa/b",
];
const IDS: &[&str] = &["spiffe://td/ns/a/sa/a", "spiffe://td/ns/b/sa/b", "spiffe://td/ns/c/sa/x"];
const NAMESPACES: &[&str] = &["a", "b", "c"];
const BLOCKS: &[&str] = &["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "::/0"];
const IPS: &[&str] = &["10.0.0.1", "10.1.2.3", "192.168.1.1", "172.16.0.1"];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];
const PATHS: &[&str] = &["/orders/*", "/admin/*", "/healthz", "/*", "/orders/1"];
const REQ_PATHS: &[&str] = &["/orders/1", "/admin/x", "/healthz", "/", "/orders"];

#[derive(Arbitrary, Debug)]
struct FuzzRule {
    deny: bool,
    dry_run: bool,
    ports: Vec<u8>,
    principals: Vec<u8>,
    namespaces: Vec<u8>,
    blocks: Vec<u8>,
    methods: Vec<u8>,
    paths: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    default: u8,
    probe_networks: Vec<u8>,
    rules: Vec<FuzzRule>,
    id: Option<u8>,
    ip: u8,
    port: u8,
    method: u8,
    path: u8,
    http: bool,
    probe: bool,
}

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

fn list(items: &[u8], vocab: &[&str]) -> String {
    let v: Vec<String> = items
        .iter()
        .take(3)
        .map(|i| format!("{:?}", pick(vocab, *i)))
        .collect();
    format!("[{}]", v.join(", "))
}

fn ports(items: &[u8]) -> Vec<u16> {
    items.iter().take(3).map(|p| 8000 + u16::from(p % 3)).collect()
}

fn write(input: &Input, skip_dry_run: bool) -> String {
    let mut t = format!(
        "[inbound]\ndefault = {:?}\nprobe_paths = [\"/healthz\"]\n",
        pick(&["allow", "deny", "authenticated"], input.default)
    );
    if !input.probe_networks.is_empty() {
        t.push_str(&format!("probe_networks = {}\n", list(&input.probe_networks, BLOCKS)));
    }
    for (i, r) in input.rules.iter().take(8).enumerate() {
        if skip_dry_run && r.dry_run {
            continue;
        }
        t.push_str(&format!(
            "[[inbound.rule]]\nname = \"r{i}\"\naction = \"{}\"\ndry_run = {}\n",
            if r.deny { "deny" } else { "allow" },
            r.dry_run
        ));
        let p = ports(&r.ports);
        if !p.is_empty() {
            t.push_str(&format!("ports = {p:?}\n"));
        }
        for (key, items, vocab) in [
            ("from.principals", &r.principals, PRINCIPALS),
            ("from.namespaces", &r.namespaces, NAMESPACES),
            ("from.ip_blocks", &r.blocks, BLOCKS),
            ("to.methods", &r.methods, METHODS),
            ("to.paths", &r.paths, PATHS),
        ] {
            if !items.is_empty() {
                t.push_str(&format!("{key} = {}\n", list(items, vocab)));
            }
        }
    }
    t
}

fuzz_target!(|input: Input| {
    let text = write(&input, false);
    let config = config_file::from_str("fuzz.toml", &text, &[])
        .unwrap_or_else(|e| panic!("a generated file was refused: {e:?}\n{text}"));
    let without_dry_run = config_file::from_str("fuzz.toml", &write(&input, true), &[])
        .expect("the same file without its dry-run rules");
    let authz = &config.inbound.authz;
    let id = input.id.map(|i| SpiffeId::parse(pick(IDS, i)).expect("a valid id"));
    let peer = Peer {
        principal: id.as_ref(),
        ip: pick(IPS, input.ip).parse().expect("an address"),
        port: 8000 + u16::from(input.port % 3),
    };
    let method = pick(METHODS, input.method);
    let path = pick(REQ_PATHS, input.path);
    let request = input.http.then_some(Request { method, path });
    let probe = input.http && input.probe && path == "/healthz" && method != "POST";
    let d = authz.decide(&peer, request.as_ref(), probe);
    // Dry-run rules never change a decision.
    let d2 = without_dry_run
        .inbound
        .authz
        .decide(&peer, request.as_ref(), probe);
    assert_eq!((d.allowed, &d.rule), (d2.allowed, &d2.rule), "{text}");
    // The deciding rule exists, with the action reported.
    match &*d.rule {
        "default" => {}
        "probe" => assert!(d.allowed && probe),
        name => {
            let rule = authz
                .rules
                .iter()
                .find(|r| &*r.name == name)
                .unwrap_or_else(|| panic!("decided by unknown rule {name}"));
            assert!(!rule.dry_run);
            assert_eq!(rule.action.as_str(), d.action);
            assert_eq!(d.allowed, rule.action == Action::Allow);
            if request.is_none() && d.allowed {
                assert!(
                    rule.methods.is_empty() && rule.paths.is_empty(),
                    "TCP allowed by a rule with HTTP fields: {text}"
                );
            }
        }
    }
    // A probe from the probe networks always passes.
    let from_probe_net = input.probe_networks.is_empty()
        || authz.probe_networks.iter().any(|c| c.contains(peer.ip));
    if probe && from_probe_net {
        assert!(d.allowed && &*d.rule == "probe", "{text}");
    }
});
