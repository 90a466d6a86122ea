//! twokey-bench: load scenarios that drive the real `twokey-audit`,
//! `twokey-vault` and `twokey-broker` processes over mTLS on loopback, each
//! beside its baseline in the same run, plus footprint (RSS, start time)
//! and audit-log scaling measurements, with the services' state in sled (the
//! default) or in one throwaway PostgreSQL (`--store postgres`).
//! `benches/micro.rs` holds the criterion micro-benchmarks. The numbers are
//! in docs/BENCHMARKS.md.
#![forbid(unsafe_code)]

pub mod bare;
pub mod plot;
pub mod postgres;
pub mod procs;
pub mod report;
pub mod scenario;
pub mod setup;
pub mod stats;
pub mod system;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Result, bail, ensure};
use twokey_proto::vault::v1::vault_service_client::VaultServiceClient;

pub use postgres::{Store, Stores};
pub use report::Report;

use crate::{
    report::{Machine, load_average},
    scenario::flow::{MailboxWatcher, People},
    scenario::vault::{account_names, accounts_for, enroll_all},
    setup::{CODE_ACCOUNTS, FLOW_ACCOUNTS, World},
    system::{System, broker_client, vault_client},
};

/// Which scenarios to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Everything.
    All,
    /// Vault GenerateCode beside Status.
    Vault,
    /// Audit Append with group commit beside one sync per event.
    Audit,
    /// The full release flow.
    Flow,
    /// RSS and start time of each service, with many accounts.
    Footprint,
    /// The audit log at growing sizes.
    Scaling,
}

/// Preset sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scale {
    /// The sizes docs/BENCHMARKS.md reports (a few minutes).
    Full,
    /// A few dozen operations per scenario (seconds): CI.
    Ci,
}

/// `twokey-bench` arguments.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "twokey-bench",
    about = "Drives the real twokey services over mTLS on loopback and reports throughput and latency, each scenario beside its baseline"
)]
pub struct Options {
    /// Which scenarios (comma-separated, e.g. `vault,audit,flow`).
    #[arg(value_enum, value_delimiter = ',', default_value = "all")]
    pub which: Vec<Which>,
    /// Where the services keep their state: sled in each data_dir (the
    /// audit service: its tiles), or one throwaway PostgreSQL server
    /// (`initdb` in a temp dir, deploy/postgres/init.sql, a database and
    /// role per service). The scaling run fills the audit's tiles directly
    /// and is sled only.
    #[arg(long, value_enum, default_value = "sled")]
    pub store: Store,
    /// The vault's store when it differs from `--store`, e.g. the vault on
    /// sled while broker and audit run on PostgreSQL.
    #[arg(long, value_enum)]
    pub vault_store: Option<Store>,
    /// Preset sizes; the flags below override single ones.
    #[arg(long, value_enum, default_value = "full")]
    pub scale: Scale,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json_file: Option<PathBuf>,
    /// Codes to generate (and Status calls for the baseline).
    #[arg(long)]
    pub codes: Option<usize>,
    /// Concurrent GenerateCode / Status calls.
    #[arg(long, default_value_t = 64)]
    pub vault_concurrency: usize,
    /// Appended events per source in the group-commit run.
    #[arg(long)]
    pub appends: Option<usize>,
    /// Events in the one-sync-per-event baseline.
    #[arg(long)]
    pub baseline_appends: Option<usize>,
    /// Sequential full flows.
    #[arg(long)]
    pub flows: Option<usize>,
    /// Full flows run concurrently (count).
    #[arg(long)]
    pub concurrent_flows: Option<usize>,
    /// Full flows in flight at once.
    #[arg(long, default_value_t = 32)]
    pub flow_concurrency: usize,
    /// Accounts enrolled before the vault is restarted and timed.
    #[arg(long)]
    pub accounts: Option<usize>,
    /// Audit log sizes for the scaling run (comma-separated, ascending).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<u64>>,
    /// Latency probes per operation and size in the scaling run.
    #[arg(long)]
    pub probes: Option<usize>,
    /// First pages of `Query` per index and size in the scaling run
    /// (default: the probes, at most 200).
    #[arg(long)]
    pub query_probes: Option<usize>,
    /// `Status` calls on the bare server and on the vault (default: as many
    /// as codes); more make a phase long enough to profile.
    #[arg(long)]
    pub status_calls: Option<usize>,
    /// Keep the temp dir (PKI, configs, the services' data and logs) and
    /// print its path, e.g. to start the filled vault again by hand.
    #[arg(long)]
    pub keep: bool,
    /// Write the scaling plot (PNG) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Where the service binaries are (default: beside this executable,
    /// built first when run under cargo).
    #[arg(long, env = "TWOKEY_BENCH_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Upper bound on each measured loop, seconds.
    #[arg(long, default_value_t = 300)]
    pub time_limit: u64,
}

