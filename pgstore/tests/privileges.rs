//! deploy/postgres/init.sql, the script a deployment runs, run as written
//! against a real PostgreSQL server: three roles that are no superuser and
//! may create neither databases nor roles, each owning its own database and
//! reaching no other one (SQLSTATE 42501), each migrating and using its own
//! tables, none reading another's even with a CONNECT granted by mistake;
//! run again, it takes such grants back and sets the passwords anew. And
//! what deploy/postgres/store-config.sh writes (the database's certificate,
//! pg_hba.conf, each service's [store.postgres]) connects each role to its
//! own database over verify-full and to nothing else.

mod common;

use std::{path::PathBuf, sync::Arc};

use tokio_postgres::{Client, error::SqlState};
use twokey_pgstore::{Migration, PgError, PgSettings, connect, migrate, outbox};
use twokey_runtime::{events::EventDraft, time::SystemClock};
use twokey_testkit::postgres::TestPostgres;

const ROLES: [&str; 3] = ["twokey_vault", "twokey_broker", "twokey_audit"];

/// A table like the ones a service's own migrations make.
const BROKER_V1: Migration = Migration {
    version: 1,
    name: "requests",
    sql: "CREATE TABLE broker_requests (id text PRIMARY KEY, record bytea NOT NULL)",
};
const VAULT_V1: Migration = Migration {
    version: 1,
    name: "seeds",
    sql: "CREATE TABLE vault_seeds (account text PRIMARY KEY, sealed bytea NOT NULL)",
};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/postgres/init.sql")
}

struct Server {
    pg: TestPostgres,
    secrets: PathBuf,
    dir: tempfile::TempDir,
}

fn password(role: &str, round: u32) -> String {
    format!("{role}-{round}-{:016x}", rand::random::<u64>())
}

impl Server {
    /// A fresh server with the three password files, and init.sql run on it.
    fn start() -> Self {
        let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
        let mut secrets = PathBuf::new();
        let dir = tempfile::tempdir().unwrap();
        for role in ROLES {
            let pw = password(role, 1);
            let file = pg
                .write_private(&format!("{role}.password"), &format!("{pw}\n"))
                .unwrap();
            secrets = file.parent().unwrap().to_owned();
            std::fs::write(dir.path().join(role), format!("{pw}\n")).unwrap();
        }
        let server = Self { pg, secrets, dir };
        server.init().unwrap();
        server
    }

    fn init(&self) -> Result<String, String> {
        self.pg
            .psql_file(
                "postgres",
                &script(),
                &[("secrets", self.secrets.to_str().unwrap())],
            )
            .map_err(|e| e.0)
    }

    /// A new password in the file init.sql reads and in the one the service
    /// reads (as an operator rotating it would).
    fn new_password(&self, role: &str) -> String {
        let pw = password(role, 2);
        self.pg
            .write_private(&format!("{role}.password"), &format!("{pw}\n"))
            .unwrap();
        std::fs::write(self.dir.path().join(role), format!("{pw}\n")).unwrap();
        pw
    }

    fn password(&self, role: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(role))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// The service's `[store.postgres]`: the role's password from its file.
    fn settings(&self, role: &str, database: &str) -> PgSettings {
        PgSettings {
            url: self.pg.url(database, role),
            password_file: Some(self.dir.path().join(role)),
            ca_file: None,
        }
    }

    /// Connects as `role` to `database` with tokio-postgres itself, so that
    /// the server's SQLSTATE can be read.
    async fn raw(
        &self,
        role: &str,
        database: &str,
        password: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.pg.port())
            .user(role)
            .password(password)
            .dbname(database)
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn client(&self, role: &str, database: &str) -> Client {
        connect(&self.settings(role, database))
            .await
            .unwrap_or_else(|e| panic!("{role} on {database}: {e}"))
    }
}

/// The server's SQLSTATE and message.
fn refusal(e: &tokio_postgres::Error) -> (SqlState, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().clone(), db.message().to_owned())
}

