//! Configuration: a TOML file whose every field can be overridden by a flag
//! and by a `TWOKEY_AUDIT_<FIELD>` environment variable. Errors name the
//! file (or flag), the field and what is wrong.
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
//!
//! Relative paths in the file are relative to the file's directory.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;
use twokey_runtime::{SpiffeId, keys::parse_public_key, telemetry::LogFormat, tls::TlsFiles};

use crate::error::AuditError;

/// The audit service's settings, validated.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Address to listen on.
    pub listen: String,
    /// Trust domain of every caller.
    pub trust_domain: String,
    /// Where the log is stored.
    pub data_dir: PathBuf,
    /// The checkpoint signing key file (0600).
    pub checkpoint_key_file: PathBuf,
    /// Checkpoint origin line and note key name.
    pub origin: String,
    /// Who may read the log.
    pub auditors: BTreeSet<SpiffeId>,
    /// Log line format.
    pub log_format: LogFormat,
    /// This server's TLS identity and the CA of its callers.
    pub tls: TlsFiles,
    /// Who may append, with their event keys.
    pub sources: BTreeMap<SpiffeId, VerifyingKey>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    trust_domain: Option<String>,
    data_dir: Option<PathBuf>,
    checkpoint_key_file: Option<PathBuf>,
    origin: Option<String>,
    auditors: Option<Vec<String>>,
    log_format: Option<LogFormat>,
    tls: Option<FileTls>,
    sources: Option<Vec<FileSource>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    crl: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    id: String,
    public_key: String,
}

/// Flags for `twokey-audit serve`; each overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// The TOML config file.
    #[arg(long, env = "TWOKEY_AUDIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7403.
    #[arg(long, env = "TWOKEY_AUDIT_LISTEN")]
    pub listen: Option<String>,
    /// Trust domain of every caller's SPIFFE ID.
    #[arg(long, env = "TWOKEY_AUDIT_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Directory of the log database.
    #[arg(long, env = "TWOKEY_AUDIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Checkpoint signing key file (make one with `twokey-audit init-key`).
    #[arg(long, env = "TWOKEY_AUDIT_CHECKPOINT_KEY_FILE")]
    pub checkpoint_key_file: Option<PathBuf>,
    /// Checkpoint origin line, also the note key name.
    #[arg(long, env = "TWOKEY_AUDIT_ORIGIN")]
    pub origin: Option<String>,
    /// SPIFFE IDs allowed to read the log (comma-separated; replaces the file's list).
    #[arg(long, env = "TWOKEY_AUDIT_AUDITORS", value_delimiter = ',')]
    pub auditors: Option<Vec<String>>,
    /// Log line format.
    #[arg(long, env = "TWOKEY_AUDIT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// This server's certificate (PEM).
    #[arg(long, env = "TWOKEY_AUDIT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This server's private key (PEM).
    #[arg(long, env = "TWOKEY_AUDIT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate that callers' certificates chain to (PEM).
    #[arg(long, env = "TWOKEY_AUDIT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Certificate revocation list (PEM) from the CA; listed client
    /// certificates are refused in the handshake.
    #[arg(long, env = "TWOKEY_AUDIT_TLS_CRL")]
    pub tls_crl: Option<PathBuf>,
    /// Event sources as ID=BASE64_PUBLIC_KEY (comma-separated; replaces the file's list).
    #[arg(long, env = "TWOKEY_AUDIT_SOURCES", value_delimiter = ',')]
    pub sources: Option<Vec<String>>,
}

/// Where a value came from, for error messages.
struct Origin<'a> {
    file: Option<&'a Path>,
}

/// The flag and environment variable of a field such as `tls.cert` or `sources[2].id`.
fn flag_names(field: &str) -> (String, String) {
    let base = field.split('[').next().unwrap_or(field);
    (
        base.replace(['_', '.'], "-"),
        base.to_uppercase().replace('.', "_"),
    )
}

impl Origin<'_> {
    fn err(&self, field: &str, flag: bool, what: impl std::fmt::Display) -> AuditError {
        let place = match (flag, self.file) {
            (true, _) => {
                let (flag, env) = flag_names(field);
                format!("--{flag} (or TWOKEY_AUDIT_{env}): `{field}`")
            }
            (false, Some(f)) => format!("{}: field `{field}`", f.display()),
            (false, None) => format!("`{field}`"),
        };
        AuditError::Config(format!("{place}: {what}"))
    }

    fn missing(&self, field: &str) -> AuditError {
        let (flag, env) = flag_names(field);
        match self.file {
            Some(f) => AuditError::Config(format!(
                "{}: field `{field}` is missing; set it in the file, with --{flag} or TWOKEY_AUDIT_{env}",
                f.display()
            )),
            None => AuditError::Config(format!(
                "`{field}` is not set: give --config FILE, --{flag} or TWOKEY_AUDIT_{env}"
            )),
        }
    }
}

