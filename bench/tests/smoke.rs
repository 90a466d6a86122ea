//! CI-sized run of every load scenario against the real service binaries:
//! a few dozen operations each, seconds in total. Asserts that every
//! operation succeeded and the report has every field; never asserts on
//! timings.

use clap::Parser;
use twokey_bench::{Options, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_at_ci_scale() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("scaling.png");
    let opts = Options::parse_from([
        "twokey-bench",
        "all",
        "--scale",
        "ci",
        "--time-limit",
        "120",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let sizes = opts.sizes();
    let report = run(&opts).await.expect("bench run");

    let names: Vec<&str> = report.scenarios.iter().map(|r| r.name.as_str()).collect();
    for want in [
        twokey_bench::scenario::vault::BARE_STATUS,
        "Status (empty mTLS round trip)",
        "GenerateCode (signed grant, audit ack)",
        "Append, 1 source × 1 in flight (one sync per event)",
        "Append, 8 sources × 64 in flight (group commit)",
        "5 × broker WhoAmI (the flow's 5 round trips)",
        "create → approve → PIN → verify → release",
        "Enroll (fills the vault)",
    ] {
        assert!(names.contains(&want), "missing scenario {want}: {names:?}");
    }
    for r in &report.scenarios {
        assert_eq!(r.errors, 0, "{}: {} failed", r.name, r.errors);
        assert!(r.ok > 0, "{}: nothing measured", r.name);
        assert!(r.per_second > 0.0 && r.p50_us > 0.0, "{}: {r:?}", r.name);
        assert!(r.p99_us >= r.p50_us && r.p999_us >= r.p99_us, "{r:?}");
    }
    let count = |name: &str| {
        report
            .scenarios
            .iter()
            .filter(|r| r.name == name)
            .map(|r| r.ok)
            .sum::<usize>()
    };
    assert_eq!(count("GenerateCode (signed grant, audit ack)"), sizes.codes);
    assert_eq!(
        count("Append, 8 sources × 64 in flight (group commit)"),
        8 * sizes.appends
    );
    assert_eq!(
        count("create → approve → PIN → verify → release"),
        sizes.flows + sizes.concurrent_flows
    );

    let services: Vec<(&str, &str)> = report
        .footprint
        .iter()
        .map(|f| (f.service.as_str(), f.condition.as_str()))
        .collect();
    for svc in ["twokey-audit", "twokey-vault", "twokey-broker"] {
        assert!(services.contains(&(svc, "empty")), "{services:?}");
    }
    assert!(
        services
            .iter()
            .any(|(s, c)| *s == "twokey-vault" && c.ends_with("accounts"))
    );
    for f in &report.footprint {
        assert!(f.idle_rss_mib > 0.0 && f.first_rpc_ms > 0.0, "{f:?}");
    }

    assert_eq!(report.scaling.len(), sizes.sizes.len());
    for (row, size) in report.scaling.iter().zip(&sizes.sizes) {
        assert_eq!(row.errors, 0, "{row:?}");
        assert_eq!(row.entries, *size, "{row:?}");
        assert!(
            row.append_per_s > 0.0 && row.checkpoint_p50_us > 0.0,
            "{row:?}"
        );
        assert!(row.inclusion_p50_us > 0.0, "{row:?}");
        assert!(row.disk_bytes_per_entry > 0.0, "{row:?}");
        for by in twokey_bench::scenario::scaling::QUERY_KINDS {
            let q = row
                .query(by)
                .unwrap_or_else(|| panic!("no query by {by}: {row:?}"));
            assert!(q.p99_us >= q.p50_us && q.p50_us > 0.0, "{q:?}");
            // Every kind but the time range matches a fill event by construction.
            if by != "time range" {
                assert!(q.mean_entries >= 1.0, "{q:?}");
            }
        }
    }

    let json = serde_json::to_value(&report).unwrap();
    for key in ["machine", "scenarios", "footprint", "scaling"] {
        assert!(json.get(key).is_some(), "JSON lacks {key}");
    }
    for key in ["p50_us", "p99_us", "p999_us", "per_second", "baseline"] {
        assert!(json["scenarios"][0].get(key).is_some(), "row lacks {key}");
    }
    assert!(report.table().contains("| scenario |"));
    assert!(std::fs::read(&plot).unwrap().starts_with(b"\x89PNG"));
}

/// The same load scenarios with every service on one throwaway PostgreSQL
/// (`--store postgres`, init.sql's databases and roles): every operation
/// succeeds and the report says where the state was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_scenarios_run_on_postgres() {
    let opts = Options::parse_from([
        "twokey-bench",
        "vault,audit,flow",
        "--scale",
        "ci",
        "--store",
        "postgres",
        "--codes",
        "16",
        "--flows",
        "4",
        "--concurrent-flows",
        "8",
        "--time-limit",
        "120",
    ]);
    let sizes = opts.sizes();
    let report = run(&opts).await.expect("bench run on PostgreSQL");
    assert_eq!(
        report.machine.stores,
        twokey_bench::Stores::all(twokey_bench::Store::Postgres)
    );
    assert!(
        report
            .table()
            .contains("stores: audit postgres, vault postgres, broker postgres")
    );
    for r in &report.scenarios {
        assert_eq!(r.errors, 0, "{}: {} failed", r.name, r.errors);
        assert!(r.ok > 0, "{}: nothing measured", r.name);
    }
    let count = |name: &str| {
        report
            .scenarios
            .iter()
            .filter(|r| r.name == name)
            .map(|r| r.ok)
            .sum::<usize>()
    };
    assert_eq!(count("GenerateCode (signed grant, audit ack)"), sizes.codes);
    assert_eq!(
        count("Append, 8 sources × 64 in flight (group commit)"),
        8 * sizes.appends
    );
    assert_eq!(
        count("create → approve → PIN → verify → release"),
        sizes.flows + sizes.concurrent_flows
    );
    // What the server did: every scenario committed in its databases, and
    // each code and flow flushed the WAL at least once.
    let groups: Vec<&str> = report.postgres.iter().map(|c| c.group.as_str()).collect();
    assert_eq!(groups, ["vault", "audit", "flow"]);
    for c in &report.postgres {
        assert!(c.wal_syncs > 0, "{c:?}");
        let commits = |db: &str| {
            c.commits
                .iter()
                .find(|(d, _)| d == db)
                .map_or(0, |(_, n)| *n)
        };
        assert!(commits("twokey_audit") > 0, "{c:?}");
        if c.group != "audit" {
            assert!(c.wal_syncs as usize >= c.count, "{c:?}");
            assert!(commits("twokey_vault") as usize >= c.count, "{c:?}");
        }
    }
    let services: Vec<&str> = report
        .footprint
        .iter()
        .map(|f| f.service.as_str())
        .collect();
    assert_eq!(services, ["twokey-audit", "twokey-vault", "twokey-broker"]);
}
