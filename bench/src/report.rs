//! The report: the machine, every scenario row beside its baseline, the
//! footprint of each service start and the scaling table; printed as text
//! tables or as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    postgres::{PgCost, Store, Stores},
    scenario::scaling::ScaleRow,
    stats::Row,
    system::Footprint,
};

/// What the numbers were measured on.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Machine {
    /// Logical CPUs.
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// MemTotal, MiB.
    pub memory_mib: u64,
    /// 1-minute load average when the run started.
    pub load_start: f64,
    /// 1-minute load average when it ended.
    pub load_end: f64,
    /// Which build profile the services ran in.
    pub profile: String,
    /// Where each service kept its state.
    pub stores: Stores,
}

impl Machine {
    /// Reads /proc.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024;
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_mib,
            load_start: load_average(),
            load_end: 0.0,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
            stores: Stores::default(),
        }
    }
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// Load scenarios and their baselines.
    pub scenarios: Vec<Row>,
    /// Service starts.
    pub footprint: Vec<Footprint>,
    /// Audit log at growing sizes.
    pub scaling: Vec<ScaleRow>,
    /// What the PostgreSQL server did in each scenario (`--store postgres`).
    pub postgres: Vec<PgCost>,
}

fn n(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// The report as Markdown tables (what docs/BENCHMARKS.md quotes).
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "machine: {} CPUs, {}, {} MiB; load {:.2} → {:.2}; services: {} build; \
             stores: audit {}, vault {}, broker {}\n",
            m.nproc,
            m.cpu,
            m.memory_mib,
            m.load_start,
            m.load_end,
            m.profile,
            // The audit service's own store on sled's side is its tiles.
            match m.stores.audit {
                Store::Sled => "tiles",
                Store::Postgres => "postgres",
            },
            m.stores.vault.name(),
            m.stores.broker.name(),
        );
        if !self.scenarios.is_empty() {
            s.push_str("| scenario | in flight | ok | errors | per s | p50 µs | p99 µs | p99.9 µs | target |\n");
            s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
            for r in &self.scenarios {
                let name = if r.baseline {
                    format!("{}: {} *(baseline)*", r.group, r.name)
                } else {
                    format!("{}: {}", r.group, r.name)
                };
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.concurrency,
                    r.ok,
                    r.errors,
                    n(r.per_second),
                    n(r.p50_us),
                    n(r.p99_us),
                    n(r.p999_us),
                    r.target
                );
            }
            s.push('\n');
        }
        if !self.postgres.is_empty() {
            s.push_str("| PostgreSQL in | operations | WAL flushes | per operation | transactions per database (per operation) |\n");
            s.push_str("|---|---:|---:|---:|---|\n");
            for c in &self.postgres {
                let per = |v: u64| n(v as f64 / c.count.max(1) as f64);
                let commits: Vec<String> = c
                    .commits
                    .iter()
                    .map(|(db, v)| format!("{db} {v} ({})", per(*v)))
                    .collect();
                let _ = writeln!(
                    s,
                    "| {}: {} | {} | {} | {} | {} |",
                    c.group,
                    c.operations,
                    c.count,
                    c.wal_syncs,
                    per(c.wal_syncs),
                    commits.join(", ")
                );
            }
            s.push('\n');
        }
        if !self.footprint.is_empty() {
            s.push_str("| service | holding | to listening ms | to first RPC ms | idle RSS MiB | RSS after load MiB |\n");
            s.push_str("|---|---|---:|---:|---:|---:|\n");
            for f in &self.footprint {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    f.service,
                    f.condition,
                    n(f.listening_ms),
                    n(f.first_rpc_ms),
                    n(f.idle_rss_mib),
                    if f.loaded_rss_mib > 0.0 {
                        n(f.loaded_rss_mib)
                    } else {
                        "–".into()
                    }
                );
            }
            s.push('\n');
        }
        if !self.scaling.is_empty() {
            s.push_str("| entries | disk MiB | disk bytes/entry | Append/s | Append p99 µs | checkpoint p50/p99 µs | inclusion p50/p99 µs | consistency p50/p99 µs | errors |\n");
            s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for r in &self.scaling {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} |",
                    r.entries,
                    n(r.disk_mib),
                    n(r.disk_bytes_per_entry),
                    n(r.append_per_s),
                    n(r.append_p99_us),
                    n(r.checkpoint_p50_us),
                    n(r.checkpoint_p99_us),
                    n(r.inclusion_p50_us),
                    n(r.inclusion_p99_us),
                    n(r.consistency_p50_us),
                    n(r.consistency_p99_us),
                    r.errors
                );
            }
            s.push_str(
                "\nQuery, first page of 100, p50 / p99 µs (mean entries on it):\n\n| entries |",
            );
            for by in crate::scenario::scaling::QUERY_KINDS {
                let _ = write!(s, " by {by} |");
            }
            s.push_str("\n|---:|");
            s.push_str(&"---:|".repeat(crate::scenario::scaling::QUERY_KINDS.len()));
            s.push('\n');
            for r in &self.scaling {
                let _ = write!(s, "| {} |", r.entries);
                for by in crate::scenario::scaling::QUERY_KINDS {
                    match r.query(by) {
                        Some(q) => {
                            let _ = write!(
                                s,
                                " {} / {} ({}) |",
                                n(q.p50_us),
                                n(q.p99_us),
                                n(q.mean_entries)
                            );
                        }
                        None => s.push_str(" – |"),
                    }
                }
                s.push('\n');
            }
        }
        s
    }
}
