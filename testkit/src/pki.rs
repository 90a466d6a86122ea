//! A development PKI: a CA and leaf certificates carrying SPIFFE IDs, made
//! with rcgen, and [`init`], the whole set `twokey pki init` and a local
//! system write (CA, the three services, each user with a certificate and an
//! OpenSSH signing key, a profile file). Used by tests and the CLI;
//! production deployments bring certificates from their own CA, and people
//! bring their own SSH keys.

use std::{
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

use twokey_runtime::keys::{KeyError, write_secret_file};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters.
    #[error("cannot make certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be written.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A file could not be written.
    #[error("cannot write {0}: {1}")]
    Io(String, std::io::Error),
    /// The request itself is wrong (a bad trust domain, a user named twice).
    #[error("{0}")]
    Usage(String),
    /// The directory cannot be used as it is.
    #[error("{0}")]
    Directory(String),
}

/// A PEM certificate and its PEM private key.
pub struct CertifiedKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM. Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

impl CertifiedKey {
    /// Writes `NAME.crt` (0644) and `NAME.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        let crt = dir.join(format!("{name}.crt"));
        std::fs::write(&crt, &self.cert_pem)
            .map_err(|e| PkiError::Io(crt.display().to_string(), e))?;
        write_secret_file(&dir.join(format!("{name}.key")), self.key_pem.as_bytes())?;
        Ok(())
    }
}

/// What a leaf certificate should say. Fields beyond the SPIFFE IDs exist so
/// tests can make certificates that must be refused.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs; normally exactly one SPIFFE ID.
    pub spiffe_ids: Vec<String>,
    /// DNS SANs, e.g. the service name `vault` that clients check.
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: time::OffsetDateTime,
    /// End of validity.
    pub not_after: time::OffsetDateTime,
    /// The extended key usages the certificate carries.
    pub usage: LeafUsage,
}

/// Extended key usages of a leaf certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeafUsage {
    /// serverAuth and clientAuth: what twokey issues.
    #[default]
    ServerAndClient,
    /// serverAuth only (tests: a certificate that may not act as a client).
    ServerOnly,
    /// No extended key usage extension at all (tests).
    Unspecified,
}

impl LeafSpec {
    /// A certificate for one SPIFFE ID, valid from an hour ago for a year.
    pub fn new(spiffe_id: &str) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            spiffe_ids: vec![spiffe_id.to_owned()],
            dns_names: Vec::new(),
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(365),
            usage: LeafUsage::default(),
        }
    }

    /// Adds DNS names (servers: the service name and `localhost`).
    pub fn dns(mut self, names: &[&str]) -> Self {
        self.dns_names.extend(names.iter().map(|n| (*n).to_owned()));
        self
    }
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new CA named after `trust_domain`, valid for ten years.
    pub fn new(trust_domain: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("twokey development CA ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`DevCa::write`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.crt` and `ca.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        CertifiedKey {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
        .write(dir, "ca")
    }

    /// Issues a leaf certificate for client and server use.
    pub fn issue(&self, spec: &LeafSpec) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            spec.spiffe_ids
                .first()
                .cloned()
                .unwrap_or_else(|| "no-id".into()),
        );
        params.distinguished_name = dn;
        for id in &spec.spiffe_ids {
            params
                .subject_alt_names
                .push(SanType::URI(id.as_str().try_into()?));
        }
        for dns in &spec.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
            if dns == "localhost" {
                for ip in ["127.0.0.1", "::1"] {
                    let ip: IpAddr = ip.parse().expect("literal IP");
                    params.subject_alt_names.push(SanType::IpAddress(ip));
                }
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.usage {
            LeafUsage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafUsage::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
            LeafUsage::Unspecified => Vec::new(),
        };
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate revocation list (PEM) signed by this CA that revokes
    /// each certificate in `revoked` (PEM), valid for a day from now.
    pub fn crl_pem(&self, revoked: &[&str]) -> Result<String, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for pem in revoked {
            let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            let cert = block
                .parse_x509()
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(cert.raw_serial()),
                revocation_time: now - time::Duration::minutes(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// A server certificate for service `name` (`vault`, `broker`, `audit`):
    /// SPIFFE ID `spiffe://TD/svc/NAME`, DNS names `NAME` and `localhost`.
    pub fn issue_service(&self, trust_domain: &str, name: &str) -> Result<CertifiedKey, PkiError> {
        self.issue(
            &LeafSpec::new(&format!("spiffe://{trust_domain}/svc/{name}"))
                .dns(&[name, "localhost"]),
        )
    }

    /// A user certificate: SPIFFE ID `spiffe://TD/user/NAME`.
    pub fn issue_user(&self, trust_domain: &str, name: &str) -> Result<CertifiedKey, PkiError> {
        self.issue(&LeafSpec::new(&format!(
            "spiffe://{trust_domain}/user/{name}"
        )))
    }
}

/// The default trust domain of development certificates.
pub const DEFAULT_TRUST_DOMAIN: &str = "twokey.local";
/// The profile file [`init`] writes next to the certificates.
pub const PROFILE_FILE: &str = "twokey.toml";
/// The services that get a certificate.
pub const SERVICES: [&str; 3] = ["vault", "broker", "audit"];

/// What a user does; decides their SPIFFE ID and the profile written for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserRole {
    /// Files requests.
    Requester,
    /// Approves requests.
    Approver,
    /// Verifies PINs and releases codes.
    Operator,
    /// Enrolls and removes accounts.
    Admin,
    /// Reads and verifies the audit log.
    Auditor,
    /// A service (a BPM) filing requests on requesters' behalf: gets a
    /// `svc/NAME` identity instead of `user/NAME`.
    Intake,
}

impl UserRole {
    /// Every role, in the order `--help` lists them.
    pub const ALL: [UserRole; 6] = [
        Self::Requester,
        Self::Approver,
        Self::Operator,
        Self::Admin,
        Self::Auditor,
        Self::Intake,
    ];

    /// The role's name, as `NAME:ROLE` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requester => "requester",
            Self::Approver => "approver",
            Self::Operator => "operator",
            Self::Admin => "admin",
            Self::Auditor => "auditor",
            Self::Intake => "intake",
        }
    }
}