fn denied(message: &str) -> (SqlState, String) {
    (SqlState::INSUFFICIENT_PRIVILEGE, message.to_owned())
}

#[tokio::test]
async fn three_login_roles_no_superuser_each_owning_only_its_database() {
    let s = Server::start();
    assert_eq!(
        s.pg.psql(
            "postgres",
            "SELECT string_agg(format('%s super=%s createdb=%s createrole=%s replication=%s \
             bypassrls=%s login=%s', rolname, rolsuper, rolcreatedb, rolcreaterole, \
             rolreplication, rolbypassrls, rolcanlogin), ';' ORDER BY rolname)
             FROM pg_roles WHERE rolname IN ('twokey_vault', 'twokey_broker', 'twokey_audit')",
        )
        .unwrap(),
        "twokey_audit super=f createdb=f createrole=f replication=f \
         bypassrls=f login=t;\
         twokey_broker super=f createdb=f createrole=f replication=f \
         bypassrls=f login=t;\
         twokey_vault super=f createdb=f createrole=f replication=f \
         bypassrls=f login=t"
    );
    // No role is a member of another (so none inherits a superuser's or
    // another service's rights).
    assert_eq!(
        s.pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
             WHERE r.rolname IN ('twokey_vault', 'twokey_broker', 'twokey_audit')",
        )
        .unwrap(),
        "0"
    );
    // Each database: owned by its role, which alone may connect (no PUBLIC
    // entry); its public schema: owned by that role, no one else listed.
    assert_eq!(
        s.pg.psql(
            "postgres",
            "SELECT string_agg(format('%s owner=%s acl=%s', datname, pg_get_userbyid(datdba), \
             datacl), ';' ORDER BY datname) FROM pg_database WHERE datname LIKE 'twokey\\_%'",
        )
        .unwrap(),
        "twokey_audit owner=twokey_audit acl={twokey_audit=CTc/twokey_audit};\
         twokey_broker owner=twokey_broker acl={twokey_broker=CTc/twokey_broker};\
         twokey_vault owner=twokey_vault acl={twokey_vault=CTc/twokey_vault}"
    );
    for role in ROLES {
        assert_eq!(
            s.pg.psql(
                role,
                "SELECT format('%s %s', pg_get_userbyid(nspowner), nspacl)
                 FROM pg_namespace WHERE nspname = 'public'",
            )
            .unwrap(),
            format!("{role} {{{role}=UC/{role}}}"),
        );
    }
    // The passwords came from the files, not from the script, and are kept
    // as SCRAM verifiers.
    let text = std::fs::read_to_string(script()).unwrap();
    for role in ROLES {
        let pw = s.password(role);
        assert!(!text.contains(&pw));
        let mut c = s.client(role, role).await;
        let row = c
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1)),
            (role.to_owned(), role.to_owned())
        );
        let tx = c.transaction().await.unwrap();
        tx.batch_execute("CREATE TEMP TABLE scratch (v int)")
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let e = s.raw(role, role, "not-the-password").await.unwrap_err();
        assert_eq!(
            refusal(&e),
            (
                SqlState::INVALID_PASSWORD,
                format!("password authentication failed for user \"{role}\"")
            )
        );
    }
    assert_eq!(
        s.pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_authid WHERE rolname IN ('twokey_vault', 'twokey_broker', 'twokey_audit')
             AND rolpassword LIKE 'SCRAM-SHA-256$%'",
        )
        .unwrap(),
        "3"
    );
    // Nor can a service make a database or a role, or read server files.
    for role in ROLES {
        let c = s.client(role, role).await;
        for (sql, message) in [
            (
                "CREATE DATABASE elsewhere",
                "permission denied to create database",
            ),
            ("CREATE ROLE someone", "permission denied to create role"),
            (
                "SELECT pg_read_file('postgresql.conf')",
                "permission denied for function pg_read_file",
            ),
        ] {
            let e = c.batch_execute(sql).await.unwrap_err();
            assert_eq!(refusal(&e), denied(message), "{role}: {sql}");
        }
    }
}

