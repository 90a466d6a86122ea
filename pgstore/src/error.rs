//! Errors of the PostgreSQL layer, each saying what to do, never holding a
//! password; [`PgError::is_unavailable`] tells a database that cannot be
//! reached (a retry or another replica may help) from a refusal.

/// A PostgreSQL failure.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The settings are wrong; the message names the setting.
    #[error("{0}")]
    Setting(String),
    /// The server cannot be reached or dropped the connection.
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(String),
    /// The TLS handshake failed: the server's certificate does not chain
    /// to `ca_file` or does not name the host.
    #[error("PostgreSQL TLS: {0}; check ca_file and the host in the url")]
    Tls(String),
    /// The server refused or failed a statement.
    #[error("PostgreSQL: {0}")]
    Query(String),
    /// The schema in the database does not fit this binary.
    #[error("{0}")]
    Schema(String),
}

impl PgError {
    /// True when the database could not be reached: answer UNAVAILABLE.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, PgError::Unavailable(_))
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        // A closed connection or an I/O error has no SQLSTATE; a server
        // shutting down answers class 57P (operator intervention) or 08
        // (connection exception).
        let text = describe(&e);
        if e.code().is_none() && has_tls_error(&e) {
            return PgError::Tls(text);
        }
        match e.code() {
            None => PgError::Unavailable(text),
            Some(code) if code.code().starts_with("08") || code.code().starts_with("57P") => {
                PgError::Unavailable(text)
            }
            Some(_) => PgError::Query(text),
        }
    }
}

/// The error and its sources; tokio-postgres puts the server's message in
/// the source.
fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// True when a rustls error is among the sources: a certificate refused is
/// not a server that is down.
fn has_tls_error(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>().is_some()
            || s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        source = s.source();
    }
    false
}
