//! The vault's configuration: a TOML file (`--config`), each field
//! overridable by a flag or a `TWOKEY_VAULT_*` environment variable. The
//! `[consent]` section is required: it pins the admins (an OpenSSH
//! `allowed_signers` file) and the threshold M that the first signed policy
//! must satisfy, the vault's root of trust.

use std::path::PathBuf;

use twokey_consent::TrustRoot;
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
    /// Required in the `file` seal mode (no `[seal]` section); unused in
    /// `shamir` mode, where the key is never written.
    #[serde(default)]
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
    /// The audit service's checkpoint verifier key
    /// (`<origin>+<key id>+<base64 key>`, as `twokey-audit` prints it at
    /// start): receipts are checked against it. Without it, acknowledgements
    /// are taken as they come and a WARN at start says so.
    #[serde(default)]
    pub audit_checkpoint_key: Option<String>,
    /// Days this service keeps each event after audit acknowledged it, so
    /// that an audit service restored from a backup younger than this gets
    /// it back (docs/RELIABILITY.md). 0 keeps none.
    #[serde(default = "default_audit_keep_days")]
    pub audit_keep_days: u64,
    /// How long a release waits for audit's acknowledgement.
    #[serde(default = "default_ack_timeout_ms")]
    pub audit_ack_timeout_ms: u64,
    /// `human` or `json` log lines.
    #[serde(default)]
    pub log_format: LogFormat,
    /// This server's certificate, key and the CA clients must chain to.
    pub tls: TlsFiles,
    /// The root of trust of the signed policy. Required: the vault does not
    /// start without it (an `Option` only so that its absence is reported
    /// with what to write, not as a bare missing field).
    #[serde(default)]
    pub consent: Option<ConsentConfig>,
    /// The `[seal]` section: absent for the `file` mode (the key in
    /// `master_key_file`), present for `shamir`.
    #[serde(default)]
    pub seal: Option<SealConfig>,
    /// Where seeds, used grants and consent history are kept: `[store]`,
    /// sled in `data_dir` (the default) or PostgreSQL shared by several
    /// vault replicas (docs/HA.md).
    #[serde(default)]
    pub store: twokey_pgstore::config::StoreConfig,
}

/// The `[seal]` section: how the master key is kept.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealConfig {
    /// `shamir` or `pkcs11` (without the section the key is read from
    /// `master_key_file`).
    pub mode: String,
    /// The seal descriptor `twokey-vault init-key --seal shamir|pkcs11`
    /// wrote (`seal.toml`).
    pub descriptor: PathBuf,
    /// How long shares submitted without reaching K are kept, e.g. `10m`.
    #[serde(default = "default_unseal_timeout")]
    pub unseal_timeout: String,
    /// `pkcs11`: the token's PKCS#11 module (`.so`), e.g.
    /// `/usr/lib/softhsm/libsofthsm2.so`. Not a secret.
    #[serde(default)]
    pub module: Option<PathBuf>,
    /// `pkcs11`: the token's label (or give `slot`).
    #[serde(default)]
    pub token_label: Option<String>,
    /// `pkcs11`: the token's slot number (or give `token_label`).
    #[serde(default)]
    pub slot: Option<u64>,
    /// `pkcs11`: the label of the AES-256 key that wraps the master key.
    #[serde(default)]
    pub key_label: Option<String>,
    /// `pkcs11`: a file (mode 0600) holding the token's user PIN.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// `pkcs11`: the environment variable holding the user PIN (instead of
    /// `pin_file`).
    #[serde(default)]
    pub pin_env: Option<String>,
}

impl SealConfig {
    /// The unseal timeout, read; the message says how to write one.
    pub fn timeout(&self) -> Result<std::time::Duration, String> {
        twokey_runtime::time::parse_duration(&self.unseal_timeout)
            .map_err(|e| format!("[seal] unseal_timeout: {e}"))
    }

