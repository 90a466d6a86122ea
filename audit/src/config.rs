//! The audit service's configuration: its own fields as one serde struct,
//! loaded by `twokey_runtime::config::load` from a TOML file (`--config`),
//! each field overridable by a flag or a `TWOKEY_AUDIT_*` variable. Values
//! are checked as they are read, so an error names the field; paths the
//! file gives are relative to the file's directory.
//!
//! ```toml
//! listen = "127.0.0.1:7403"
//! trust_domain = "twokey.local"
//! data_dir = "/var/lib/twokey-audit"
//! checkpoint_key_file = "/etc/twokey/audit/checkpoint.key"
//! origin = "twokey.local/audit"
//! auditors = ["spiffe://twokey.local/user/carol"]
//! log_format = "human"
//! [tls]
//! cert = "audit.crt"
//! key = "audit.key"
//! ca = "ca.crt"
//! [[sources]]
//! id = "spiffe://twokey.local/svc/vault"
//! public_key = "<base64 ed25519>"
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Deserializer, de::Error as _};
use twokey_runtime::{
    SpiffeId, config::ConfigError, keys::parse_public_key, telemetry::LogFormat, tls::TlsFiles,
};

/// The audit service's settings, each checked as it is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Address to listen on.
    #[serde(deserialize_with = "listen_address")]
    pub listen: String,
    /// Trust domain of every caller.
    #[serde(deserialize_with = "trust_domain")]
    pub trust_domain: String,
    /// Where the log is stored.
    pub data_dir: PathBuf,
    /// The checkpoint signing key file (0600).
    pub checkpoint_key_file: PathBuf,
    /// Checkpoint origin line and note key name.
    #[serde(deserialize_with = "origin")]
    pub origin: String,
    /// Who may read the log.
    #[serde(default, deserialize_with = "auditors")]
    pub auditors: BTreeSet<SpiffeId>,
    /// Log line format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// This server's TLS identity and the CA of its callers.
    pub tls: TlsFiles,
    /// Who may append, with their event keys.
    #[serde(deserialize_with = "sources")]
    pub sources: BTreeMap<SpiffeId, VerifyingKey>,
}

impl AuditConfig {
    /// Finishes a loaded configuration: paths the file at `file` gave (those
    /// `given` does not name as set by a flag or variable) become relative to
    /// its directory, and every auditor and source must be in the trust domain.
    pub fn finish(
        mut self,
        file: Option<&Path>,
        given: impl Fn(&str) -> bool,
    ) -> Result<Self, ConfigError> {
        let tls = &mut self.tls;
        twokey_runtime::config::paths_relative_to_file(
            file,
            given,
            [
                ("data_dir", &mut self.data_dir),
                ("checkpoint_key_file", &mut self.checkpoint_key_file),
                ("tls.cert", &mut tls.cert),
                ("tls.key", &mut tls.key),
                ("tls.ca", &mut tls.ca),
            ]
            .into_iter()
            .chain(tls.crl.as_mut().map(|crl| ("tls.crl", crl))),
        );
        let outside = self
            .auditors
            .iter()
            .map(|id| ("auditors", id))
            .chain(self.sources.keys().map(|id| ("sources", id)))
            .find(|(_, id)| id.trust_domain() != self.trust_domain);
        if let Some((field, id)) = outside {
            return Err(ConfigError::Invalid {
                origin: file.map_or_else(
                    || "from flags and environment".to_owned(),
                    |f| f.display().to_string(),
                ),
                message: format!(
                    "`{field}`: {id} is not in trust domain {}",
                    self.trust_domain
                ),
            });
        }
        Ok(self)
    }
}

fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let listen = String::deserialize(d)?;
    match listen.parse::<std::net::SocketAddr>() {
        Ok(_) => Ok(listen),
        Err(_) => Err(D::Error::custom(format!(
            "`listen`: {listen:?} is not an address like 127.0.0.1:7403"
        ))),
    }
}

fn trust_domain<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let domain = String::deserialize(d)?;
    match SpiffeId::parse(&format!("spiffe://{domain}/x")) {
        Ok(_) if !domain.trim().is_empty() => Ok(domain),
        _ => Err(D::Error::custom(format!(
            "`trust_domain`: {domain:?} is not a trust domain (lower-case letters, digits, '.', '-', '_')"
        ))),
    }
}

fn origin<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let origin = String::deserialize(d)?;
    if origin.trim().is_empty() {
        return Err(D::Error::custom("`origin`: must not be empty"));
    }
    if origin.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(D::Error::custom(format!(
            "`origin`: {origin:?} must not contain spaces or '+'"
        )));
    }
    Ok(origin)
}

fn auditors<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<SpiffeId>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .enumerate()
        .map(|(i, a)| {
            SpiffeId::parse(a.trim()).map_err(|e| D::Error::custom(format!("`auditors[{i}]`: {e}")))
        })
        .collect()
}

/// A `[[sources]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    id: String,
    public_key: String,
}

fn sources<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<SpiffeId, VerifyingKey>, D::Error> {
    let list = Vec::<Source>::deserialize(d)?;
    if list.is_empty() {
        return Err(D::Error::custom(
            "`sources` is not set: add [[sources]] to the file or give --sources ID=BASE64_PUBLIC_KEY",
        ));
    }
    let mut sources = BTreeMap::new();
    for (i, s) in list.iter().enumerate() {
        let field = format!("sources[{i}]");
        let id = SpiffeId::parse(s.id.trim())
            .map_err(|e| D::Error::custom(format!("`{field}.id`: {e}")))?;
        let key = parse_public_key(&s.public_key)
            .map_err(|e| D::Error::custom(format!("`{field}.public_key`: {e}")))?;
        if sources.insert(id.clone(), key).is_some() {
            return Err(D::Error::custom(format!(
                "`{field}.id`: {id} is listed twice"
            )));
        }
    }
    Ok(sources)
}
