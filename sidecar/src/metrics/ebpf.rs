//! `sidecar_ebpf_events_total{counter}`: the kernel programs' per-CPU counters (the ones
//! `sidecar status` shows), read from the pod's pinned stats map at scrape time.
//!
//! The proxy runs as UID 1337 without capabilities. Since Linux 6.5 opening a pinned map and
//! reading it need no capability, only read permission on the pin: the map is opened read-only
//! (`BPF_F_RDONLY`), so a pin of mode 0444 (or 0644) is enough. When the map cannot be read the
//! counters are simply not exported, and why is logged once.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use aya::maps::{Map, MapData, PerCpuArray};
use prometheus::core::{Collector, Desc};
use prometheus::{IntCounterVec, Opts};
use sidecar_common::{maps, stats};

pub struct EbpfCollector {
    path: PathBuf,
    counters: IntCounterVec,
    /// The kernel's totals at the last scrape: a re-run of `sidecar init` that cannot keep the
    /// map (a new layout) pins a fresh one whose counts start again at zero, and a Prometheus
    /// counter must not go down.
    last: Mutex<[u64; stats::COUNT as usize]>,
    warned: AtomicBool,
}

impl EbpfCollector {
    /// Reads `<pin_dir>/map_SC_STATS`.
    pub fn new(pin_dir: &Path) -> Result<EbpfCollector, prometheus::Error> {
        let counters = IntCounterVec::new(
            Opts::new(
                "sidecar_ebpf_events_total",
                "Kernel-side interception events of this pod (see `sidecar status`)",
            ),
            &["counter"],
        )?;
        Ok(EbpfCollector {
            path: crate::pins::map(pin_dir, maps::STATS),
            counters,
            last: Mutex::new([0; stats::COUNT as usize]),
            warned: AtomicBool::new(false),
        })
    }

    /// The kernel's current totals, summed over CPUs.
    pub fn read(&self) -> Result<[u64; stats::COUNT as usize], String> {
        read_stats(&self.path)
    }
}

/// The pinned stats map at `path`: the kernel's totals, summed over CPUs.
pub fn read_stats(path: &Path) -> Result<[u64; stats::COUNT as usize], String> {
    let fd = crate::bpf::obj_get_rdonly(path).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) => {
                " (the proxy may read it if the pin is world-readable: chmod 0444)"
            }
            Some(libc::EPERM) => " (this kernel needs CAP_BPF to open pinned maps; 6.5+ does not)",
            Some(libc::ENOENT) => " (has `sidecar init` run for this pod?)",
            _ => "",
        };
        format!("cannot open {}: {e}{hint}", path.display())
    })?;
    let map = MapData::from_fd(fd)
        .and_then(Map::from_map_data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let array: PerCpuArray<MapData, u64> = map
        .try_into()
        .map_err(|e| format!("{}: not the stats map: {e}", path.display()))?;
    let mut totals = [0u64; stats::COUNT as usize];
    for (i, total) in totals.iter_mut().enumerate() {
        *total = array
            .get(&(i as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .map_err(|e| format!("read {}: {e}", path.display()))?;
    }
    Ok(totals)
}

impl Collector for EbpfCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.counters.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let totals = match self.read() {
            Ok(t) => t,
            Err(why) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        reason = %why,
                        "kernel counters are not exported (sidecar_ebpf_events_total); logged once"
                    );
                }
                return Vec::new();
            }
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, name) in stats::NAMES.iter().enumerate() {
            let Ok(counter) = self.counters.get_metric_with_label_values(&[name]) else {
                continue;
            };
            // Below the last reading means a fresh map (init re-ran): everything is new.
            let delta = totals[i].checked_sub(last[i]).unwrap_or(totals[i]);
            counter.inc_by(delta);
            last[i] = totals[i];
        }
        self.counters.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_map_exports_nothing_and_says_why() {
        let c = EbpfCollector::new(Path::new("/nonexistent/sidecar-pins")).unwrap();
        assert!(c.collect().is_empty());
        let why = c.read().unwrap_err();
        assert!(why.contains("map_SC_STATS"), "{why}");
    }
}
