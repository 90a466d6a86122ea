//! Mutual TLS from PEM files: server configs that require a client
//! certificate chaining to the configured CA (and not revoked by the
//! configured CRL), and client configs that present one and check the
//! server's name.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::failover;

/// How long a client may take to complete the TLS handshake before the
/// server closes the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The private key file is readable by group or others.
    #[error(
        "private key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` \
         (or 400; in Kubernetes mount the secret with defaultMode 0400)"
    )]
    KeyPermissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The endpoint address is not a valid URL.
    #[error("invalid address {0:?}: use https://HOST:PORT")]
    BadAddress(String),
    /// The endpoint address is not `https://`.
    #[error(
        "address {0:?} is not https://: every twokey service speaks only mutual TLS; use \
         https://HOST:PORT"
    )]
    NotHttps(String),
    /// The transport refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A PEM file does not hold what it should, or rustls refused it.
    #[error("cannot use {what} {path}: {why}")]
    Invalid {
        /// Which file it was.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Whether a server requires a client certificate in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate, no connection (vault, audit).
    Required,
    /// A client without a certificate may connect, so the server can answer
    /// UNAUTHENTICATED (broker); a certificate that is presented must verify.
    Optional,
}

/// A server's TLS: the rustls config and the handshake timeout.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The rustls config (ALPN `h2`).
    pub config: Arc<rustls::ServerConfig>,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
}

/// The three PEM files of a TLS identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This process's certificate chain.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
    /// The CA that peers' certificates must chain to.
    pub ca: PathBuf,
    /// Optional certificate revocation list(s) (PEM) from the CA: a client
    /// certificate it lists is refused in the handshake. Servers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
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

/// The private key's PEM, refused when group or others may read the file
/// (as every other key file of twokey is).
fn read_private_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    read_pem(path, "private key", "PRIVATE KEY")
}

