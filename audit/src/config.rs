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
//! # Optional (off by default): the second, HTTP listener (EventBridge
//! # posts of CloudTrail events, docs/RECONCILE.md).
//! http_listen = "127.0.0.1:7404"
//! # Optional: the reconciler (issue 20, docs/RECONCILE.md). Its source_id
//! # must also be one of [[sources]], with the public key of key_file.
//! [reconcile]
//! source_id = "spiffe://twokey.local/svc/reconcile"
//! key_file = "reconcile.key"
//! cloudtrail_dir = "/var/lib/twokey-audit/cloudtrail"
//! scan_interval = "60s"
//! delivery_delay = "15m"
//! vault = "spiffe://twokey.local/svc/vault"
//! posters = ["spiffe://twokey.local/svc/eventbridge-relay"]
//! readers = ["spiffe://twokey.local/svc/broker"]
//! # Optional: the log in PostgreSQL, shared by several replicas, one of
//! # them the sequencer (docs/HA.md); tiles in data_dir by default.
//! [store]
//! backend = "postgres"
//! [store.postgres]
//! url = "postgresql://twokey_audit@db.internal:5432/twokey_audit"
//! password_file = "audit-db.pw"
//! ca_file = "db-ca.crt"
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
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
    /// Address of the HTTP listener (EventBridge posts); none by default.
    #[serde(default, deserialize_with = "optional_listen")]
    pub http_listen: Option<String>,
    /// The reconciler of CloudTrail sign-ins with released codes; off when
    /// absent.
    #[serde(default)]
    pub reconcile: Option<ReconcileConfig>,
    /// Where the log is kept: `[store]`.
    #[serde(default)]
    pub store: StoreConfig,
}

/// `[store]`: C2SP tiles and sled indexes in `data_dir` (the default, one
/// machine), or PostgreSQL shared by several replicas (`[store.postgres]`,
/// docs/HA.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `tiles` or `postgres`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// How to reach the audit database; required with `postgres`.
    #[serde(default)]
    pub postgres: Option<twokey_pgstore::PgSettings>,
}

/// The store backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Tiles and sled in `data_dir`.
    #[default]
    Tiles,
    /// PostgreSQL (`[store.postgres]`).
    Postgres,
}

impl StoreConfig {
    /// The PostgreSQL settings when the backend is PostgreSQL; an error
    /// saying what to set when they are missing or wrong.
    pub fn postgres(&self) -> Result<Option<&twokey_pgstore::PgSettings>, String> {
        match (self.backend, &self.postgres) {
            (StoreBackend::Tiles, _) => Ok(None),
            (StoreBackend::Postgres, None) => Err(
                "`store.backend = \"postgres\"` needs [store.postgres] with url (and \
                 password_file, ca_file)"
                    .to_owned(),
            ),
            (StoreBackend::Postgres, Some(p)) => {
                twokey_pgstore::connect::check(p).map_err(|e| format!("`store.postgres`: {e}"))?;
                Ok(Some(p))
            }
        }
    }
}

/// `[reconcile]`: the reconciler of CloudTrail sign-ins with the vault's
/// `code.released` events (docs/RECONCILE.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// The reconciler's audit source identity; must be in `[[sources]]`.
    #[serde(deserialize_with = "spiffe_id")]
    pub source_id: SpiffeId,
    /// Its ed25519 event signing key file (0600).
    pub key_file: PathBuf,
    /// The directory the trail's bucket is synced to (holding `AWSLogs`);
    /// none when events come only by EventBridge.
    #[serde(default)]
    pub cloudtrail_dir: Option<PathBuf>,
    /// How often the directory is scanned (default 60s).
    #[serde(default = "default_scan_interval", deserialize_with = "duration")]
    pub scan_interval: Duration,
    /// How late CloudTrail may deliver a record: a release is unused only
    /// once its window closed this long ago (default 15m).
    #[serde(default = "default_delivery_delay", deserialize_with = "duration")]
    pub delivery_delay: Duration,
    /// The vault, whose `code.released` and `policy.applied` events are read
    /// (default `spiffe://<trust_domain>/svc/vault`).
    #[serde(default, deserialize_with = "optional_spiffe_id")]
    pub vault: Option<SpiffeId>,
    /// Who may POST EventBridge events to the HTTP listener.
    #[serde(default, deserialize_with = "id_list")]
    pub posters: BTreeSet<SpiffeId>,
    /// Who may Query the reconciler's findings (`reconcile.*` events) and
    /// nothing else: the broker, which notifies the account's admins.
    #[serde(default, deserialize_with = "id_list")]
    pub readers: BTreeSet<SpiffeId>,
}