fn pick<T>(flag: Option<T>, file: Option<T>) -> (Option<T>, bool) {
    match flag {
        Some(v) => (Some(v), true),
        None => (file, false),
    }
}

impl AuditConfig {
    /// Reads the config file (if any) and applies the flags over it.
    pub fn load(args: &ConfigArgs) -> Result<Self, AuditError> {
        let (file, base) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    AuditError::Config(format!("cannot read config file {}: {e}", path.display()))
                })?;
                let parsed: FileConfig = toml::from_str(&text)
                    .map_err(|e| AuditError::Config(format!("{}: {e}", path.display())))?;
                let base = path.parent().map(Path::to_owned).unwrap_or_default();
                (parsed, base)
            }
            None => (FileConfig::default(), PathBuf::new()),
        };
        let origin_of = Origin {
            file: args.config.as_deref(),
        };
        let rel = |p: PathBuf, from_flag: bool| {
            if from_flag || p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };
        let need = |v: (Option<String>, bool), field: &str| -> Result<(String, bool), AuditError> {
            match v {
                (Some(s), f) if !s.trim().is_empty() => Ok((s, f)),
                (Some(_), f) => Err(origin_of.err(field, f, "must not be empty")),
                (None, _) => Err(origin_of.missing(field)),
            }
        };
        let need_path = |v: (Option<PathBuf>, bool), field: &str| -> Result<PathBuf, AuditError> {
            match v {
                (Some(p), f) => Ok(rel(p, f)),
                (None, _) => Err(origin_of.missing(field)),
            }
        };

        let (listen, listen_flag) = need(pick(args.listen.clone(), file.listen), "listen")?;
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(origin_of.err(
                "listen",
                listen_flag,
                format!("{listen:?} is not an address like 127.0.0.1:7403"),
            ));
        }
        let (trust_domain, td_flag) = need(
            pick(args.trust_domain.clone(), file.trust_domain),
            "trust_domain",
        )?;
        if SpiffeId::parse(&format!("spiffe://{trust_domain}/x")).is_err() {
            return Err(origin_of.err(
                "trust_domain",
                td_flag,
                format!("{trust_domain:?} is not a trust domain (lower-case letters, digits, '.', '-', '_')"),
            ));
        }
        let data_dir = need_path(pick(args.data_dir.clone(), file.data_dir), "data_dir")?;
        let checkpoint_key_file = need_path(
            pick(args.checkpoint_key_file.clone(), file.checkpoint_key_file),
            "checkpoint_key_file",
        )?;
        let (origin, origin_flag) = need(pick(args.origin.clone(), file.origin), "origin")?;
        if origin.chars().any(|c| c.is_whitespace() || c == '+') {
            return Err(origin_of.err(
                "origin",
                origin_flag,
                format!("{origin:?} must not contain spaces or '+'"),
            ));
        }
        let log_format = pick(args.log_format, file.log_format).0.unwrap_or_default();

        let file_tls = file.tls.unwrap_or_default();
        let tls = TlsFiles {
            cert: need_path(pick(args.tls_cert.clone(), file_tls.cert), "tls.cert")?,
            key: need_path(pick(args.tls_key.clone(), file_tls.key), "tls.key")?,
            ca: need_path(pick(args.tls_ca.clone(), file_tls.ca), "tls.ca")?,
            crl: match pick(args.tls_crl.clone(), file_tls.crl) {
                (Some(p), f) => Some(rel(p, f)),
                (None, _) => None,
            },
        };

        let (auditor_list, auditors_flag) = pick(args.auditors.clone(), file.auditors);
        let mut auditors = BTreeSet::new();
        for (i, a) in auditor_list.unwrap_or_default().iter().enumerate() {
            let id = SpiffeId::parse(a.trim())
                .map_err(|e| origin_of.err(&format!("auditors[{i}]"), auditors_flag, e))?;
            if id.trust_domain() != trust_domain {
                return Err(origin_of.err(
                    &format!("auditors[{i}]"),
                    auditors_flag,
                    format!("{id} is not in trust domain {trust_domain}"),
                ));
            }
            auditors.insert(id);
        }

        let (source_list, sources_flag) = match (&args.sources, file.sources) {
            (Some(flags), _) => {
                let mut list = Vec::new();
                for (i, s) in flags.iter().enumerate() {
                    let (id, key) = s.split_once('=').ok_or_else(|| {
                        origin_of.err(
                            &format!("sources[{i}]"),
                            true,
                            "expected ID=BASE64_PUBLIC_KEY",
                        )
                    })?;
                    list.push(FileSource {
                        id: id.trim().to_owned(),
                        public_key: key.trim().to_owned(),
                    });
                }
                (list, true)
            }
            (None, file_sources) => (file_sources.unwrap_or_default(), false),
        };
        if source_list.is_empty() {
            return Err(origin_of.missing("sources"));
        }
        let mut sources = BTreeMap::new();
        for (i, s) in source_list.iter().enumerate() {
            let field = format!("sources[{i}]");
            let id = SpiffeId::parse(&s.id)
                .map_err(|e| origin_of.err(&format!("{field}.id"), sources_flag, e))?;
            if id.trust_domain() != trust_domain {
                return Err(origin_of.err(
                    &format!("{field}.id"),
                    sources_flag,
                    format!("{id} is not in trust domain {trust_domain}"),
                ));
            }
            let key = parse_public_key(&s.public_key)
                .map_err(|e| origin_of.err(&format!("{field}.public_key"), sources_flag, e))?;
            if sources.insert(id.clone(), key).is_some() {
                return Err(origin_of.err(
                    &format!("{field}.id"),
                    sources_flag,
                    format!("{id} is listed twice"),
                ));
            }
        }

        Ok(Self {
            listen,
            trust_domain,
            data_dir,
            checkpoint_key_file,
            origin,
            auditors,
            log_format,
            tls,
            sources,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        twokey_runtime::keys::encode_public_key(
            &ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        )
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("audit.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn full(key: &str) -> String {
        format!(
            r#"
listen = "127.0.0.1:7403"
trust_domain = "twokey.local"
data_dir = "data"
checkpoint_key_file = "/etc/twokey/audit/checkpoint.key"
origin = "twokey.local/audit"
auditors = ["spiffe://twokey.local/user/carol"]
log_format = "json"
[tls]
cert = "audit.crt"
key = "audit.key"
ca = "ca.crt"
[[sources]]
id = "spiffe://twokey.local/svc/vault"
public_key = "{key}"
"#
        )
    }

    #[test]
    fn a_full_file_loads_with_paths_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &full(&key()));
        let args = ConfigArgs {
            config: Some(path),
            ..ConfigArgs::default()
        };
        let c = AuditConfig::load(&args).unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.tls.ca, dir.path().join("ca.crt"));
        assert_eq!(
            c.checkpoint_key_file,
            PathBuf::from("/etc/twokey/audit/checkpoint.key")
        );
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.sources.len(), 1);
        assert!(
            c.auditors
                .contains(&SpiffeId::parse("spiffe://twokey.local/user/carol").unwrap())
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &full(&key()));
        let args = ConfigArgs {
            config: Some(path),
            listen: Some("127.0.0.1:0".into()),
            auditors: Some(vec!["spiffe://twokey.local/user/dave".into()]),
            sources: Some(vec![format!("spiffe://twokey.local/svc/broker={}", key())]),
            ..ConfigArgs::default()
        };
        let c = AuditConfig::load(&args).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(
            c.auditors.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["spiffe://twokey.local/user/dave"]
        );
        assert_eq!(
            c.sources.keys().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["spiffe://twokey.local/svc/broker"]
        );
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &full("not-a-key"));
        let args = ConfigArgs {
            config: Some(path.clone()),
            ..ConfigArgs::default()
        };
        let err = AuditConfig::load(&args).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("sources[0].public_key"), "{err}");
        assert!(err.contains("invalid ed25519 public key"), "{err}");

        let path = write(
            dir.path(),
            &full(&key()).replace("origin = \"twokey.local/audit\"\n", ""),
        );
        let err = AuditConfig::load(&ConfigArgs {
            config: Some(path),
            ..ConfigArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("field `origin` is missing"), "{err}");

        let path = write(dir.path(), &format!("{}\nbogus = 1\n", full(&key())));
        let err = AuditConfig::load(&ConfigArgs {
            config: Some(path),
            ..ConfigArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("bogus"), "{err}");

        let path = write(
            dir.path(),
            &full(&key()).replace("user/carol", "user/carol x"),
        );
        let err = AuditConfig::load(&ConfigArgs {
            config: Some(path),
            ..ConfigArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("auditors[0]"), "{err}");
    }

    #[test]
    fn errors_in_flags_name_the_flag() {
        let args = ConfigArgs {
            listen: Some("127.0.0.1:0".into()),
            trust_domain: Some("twokey.local".into()),
            data_dir: Some("d".into()),
            checkpoint_key_file: Some("k".into()),
            origin: Some("twokey.local/audit".into()),
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            tls_ca: Some("a".into()),
            sources: Some(vec!["spiffe://twokey.local/svc/vault".into()]),
            ..ConfigArgs::default()
        };
        let err = AuditConfig::load(&args).unwrap_err().to_string();
        assert!(err.contains("--sources (or TWOKEY_AUDIT_SOURCES)"), "{err}");
        assert!(err.contains("ID=BASE64_PUBLIC_KEY"), "{err}");
        let err = AuditConfig::load(&ConfigArgs {
            sources: None,
            ..args
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("`sources` is not set"), "{err}");
    }
}