    /// Checks the mode.
    pub fn check(&self) -> Result<(), String> {
        if self.mode == "shamir" || self.mode == crate::hsm::MODE {
            Ok(())
        } else {
            Err(format!(
                "[seal] mode = {:?}: the section takes \"shamir\" or \"pkcs11\"; remove the section for the file mode",
                self.mode
            ))
        }
    }

    /// The `pkcs11` mode's settings, checked: the module, exactly one of
    /// `token_label` and `slot`, `key_label`, exactly one of `pin_file` and
    /// `pin_env`. The message names what to write.
    pub fn pkcs11(&self) -> Result<crate::hsm::Settings, String> {
        use crate::hsm::{PinSource, Settings, TokenRef};
        let module = self.module.clone().ok_or(
            "[seal] mode = \"pkcs11\" needs module = \"/path/to/the/pkcs11-module.so\" (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)",
        )?;
        let token = match (&self.token_label, self.slot) {
            (Some(label), None) => TokenRef::Label(label.clone()),
            (None, Some(slot)) => TokenRef::Slot(slot),
            _ => {
                return Err(
                    "[seal] mode = \"pkcs11\" needs exactly one of token_label = \"LABEL\" and slot = N"
                        .into(),
                );
            }
        };
        let key_label = self.key_label.clone().ok_or(
            "[seal] mode = \"pkcs11\" needs key_label = \"LABEL\": the wrapping key init-key made or found",
        )?;
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(file), None) => PinSource::File(file.clone()),
            (None, Some(var)) => PinSource::Env(var.clone()),
            _ => {
                return Err(
                    "[seal] mode = \"pkcs11\" needs exactly one of pin_file = \"/path/pin\" (mode 0600) and pin_env = \"VARIABLE\" for the token's user PIN"
                        .into(),
                );
            }
        };
        Ok(Settings {
            module,
            token,
            key_label,
            pin,
        })
    }
}

fn default_unseal_timeout() -> String {
    "10m".into()
}

/// The `[consent]` section: the pinned admins and threshold.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentConfig {
    /// OpenSSH `allowed_signers` file of the initial admins; principals are
    /// their SPIFFE IDs.
    pub admins_file: PathBuf,
    /// M: distinct admins whose signatures the first policy version needs.
    pub threshold: u32,
}

/// The message for a config without `[consent]`.
pub const CONSENT_REQUIRED: &str = "the [consent] section is required: add\n\n[consent]\nadmins_file = \"/path/admins.allowed_signers\"   # OpenSSH allowed_signers; principals = admins' SPIFFE IDs\nthreshold = 2\n\nto the vault's config; it pins the admins who sign the first consent policy";

fn default_audit_server_name() -> String {
    "audit".into()
}

fn default_ack_timeout_ms() -> u64 {
    3000
}

impl VaultConfig {
    /// The pinned root of trust: the `[consent]` section's admins and
    /// threshold, read and checked; the message says what to fix.
    pub fn trust_root(&self) -> Result<TrustRoot, String> {
        let consent = self.consent.as_ref().ok_or(CONSENT_REQUIRED)?;
        let path = &consent.admins_file;
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "[consent] admins_file {}: {e}; write the pinned admins' allowed_signers lines there",
                path.display()
            )
        })?;
        TrustRoot::from_allowed_signers(&self.trust_domain, &text, consent.threshold)
            .map_err(|e| format!("[consent] admins_file {}: {e}", path.display()))
    }

    /// Every path field, by its dotted name (made relative to the config
    /// file's directory when the file gave them).
    pub fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let tls = &mut self.tls;
        let mut paths = vec![
            ("data_dir", &mut self.data_dir),
            ("master_key_file", &mut self.master_key_file),
            ("event_key_file", &mut self.event_key_file),
            ("tls.cert", &mut tls.cert),
            ("tls.key", &mut tls.key),
            ("tls.ca", &mut tls.ca),
        ];
        paths.extend(tls.crl.as_mut().map(|p| ("tls.crl", p)));
        if let Some(c) = self.consent.as_mut() {
            paths.push(("consent.admins_file", &mut c.admins_file));
        }
        if let Some(s) = self.seal.as_mut() {
            paths.push(("seal.descriptor", &mut s.descriptor));
            paths.extend(s.pin_file.as_mut().map(|p| ("seal.pin_file", p)));
        }
        paths.extend(self.store.paths_mut());
        paths
    }

    /// The vault's own SPIFFE ID, the source of its audit events.
    pub fn source_id(&self) -> Result<SpiffeId, twokey_runtime::identity::IdentityError> {
        SpiffeId::parse(&format!("spiffe://{}/svc/vault", self.trust_domain))
    }
}

