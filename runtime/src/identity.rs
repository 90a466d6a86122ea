//! Who is calling: the SPIFFE ID carried in the URI SAN of the verified peer
//! certificate, and the authorisation helper every gRPC layer uses.
//!
//! No or unusable identity → `UNAUTHENTICATED`; identity not allowed →
//! `PERMISSION_DENIED`. Servers never take identity from a request field.

use std::fmt;

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why a SPIFFE ID or a certificate's identity was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The text is not a SPIFFE ID.
    #[error("invalid SPIFFE ID {0:?}: {1}")]
    Invalid(String, &'static str),
    /// The certificate could not be parsed.
    #[error("unreadable client certificate")]
    BadCertificate,
    /// The certificate carries no SPIFFE ID, or more than one.
    #[error("the client certificate carries {0} SPIFFE IDs; exactly one URI SAN is required")]
    Count(usize),
    /// The SPIFFE ID belongs to another trust domain.
    #[error("SPIFFE ID {0} is not in trust domain {1}")]
    ForeignTrustDomain(String, String),
    /// The certificate may not be used by a client.
    #[error(
        "the client certificate of {0} does not carry the clientAuth extended key usage; \
         issue it for client authentication (twokey pki init does)"
    )]
    NotForClients(String),
}

/// A SPIFFE ID such as `spiffe://example.org/user/alice`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(String);

fn valid_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID (scheme, trust domain, non-empty path).
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let bad = |why| {
            Err(IdentityError::Invalid(
                text.chars().take(120).collect(),
                why,
            ))
        };
        if text.len() > 2048 {
            return bad("longer than 2048 bytes");
        }
        let Some(rest) = text.strip_prefix("spiffe://") else {
            return bad("must start with spiffe://");
        };
        let Some((domain, path)) = rest.split_once('/') else {
            return bad("needs a path after the trust domain");
        };
        if domain.is_empty()
            || !domain.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            })
        {
            return bad("trust domain must be lower-case letters, digits, '.', '-' or '_'");
        }
        if path.is_empty()
            || path
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return bad("path segments must be non-empty and not '.' or '..'");
        }
        if !path.chars().all(|c| c == '/' || valid_segment_char(c)) {
            return bad("path may hold only letters, digits, '.', '-', '_' and '/'");
        }
        Ok(Self(text.to_owned()))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map_or(rest, |(d, _)| d)
    }

    /// The path, e.g. `/user/alice`.
    pub fn path(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.find('/').map_or("", |i| &rest[i..])
    }

    /// The last path segment: `alice` for `spiffe://example.org/user/alice`.
    pub fn name(&self) -> &str {
        self.path().rsplit('/').next().unwrap_or_default()
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdentityError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<SpiffeId> for String {
    fn from(value: SpiffeId) -> Self {
        value.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.0)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Every SPIFFE ID among the URI SANs of a DER certificate.
pub fn spiffe_ids_in_cert(der: &[u8]) -> Result<Vec<SpiffeId>, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::BadCertificate)?;
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                ids.push(SpiffeId::parse(uri)?);
            }
        }
    }
    Ok(ids)
}

/// Whether a DER certificate carries the clientAuth extended key usage.
fn allows_client_auth(der: &[u8]) -> Result<bool, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::BadCertificate)?;
    Ok(match cert.extended_key_usage() {
        Ok(Some(eku)) => eku.value.client_auth || eku.value.any,
        _ => false,
    })
}

/// The one SPIFFE ID of a client's DER certificate, required to be in
/// `trust_domain` and to carry the clientAuth extended key usage.
pub fn identity_of_cert(der: &[u8], trust_domain: &str) -> Result<SpiffeId, IdentityError> {
    let mut ids = spiffe_ids_in_cert(der)?;
    if ids.len() != 1 {
        return Err(IdentityError::Count(ids.len()));
    }
    let id = ids.remove(0);
    if id.trust_domain() != trust_domain {
        return Err(IdentityError::ForeignTrustDomain(
            id.to_string(),
            trust_domain.to_owned(),
        ));
    }
    if !allows_client_auth(der)? {
        return Err(IdentityError::NotForClients(id.to_string()));
    }
    Ok(id)
}

