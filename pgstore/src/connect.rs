//! Connecting to PostgreSQL: the URL names role, host, port and database but
//! never a password (argv and config files get copied around; the password
//! comes from `password_file`). `sslmode` is `verify-full` by default (the
//! server's certificate must chain to `ca_file` and name the host), or
//! `disable` on loopback or a Unix socket only; `prefer` and `allow`, which
//! fall back to cleartext without a word, are refused.

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
};
use tokio_postgres::{AsyncMessage, Client, Notification, config::Host};
use zeroize::Zeroizing;

use crate::error::PgError;

/// How a service reaches its database (`[store.postgres]` in its config).
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgSettings {
    /// `postgresql://ROLE@HOST:PORT/DATABASE?sslmode=verify-full`, with no
    /// password.
    pub url: String,
    /// A file whose first line is the role's password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates that sign the server's certificate; required
    /// unless `sslmode=disable`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.url)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The TLS modes twokey takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    Disable,
    VerifyFull,
}

/// Splits `sslmode` off the URL: what we do, and the URL tokio-postgres
/// parses (`require`: it negotiates TLS; rustls does the verifying).
fn ssl_mode(url: &str) -> Result<(Tls, String), PgError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("sslmode=") {
            Some(m) => mode = Some(m.to_owned()),
            None => rest.push(pair),
        }
    }
    let tls = match mode.as_deref() {
        None | Some("verify-full") | Some("require") => Tls::VerifyFull,
        Some("disable") => Tls::Disable,
        Some(other) => {
            return Err(PgError::Setting(format!(
                "postgres url: sslmode={other} is not taken: use verify-full (the default; \
                 require means the same here, the certificate is always checked), or \
                 disable on loopback or a Unix socket"
            )));
        }
    };
    rest.push(match tls {
        Tls::Disable => "sslmode=disable",
        Tls::VerifyFull => "sslmode=require",
    });
    Ok((tls, format!("{base}?{}", rest.join("&"))))
}

fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// The parsed settings and the TLS mode, checked; reads the password file.
fn config(settings: &PgSettings) -> Result<(tokio_postgres::Config, Tls), PgError> {
    let (tls, url) = ssl_mode(&settings.url)?;
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        PgError::Setting(format!(
            "postgres url: {e}; write postgresql://ROLE@HOST:PORT/DATABASE?sslmode=verify-full"
        ))
    })?;
    if config.get_password().is_some() {
        return Err(PgError::Setting(
            "postgres url holds a password: remove it and put it in password_file".to_owned(),
        ));
    }
    if config.get_user().is_none() {
        return Err(PgError::Setting(
            "postgres url names no role: write postgresql://ROLE@HOST:PORT/DATABASE".to_owned(),
        ));
    }
    if tls == Tls::Disable && !config.get_hosts().iter().all(is_local) {
        return Err(PgError::Setting(
            "postgres url: sslmode=disable is taken only for loopback hosts and Unix sockets; \
             use sslmode=verify-full with ca_file"
                .to_owned(),
        ));
    }
    if let Some(path) = &settings.password_file {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            PgError::Setting(format!("postgres password_file {}: {e}", path.display()))
        })?);
        let password = text.lines().next().unwrap_or("");
        if password.is_empty() {
            return Err(PgError::Setting(format!(
                "postgres password_file {} is empty: its first line is the password",
                path.display()
            )));
        }
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    Ok((config, tls))
}