fn default_scan_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_delivery_delay() -> Duration {
    Duration::from_secs(15 * 60)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let d = twokey_runtime::time::parse_duration(&text).map_err(D::Error::custom)?;
    Ok(d)
}

fn spiffe_id<'de, D: Deserializer<'de>>(d: D) -> Result<SpiffeId, D::Error> {
    let text = String::deserialize(d)?;
    SpiffeId::parse(text.trim()).map_err(D::Error::custom)
}

fn optional_spiffe_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SpiffeId>, D::Error> {
    spiffe_id(d).map(Some)
}

fn id_list<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<SpiffeId>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|a| SpiffeId::parse(a.trim()).map_err(D::Error::custom))
        .collect()
}

fn optional_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let listen = String::deserialize(d)?;
    match listen.parse::<std::net::SocketAddr>() {
        Ok(_) => Ok(Some(listen)),
        Err(_) => Err(D::Error::custom(format!(
            "`http_listen`: {listen:?} is not an address like 127.0.0.1:7404"
        ))),
    }
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
        if let Some(p) = self.store.postgres.as_mut() {
            twokey_runtime::config::paths_relative_to_file(
                file,
                |_| false,
                p.password_file
                    .as_mut()
                    .map(|f| ("store.postgres.password_file", f))
                    .into_iter()
                    .chain(p.ca_file.as_mut().map(|f| ("store.postgres.ca_file", f))),
            );
        }
        if let Some(r) = self.reconcile.as_mut() {
            twokey_runtime::config::paths_relative_to_file(
                file,
                |_| false,
                [("reconcile.key_file", &mut r.key_file)].into_iter().chain(
                    r.cloudtrail_dir
                        .as_mut()
                        .map(|d| ("reconcile.cloudtrail_dir", d)),
                ),
            );
            if r.vault.is_none() {
                r.vault =
                    SpiffeId::parse(&format!("spiffe://{}/svc/vault", self.trust_domain)).ok();
            }
        }
        let invalid = |message: String| ConfigError::Invalid {
            origin: file.map_or_else(
                || "from flags and environment".to_owned(),
                |f| f.display().to_string(),
            ),
            message,
        };
        let reconcile_ids = self.reconcile.iter().flat_map(|r| {
            std::iter::once(("reconcile.source_id", &r.source_id))
                .chain(r.posters.iter().map(|id| ("reconcile.posters", id)))
                .chain(r.readers.iter().map(|id| ("reconcile.readers", id)))
        });
        let outside = self
            .auditors
            .iter()
            .map(|id| ("auditors", id))
            .chain(self.sources.keys().map(|id| ("sources", id)))
            .chain(reconcile_ids)
            .find(|(_, id)| id.trust_domain() != self.trust_domain);
        if let Some((field, id)) = outside {
            return Err(invalid(format!(
                "`{field}`: {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let postgres = self.store.postgres().map_err(invalid)?.is_some();
        if postgres && (self.reconcile.is_some() || self.http_listen.is_some()) {
            return Err(invalid(
                "`store.backend = \"postgres\"` does not take [reconcile] or http_listen yet \
                 (both read the log's files in data_dir): run the reconciler beside an audit on \
                 tiles, or remove them"
                    .to_owned(),
            ));
        }
        if let Some(r) = &self.reconcile {
            if !self.sources.contains_key(&r.source_id) {
                return Err(invalid(format!(
                    "`reconcile.source_id`: {} is not one of [[sources]]: add it there with the \
                     public key of reconcile.key_file, so its findings are verified like any event",
                    r.source_id
                )));
            }
            if r.scan_interval < Duration::from_secs(1) {
                return Err(invalid(
                    "`reconcile.scan_interval` must be at least 1s".to_owned(),
                ));
            }
            if !r.posters.is_empty() && self.http_listen.is_none() {
                return Err(invalid(
                    "`reconcile.posters` is set but `http_listen` is not: set http_listen so \
                     EventBridge relays can post, or remove posters"
                        .to_owned(),
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn load(extra_top: &str, reconcile: &str) -> Result<AuditConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.toml");
        let text = format!(
            "{extra_top}listen = \"127.0.0.1:7403\"\ntrust_domain = \"t\"\ndata_dir = \"data\"\n\
             checkpoint_key_file = \"c.key\"\norigin = \"t/audit\"\n\
             [tls]\ncert = \"a.crt\"\nkey = \"a.key\"\nca = \"ca.crt\"\n\
             [[sources]]\nid = \"spiffe://t/svc/vault\"\npublic_key = \"{KEY}\"\n\
             [[sources]]\nid = \"spiffe://t/svc/reconcile\"\npublic_key = \"{KEY}\"\n{reconcile}"
        );
        std::fs::write(&path, text).unwrap();
        let config: AuditConfig =
            twokey_runtime::config::load(Some(&path), &[], "TWOKEY_AUDIT_TEST_")?;
        config.finish(Some(&path), |_| false).map(|mut c| {
            // Paths are relative to the file's directory: keep them comparable.
            if let Some(r) = c.reconcile.as_mut() {
                r.key_file = r.key_file.strip_prefix(dir.path()).unwrap().to_owned();
            }
            c
        })
    }

    const RECONCILE: &str = "[reconcile]\nsource_id = \"spiffe://t/svc/reconcile\"\n\
                             key_file = \"r.key\"\nreaders = [\"spiffe://t/svc/broker\"]\n";

    #[test]
    fn reconcile_is_off_unless_its_section_is_there_and_has_defaults() {
        let c = load("", "").unwrap();
        assert!(c.reconcile.is_none() && c.http_listen.is_none());
        let c = load("", RECONCILE).unwrap();
        let r = c.reconcile.unwrap();
        assert_eq!(r.key_file, PathBuf::from("r.key"));
        assert_eq!(r.scan_interval, Duration::from_secs(60));
        assert_eq!(r.delivery_delay, Duration::from_secs(15 * 60));
        assert_eq!(r.vault.unwrap().as_str(), "spiffe://t/svc/vault");
        assert!(r.posters.is_empty());
        assert_eq!(r.readers.len(), 1);
    }

    #[test]
    fn a_reconcile_source_must_be_listed_and_posters_need_the_http_listener() {
        let unlisted = RECONCILE.replace("svc/reconcile", "svc/other");
        let err = load("", &unlisted).unwrap_err().to_string();
        assert!(err.contains("is not one of [[sources]]"), "{err}");
        let posters = format!("{RECONCILE}posters = [\"spiffe://t/svc/relay\"]\n");
        let err = load("", &posters).unwrap_err().to_string();
        assert!(err.contains("`http_listen` is not"), "{err}");
        let c = load("http_listen = \"127.0.0.1:0\"\n", &posters).unwrap();
        assert_eq!(c.http_listen.as_deref(), Some("127.0.0.1:0"));
        let err = load("http_listen = \"nowhere\"\n", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http_listen"), "{err}");
        let outside = format!("{RECONCILE}posters = [\"spiffe://elsewhere/svc/relay\"]\n");
        let err = load("http_listen = \"127.0.0.1:0\"\n", &outside)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reconcile.posters") && err.contains("not in trust domain"),
            "{err}"
        );
    }

    #[test]
    fn the_store_is_tiles_by_default_and_postgres_needs_its_settings() {
        assert_eq!(load("", "").unwrap().store.backend, StoreBackend::Tiles);
        let err = load("", "[store]\nbackend = \"postgres\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs [store.postgres] with url"), "{err}");
        let pg = "[store]\nbackend = \"postgres\"\n[store.postgres]\n\
                  url = \"postgresql://audit@127.0.0.1:5432/audit?sslmode=disable\"\n";
        let c = load("", pg).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Postgres);
        // The password file is read at load, relative to the config file.
        let err = load("", &format!("{pg}password_file = \"db.pw\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("password_file /"), "{err}");
        assert!(err.contains("/db.pw: No such file"), "{err}");
        let err = load("", &pg.replace("sslmode=disable", "sslmode=prefer"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`store.postgres`: postgres url: sslmode=prefer"),
            "{err}"
        );
        let err = load("", &format!("{RECONCILE}{pg}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not take [reconcile] or http_listen"),
            "{err}"
        );
        let err = load("", "[store]\nbackend = \"sled\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `sled`"), "{err}");
    }
}