#[tokio::test]
async fn no_role_may_connect_to_another_services_database() {
    let s = Server::start();
    for role in ROLES {
        for database in ROLES.into_iter().filter(|d| *d != role) {
            let e = s
                .raw(role, database, &s.password(role))
                .await
                .map(drop)
                .unwrap_err();
            assert_eq!(
                refusal(&e),
                denied(&format!("permission denied for database \"{database}\"")),
                "{role} on {database}"
            );
            // What a service logs when its url names the wrong database.
            let e = connect(&s.settings(role, database)).await.unwrap_err();
            assert!(
                matches!(&e, PgError::Query(m)
                    if m.contains(&format!("permission denied for database \"{database}\""))),
                "{e}"
            );
        }
    }
}

#[tokio::test]
async fn each_role_migrates_and_uses_its_own_database_and_no_other_reads_it_even_with_a_stray_connect()
 {
    let s = Server::start();
    // The broker: its own tables and the outbox, migrated at start as the
    // service does, then used: a request row and an event in one transaction.
    let mut broker = s.client("twokey_broker", "twokey_broker").await;
    let m = migrate(&mut broker, "broker", &[BROKER_V1]).await.unwrap();
    assert_eq!((m.from, m.to), (0, 1));
    let m = outbox::migrate(&mut broker).await.unwrap();
    assert_eq!((m.from, m.to), (0, 1));
    let settings = s.settings("twokey_broker", "twokey_broker");
    let events = outbox::PgOutbox::connect(&settings, common::signer(), Arc::new(SystemClock))
        .await
        .unwrap();
    let tx = broker.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO broker_requests (id, record) VALUES ('r1', '\\x01')",
        &[],
    )
    .await
    .unwrap();
    let seq = events
        .push(&tx, EventDraft::new(common::CAROL, "request.created"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seq, 1);
    // The vault and audit likewise in theirs (audit: its real schema).
    let mut vault = s.client("twokey_vault", "twokey_vault").await;
    migrate(&mut vault, "vault", &[VAULT_V1]).await.unwrap();
    outbox::migrate(&mut vault).await.unwrap();
    vault
        .execute(
            "INSERT INTO vault_seeds (account, sealed) VALUES ('aws-root', '\\x02')",
            &[],
        )
        .await
        .unwrap();
    let mut audit = s.client("twokey_audit", "twokey_audit").await;
    let m = migrate(
        &mut audit,
        "audit",
        twokey_audit::store::postgres::MIGRATIONS,
    )
    .await
    .unwrap();
    assert_eq!(m.from, 0);
    assert!(m.to >= 1);

    // Someone grants the vault's role CONNECT on the broker's database by
    // mistake: it gets in, but the schema and its tables stay closed.
    s.pg.psql(
        "postgres",
        "GRANT CONNECT, TEMPORARY ON DATABASE twokey_broker TO twokey_vault",
    )
    .unwrap();
    let stray = s
        .raw("twokey_vault", "twokey_broker", &s.password("twokey_vault"))
        .await
        .unwrap();
    for table in [
        "broker_requests",
        "twokey_outbox_pending",
        "twokey_schema_migrations",
    ] {
        let e = stray
            .query(&format!("SELECT * FROM public.{table}"), &[])
            .await
            .unwrap_err();
        assert_eq!(
            refusal(&e),
            denied("permission denied for schema public"),
            "{table}"
        );
        let e = stray
            .query(&format!("SELECT * FROM {table}"), &[])
            .await
            .unwrap_err();
        assert_eq!(
            refusal(&e),
            (
                SqlState::UNDEFINED_TABLE,
                format!("relation \"{table}\" does not exist")
            ),
            "{table}: not even visible"
        );
    }
    let e = stray
        .batch_execute("CREATE TABLE public.planted (v int)")
        .await
        .unwrap_err();
    assert_eq!(refusal(&e), denied("permission denied for schema public"));
    // And with USAGE on the schema granted by mistake too, the tables,
    // granted to no one, still refuse.
    s.pg.psql(
        "twokey_broker",
        "GRANT USAGE ON SCHEMA public TO twokey_vault",
    )
    .unwrap();
    for table in ["broker_requests", "twokey_outbox_pending"] {
        let e = stray
            .query(&format!("SELECT * FROM public.{table}"), &[])
            .await
            .unwrap_err();
        assert_eq!(
            refusal(&e),
            denied(&format!("permission denied for table {table}"))
        );
    }
    let e = stray
        .execute("UPDATE public.broker_requests SET record = '\\x00'", &[])
        .await
        .unwrap_err();
    assert_eq!(
        refusal(&e),
        denied("permission denied for table broker_requests")
    );
    drop(stray);

    // Run again (as an operator would, with a new broker password): the
    // stray grants are taken back, the passwords set anew, the data kept.
    let old = s.password("twokey_broker");
    let new = s.new_password("twokey_broker");
    s.init().unwrap();
    let e = s
        .raw("twokey_vault", "twokey_broker", &s.password("twokey_vault"))
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(
        refusal(&e),
        denied("permission denied for database \"twokey_broker\"")
    );
    assert_eq!(
        s.pg.psql(
            "twokey_broker",
            "SELECT nspacl FROM pg_namespace WHERE nspname = 'public'"
        )
        .unwrap(),
        "{twokey_broker=UC/twokey_broker}"
    );
    let e = s
        .raw("twokey_broker", "twokey_broker", &old)
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(refusal(&e).0, SqlState::INVALID_PASSWORD);
    let broker = s.raw("twokey_broker", "twokey_broker", &new).await.unwrap();
    let row = broker
        .query_one(
            "SELECT (SELECT count(*) FROM broker_requests), \
             (SELECT count(*) FROM twokey_outbox_pending)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1, 1));
    // The service, restarted, finds its schema at its version.
    let mut broker = s.client("twokey_broker", "twokey_broker").await;
    let m = migrate(&mut broker, "broker", &[BROKER_V1]).await.unwrap();
    assert_eq!((m.from, m.to), (1, 1));
}

#[tokio::test]
async fn a_missing_password_file_stops_the_script_before_it_changes_anything() {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let file = pg
        .write_private("twokey_vault.password", "only-the-vault\n")
        .unwrap();
    let e = pg
        .psql_file(
            "postgres",
            &script(),
            &[("secrets", file.parent().unwrap().to_str().unwrap())],
        )
        .unwrap_err();
    assert!(
        e.0.contains("a password file is missing or empty; nothing was changed"),
        "{e}"
    );
    assert!(!e.0.contains("only-the-vault"), "{e}");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('twokey_vault', 'twokey_broker', 'twokey_audit')"
        )
        .unwrap(),
        "0"
    );
}

