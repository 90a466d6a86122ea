//! A local system with two replicas of every service on one throwaway
//! PostgreSQL (issue 18, docs/HA.md): the server is set up with the
//! deployment's own `deploy/postgres/init.sql` (one database and one LOGIN
//! role per service, each password in a 0600 file), and
//! [`crate::local::LocalSystem::start_replicated`] starts two processes of
//! audit, vault and broker on it, each replica with its own listen port and
//! data directory and the same keys, every peer address the comma list of
//! both replicas.
//!
//! Readiness is gRPC health: both vault replicas and both broker replicas
//! SERVING; of the audit replicas one (the sequencer, which holds the lease)
//! SERVING, the other NOT_SERVING for appends while it serves reads.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use twokey_runtime::tls::TlsFiles;

use crate::postgres::{PgUnavailable, TestPostgres};

/// A replica's gRPC health, as [`health`] reads it.
pub use tonic_health::pb::health_check_response::ServingStatus;

/// Processes of each service in a replicated local system.
pub const REPLICAS: usize = 2;

/// How long a replica may take to report SERVING after it announced itself.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One service's database: the URL (no password in it) and its role's
/// password file.
#[derive(Debug, Clone)]
pub struct PgStore {
    /// `postgresql://ROLE@127.0.0.1:PORT/DATABASE?sslmode=disable`.
    pub url: String,
    /// The role's password (first line), mode 0600.
    pub password_file: PathBuf,
}

impl PgStore {
    /// The `[store]` section naming this database, for the end of a
    /// service's config file.
    pub fn section(&self) -> String {
        format!(
            "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = {:?}\npassword_file = {:?}\n",
            self.url,
            self.password_file.display().to_string()
        )
    }
}

/// What a replicated local system runs on, and the accounts it has
/// besides [`crate::local::ACCOUNT`].
#[derive(Debug, Clone)]
pub struct Replicated {
    /// The vault's database (`twokey_vault`).
    pub vault: PgStore,
    /// The broker's database (`twokey_broker`).
    pub broker: PgStore,
    /// The audit service's database (`twokey_audit`).
    pub audit: PgStore,
    /// More accounts with the same people and rules as
    /// [`crate::local::ACCOUNT`], in both the broker's policy file and
    /// consent policy version 1 (not enrolled): the vault hands out each
    /// TOTP step of an account once, so concurrent flows need an account
    /// each.
    pub accounts: Vec<String>,
}

impl Replicated {
    /// The database of service `kind` (`vault`, `broker` or `audit`).
    pub fn store(&self, kind: &str) -> &PgStore {
        match kind {
            "vault" => &self.vault,
            "broker" => &self.broker,
            _ => &self.audit,
        }
    }
}

/// `deploy/postgres/init.sql` of this workspace.
pub fn init_sql() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/postgres/init.sql")
}

/// Sets up `pg` as a deployment would: a random password per service in a
/// 0600 file (`TestPostgres::write_private`), then `deploy/postgres/init.sql`
/// run as written with `-v secrets=DIR`. Returns the three databases, with
/// `accounts` as [`Replicated::accounts`].
pub fn databases(pg: &TestPostgres, accounts: &[String]) -> Result<Replicated, PgUnavailable> {
    let mut stores = Vec::new();
    for service in ["vault", "broker", "audit"] {
        let role = format!("twokey_{service}");
        let password: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let file = pg.write_private(&format!("{role}.password"), &format!("{password}\n"))?;
        stores.push(PgStore {
            url: pg.url(&role, &role),
            password_file: file,
        });
    }
    let secrets = stores[0]
        .password_file
        .parent()
        .expect("a password file is in a directory")
        .display()
        .to_string();
    pg.psql_file("postgres", &init_sql(), &[("secrets", &secrets)])?;
    let mut stores = stores.into_iter();
    let mut next = || stores.next().expect("three stores");
    Ok(Replicated {
        vault: next(),
        broker: next(),
        audit: next(),
        accounts: accounts.to_vec(),
    })
}

/// The gRPC service whose health a replica of `kind` reports, the
/// certificate (in the system's `pki` directory) that asks, and the name
/// in the replica's certificate.
pub fn health_target(kind: &str) -> (&'static str, &'static str, &'static str) {
    match kind {
        "vault" => ("twokey.vault.v1.VaultService", "broker", "vault"),
        "broker" => ("twokey.broker.v1.BrokerService", "alice", "broker"),
        _ => ("twokey.audit.v1.AuditService", "carol", "audit"),
    }
}

/// The health a replica of `kind` at `address` (one `https://HOST:PORT`)
/// reports for its service, asked with the certificates in `pki`; the
/// failed call's status when it does not answer.
pub async fn health(pki: &Path, kind: &str, address: &str) -> Result<ServingStatus, tonic::Status> {
    let (service, user, server_name) = health_target(kind);
    let channel = TlsFiles::in_dir(pki, user)
        .channel(address, server_name)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        HealthClient::new(channel).check(HealthCheckRequest {
            service: service.to_owned(),
        }),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("no health answer within 5 s"))??;
    Ok(answer.into_inner().status())
}

/// Waits until at least `at_least` of `addresses` (replicas of `kind`)
/// report SERVING, at most `timeout`; the last statuses seen otherwise.
pub async fn wait_serving(
    pki: &Path,
    kind: &str,
    addresses: &[String],
    at_least: usize,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let mut seen = Vec::new();
        for address in addresses {
            seen.push(health(pki, kind, address).await);
        }
        let serving = seen
            .iter()
            .filter(|s| matches!(s, Ok(ServingStatus::Serving)))
            .count();
        if serving >= at_least {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            let seen: Vec<String> = addresses
                .iter()
                .zip(&seen)
                .map(|(a, s)| match s {
                    Ok(s) => format!("{a}: {s:?}"),
                    Err(e) => format!("{a}: {:?} {}", e.code(), e.message()),
                })
                .collect();
            return Err(format!(
                "fewer than {at_least} {kind} replicas SERVING after {timeout:?}: {}",
                seen.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_serving`] on a thread of its own with its own runtime, so that
/// callers inside an async runtime may use it too.
pub fn wait_serving_blocking(
    pki: &Path,
    kind: &str,
    addresses: &[String],
    at_least: usize,
    timeout: Duration,
) -> Result<(), String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime: {e}"))?;
                runtime.block_on(wait_serving(pki, kind, addresses, at_least, timeout))
            })
            .join()
            .unwrap_or_else(|_| Err("waiting for health panicked".to_owned()))
    })
}
