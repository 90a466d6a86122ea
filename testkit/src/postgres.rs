//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port and a Unix socket in
//! that directory, stopped (`-m immediate`) and deleted on drop. Run as root
//! (CI), the server runs as the `postgres` user, since PostgreSQL refuses to
//! run as root. Never a shared or long-lived server: each test gets its own.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The superuser's name in every test server.
pub const SUPERUSER: &str = "twokey_test_super";

/// Why a test server could not start, with what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PgUnavailable(pub String);

/// A running test server; stopped and removed on drop.
#[derive(Debug)]
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
}

/// The directory holding `initdb`, `pg_ctl` and `psql`: `$TWOKEY_PG_BIN`,
/// else the first such directory on `PATH`, else Debian's `/usr/lib/postgresql/<newest>/bin`.
pub fn bin_dir() -> Result<PathBuf, PgUnavailable> {
    if let Some(dir) = std::env::var_os("TWOKEY_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if ["initdb", "pg_ctl", "psql"]
                .iter()
                .all(|tool| dir.join(tool).is_file())
            {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        PgUnavailable(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): \
             scripts/test installs Debian's postgresql package; or set TWOKEY_PG_BIN"
                .to_owned(),
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

impl TestPostgres {
    /// Starts a fresh server: `initdb` (UTF-8, `trust` on the Unix socket,
    /// `scram-sha-256` over TCP), then `pg_ctl start -w` listening on
    /// 127.0.0.1 only. Fails with the reason when PostgreSQL is missing or
    /// does not start.
    pub fn start() -> Result<Self, PgUnavailable> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("twokey-pg-")
            .tempdir()
            .map_err(|e| PgUnavailable(format!("temp dir: {e}")))?;
        let run_as = is_root().then(|| "postgres".to_owned());
        if run_as.is_some() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .map_err(|e| PgUnavailable(format!("chown: {e}")))?;
            if !status.success() {
                return Err(PgUnavailable(
                    "running as root, the test server runs as the `postgres` user, \
                     which does not exist: install Debian's postgresql package"
                        .to_owned(),
                ));
            }
        }
        let me = Self {
            dir,
            bin,
            port: free_port(),
            run_as,
        };
        let pwfile = me.dir.path().join("superuser.pw");
        std::fs::write(&pwfile, "twokey-test-superuser\n")
            .map_err(|e| PgUnavailable(format!("write {}: {e}", pwfile.display())))?;
        me.chown(&pwfile)?;
        let data = me.data_dir();
        me.run_ok(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                SUPERUSER,
                "--pwfile",
                path_str(&pwfile),
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-instructions",
            ],
        )?;
        me.start_server()?;
        Ok(me)
    }

    fn chown(&self, path: &Path) -> Result<(), PgUnavailable> {
        if self.run_as.is_some() {
            Command::new("chown")
                .arg("postgres:")
                .arg(path)
                .status()
                .map_err(|e| PgUnavailable(format!("chown: {e}")))?;
        }
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run_ok(&self, tool: &str, args: &[&str]) -> Result<Output, PgUnavailable> {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .map_err(|e| PgUnavailable(format!("run {tool}: {e}")))?;
        if !out.status.success() {
            return Err(PgUnavailable(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(out)
    }

    /// Starts the server (again, after [`TestPostgres::stop`]) on the same
    /// port and data, and waits until it accepts connections.
    pub fn start_server(&self) -> Result<(), PgUnavailable> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=on -c synchronous_commit=on",
            self.port,
            path_str(self.socket_dir())
        );
        let log = self.dir.path().join("server.log");
        self.run_ok(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                path_str(&self.data_dir()),
                "-l",
                path_str(&log),
                "-o",
                &options,
            ],
        )
        .map(drop)
        .map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            PgUnavailable(format!("{e}\nserver log:\n{log}"))
        })
    }

    /// Turns TLS on with this server certificate and key (PEM), and
    /// restarts: clients may then connect with `sslmode=verify-full`.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<(), PgUnavailable> {
        let data = self.data_dir();
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, pem)
                .map_err(|e| PgUnavailable(format!("write {}: {e}", path.display())))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| PgUnavailable(format!("chmod {}: {e}", path.display())))?;
            self.chown(&path)?;
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .map_err(|e| PgUnavailable(format!("read {}: {e}", conf.display())))?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text)
            .map_err(|e| PgUnavailable(format!("write {}: {e}", conf.display())))?;
        self.stop()?;
        self.start_server()
    }

    /// Replaces the server's `pg_hba.conf` with `text` (a deployment's
    /// own) and restarts, so that it is in force for every new connection.
    pub fn set_hba(&self, text: &str) -> Result<(), PgUnavailable> {
        let path = self.data_dir().join("pg_hba.conf");
        std::fs::write(&path, text)
            .map_err(|e| PgUnavailable(format!("write {}: {e}", path.display())))?;
        self.chown(&path)?;
        self.stop()?;
        self.start_server()
    }

    /// Stops the server at once (`-m immediate`: like a crash, the next start
    /// recovers from the WAL).
    pub fn stop(&self) -> Result<(), PgUnavailable> {
        self.run_ok(
            "pg_ctl",
            &["stop", "-m", "immediate", "-D", path_str(&self.data_dir())],
        )
        .map(drop)
    }

    /// Runs SQL as the superuser through `psql` on the Unix socket, stopping
    /// at the first error; returns what it printed (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, PgUnavailable> {
        let port = self.port.to_string();
        let out = self.run_ok(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                path_str(self.socket_dir()),
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Runs a psql script file (as `psql -f`, fed on stdin) as the
    /// superuser on the Unix socket, with `-v NAME=VALUE` for each of
    /// `vars`, stopping at the first error; returns what it printed. This is
    /// how a deployment's own SQL (deploy/postgres/init.sql) is tested as
    /// written. Backquoted shell commands in the script run as the server's
    /// user: give them files from [`TestPostgres::write_private`].
    pub fn psql_file(
        &self,
        database: &str,
        script: &Path,
        vars: &[(&str, &str)],
    ) -> Result<String, PgUnavailable> {
        use std::io::Write;
        let text = std::fs::read(script)
            .map_err(|e| PgUnavailable(format!("read {}: {e}", script.display())))?;
        let port = self.port.to_string();
        let mut command = self.command("psql");
        command.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
        for (name, value) in vars {
            command.arg("-v").arg(format!("{name}={value}"));
        }
        command
            .args(["-h", path_str(self.socket_dir()), "-p", &port])
            .args(["-U", SUPERUSER, "-d", database, "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| PgUnavailable(format!("run psql: {e}")))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(&text)
            .map_err(|e| PgUnavailable(format!("feed psql: {e}")))?;
        let out = child
            .wait_with_output()
            .map_err(|e| PgUnavailable(format!("run psql: {e}")))?;
        if !out.status.success() {
            return Err(PgUnavailable(format!(
                "psql -f {} failed: {}{}",
                script.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Writes `contents` to `name` in a directory of this test server's
    /// (mode 0600, owned by the user the server and `psql` run as), and
    /// returns its path: secrets a script reads, such as password files.
    pub fn write_private(&self, name: &str, contents: &str) -> Result<PathBuf, PgUnavailable> {
        let dir = self.dir.path().join("private");
        std::fs::create_dir_all(&dir)
            .map_err(|e| PgUnavailable(format!("create {}: {e}", dir.display())))?;
        self.chown(&dir)?;
        let path = dir.join(name);
        std::fs::write(&path, contents)
            .map_err(|e| PgUnavailable(format!("write {}: {e}", path.display())))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| PgUnavailable(format!("chmod {}: {e}", path.display())))?;
        self.chown(&path)?;
        Ok(path)
    }

    /// Creates a login role with `password` and a database it owns, which no
    /// other role may connect to (as each service's own database), and
    /// returns the URL to reach it over loopback TCP (no password in it).
    pub fn create_database(
        &self,
        name: &str,
        role: &str,
        password: &str,
    ) -> Result<String, PgUnavailable> {
        self.psql(
            "postgres",
            &format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"),
        )?;
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {role}"))?;
        self.psql(
            "postgres",
            &format!("REVOKE CONNECT, TEMPORARY ON DATABASE {name} FROM PUBLIC"),
        )?;
        self.psql(name, "REVOKE ALL ON SCHEMA public FROM PUBLIC")?;
        Ok(self.url(name, role))
    }

    /// A service's own database, as the service is given it: a database
    /// `name` owned by login role `role` (as [`TestPostgres::create_database`])
    /// with a random password, written (with a newline) to a 0600 file of
    /// this server's ([`TestPostgres::write_private`], named
    /// `ROLE.password`): `[store.postgres]`'s `url` and `password_file`.
    pub fn database_for(&self, name: &str, role: &str) -> Result<TestDatabase, PgUnavailable> {
        let password: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let url = self.create_database(name, role, &password)?;
        let password_file =
            self.write_private(&format!("{role}.password"), &format!("{password}\n"))?;
        Ok(TestDatabase {
            url,
            password_file,
            password,
        })
    }

    /// `postgresql://ROLE@127.0.0.1:PORT/DATABASE?sslmode=disable`.
    pub fn url(&self, database: &str, role: &str) -> String {
        format!(
            "postgresql://{role}@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }
}

/// A service's database on a test server ([`TestPostgres::database_for`]):
/// what its `[store.postgres]` section (or `PgSettings`) is given.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// `postgresql://ROLE@127.0.0.1:PORT/NAME?sslmode=disable`, no password.
    pub url: String,
    /// The role's password file (mode 0600, one line).
    pub password_file: PathBuf,
    /// The password itself, for tests that check it is never shown.
    pub password: String,
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.data_dir())
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_server_starts_answers_survives_a_crash_restart_and_keeps_committed_rows() {
        let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
        let url = pg.create_database("probe", "probe_role", "pw").unwrap();
        assert_eq!(
            url,
            format!(
                "postgresql://probe_role@127.0.0.1:{}/probe?sslmode=disable",
                pg.port()
            )
        );
        pg.psql("probe", "CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
            .unwrap();
        assert_eq!(pg.psql("probe", "SHOW synchronous_commit").unwrap(), "on");
        pg.stop().unwrap();
        assert!(
            pg.psql("probe", "SELECT 1").is_err(),
            "stopped means stopped"
        );
        pg.start_server().unwrap();
        assert_eq!(pg.psql("probe", "SELECT v FROM t").unwrap(), "7");
        let err = pg.psql("probe", "SELECT * FROM missing").unwrap_err();
        assert!(err.0.contains("missing"), "{err}");
    }

    #[test]
    fn a_service_database_has_its_role_a_random_password_and_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
        let db = pg.database_for("svc", "svc_role").unwrap();
        assert_eq!(db.url, pg.url("svc", "svc_role"));
        assert!(!db.url.contains(&db.password));
        assert_eq!(db.password.len(), 32);
        let mode = std::fs::metadata(&db.password_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&db.password_file).unwrap(),
            format!("{}\n", db.password)
        );
        // The role logs in with it over TCP (scram-sha-256) and owns the
        // database.
        let login = |password: &str| {
            pg.command("psql")
                .args(["-X", "-A", "-t", "-w", "-h", "127.0.0.1", "-p"])
                .arg(pg.port().to_string())
                .args(["-U", "svc_role", "-d", "svc", "-c", "SELECT current_user"])
                .env("PGPASSWORD", password)
                .output()
                .unwrap()
        };
        let out = login(&db.password);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "svc_role");
        assert!(!login("wrong").status.success());
        let owner = pg
            .psql(
                "postgres",
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'svc'",
            )
            .unwrap();
        assert_eq!(owner, "svc_role");
        let other = pg.database_for("svc2", "svc2_role").unwrap();
        assert_ne!(other.password, db.password);
    }
}