fn deploy_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/postgres")
        .join(name)
}

/// The `key = "value"` of `[store.postgres]` in a config store-config.sh wrote.
fn store_setting(config: &str, key: &str) -> String {
    let section = config
        .split("[store.postgres]")
        .nth(1)
        .expect("store-config.sh wrote [store.postgres]");
    section
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no {key} in {section}"))
        .to_owned()
}

#[tokio::test]
async fn what_store_config_writes_serves_each_role_its_own_database_over_verify_full_only() {
    // bootstrap.sh's layout, as far as store-config.sh reads it.
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(out.path().join("pki")).unwrap();
    for svc in ["vault", "broker", "audit"] {
        std::fs::create_dir(out.path().join(svc)).unwrap();
        std::fs::write(
            out.path().join(svc).join(format!("{svc}.toml")),
            "listen = \"0.0.0.0:1\"\n",
        )
        .unwrap();
    }
    let run = std::process::Command::new(deploy_script("store-config.sh"))
        .arg(out.path())
        .env("TWOKEY_DB_HOST", "localhost")
        .env("TWOKEY_CONFIG_ROOT", out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "store-config.sh: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let db = out.path().join("db");
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));

    // The database as store-config.sh and init.sql make it.
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    pg.enable_tls(&read(db.join("server.crt")), &read(db.join("server.key")))
        .unwrap();
    pg.set_hba(&read(db.join("pg_hba.conf"))).unwrap();
    let mut secrets = PathBuf::new();
    for role in ROLES {
        let file = pg
            .write_private(
                &format!("{role}.password"),
                &read(db.join("secrets").join(format!("{role}.password"))),
            )
            .unwrap();
        secrets = file.parent().unwrap().to_owned();
    }
    pg.psql_file(
        "postgres",
        &script(),
        &[("secrets", secrets.to_str().unwrap())],
    )
    .unwrap();

    let port = pg.port().to_string();
    for svc in ["vault", "broker", "audit"] {
        let role = format!("twokey_{svc}");
        let config = read(out.path().join(svc).join(format!("{svc}.toml")));
        assert!(
            config.contains("[store]\nbackend = \"postgres\""),
            "{config}"
        );
        let url = store_setting(&config, "url");
        assert_eq!(
            url,
            format!("postgresql://{role}@localhost:5432/{role}?sslmode=verify-full")
        );
        // The service's own settings, on this server's port.
        let settings = PgSettings {
            url: url.replace(":5432/", &format!(":{port}/")),
            password_file: Some(store_setting(&config, "password_file").into()),
            ca_file: Some(store_setting(&config, "ca_file").into()),
        };
        let c = connect(&settings)
            .await
            .unwrap_or_else(|e| panic!("{svc}: {e}"));
        let row = c
            .query_one(
                "SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, bool>(1)),
            (role.clone(), true)
        );
        // Another service's database, over TLS with the right password:
        // pg_hba has no line for it.
        let other = if svc == "vault" {
            "twokey_broker"
        } else {
            "twokey_vault"
        };
        let wrong_db = PgSettings {
            url: settings
                .url
                .replace(&format!("/{role}?"), &format!("/{other}?")),
            ..settings.clone()
        };
        let e = connect(&wrong_db).await.unwrap_err();
        assert!(
            matches!(&e, PgError::Query(m) if m.contains("no pg_hba.conf entry")
                && m.contains(&format!("database \"{other}\""))),
            "{svc}: {e}"
        );
        // Cleartext over TCP: refused by the server too (the services
        // themselves take sslmode=disable on loopback only).
        let password = read(out.path().join(svc).join("postgres.password"));
        let e = cleartext_refusal(pg.port(), &role, password.trim()).await;
        assert_eq!(
            e.0,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "{}",
            e.1
        );
        assert!(
            e.1.contains("no pg_hba.conf entry") && e.1.contains("no encryption"),
            "{}",
            e.1
        );
    }
    // The certificate names `localhost` only: another name for the same
    // server is refused by verify-full.
    let audit = read(out.path().join("audit/audit.toml"));
    let by_ip = PgSettings {
        url: format!("postgresql://twokey_audit@127.0.0.1:{port}/twokey_audit?sslmode=verify-full"),
        password_file: Some(store_setting(&audit, "password_file").into()),
        ca_file: Some(store_setting(&audit, "ca_file").into()),
    };
    let e = connect(&by_ip).await.unwrap_err();
    assert!(matches!(e, PgError::Tls(_)), "{e}");
}

/// A cleartext TCP connection's refusal: SQLSTATE and message.
async fn cleartext_refusal(port: u16, role: &str, password: &str) -> (SqlState, String) {
    let e = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(role)
        .password(password)
        .dbname(role)
        .connect(tokio_postgres::NoTls)
        .await
        .map(drop)
        .unwrap_err();
    refusal(&e)
}