/// A `NAME:ROLE` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// The name in the SPIFFE ID and the profile.
    pub name: String,
    /// The role.
    pub role: UserRole,
}

/// Parses `NAME:ROLE`.
pub fn parse_user(text: &str) -> Result<UserSpec, String> {
    let (name, role) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not NAME:ROLE (e.g. alice:requester)"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "user name {name:?} may hold only letters, digits, '.', '-' and '_'"
        ));
    }
    if SERVICES.contains(&name) || name == "ca" {
        return Err(format!(
            "user name {name:?} is taken by a service certificate"
        ));
    }
    let role = UserRole::ALL
        .into_iter()
        .find(|r| r.as_str().eq_ignore_ascii_case(role))
        .ok_or_else(|| {
            format!(
                "unknown role {role:?}: use requester, approver, operator, admin, auditor or intake"
            )
        })?;
    Ok(UserSpec {
        name: name.to_owned(),
        role,
    })
}

/// One certificate written.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    /// File stem: `vault`, `alice`.
    pub name: String,
    /// `service`, or the user's role.
    pub role: String,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// Certificate path.
    pub cert: PathBuf,
    /// Key path.
    pub key: PathBuf,
    /// The user's OpenSSH signing key (`NAME.ssh`, beside `NAME.ssh.pub`);
    /// none for services.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<PathBuf>,
}

/// What [`init`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    /// The directory.
    pub dir: PathBuf,
    /// The trust domain.
    pub trust_domain: String,
    /// The CA certificate.
    pub ca: PathBuf,
    /// Every leaf certificate.
    pub identities: Vec<Issued>,
    /// The profile file, if users were given.
    pub config: Option<PathBuf>,
}

/// Where the users' profiles point.
#[derive(Debug, Clone, Copy)]
pub struct Addresses<'a> {
    /// The broker, `https://HOST:PORT`.
    pub broker: &'a str,
    /// The audit service (auditors' profiles only).
    pub audit: &'a str,
}

/// Writes the CA, the service certificates, the user certificates and (with
/// users) the profile file [`PROFILE_FILE`] into `dir`, which must be empty
/// or missing unless `force` (then the twokey files in it are replaced).
pub fn init(
    dir: &Path,
    trust_domain: &str,
    users: &[UserSpec],
    force: bool,
    addresses: Addresses<'_>,
) -> Result<InitReport, PkiError> {
    let td = trust_domain;
    twokey_runtime::SpiffeId::parse(&format!("spiffe://{td}/svc/vault"))
        .map_err(|e| PkiError::Usage(format!("--trust-domain {td:?}: {e}")))?;
    let mut seen = std::collections::BTreeSet::new();
    for u in users {
        if !seen.insert(u.name.as_str()) {
            return Err(PkiError::Usage(format!(
                "user {:?} is given twice; give each --user once",
                u.name
            )));
        }
    }
    prepare_dir(dir, force)?;
    if force {
        let names = ["ca"]
            .into_iter()
            .chain(SERVICES)
            .chain(users.iter().map(|u| u.name.as_str()));
        for name in names {
            for ext in ["crt", "key", "ssh", "ssh.pub"] {
                remove_if_present(&dir.join(format!("{name}.{ext}")))?;
            }
        }
    }

    let ca = DevCa::new(td)?;
    ca.write(dir)?;
    let mut identities = Vec::new();
    for service in SERVICES {
        let id = format!("spiffe://{td}/svc/{service}");
        ca.issue_service(td, service)?.write(dir, service)?;
        identities.push(issued(dir, service, "service", id));
    }
    for u in users {
        let id = match u.role {
            UserRole::Intake => format!("spiffe://{td}/svc/{}", u.name),
            _ => format!("spiffe://{td}/user/{}", u.name),
        };
        ca.issue(&LeafSpec::new(&id))?.write(dir, &u.name)?;
        let ssh_key = crate::consent::write_key(dir, &u.name, &crate::consent::generate_key())
            .map_err(|e| {
                PkiError::Io(dir.join(format!("{}.ssh", u.name)).display().to_string(), e)
            })?;
        let mut entry = issued(dir, &u.name, u.role.as_str(), id);
        entry.ssh_key = Some(ssh_key);
        identities.push(entry);
    }

    let config = if users.is_empty() {
        None
    } else {
        let path = dir.join(PROFILE_FILE);
        remove_if_present(&path)?;
        write_profiles(&path, "", users, addresses)?;
        Some(path)
    };
    Ok(InitReport {
        dir: dir.to_owned(),
        trust_domain: td.to_owned(),
        ca: dir.join("ca.crt"),
        identities,
        config,
    })
}

