//! What the bench reads from /proc and cgroupfs: the processes of a target (its cgroup), their
//! CPU time (the cgroup's `cpu.stat` `usage_usec`) and resident memory, and TCP counters of a
//! network namespace.

use std::fs;
use std::path::Path;

/// Pids in one cgroup (not its descendants: each target has a leaf cgroup of its own).
pub fn cgroup_pids(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// CPU time of everything in a cgroup, in µs (`usage_usec` of its `cpu.stat`: the scheduler's
/// run time, all threads, exited ones included). Not utime + stime: with tick-based accounting
/// (`CONFIG_TICK_CPU_ACCOUNTING`, 250 Hz here) those charge a whole 4 ms tick to whatever runs
/// when it fires, which at 1k req/s (about 60 µs of work per millisecond) samples the proxy a few
/// hundred times a phase and can lock onto the load generator's 1 ms period.
pub fn cpu_usec(cgroup: &Path) -> Option<u64> {
    let stat = fs::read_to_string(cgroup.join("cpu.stat")).ok()?;
    parse_usage_usec(&stat)
}

fn parse_usage_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// VmRSS of a process in KiB (0 for kernel threads or a process that just exited).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Pss of a process in KiB (smaps_rollup): its resident pages, each shared page divided by the
/// number of processes sharing it. Summed over nginx's master and worker it counts their shared
/// pages once, where summed RSS counts them twice.
pub fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A snapshot of a cgroup's processes: CPU time and memory, summed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_usec: u64,
    pub rss_kib: u64,
    pub processes: usize,
}

pub fn usage(cgroup: &Path) -> Usage {
    let pids = cgroup_pids(cgroup);
    Usage {
        cpu_usec: cpu_usec(cgroup).unwrap_or(0),
        rss_kib: pids.iter().map(|&p| rss_kib(p)).sum(),
        processes: pids.len(),
    }
}

/// Summed Pss of a cgroup's processes (slower to read than RSS: read once per phase).
pub fn pss_total_kib(cgroup: &Path) -> u64 {
    cgroup_pids(cgroup).iter().map(|&p| pss_kib(p)).sum()
}

/// TCP counters of the network namespace `pid` lives in: `Tcp:` from net/snmp and `TcpExt:` from
/// net/netstat, looked up by name.
#[derive(Debug, Clone, Default)]
pub struct TcpCounters {
    pairs: Vec<(String, u64)>,
}

impl TcpCounters {
    pub fn read(pid: u32) -> TcpCounters {
        let mut pairs = Vec::new();
        for (file, prefix) in [("snmp", "Tcp:"), ("netstat", "TcpExt:")] {
            let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
            pairs.extend(parse_counter_table(&text, prefix));
        }
        TcpCounters { pairs }
    }

    pub fn get(&self, name: &str) -> u64 {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v)
    }

    /// `later - self` for one counter (counters only grow; saturate if the namespace changed).
    pub fn delta(&self, later: &TcpCounters, name: &str) -> u64 {
        later.get(name).saturating_sub(self.get(name))
    }
}

/// /proc/net/snmp and netstat come as pairs of lines: "Tcp: Name1 Name2 ..." then
/// "Tcp: 1 2 ...".
fn parse_counter_table(text: &str, prefix: &str) -> Vec<(String, u64)> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    let mut out = Vec::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            // Some Tcp: values are signed (MaxConn -1); those are not counters we read.
            if let Ok(v) = v.parse() {
                out.push((n.to_string(), v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat_gives_the_usage() {
        assert_eq!(parse_usage_usec("user_usec 1\nusage_usec 77\n"), Some(77));
        assert_eq!(parse_usage_usec("nr_periods 0\n"), None);
    }

    #[test]
    fn counter_tables_pair_names_with_values() {
        let text = "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm MaxConn PassiveOpens\nTcp: 1 -1 17\n";
        let c = parse_counter_table(text, "Tcp:");
        assert_eq!(
            c,
            vec![("RtoAlgorithm".into(), 1), ("PassiveOpens".into(), 17)]
        );
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        assert!(!own.is_empty());
        assert!(rss_kib(pid) > 0);
        assert!(TcpCounters::read(pid).pairs.len() > 5);
    }
}
