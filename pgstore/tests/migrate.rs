//! Migrations and connections against a real PostgreSQL server started for
//! the test (`twokey_testkit::postgres`): applied once, forward only, all or
//! nothing, safe with replicas racing, and a role confined to its database.

use std::path::PathBuf;

use twokey_pgstore::{Migration, PgError, PgSettings, connect, migrate};
use twokey_testkit::postgres::TestPostgres;

const V1: Migration = Migration {
    version: 1,
    name: "grants",
    sql: "CREATE TABLE grants (id text PRIMARY KEY)",
};
const V2: Migration = Migration {
    version: 2,
    name: "grants used_at",
    sql: "ALTER TABLE grants ADD COLUMN used_at bigint",
};

struct Db {
    pg: TestPostgres,
    dir: tempfile::TempDir,
}

fn db() -> Db {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    pg.create_database("vault", "vault_role", "vault-pw")
        .unwrap();
    pg.create_database("broker", "broker_role", "broker-pw")
        .unwrap();
    Db {
        pg,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Db {
    fn settings(&self, database: &str, role: &str, password: &str) -> PgSettings {
        let file: PathBuf = self.dir.path().join(format!("{role}.pw"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        PgSettings {
            url: self.pg.url(database, role),
            password_file: Some(file),
            ca_file: None,
        }
    }
}

fn versions(pg: &TestPostgres) -> String {
    pg.psql(
        "vault",
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM twokey_schema_migrations",
    )
    .unwrap()
}

#[tokio::test]
async fn migrations_apply_once_and_in_order() {
    let db = db();
    let s = db.settings("vault", "vault_role", "vault-pw");
    let mut c = connect(&s).await.unwrap();
    let m = migrate(&mut c, "vault", &[V1]).await.unwrap();
    assert_eq!((m.from, m.to), (0, 1));
    let m = migrate(&mut c, "vault", &[V1, V2]).await.unwrap();
    assert_eq!((m.from, m.to), (1, 2));
    let m = migrate(&mut c, "vault", &[V1, V2]).await.unwrap();
    assert_eq!((m.from, m.to), (2, 2));
    assert_eq!(versions(&db.pg), "1,2");
    c.execute("INSERT INTO grants (id, used_at) VALUES ('g', 1)", &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn replicas_migrating_at_once_apply_each_migration_exactly_once() {
    let db = db();
    let s = db.settings("vault", "vault_role", "vault-pw");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&s).await.unwrap();
            migrate(&mut c, "vault", &[V1, V2]).await.unwrap()
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let m = t.await.unwrap();
        assert_eq!(m.to, 2);
        if m.from == 0 {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one replica applied the migrations");
    assert_eq!(versions(&db.pg), "1,2");
}

#[tokio::test]
async fn a_database_ahead_of_the_binary_or_migrated_by_another_build_is_refused() {
    let db = db();
    let s = db.settings("vault", "vault_role", "vault-pw");
    let mut c = connect(&s).await.unwrap();
    migrate(&mut c, "vault", &[V1, V2]).await.unwrap();
    let e = migrate(&mut c, "vault", &[V1]).await.unwrap_err();
    assert!(
        matches!(&e, PgError::Schema(m) if m.contains("at schema version 2 (grants used_at), newer than this binary's 1")),
        "{e}"
    );
    let other = Migration {
        sql: "ALTER TABLE grants ADD COLUMN used_at integer",
        ..V2
    };
    let e = migrate(&mut c, "vault", &[V1, other]).await.unwrap_err();
    assert!(
        matches!(&e, PgError::Schema(m) if m.contains("migration 2 (grants used_at) differs")),
        "{e}"
    );
    assert_eq!(versions(&db.pg), "1,2", "nothing changed");
}

#[tokio::test]
async fn a_failing_migration_applies_nothing() {
    let db = db();
    let s = db.settings("vault", "vault_role", "vault-pw");
    let mut c = connect(&s).await.unwrap();
    let broken = Migration {
        version: 2,
        name: "broken",
        sql: "CREATE TABLE half (v int); SELECT * FROM no_such_table",
    };
    let e = migrate(&mut c, "vault", &[V1, broken]).await.unwrap_err();
    assert!(
        matches!(&e, PgError::Schema(m) if m.contains("vault migration 2 (broken) failed, nothing applied") && m.contains("no_such_table")),
        "{e}"
    );
    let tables = db
        .pg
        .psql(
            "vault",
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('grants', 'half', 'twokey_schema_migrations')",
        )
        .unwrap();
    assert_eq!(tables, "0", "the whole transaction rolled back");
}

#[tokio::test]
async fn one_services_role_cannot_reach_anothers_database() {
    let db = db();
    let vault = db.settings("vault", "vault_role", "vault-pw");
    let mut c = connect(&vault).await.unwrap();
    migrate(&mut c, "vault", &[V1]).await.unwrap();
    let broker_in_vault = db.settings("vault", "broker_role", "broker-pw");
    let e = connect(&broker_in_vault).await.unwrap_err();
    assert!(
        matches!(&e, PgError::Query(m) if m.contains("permission denied for database \"vault\"")),
        "{e}"
    );
    let wrong = db.settings("vault", "vault_role", "not-the-password");
    let e = connect(&wrong).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
}

#[tokio::test]
async fn a_stopped_server_is_unavailable_and_a_restarted_one_serves_again() {
    let db = db();
    let s = db.settings("vault", "vault_role", "vault-pw");
    let mut c = connect(&s).await.unwrap();
    migrate(&mut c, "vault", &[V1]).await.unwrap();
    db.pg.stop().unwrap();
    let e = PgError::from(c.execute("SELECT 1", &[]).await.unwrap_err());
    assert!(e.is_unavailable(), "{e}");
    let e = connect(&s).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    db.pg.start_server().unwrap();
    let c = connect(&s).await.unwrap();
    assert_eq!(
        c.execute("INSERT INTO grants VALUES ('after')", &[])
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn verify_full_reaches_a_server_whose_certificate_chains_to_ca_file_and_no_other() {
    let db = db();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = twokey_testkit::pki::DevCa::new("twokey.local").unwrap();
    let server = ca.issue_service("twokey.local", "postgres").unwrap();
    server.write(db.dir.path(), "pg").unwrap();
    ca.write(db.dir.path()).unwrap();
    let cert = std::fs::read_to_string(db.dir.path().join("pg.crt")).unwrap();
    let key = std::fs::read_to_string(db.dir.path().join("pg.key")).unwrap();
    db.pg.enable_tls(&cert, &key).unwrap();

    let mut s = db.settings("vault", "vault_role", "vault-pw");
    s.url = s.url.replace("sslmode=disable", "sslmode=verify-full");
    s.ca_file = Some(db.dir.path().join("ca.crt"));
    let c = connect(&s).await.unwrap();
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the session runs over TLS");

    let other = twokey_testkit::pki::DevCa::new("other.local").unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    other.write(other_dir.path()).unwrap();
    s.ca_file = Some(other_dir.path().join("ca.crt"));
    let e = connect(&s).await.unwrap_err();
    assert!(
        matches!(&e, PgError::Tls(m) if m.contains("certificate")),
        "{e:?}"
    );
}
