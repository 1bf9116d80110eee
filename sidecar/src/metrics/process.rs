//! `process_*` metrics (the names every Prometheus client library uses), read from `/proc/self` at
//! scrape time. Written here rather than enabling the prometheus crate's `process` feature, which
//! pulls in `procfs` and its dependencies for the same half-dozen numbers.
use std::fs;
use std::sync::OnceLock;

use prometheus::core::{Collector, Desc};
use prometheus::{Counter, IntGauge, Opts};

pub struct ProcessCollector {
    descs: Vec<Desc>,
    cpu: Counter,
    rss: IntGauge,
    vsize: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    start_time: IntGauge,
    threads: IntGauge,
}

impl ProcessCollector {
    pub fn new() -> Result<ProcessCollector, prometheus::Error> {
        let gauge = |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help));
        let cpu = Counter::with_opts(Opts::new(
            "process_cpu_seconds_total",
            "User and system CPU time spent, in seconds",
        ))?;
        let rss = gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
        )?;
        let vsize = gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
        )?;
        let open_fds = gauge("process_open_fds", "Open file descriptors")?;
        let max_fds = gauge("process_max_fds", "Limit of open file descriptors (soft)")?;
        let start_time = gauge(
            "process_start_time_seconds",
            "Start time of the process, seconds since the Unix epoch",
        )?;
        let threads = gauge("process_threads", "OS threads of the process")?;
        if let (Some(stat), Some(boot)) = (Stat::read(), boot_time()) {
            start_time.set(boot + stat.start_ticks / clock_ticks());
        }
        let mut descs = Vec::new();
        descs.extend(cpu.desc().into_iter().cloned());
        for g in [&rss, &vsize, &open_fds, &max_fds, &start_time, &threads] {
            descs.extend(g.desc().into_iter().cloned());
        }
        Ok(ProcessCollector {
            descs,
            cpu,
            rss,
            vsize,
            open_fds,
            max_fds,
            start_time,
            threads,
        })
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = Vec::new();
        if let Some(stat) = Stat::read() {
            let total = (stat.utime + stat.stime) as f64 / clock_ticks() as f64;
            // A counter can only go up: add the difference to what was reported last time.
            let delta = total - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            families.extend(self.cpu.collect());
            self.rss.set(stat.rss_pages.saturating_mul(page_size()));
            self.vsize.set(stat.vsize);
            self.threads.set(stat.threads);
            families.extend(self.rss.collect());
            families.extend(self.vsize.collect());
            families.extend(self.threads.collect());
        }
        if let Ok(dir) = fs::read_dir("/proc/self/fd") {
            // Minus the descriptor read_dir itself holds open.
            self.open_fds.set((dir.count() as i64 - 1).max(0));
            families.extend(self.open_fds.collect());
        }
        if let Some(max) = max_open_files() {
            self.max_fds.set(max);
            families.extend(self.max_fds.collect());
        }
        families.extend(self.start_time.collect());
        families
    }
}

/// The fields of `/proc/self/stat` we report.
#[derive(Debug, PartialEq)]
struct Stat {
    utime: i64,
    stime: i64,
    threads: i64,
    start_ticks: i64,
    vsize: i64,
    rss_pages: i64,
}

impl Stat {
    fn read() -> Option<Stat> {
        Stat::parse(&fs::read_to_string("/proc/self/stat").ok()?)
    }

    /// Fields after the command name (which may contain spaces and parentheses, hence the search
    /// for the last ')'), numbered as in proc(5): state is field 3.
    fn parse(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<i64> { fields.get(n - 3)?.parse().ok() };
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

fn clock_ticks() -> i64 {
    static TICKS: OnceLock<i64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *TICKS.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n,
        _ => 100,
    })
}

fn page_size() -> i64 {
    static PAGE: OnceLock<i64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n,
        _ => 4096,
    })
}

/// `btime` of /proc/stat: boot time, seconds since the epoch.
fn boot_time() -> Option<i64> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_open_files() -> Option<i64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    i64::try_from(limit.rlim_cur).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let line = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 5 0 1234 \
                    10485760 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                utime: 7,
                stime: 3,
                threads: 5,
                start_ticks: 1234,
                vsize: 10485760,
                rss_pages: 300,
            })
        );
    }

    #[test]
    fn collects_this_process() {
        let c = ProcessCollector::new().unwrap();
        let names: Vec<String> = c.collect().iter().map(|f| f.name().to_owned()).collect();
        for want in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(c.rss.get() > 0);
    }
}