/// Resolved sizes.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// See [`Options`].
    pub codes: usize,
    /// See [`Options`].
    pub appends: usize,
    /// See [`Options`].
    pub baseline_appends: usize,
    /// See [`Options`].
    pub flows: usize,
    /// See [`Options`].
    pub concurrent_flows: usize,
    /// See [`Options`].
    pub accounts: usize,
    /// See [`Options`].
    pub sizes: Vec<u64>,
    /// See [`Options`].
    pub probes: usize,
    /// First pages of `Query` per index and size.
    pub query_probes: usize,
    /// `Status` calls per server.
    pub status_calls: usize,
}

impl Options {
    /// The sizes after presets and overrides.
    pub fn sizes(&self) -> Sizes {
        let full = self.scale == Scale::Full;
        let pick = |v: Option<usize>, f: usize, c: usize| v.unwrap_or(if full { f } else { c });
        // At full scale every code and every flow needs an account of its own
        // (3 codes per account and step window), and the signed policy must
        // name each one in a document of at most 240 KiB (one gRPC message):
        // about 1,200 accounts since each names its AWS account (issue 20),
        // so 640 codes and 2 × 250 flows.
        Sizes {
            codes: pick(self.codes, 640, 64),
            appends: pick(self.appends, 5_000, 8),
            baseline_appends: pick(self.baseline_appends, 3_000, 16),
            flows: pick(self.flows, 250, 12),
            concurrent_flows: pick(self.concurrent_flows, 250, 32),
            accounts: pick(self.accounts, 100_000, 40),
            sizes: self.sizes.clone().unwrap_or_else(|| {
                if full {
                    vec![1_000, 100_000, 1_000_000]
                } else {
                    vec![100, 1_000]
                }
            }),
            probes: pick(self.probes, 500, 5),
            query_probes: self
                .query_probes
                .unwrap_or_else(|| pick(self.probes, 500, 5).min(200)),
            status_calls: self
                .status_calls
                .unwrap_or_else(|| pick(self.codes, 640, 64)),
        }
    }

    fn runs(&self, w: Which) -> bool {
        self.which.contains(&Which::All) || self.which.contains(&w)
    }

    /// Where each service keeps its state.
    pub fn stores(&self) -> Stores {
        Stores {
            vault: self.vault_store.unwrap_or(self.store),
            ..Stores::all(self.store)
        }
    }
}