/// Writes a CLI profile file at `path`: one `[profiles.NAME]` per user, with
/// the broker's address, the audit address for auditors, and certificate,
/// key, CA and OpenSSH signing key (`ssh_key`, `NAME.ssh`) paths under
/// `pki_prefix` (relative to the file).
pub fn write_profiles(
    path: &Path,
    pki_prefix: &str,
    users: &[UserSpec],
    addresses: Addresses<'_>,
) -> Result<(), PkiError> {
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut text = String::new();
    for u in users {
        text.push_str(&format!("[profiles.{}]\n", quote(&u.name)));
        text.push_str(&format!("broker = {}\n", quote(addresses.broker)));
        if u.role == UserRole::Auditor {
            text.push_str(&format!("audit = {}\n", quote(addresses.audit)));
        }
        let file = |ext: &str| quote(&format!("{pki_prefix}{}.{ext}", u.name));
        text.push_str(&format!(
            "cert = {}\nkey = {}\nssh_key = {}\n",
            file("crt"),
            file("key"),
            file("ssh")
        ));
        text.push_str(&format!(
            "ca = {}\n\n",
            quote(&format!("{pki_prefix}ca.crt"))
        ));
    }
    std::fs::write(path, text).map_err(|e| PkiError::Io(path.display().to_string(), e))
}

fn issued(dir: &Path, name: &str, role: &str, spiffe_id: String) -> Issued {
    Issued {
        name: name.to_owned(),
        role: role.to_owned(),
        spiffe_id,
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ssh_key: None,
    }
}

fn remove_if_present(path: &Path) -> Result<(), PkiError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PkiError::Io(path.display().to_string(), e))
        }
        _ => Ok(()),
    }
}

fn prepare_dir(dir: &Path, force: bool) -> Result<(), PkiError> {
    let io = |e| PkiError::Io(dir.display().to_string(), e);
    if dir.exists() {
        if !dir.is_dir() {
            return Err(PkiError::Usage(format!(
                "{} exists and is not a directory; give --dir a directory",
                dir.display()
            )));
        }
        let mut entries = std::fs::read_dir(dir).map_err(io)?;
        if entries.next().is_some() && !force {
            return Err(PkiError::Directory(format!(
                "{} is not empty; pick an empty directory, or pass --force to replace the twokey files in it",
                dir.display()
            )));
        }
        Ok(())
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
    }
}

/// A TLS connector for tests' HTTPS clients: trusts the `ca.crt` in `pki`,
/// presents `name`'s certificate (`<name>.crt`, `<name>.key`) or none, and
/// offers the ALPN protocols `alpn`.
pub fn https_connector(
    pki: &Path,
    name: Option<&str>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.join("ca.crt")).expect("the test CA") {
        roots
            .add(ca.expect("a CA certificate"))
            .expect("the CA is usable");
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots);
    let mut config = match name {
        Some(name) => {
            let certs = CertificateDer::pem_file_iter(pki.join(format!("{name}.crt")))
                .expect("the client certificate")
                .collect::<Result<Vec<_>, _>>()
                .expect("a PEM certificate");
            let key = PrivateKeyDer::from_pem_file(pki.join(format!("{name}.key")))
                .expect("the client key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("a usable client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twokey_runtime::identity::{identity_of_cert, spiffe_ids_in_cert};

    fn der(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()
    }

    #[test]
    fn issued_certificates_carry_their_spiffe_id() {
        let ca = DevCa::new("example.org").unwrap();
        let leaf = ca.issue_service("example.org", "vault").unwrap();
        let id = identity_of_cert(&der(&leaf.cert_pem), "example.org").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/svc/vault");
        assert!(identity_of_cert(&der(&leaf.cert_pem), "other.org").is_err());
    }

    #[test]
    fn two_spiffe_ids_are_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let mut spec = LeafSpec::new("spiffe://example.org/user/a");
        spec.spiffe_ids.push("spiffe://example.org/user/b".into());
        let leaf = ca.issue(&spec).unwrap();
        assert_eq!(spiffe_ids_in_cert(&der(&leaf.cert_pem)).unwrap().len(), 2);
        assert!(identity_of_cert(&der(&leaf.cert_pem), "example.org").is_err());
    }

    #[test]
    fn a_written_ca_loads_and_issues() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("example.org").unwrap();
        ca.write(dir.path()).unwrap();
        let cert = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
        let key = std::fs::read_to_string(dir.path().join("ca.key")).unwrap();
        let again = DevCa::load(&cert, &key).unwrap();
        again.issue_user("example.org", "alice").unwrap();
    }
}
