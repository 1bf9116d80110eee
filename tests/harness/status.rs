//! `sidecar status --json`, parsed: what the sidecar says is attached for a pod, the configuration
//! it reads back from the kernel, and the kernel counters. Tests compare it with bpftool's view
//! (see `bpf`) and with the traffic they generated.
use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole `sidecar status --json` document.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub pin_dir: String,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub programs: Vec<ProgramStatus>,
    pub config: BTreeMap<String, String>,
    pub counters: Counters,
}

/// One attached program, as `sidecar status` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: String,
    pub attach: String,
    pub link_id: u64,
    pub prog_id: u64,
    /// "cgroup <id>", "netns <inode>", or "detached ..." when the target is gone.
    pub target: String,
}

impl Status {
    /// The program called `name`; panics, listing what is there, when it is missing.
    pub fn program(&self, name: &str) -> &ProgramStatus {
        self.programs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("sidecar status lists no {name}: {:#?}", self.programs))
    }

    /// A configuration value; panics, listing what is there, when the key is missing.
    pub fn config(&self, key: &str) -> &str {
        self.config
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("sidecar status has no config {key:?}: {:#?}", self.config))
    }
}

/// Kernel counters by name (`sidecar_common::stats::NAMES`), summed over CPUs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// The counter `name`. Panics on a name the sidecar does not report, so that a typo in a test
    /// cannot read as "stayed at zero".
    pub fn get(&self, name: &str) -> u64 {
        match self.0.get(name) {
            Some(v) => *v,
            None => panic!(
                "no counter {name:?}; the sidecar reports {:?}",
                self.0.keys().collect::<Vec<_>>()
            ),
        }
    }

    /// How much each counter moved since `before` (counters only grow while the maps live).
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, v)| {
                    let base = before.0.get(k).copied().unwrap_or(0);
                    (k.clone(), v.saturating_sub(base))
                })
                .collect(),
        )
    }

    /// The counters that are not zero, for assertion messages.
    pub fn nonzero(&self) -> BTreeMap<&str, u64> {
        self.0
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.as_str(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_subtract_per_name() {
        let before = Counters([("a".to_string(), 2), ("b".to_string(), 5)].into());
        let after = Counters([("a".to_string(), 3), ("b".to_string(), 5)].into());
        let moved = after.since(&before);
        assert_eq!(moved.get("a"), 1);
        assert_eq!(moved.get("b"), 0);
        assert_eq!(moved.nonzero(), [("a", 1)].into());
    }

    #[test]
    fn status_json_parses() {
        let json = r#"{"pin_dir":"/p","cgroup":"/c","cgroup_id":7,
            "programs":[{"name":"sc_sk_lookup","attach":"sk_lookup (netns)","link_id":1,"prog_id":2,"target":"netns 9"}],
            "config":{"inbound_port":"15006"},"counters":{"redirected":4}}"#;
        let status: Status = serde_json::from_str(json).expect("parse");
        assert_eq!(status.program("sc_sk_lookup").target, "netns 9");
        assert_eq!(status.config("inbound_port"), "15006");
        assert_eq!(status.counters.get("redirected"), 4);
    }
}