fn default_audit_keep_days() -> u64 {
    twokey_runtime::shipper::DEFAULT_KEEP_DAYS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(text: &str) -> SealConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_seal_section_takes_shamir_and_a_timeout_defaulting_to_ten_minutes() {
        let s = seal("mode = \"shamir\"\ndescriptor = \"seal.toml\"\n");
        assert_eq!(s.check(), Ok(()));
        assert_eq!(s.timeout(), Ok(std::time::Duration::from_secs(600)));
        let s = seal("mode = \"file\"\ndescriptor = \"seal.toml\"\nunseal_timeout = \"ten\"\n");
        assert_eq!(
            s.check().unwrap_err(),
            "[seal] mode = \"file\": the section takes \"shamir\" or \"pkcs11\"; remove the section for the file mode"
        );
        assert!(
            s.timeout()
                .unwrap_err()
                .starts_with("[seal] unseal_timeout:")
        );
        assert!(
            toml::from_str::<SealConfig>("mode = \"shamir\"\ndescriptor = \"x\"\nkey = \"y\"\n")
                .is_err()
        );
    }

    #[test]
    fn the_pkcs11_mode_needs_a_module_one_token_a_key_label_and_one_pin_source() {
        use crate::hsm::{PinSource, TokenRef};
        let base = "mode = \"pkcs11\"\ndescriptor = \"seal.toml\"\n";
        let full = format!(
            "{base}module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"twokey\"\nkey_label = \"master\"\npin_file = \"pin\"\n"
        );
        let s = seal(&full);
        assert_eq!(s.check(), Ok(()));
        let p = s.pkcs11().unwrap();
        assert_eq!(p.token, TokenRef::Label("twokey".into()));
        assert_eq!(p.pin, PinSource::File("pin".into()));
        assert_eq!(p.key_label, "master");
        let by_slot = seal(&format!(
            "{base}module = \"/m.so\"\nslot = 7\nkey_label = \"k\"\npin_env = \"HSM_PIN\"\n"
        ))
        .pkcs11()
        .unwrap();
        assert_eq!(
            (by_slot.token, by_slot.pin),
            (TokenRef::Slot(7), PinSource::Env("HSM_PIN".into()))
        );
        let e = seal(base).pkcs11().unwrap_err();
        assert!(e.contains("needs module ="), "{e}");
        let e = seal(&format!(
            "{base}module = \"/m.so\"\ntoken_label = \"t\"\nslot = 1\nkey_label = \"k\"\npin_env = \"P\"\n"
        ))
        .pkcs11()
        .unwrap_err();
        assert!(e.contains("exactly one of token_label"), "{e}");
        let e = seal(&format!(
            "{base}module = \"/m.so\"\nslot = 1\npin_env = \"P\"\n"
        ))
        .pkcs11()
        .unwrap_err();
        assert!(e.contains("needs key_label"), "{e}");
        let e = seal(&format!(
            "{base}module = \"/m.so\"\nslot = 1\nkey_label = \"k\"\npin_file = \"f\"\npin_env = \"P\"\n"
        ))
        .pkcs11()
        .unwrap_err();
        assert!(e.contains("exactly one of pin_file"), "{e}");
        // The PIN itself has no place in the section.
        assert!(toml::from_str::<SealConfig>(&format!("{full}pin = \"1234\"\n")).is_err());
    }
}
