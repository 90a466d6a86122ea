//! Mutual TLS from PEM files: server configs that require a client
//! certificate chaining to the configured CA, and client configs that present
//! one and check the server's name.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file it was.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind.
    #[error("{path} holds no PEM {what}; give a PEM file (twokey pki init makes them)")]
    NotPem {
        /// What was expected.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// The endpoint address is not a valid URL.
    #[error("invalid address {0:?}: use https://HOST:PORT")]
    BadAddress(String),
    /// The transport refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The three PEM files of a TLS identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TlsFiles {
    /// This process's certificate chain.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
    /// The CA that peers' certificates must chain to.
    pub ca: PathBuf,
}

fn read_pem(path: &Path, what: &'static str, marker: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN") || !text.contains(marker) {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Files `NAME.crt`, `NAME.key` and `ca.crt` in `dir`, as `twokey pki init` lays them out.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.crt"),
        }
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        let cert = read_pem(&self.cert, "certificate", "CERTIFICATE")?;
        let key = read_pem(&self.key, "private key", "PRIVATE KEY")?;
        Ok(Identity::from_pem(cert, key))
    }

    fn ca(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(read_pem(
            &self.ca,
            "CA certificate",
            "CERTIFICATE",
        )?))
    }

    /// The certificate's PEM bytes (for expiry metrics and the like).
    pub fn cert_pem(&self) -> Result<Vec<u8>, TlsError> {
        read_pem(&self.cert, "certificate", "CERTIFICATE")
    }

    /// A server config that requires every client to present a certificate
    /// chaining to the CA. Handshakes that take longer than 10 s are dropped.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?)
            .timeout(Duration::from_secs(10)))
    }

    /// A client config presenting this identity and requiring the server's
    /// certificate to chain to the CA and name `server_name` (e.g. `vault`).
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .identity(self.identity()?)
            .ca_certificate(self.ca()?)
            .domain_name(server_name))
    }

    /// A lazily connecting channel to `address` (`https://HOST:PORT`).
    pub fn channel(&self, address: &str, server_name: &str) -> Result<Channel, TlsError> {
        Ok(endpoint(address)?
            .tls_config(self.client_config(server_name)?)?
            .connect_lazy())
    }
}

/// An endpoint with twokey's connection defaults.
pub fn endpoint(address: &str) -> Result<Endpoint, TlsError> {
    Ok(Endpoint::from_shared(address.to_owned())
        .map_err(|_| TlsError::BadAddress(address.to_owned()))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10)))
}
