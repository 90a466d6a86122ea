//! Versioned, forward-only schema migrations. Each component (vault,
//! broker, audit) lists its migrations in order; [`migrate`] applies the
//! missing ones in one transaction under a transaction-scoped advisory lock,
//! so replicas starting at once apply each exactly once. A database that is
//! ahead of the binary, or whose applied migration differs from the
//! binary's, is refused: schemas only move forward, and never silently.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::error::PgError;

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// 1, 2, 3, …: the position in the list.
    pub version: i32,
    /// What it does, in a few words.
    pub name: &'static str,
    /// The SQL, run as one batch inside the migration transaction.
    pub sql: &'static str,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The schema version before.
    pub from: i32,
    /// The schema version now: the binary's newest.
    pub to: i32,
}

const TABLE: &str = "CREATE TABLE IF NOT EXISTS twokey_schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    sha256     bytea       NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)";

fn digest(m: &Migration) -> Vec<u8> {
    Sha256::digest(m.sql.as_bytes()).to_vec()
}

/// Brings `component`'s schema to the newest of `migrations` (versions 1,
/// 2, … in order), applying only what is missing, all in one transaction.
pub async fn migrate(
    client: &mut Client,
    component: &str,
    migrations: &[Migration],
) -> Result<Migrated, PgError> {
    for (i, m) in migrations.iter().enumerate() {
        if m.version != i as i32 + 1 {
            return Err(PgError::Schema(format!(
                "{component} migration {:?} has version {}, expected {}: versions run 1, 2, 3, …",
                m.name,
                m.version,
                i + 1
            )));
        }
    }
    let newest = migrations.len() as i32;
    let tx = client.transaction().await?;
    // The lock key is the component's name, hashed by the server; released
    // at commit or rollback.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('twokey-migrate:' || $1))",
        &[&component],
    )
    .await?;
    tx.batch_execute(TABLE).await?;
    let applied = tx
        .query(
            "SELECT version, name, sha256 FROM twokey_schema_migrations
             WHERE component = $1 ORDER BY version",
            &[&component],
        )
        .await?;
    let mut from = 0;
    for row in &applied {
        let version: i32 = row.get(0);
        let name: String = row.get(1);
        let sha: Vec<u8> = row.get(2);
        let Some(known) = migrations.get((version - 1).max(0) as usize) else {
            return Err(PgError::Schema(format!(
                "the {component} database is at schema version {version} ({name}), newer than \
                 this binary's {newest}: run a twokey release that knows it (schemas only move \
                 forward)"
            )));
        };
        if known.version != version || digest(known) != sha {
            return Err(PgError::Schema(format!(
                "the {component} database's migration {version} ({name}) differs from this \
                 binary's ({}): it was migrated by another build; restore the database or run \
                 the build that migrated it",
                known.name
            )));
        }
        from = version;
    }
    for m in &migrations[from as usize..] {
        tx.batch_execute(m.sql).await.map_err(|e| {
            PgError::Schema(format!(
                "{component} migration {} ({}) failed, nothing applied: {}",
                m.version,
                m.name,
                PgError::from(e)
            ))
        })?;
        tx.execute(
            "INSERT INTO twokey_schema_migrations (component, version, name, sha256)
             VALUES ($1, $2, $3, $4)",
            &[&component, &m.version, &m.name, &digest(m)],
        )
        .await?;
    }
    tx.commit().await?;
    if from < newest {
        tracing::info!(component, from, to = newest, "schema migrated");
    }
    Ok(Migrated { from, to: newest })
}