impl TlsFiles {
    /// Files `NAME.crt`, `NAME.key` and `ca.crt` in `dir`, as `twokey pki init` lays them out.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.crt"),
            crl: None,
        }
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        let cert = read_pem(&self.cert, "certificate", "CERTIFICATE")?;
        let key = read_private_key(&self.key)?;
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

    /// The server TLS of a gRPC listener: this identity, client
    /// certificates verified against the CA and the CRL (if configured),
    /// ALPN `h2`, handshakes bounded by [`HANDSHAKE_TIMEOUT`]. Serve it with
    /// [`crate::serve::incoming`].
    pub fn server_tls(&self, auth: ClientAuth) -> Result<ServerTls, TlsError> {
        self.server_tls_with_alpn(auth, &[b"h2"])
    }

    /// [`TlsFiles::server_tls`] offering the given ALPN protocols (the
    /// broker's HTTP/JSON listener offers `h2` and `http/1.1`).
    pub fn server_tls_with_alpn(
        &self,
        auth: ClientAuth,
        alpn: &[&[u8]],
    ) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            config: Arc::new(self.rustls_server_config(auth, alpn)?),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// The rustls server config behind [`TlsFiles::server_tls`], with the
    /// given ALPN protocols (the broker's HTTP listener adds `http/1.1`).
    fn rustls_server_config(
        &self,
        auth: ClientAuth,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let invalid = |what, path: &Path, why: &dyn std::fmt::Display| TlsError::Invalid {
            what,
            path: path.to_owned(),
            why: why.to_string(),
        };
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem()?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate", &self.cert, &e))?;
        let key = PrivateKeyDer::from_pem_slice(&read_private_key(&self.key)?)
            .map_err(|e| invalid("private key", &self.key, &e))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in
            CertificateDer::pem_slice_iter(&read_pem(&self.ca, "CA certificate", "CERTIFICATE")?)
        {
            let ca = ca.map_err(|e| invalid("CA certificate", &self.ca, &e))?;
            roots
                .add(ca)
                .map_err(|e| invalid("CA certificate", &self.ca, &e))?;
        }
        let crls = match &self.crl {
            Some(path) => CertificateRevocationListDer::pem_slice_iter(&read_pem(
                path,
                "certificate revocation list",
                "X509 CRL",
            )?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate revocation list", path, &e))?,
            None => Vec::new(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls);
        if auth == ClientAuth::Optional {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier.build().map_err(|e| {
            invalid(
                "CA certificate or CRL",
                self.crl.as_deref().unwrap_or(&self.ca),
                &e,
            )
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("certificate", &self.cert, &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| invalid("private key", &self.key, &e))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// A client config presenting this identity and requiring the server's
    /// certificate to chain to the CA and name `server_name` (e.g. `vault`).
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .identity(self.identity()?)
            .ca_certificate(self.ca()?)
            .domain_name(server_name))
    }

    /// A lazily connecting channel to `addresses`: one `https://HOST:PORT`,
    /// or the replicas of one peer, comma-separated (see `failover`).
    pub fn channel(&self, addresses: &str, server_name: &str) -> Result<Channel, TlsError> {
        Ok(self.peer(addresses, server_name)?.channel())
    }

    /// The peer at `addresses`, whose channel can be opened again (see
    /// [`Peer`]).
    pub fn peer(&self, addresses: &str, server_name: &str) -> Result<Peer, TlsError> {
        let list = failover::split_addresses(addresses);
        let endpoint =
            endpoint_list(&list, addresses)?.tls_config(self.client_config(server_name)?)?;
        Peer::new(endpoint, &list, CONNECT_TIMEOUT)
    }
}

/// A peer at one address or several replicas: each [`Peer::channel`] is a
/// new, lazily opened connection; with replicas it starts after the
/// replica the last connection used. A caller whose replica answers but
/// cannot serve it (an audit replica that is not the sequencer) opens a new
/// channel to move on: one channel keeps its connection while it is alive.
#[derive(Debug, Clone)]
pub struct Peer {
    endpoint: Endpoint,
    replicas: Option<failover::Failover>,
}

impl Peer {
    /// The peer over `endpoint` (TLS and timeouts set): at the endpoint's
    /// own address when `list` has one, else through
    /// [`failover::Failover`], each replica given `per_replica` to answer.
    pub fn new(endpoint: Endpoint, list: &[&str], per_replica: Duration) -> Result<Self, TlsError> {
        if list.len() <= 1 {
            return Ok(Self {
                endpoint,
                replicas: None,
            });
        }
        let replicas = failover::Failover::new(list, per_replica)
            .map_err(|_| TlsError::BadAddress(list.join(",")))?;
        Ok(Self {
            endpoint: endpoint
                .connect_timeout(per_replica * replicas.len() as u32 + Duration::from_secs(1)),
            replicas: Some(replicas),
        })
    }

    /// A new lazily connecting channel to the peer.
    pub fn channel(&self) -> Channel {
        match &self.replicas {
            None => self.endpoint.connect_lazy(),
            Some(replicas) => self
                .endpoint
                .clone()
                .connect_with_connector_lazy(replicas.clone()),
        }
    }
}

/// How long one address gets to accept a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The endpoint of the first of `list` (the split `addresses`), every
/// address checked as [`endpoint`] checks one.
pub fn endpoint_list(list: &[&str], addresses: &str) -> Result<Endpoint, TlsError> {
    let Some((first, rest)) = list.split_first() else {
        return Err(TlsError::BadAddress(addresses.to_owned()));
    };
    for address in rest {
        endpoint(address)?;
    }
    endpoint(first)
}

/// A lazily connecting channel over `endpoint` (TLS and timeouts set): to
/// the endpoint's own address when `list` has one, else through
/// [`failover::Failover`], each replica given `per_replica` to answer.
pub fn connect_lazy(
    endpoint: Endpoint,
    list: &[&str],
    per_replica: Duration,
) -> Result<Channel, TlsError> {
    Ok(Peer::new(endpoint, list, per_replica)?.channel())
}

/// An endpoint with twokey's connection defaults.
pub fn endpoint(address: &str) -> Result<Endpoint, TlsError> {
    let scheme = address.split_once("://").map(|(s, _)| s);
    if scheme.is_some_and(|s| !s.eq_ignore_ascii_case("https")) {
        return Err(TlsError::NotHttps(address.to_owned()));
    }
    Ok(Endpoint::from_shared(address.to_owned())
        .map_err(|_| TlsError::BadAddress(address.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10)))
}
