//! The vault's configuration: a TOML file (`--config`), each field
//! overridable by a flag or a `TWOKEY_VAULT_*` environment variable.

use std::path::PathBuf;

use twokey_runtime::{SpiffeId, telemetry::LogFormat, tls::TlsFiles};

/// Everything the vault needs to run.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Address to listen on, e.g. `127.0.0.1:7401`.
    pub listen: String,
    /// SPIFFE trust domain of every peer, e.g. `twokey.local`.
    pub trust_domain: String,
    /// sled data directory.
    pub data_dir: PathBuf,
    /// 32-byte master key file (mode 0600), made by `twokey-vault init-key`.
    pub master_key_file: PathBuf,
    /// ed25519 key that signs the vault's audit events.
    pub event_key_file: PathBuf,
    /// The only client allowed: the broker's SPIFFE ID.
    pub broker_id: SpiffeId,
    /// The broker's grant-verification public key (base64).
    pub grant_public_key: String,
    /// The audit service, `https://HOST:PORT`.
    pub audit_address: String,
    /// The name the audit service's certificate must carry.
    #[serde(default = "default_audit_server_name")]
    pub audit_server_name: String,
    /// How long a release waits for audit's acknowledgement.
    #[serde(default = "default_ack_timeout_ms")]
    pub audit_ack_timeout_ms: u64,
    /// `human` or `json` log lines.
    #[serde(default)]
    pub log_format: LogFormat,
    /// This server's certificate, key and the CA clients must chain to.
    pub tls: TlsFiles,
}

fn default_audit_server_name() -> String {
    "audit".into()
}

fn default_ack_timeout_ms() -> u64 {
    3000
}

impl VaultConfig {
    /// The vault's own SPIFFE ID, the source of its audit events.
    pub fn source_id(&self) -> Result<SpiffeId, twokey_runtime::identity::IdentityError> {
        SpiffeId::parse(&format!("spiffe://{}/svc/vault", self.trust_domain))
    }
}