/// Runs the chosen scenarios and returns the report.
pub async fn run(opts: &Options) -> Result<Report> {
    let sizes = opts.sizes();
    let limit = Duration::from_secs(opts.time_limit);
    let stores = opts.stores();
    // The scaling run (and the footprint's audit on a filled log) fills the
    // audit's tile store directly, not through the service.
    let tiles_only = stores.audit == Store::Postgres;
    if tiles_only && opts.which.contains(&Which::Scaling) {
        bail!(
            "the scaling run fills the audit's tile store directly and measures it: \
             run it with --store sled"
        );
    }
    let mut report = Report {
        machine: Machine {
            stores,
            ..Machine::probe()
        },
        ..Report::default()
    };
    let bin_dir = procs::bin_dir(opts.bin_dir.as_deref())?;
    // A TOTP account yields at most 3 codes per step window (issue 16), so
    // releases are spread over accounts enrolled before the clock starts.
    let code_accounts = account_names(CODE_ACCOUNTS, accounts_for(sizes.codes));
    let flow_accounts = account_names(
        FLOW_ACCOUNTS,
        accounts_for(scenario::flow::flows_for(
            sizes.flows,
            sizes.concurrent_flows,
        )),
    );
    let mut world = World::new(&flow_accounts, stores)?;
    if opts.keep {
        world.keep();
    }
    let mut sys = System::start(&world, &bin_dir).await?;
    let vault = vault_client(&world, &sys.vault.address)?;
    // The admin-signed policy naming every account codes are released for
    // (the broker picks it up when the first statement names it).
    let mut policy_accounts = Vec::new();
    if opts.runs(Which::Vault) {
        policy_accounts.extend(code_accounts.iter().cloned());
    }
    if opts.runs(Which::Flow) {
        policy_accounts.extend(flow_accounts.iter().cloned());
    }
    world.apply_policy(&vault, &policy_accounts).await?;
    let mut sources = scenario::audit::sources(&world);
    // Accounts the vault holds before the footprint run fills it.
    let mut held = 0;

    if opts.runs(Which::Vault) {
        enroll_all(&vault, &world.grant_key, &code_accounts, 64, limit).await?;
        held += code_accounts.len();
        let before = pg_counters(&world).await?;
        let bare_server = bare::BareServer::start(&world.tls("vault"))?;
        let bare =
            VaultServiceClient::new(world.channel("broker", &bare_server.address, "vault")?);
        let rows = scenario::vault::run(
            &vault,
            &bare,
            &world.grant_key,
            &world.people,
            &code_accounts,
            sizes.codes,
            sizes.status_calls,
            opts.vault_concurrency,
            limit,
        )
        .await?;
        drop(bare_server);
        report.scenarios.extend(rows);
        let what = format!(
            "GenerateCode (and {} Status, one read each)",
            sizes.status_calls
        );
        pg_cost(&world, before, &mut report, "vault", &what, sizes.codes).await?;
    }
    if opts.runs(Which::Audit) {
        let before = pg_counters(&world).await?;
        let rows = scenario::audit::run(
            &world,
            &sys.audit.address,
            &mut sources,
            sizes.appends,
            sizes.baseline_appends,
            limit,
        )
        .await?;
        report.scenarios.extend(rows);
        // 4 warm-up events per source, the grouped run, the single one.
        let appends = sources.len() * (4 + sizes.appends) + sizes.baseline_appends;
        let what = "Append (grouped and one in flight)";
        pg_cost(&world, before, &mut report, "audit", what, appends).await?;
    }
    if opts.runs(Which::Flow) {
        let people = People {
            alice: broker_client(&world, &sys.broker.address, "alice")?,
            bob: broker_client(&world, &sys.broker.address, "bob")?,
            olivia: broker_client(&world, &sys.broker.address, "olivia")?,
            keys: world.people.clone(),
        };
        let mailbox = Arc::new(MailboxWatcher::start(world.mailbox().join("alice.jsonl")));
        enroll_all(&vault, &world.grant_key, &flow_accounts, 64, limit).await?;
        held += flow_accounts.len();
        let before = pg_counters(&world).await?;
        let rows = scenario::flow::run(
            people,
            mailbox,
            &flow_accounts,
            sizes.flows,
            sizes.concurrent_flows,
            opts.flow_concurrency,
            limit,
        )
        .await?;
        report.scenarios.extend(rows);
        let flows = sizes.flows + sizes.concurrent_flows;
        pg_cost(&world, before, &mut report, "flow", "full flow", flows).await?;
    }
    if opts.runs(Which::Footprint) {
        sys.record_loaded_rss()?;
        let row =
            scenario::vault::enroll_many(&vault, &world.grant_key, sizes.accounts, 64, limit).await;
        ensure!(
            row.errors == 0,
            "enrolling {} accounts failed",
            sizes.accounts
        );
        report.scenarios.push(row);
        let phase = stats::Phase::start("footprint: vault restart");
        sys.restart_vault(&world, &format!("{} accounts", sizes.accounts + held))
            .await?;
        drop(phase);
    }
    report.footprint = std::mem::take(&mut sys.footprints);
    drop(sys);
    if tiles_only {
        if opts.runs(Which::Footprint) {
            eprintln!(
                "twokey-bench: no audit start on a filled log with the audit on PostgreSQL \
                 (the fill writes tiles)"
            );
        }
    } else if opts.runs(Which::Scaling) || opts.runs(Which::Footprint) {
        let sizes_run = if opts.runs(Which::Scaling) {
            sizes.sizes.clone()
        } else {
            sizes.sizes.last().copied().into_iter().collect()
        };
        let (rows, fps) = scenario::scaling::run(
            &world,
            &bin_dir,
            &sources,
            &sizes_run,
            (sizes.appends / 4).max(4),
            sizes.probes,
            sizes.query_probes,
            limit,
        )
        .await?;
        report.footprint.extend(fps);
        if opts.runs(Which::Scaling) {
            if let Some(path) = &opts.plot {
                plot::scaling_png(&rows, path)?;
            }
            report.scaling = rows;
        }
    }
    report.machine.load_end = load_average();
    Ok(report)
}

/// The PostgreSQL server's counters when the world has one.
async fn pg_counters(world: &World) -> Result<Option<postgres::PgCounters>> {
    match &world.postgres {
        Some(pg) => Ok(Some(pg.counters().await?)),
        None => Ok(None),
    }
}

/// Adds to `report` what the server did since `before` (if it runs).
async fn pg_cost(
    world: &World,
    before: Option<postgres::PgCounters>,
    report: &mut Report,
    group: &str,
    operations: &str,
    count: usize,
) -> Result<()> {
    if let (Some(pg), Some(before)) = (&world.postgres, before) {
        let after = pg.counters().await?;
        report
            .postgres
            .push(before.cost(&after, group, operations, count));
    }
    Ok(())
}