/// Reads callers' identities for one server: the certificate chain was
/// already verified by rustls against the configured CA; this reads the
/// SPIFFE ID and checks its trust domain.
#[derive(Debug, Clone)]
pub struct Authenticator {
    trust_domain: String,
    known: std::sync::Arc<KnownCerts>,
}

/// Most certificates whose identity an [`Authenticator`] keeps; when full
/// it starts over (a caller's certificate is then read once more).
const KNOWN_CERTS: usize = 1024;

/// The identities of certificates already read, by certificate (DER): a
/// connection's certificate is read on its first call, not on every call
/// (parsing it twice per call was a measurable share of an empty call's
/// cost). Only accepted identities are kept: the answer is a function of
/// the certificate and the trust domain alone, and a refused certificate
/// is read and refused again, with its own message. (Revocation and
/// validity are checked by rustls in each handshake, not here.)
#[derive(Default)]
struct KnownCerts(std::sync::Mutex<std::collections::HashMap<Vec<u8>, SpiffeId>>);

impl fmt::Debug for KnownCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        write!(f, "KnownCerts({n})")
    }
}

impl Authenticator {
    /// An authenticator accepting IDs of `trust_domain`.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            known: std::sync::Arc::default(),
        }
    }

    /// The identity of a client's DER certificate, as [`identity_of_cert`]
    /// reads it for this trust domain; an accepted one is kept (see
    /// [`KnownCerts`]).
    pub fn identity_of(&self, der: &[u8]) -> Result<SpiffeId, IdentityError> {
        let lock = || self.known.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = lock().get(der) {
            return Ok(id.clone());
        }
        let id = identity_of_cert(der, &self.trust_domain)?;
        let mut known = lock();
        if known.len() >= KNOWN_CERTS {
            known.clear();
        }
        known.insert(der.to_vec(), id.clone());
        Ok(id)
    }

    /// The trust domain this server accepts.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The caller's SPIFFE ID, or `UNAUTHENTICATED`.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("no client certificate: connect with mutual TLS and a certificate from the twokey CA")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
        let id = self
            .identity_of(leaf)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        crate::trace::record_caller(&id);
        Ok(id)
    }

    /// The caller's SPIFFE ID if `allowed` accepts it: `UNAUTHENTICATED` when
    /// there is no usable identity, `PERMISSION_DENIED` naming the caller and
    /// `what` they would need to be otherwise.
    pub fn authorize<T>(
        &self,
        request: &Request<T>,
        what: &str,
        allowed: impl FnOnce(&SpiffeId) -> bool,
    ) -> Result<SpiffeId, Status> {
        let id = self.authenticate(request)?;
        if allowed(&id) {
            Ok(id)
        } else {
            Err(Status::permission_denied(format!(
                "permission denied: {id} is not {what}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_cert(spiffe_id: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_is_read_once_and_a_refused_one_every_time() {
        let alice = client_cert("spiffe://t.example/user/alice");
        let foreign = client_cert("spiffe://other.example/user/mallory");
        let auth = Authenticator::new("t.example");
        for _ in 0..2 {
            assert_eq!(
                auth.identity_of(&alice).unwrap().as_str(),
                "spiffe://t.example/user/alice"
            );
            assert_eq!(
                auth.identity_of(&foreign),
                Err(IdentityError::ForeignTrustDomain(
                    "spiffe://other.example/user/mallory".into(),
                    "t.example".into()
                ))
            );
            assert_eq!(
                auth.identity_of(b"not a certificate"),
                Err(IdentityError::BadCertificate)
            );
        }
        // Only the accepted certificate is kept.
        assert_eq!(format!("{:?}", auth.known), "KnownCerts(1)");
    }

    #[test]
    fn parses_parts_of_a_spiffe_id() {
        let id = SpiffeId::parse("spiffe://example.org/user/alice").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/user/alice");
        assert_eq!(id.name(), "alice");
    }

    #[test]
    fn rejects_malformed_spiffe_ids() {
        for bad in [
            "http://example.org/x",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe:///x",
            "spiffe://Example.org/x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?b",
            "spiffe://example.org/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