fn rustls_config(settings: &PgSettings) -> Result<rustls::ClientConfig, PgError> {
    let Some(ca) = &settings.ca_file else {
        return Err(PgError::Setting(
            "postgres: sslmode=verify-full needs ca_file (the CA that signs the server's \
             certificate)"
                .to_owned(),
        ));
    };
    let pem = std::fs::read(ca)
        .map_err(|e| PgError::Setting(format!("postgres ca_file {}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| PgError::Setting(format!("postgres ca_file {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| PgError::Setting(format!("postgres ca_file {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(PgError::Setting(format!(
            "postgres ca_file {} holds no certificate",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Setting(format!("postgres TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Checks the settings without connecting: what a service does at start,
/// so a bad setting stops it before it serves.
pub fn check(settings: &PgSettings) -> Result<(), PgError> {
    let (_, tls) = config(settings)?;
    if tls == Tls::VerifyFull {
        rustls_config(settings)?;
    }
    Ok(())
}

/// Connects, and drives the connection on a task of its own. A lost
/// connection makes the client's calls fail with [`PgError::Unavailable`].
pub async fn connect(settings: &PgSettings) -> Result<Client, PgError> {
    let (config, tls) = config(settings)?;
    match tls {
        Tls::Disable => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
        Tls::VerifyFull => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config(settings)?);
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
    }
}

/// Like [`connect`], also handing over the notifications (`LISTEN`) the
/// server sends on this session; the receiver ends when the connection does.
pub async fn connect_listening(
    settings: &PgSettings,
) -> Result<(Client, UnboundedReceiver<Notification>), PgError> {
    let (config, tls) = config(settings)?;
    let (tx, rx) = unbounded_channel();
    let client = match tls {
        Tls::Disable => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(drive_listening(connection, tx));
            client
        }
        Tls::VerifyFull => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config(settings)?);
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(drive_listening(connection, tx));
            client
        }
    };
    Ok((client, rx))
}

/// Drives a connection, passing its notifications on.
async fn drive_listening<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notifications: UnboundedSender<Notification>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                let _ = notifications.send(n);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %PgError::from(e), "PostgreSQL connection closed");
                return;
            }
            None => return,
        }
    }
}

async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::warn!(error = %PgError::from(e), "PostgreSQL connection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> PgSettings {
        PgSettings {
            url: url.to_owned(),
            password_file: None,
            ca_file: None,
        }
    }

    fn setting_error(url: &str) -> String {
        match config(&settings(url)) {
            Err(PgError::Setting(m)) => m,
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_not_repeated() {
        let m = setting_error("postgresql://vault:hunter2@db.example:5432/vault");
        assert!(m.contains("password_file"), "{m}");
        assert!(!m.contains("hunter2"), "{m}");
    }

    #[test]
    fn cleartext_is_only_for_loopback_and_unix_sockets() {
        let m = setting_error("postgresql://vault@db.example/vault?sslmode=disable");
        assert!(m.contains("loopback"), "{m}");
        for ok in [
            "postgresql://vault@127.0.0.1:5432/vault?sslmode=disable",
            "postgresql://vault@localhost/vault?sslmode=disable",
            "postgresql://vault@[::1]/vault?sslmode=disable",
            "postgresql://vault@%2Frun%2Fpostgresql/vault?sslmode=disable",
        ] {
            let (_, tls) = config(&settings(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(tls, Tls::Disable, "{ok}");
        }
    }

    #[test]
    fn modes_that_fall_back_to_cleartext_are_refused_and_tls_is_the_default() {
        for mode in ["prefer", "allow", "verify-ca", "bogus"] {
            let m = setting_error(&format!("postgresql://v@h/d?sslmode={mode}"));
            assert!(m.contains(&format!("sslmode={mode} is not taken")), "{m}");
        }
        let (c, tls) = config(&settings("postgresql://v@h/d")).unwrap();
        assert_eq!(tls, Tls::VerifyFull);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let m = match check(&settings("postgresql://v@h/d")) {
            Err(PgError::Setting(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(m.contains("needs ca_file"), "{m}");
    }

    #[test]
    fn the_password_comes_from_the_first_line_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let mut s = settings("postgresql://v@127.0.0.1/d?sslmode=disable");
        s.password_file = Some(file.clone());
        let (c, _) = config(&s).unwrap();
        assert_eq!(c.get_password(), Some(&b"s3cret"[..]));
        assert!(!format!("{s:?}").contains("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        let m = match config(&s) {
            Err(PgError::Setting(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(m.contains("is empty"), "{m}");
    }
}
