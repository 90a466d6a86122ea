//! `--store postgres`: one throwaway PostgreSQL server for the run
//! (`twokey_testkit::postgres::TestPostgres`: `initdb` in a temp dir,
//! `fsync = on`, `synchronous_commit = on`, loopback only), set up by the
//! deployment's own `deploy/postgres/init.sql` (a database and a LOGIN role
//! per service, each password from a 0600 file), and the `[store]` section
//! each service's config then carries.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use twokey_testkit::postgres::TestPostgres;

/// Where each service keeps its state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    /// The embedded default: sled in each data_dir (audit: its tiles, journal
    /// and sled indexes).
    #[default]
    Sled,
    /// One PostgreSQL server, a database and role per service.
    Postgres,
}

impl Store {
    /// `sled` or `postgres`, as in the configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sled => "sled",
            Self::Postgres => "postgres",
        }
    }
}

/// Which store each service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Stores {
    /// The audit service.
    pub audit: Store,
    /// The vault.
    pub vault: Store,
    /// The broker.
    pub broker: Store,
}

impl Stores {
    /// Every service on `store`.
    pub fn all(store: Store) -> Self {
        Self {
            audit: store,
            vault: store,
            broker: store,
        }
    }

    /// Whether any service needs the PostgreSQL server.
    pub fn any_postgres(&self) -> bool {
        [self.audit, self.vault, self.broker].contains(&Store::Postgres)
    }

    /// The store of `service` (`audit`, `vault` or `broker`).
    pub fn of(&self, service: &str) -> Store {
        match service {
            "audit" => self.audit,
            "vault" => self.vault,
            _ => self.broker,
        }
    }
}

/// The deployment's database script, built into the bench so that the
/// binary runs outside the source tree too.
pub const INIT_SQL: &str = include_str!("../../deploy/postgres/init.sql");

/// The roles (and databases) init.sql makes, one per service.
const SERVICES: [&str; 3] = ["vault", "broker", "audit"];

/// The running server with init.sql applied; stopped and removed on drop.
#[derive(Debug)]
pub struct BenchPostgres {
    pg: TestPostgres,
    passwords: PathBuf,
}

impl BenchPostgres {
    /// Starts the server and runs init.sql on it (script copied to `dir`).
    pub fn start(dir: &Path) -> Result<Self> {
        let pg = TestPostgres::start()
            .map_err(|e| anyhow!("--store postgres starts a throwaway PostgreSQL: {e}"))?;
        let mut passwords = None;
        for svc in SERVICES {
            let password = format!("{:032x}", rand::random::<u128>());
            let file = pg
                .write_private(&format!("twokey_{svc}.password"), &format!("{password}\n"))
                .map_err(|e| anyhow!("{e}"))?;
            passwords = file.parent().map(Path::to_owned);
        }
        let passwords = passwords.context("the password directory")?;
        let script = dir.join("init.sql");
        std::fs::write(&script, INIT_SQL)?;
        pg.psql_file(
            "postgres",
            &script,
            &[("secrets", passwords.to_str().context("UTF-8 temp path")?)],
        )
        .map_err(|e| anyhow!("deploy/postgres/init.sql: {e}"))?;
        eprintln!(
            "twokey-bench: PostgreSQL on 127.0.0.1:{} (data and socket in {})",
            pg.port(),
            pg.socket_dir().display()
        );
        Ok(Self { pg, passwords })
    }

    /// The server.
    pub fn server(&self) -> &TestPostgres {
        &self.pg
    }

    /// The `[store]` section of `service`'s config: its own database and
    /// role, the password in its 0600 file, plain TCP on loopback.
    pub fn store_section(&self, service: &str) -> String {
        let name = format!("twokey_{service}");
        format!(
            "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = {:?}\npassword_file = {:?}\n",
            self.pg.url(&name, &name),
            self.passwords
                .join(format!("{name}.password"))
                .display()
                .to_string()
        )
    }
}

/// What the server did during one scenario: WAL flushes and transactions
/// per database, read from its statistics views before and after.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct PgCost {
    /// The scenario group, e.g. `vault`.
    pub group: String,
    /// What the operations are, e.g. `GenerateCode`.
    pub operations: String,
    /// How many the scenario ran (successful or not).
    pub count: usize,
    /// `pg_stat_wal.wal_sync`: WAL flushes to disk, server-wide.
    pub wal_syncs: u64,
    /// `pg_stat_database.xact_commit` per service database (read-only
    /// transactions and single statements included).
    pub commits: Vec<(String, u64)>,
}

/// The server's counters at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PgCounters {
    wal_syncs: u64,
    commits: Vec<(String, u64)>,
}

/// How long a backend may hold its statistics before reporting them
/// (PostgreSQL 15 flushes an idle backend's at most once a second).
const STATS_DELAY: std::time::Duration = std::time::Duration::from_millis(1500);

impl BenchPostgres {
    /// The counters now, once every backend has reported what it did
    /// (waits [`STATS_DELAY`] first: call it outside measured loops).
    pub async fn counters(&self) -> Result<PgCounters> {
        tokio::time::sleep(STATS_DELAY).await;
        let text = self
            .pg
            .psql(
                "postgres",
                "SELECT 'wal', wal_sync FROM pg_stat_wal UNION ALL \
                 SELECT datname, xact_commit FROM pg_stat_database \
                 WHERE datname LIKE 'twokey\\_%' ORDER BY 1",
            )
            .map_err(|e| anyhow!("reading the server's statistics: {e}"))?;
        let mut counters = PgCounters::default();
        for line in text.lines() {
            let (name, value) = line
                .split_once('|')
                .with_context(|| format!("statistics line {line:?}"))?;
            let value: u64 = value.parse().with_context(|| format!("{line:?}"))?;
            if name == "wal" {
                counters.wal_syncs = value;
            } else {
                counters.commits.push((name.to_owned(), value));
            }
        }
        Ok(counters)
    }
}

impl PgCounters {
    /// What happened between `self` and `later`, for `count` `operations`.
    pub fn cost(&self, later: &Self, group: &str, operations: &str, count: usize) -> PgCost {
        PgCost {
            group: group.into(),
            operations: operations.into(),
            count,
            wal_syncs: later.wal_syncs.saturating_sub(self.wal_syncs),
            commits: later
                .commits
                .iter()
                .map(|(db, n)| {
                    let before = self
                        .commits
                        .iter()
                        .find(|(d, _)| d == db)
                        .map_or(0, |(_, b)| *b);
                    (db.clone(), n.saturating_sub(before))
                })
                .collect(),
        }
    }
}
