//! The `twokey-vault` command line: `serve` (the shared service flags plus
//! the vault's own) and key generation. Every long flag has its
//! `TWOKEY_VAULT_<FLAG>` variable (`twokey_runtime::cli::parse`).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use twokey_runtime::{
    cli::ServiceFlags,
    config::{self, path, text},
    keys::{SecretKey, encode_public_key, generate_signing_key},
    telemetry,
};

use crate::config::VaultConfig;

/// The prefix of the vault's environment variables.
pub const ENV_PREFIX: &str = "TWOKEY_VAULT_";

/// The twokey vault: holds TOTP seeds encrypted and computes a code only for
/// a single-use grant signed by the broker.
#[derive(Debug, Parser)]
#[command(name = "twokey-vault", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the vault API over mutual TLS.
    Serve(Box<ServeArgs>),
    /// Make a fresh 32-byte master key: `--seal file` (the default) writes
    /// it to a new file (mode 0600); `--seal shamir` never writes it, but
    /// splits it K-of-N, encrypts each share to its holder's ssh-ed25519 key
    /// (age) and writes `<name>.share.age` per holder and `seal.toml` into
    /// the directory `--out`; `--seal pkcs11` never writes it either, but
    /// has the HSM encrypt it under an AES-256 key that never leaves the
    /// token (made if `--key-label` names none) and writes only that and
    /// the descriptor, `seal.toml`, into `--out`.
    InitKey {
        /// The file to create (`file`), or a new or empty directory (`shamir`, `pkcs11`).
        #[arg(long)]
        out: PathBuf,
        /// How the key is kept: `file`, `shamir` or `pkcs11`.
        #[arg(long, value_enum, default_value_t = SealMode::File)]
        seal: SealMode,
        /// With `shamir`: K, the shares needed to unseal (at least 2).
        #[arg(long, required_if_eq("seal", "shamir"))]
        threshold: Option<u8>,
        /// With `shamir`, once per holder: NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY.
        #[arg(long = "holder")]
        holders: Vec<String>,
        /// With `pkcs11`: where the token is and the key that wraps the master key.
        #[command(flatten)]
        pkcs11: Pkcs11Args,
    },
    /// Write a fresh ed25519 event-signing key (mode 0600) and print its
    /// public half for the audit service's `[[sources]]`.
    InitEventKey {
        /// The file to create.
        #[arg(long)]
        out: PathBuf,
    },
}

/// How `init-key` keeps the master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SealMode {
    /// One key file (today's mode; the demo and tests use it).
    File,
    /// Split K-of-N among holders; the vault starts sealed.
    Shamir,
    /// Wrapped by a key inside an HSM (PKCS#11); the vault unwraps it at start.
    Pkcs11,
}

/// `init-key --seal pkcs11`'s flags: the same settings as `[seal]`. The PIN
/// is read from a file or a variable, never from the command line.
#[derive(Debug, Default, Args)]
struct Pkcs11Args {
    /// The token's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, required_if_eq("seal", "pkcs11"))]
    module: Option<PathBuf>,
    /// The token's label.
    #[arg(long, conflicts_with = "slot")]
    token_label: Option<String>,
    /// The token's slot number (instead of --token-label).
    #[arg(long)]
    slot: Option<u64>,
    /// The label of the AES-256 wrapping key: found, or made if the token has none.
    #[arg(long, required_if_eq("seal", "pkcs11"))]
    key_label: Option<String>,
    /// A file (mode 0600) holding the token's user PIN.
    #[arg(long, conflicts_with = "pin_env")]
    pin_file: Option<PathBuf>,
    /// The environment variable holding the token's user PIN.
    #[arg(long)]
    pin_env: Option<String>,
}

/// `init-key --seal pkcs11`: has the HSM wrap a fresh key and writes the
/// descriptor into `out`.
fn init_pkcs11(out: &std::path::Path, args: Pkcs11Args) -> anyhow::Result<()> {
    use crate::hsm::{self, PinSource, Settings, TokenRef};
    let token = match (args.token_label, args.slot) {
        (Some(label), _) => TokenRef::Label(label),
        (None, Some(slot)) => TokenRef::Slot(slot),
        (None, None) => {
            anyhow::bail!("--seal pkcs11 needs the token: --token-label LABEL or --slot N")
        }
    };
    let pin = match (args.pin_file, args.pin_env) {
        (Some(file), _) => PinSource::File(file),
        (None, Some(var)) => PinSource::Env(var),
        (None, None) => anyhow::bail!(
            "--seal pkcs11 needs the user PIN: --pin-file FILE (mode 0600) or --pin-env VARIABLE; never on the command line"
        ),
    };
    let settings = Settings {
        module: args.module.unwrap_or_default(),
        token,
        key_label: args.key_label.unwrap_or_default(),
        pin,
    };
    let path = out.join(hsm::DESCRIPTOR_FILE);
    if path.exists() {
        anyhow::bail!(
            "{} exists and is never overwritten (it may be the only copy of a vault's wrapped key); choose a new, empty directory for --out",
            path.display()
        );
    }
    let wrapped = hsm::wrap(&settings, &SecretKey::generate())?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the directory {}", out.display()))?;
    wrapped.descriptor.write(&path)?;
    if let Ok(d) = std::fs::File::open(out) {
        let _ = d.sync_all();
    }
    println!(
        "{} the AES-256 key {:?} in {} ({})",
        if wrapped.made { "made" } else { "found" },
        settings.key_label,
        settings.token,
        if wrapped.born_inside {
            "sensitive, never extractable"
        } else {
            "sensitive and not extractable now, but imported: copies of it may exist outside the token"
        }
    );
    println!(
        "wrote {}: the master key wrapped by that key, and never written in the clear; set [seal] mode = \"pkcs11\", descriptor, module, token_label or slot, key_label and pin_file or pin_env",
        path.display()
    );
    Ok(())
}

/// `init-key --seal shamir`: splits a fresh key and writes the shares and
/// the descriptor into `out`.
fn init_shamir(out: &std::path::Path, threshold: u8, holders: &[String]) -> anyhow::Result<()> {
    use crate::unseal::{HolderSpec, split, write_split};
    if holders.is_empty() {
        anyhow::bail!(
            "--seal shamir needs the holders: --holder NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY, once each"
        );
    }
    let specs = holders
        .iter()
        .map(|h| HolderSpec::parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    let split = split(&SecretKey::generate(), threshold, &specs)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the directory {}", out.display()))?;
    for path in write_split(out, &split)? {
        println!("wrote {}", path.display());
    }
    println!(
        "the master key was split {threshold} of {} and never written; point [seal] descriptor at seal.toml and give each holder their own .share.age",
        specs.len()
    );
    Ok(())
}

/// Flags of `serve`; each overrides the config file.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// The flags every service's `serve` takes.
    #[command(flatten)]
    pub flags: ServiceFlags,
    /// Master key file.
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
    /// Event signing key file.
    #[arg(long)]
    pub event_key_file: Option<PathBuf>,
    /// The broker's SPIFFE ID.
    #[arg(long)]
    pub broker_id: Option<String>,
    /// The broker's grant public key (base64).
    #[arg(long)]
    pub grant_public_key: Option<String>,
    /// Audit service address.
    #[arg(long)]
    pub audit_address: Option<String>,
    /// Name in the audit service's certificate.
    #[arg(long)]
    pub audit_server_name: Option<String>,
    /// The audit service's checkpoint verifier key (receipts are checked).
    #[arg(long)]
    pub audit_checkpoint_key: Option<String>,
    /// Milliseconds a release waits for audit.
    #[arg(long)]
    pub audit_ack_timeout_ms: Option<u64>,
    /// Where seeds are kept: sled (in data_dir) or postgres [default: sled].
    #[arg(long)]
    pub store_backend: Option<String>,
    /// postgresql://ROLE@HOST:PORT/DATABASE?sslmode=verify-full, no password.
    #[arg(long)]
    pub store_postgres_url: Option<String>,
    /// File whose first line is the PostgreSQL role's password.
    #[arg(long, value_name = "FILE")]
    pub store_postgres_password_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the PostgreSQL server's certificate.
    #[arg(long, value_name = "FILE")]
    pub store_postgres_ca_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The configuration: the file, then these flags over it.
    pub fn load(&self) -> Result<VaultConfig, config::ConfigError> {
        let mut overrides = self.flags.overrides();
        overrides.extend([
            ("master_key_file", path(&self.master_key_file)),
            ("event_key_file", path(&self.event_key_file)),
            ("broker_id", text(&self.broker_id)),
            ("grant_public_key", text(&self.grant_public_key)),
            ("audit_address", text(&self.audit_address)),
            ("audit_server_name", text(&self.audit_server_name)),
            ("audit_checkpoint_key", text(&self.audit_checkpoint_key)),
            (
                "audit_ack_timeout_ms",
                self.audit_ack_timeout_ms
                    .map(|v| toml::Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))),
            ),
            ("store.backend", text(&self.store_backend)),
            ("store.postgres.url", text(&self.store_postgres_url)),
            (
                "store.postgres.password_file",
                path(&self.store_postgres_password_file),
            ),
            ("store.postgres.ca_file", path(&self.store_postgres_ca_file)),
        ]);
        let file = self.flags.config.as_deref();
        let mut config: VaultConfig = config::load(file, &overrides, ENV_PREFIX)?;
        config::paths_relative_to_file(
            file,
            |field| config::overridden(&overrides, field),
            config.paths_mut(),
        );
        if let Err(message) = config.store.postgres() {
            return Err(config::ConfigError::Invalid {
                origin: file.map_or_else(
                    || "from flags and environment".to_owned(),
                    |p| p.display().to_string(),
                ),
                message,
            });
        }
        Ok(config)
    }
}

/// What to do when `init-key` cannot create `out`: an existing file is
/// never overwritten (it may be the only copy of a vault's key); a missing
/// directory must be made first.
fn init_key_advice(out: &std::path::Path) -> String {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if out.exists() {
        format!(
            "cannot create the master key {}: the file exists and is never overwritten (it may be \
             the only copy of a vault's key); choose another path",
            out.display()
        )
    } else if !dir.is_dir() {
        format!(
            "cannot create the master key {}: the directory {} does not exist; create it first \
             (mkdir -p {})",
            out.display(),
            dir.display(),
            dir.display()
        )
    } else {
        format!("cannot create the master key {}", out.display())
    }
}

/// Runs the command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            // No core dumps or ptrace by other users' processes: the key
            // and seeds live in this process's memory.
            rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
                .context("cannot mark the vault process non-dumpable")?;
            let memory = crate::memlock::lock_memory();
            let config = args.load()?;
            let _telemetry = telemetry::init("twokey-vault", config.log_format);
            match memory {
                crate::memlock::MemoryLock::Locked => {
                    tracing::info!("memory locked: keys and seeds never reach swap")
                }
                crate::memlock::MemoryLock::NotLocked(why) => tracing::warn!("{why}"),
            }
            twokey_runtime::metrics::observe_certificate_expiry("twokey-vault", &config.tls.cert);
            let listener = twokey_runtime::serve::bind(&config.listen).await?;
            crate::serve(config, listener, twokey_runtime::serve::shutdown_signal()).await?;
        }
        Command::InitKey {
            out,
            seal: SealMode::Shamir,
            threshold,
            holders,
            ..
        } => init_shamir(&out, threshold.unwrap_or(0), &holders)?,
        Command::InitKey {
            out,
            seal: SealMode::Pkcs11,
            pkcs11,
            ..
        } => init_pkcs11(&out, pkcs11)?,
        Command::InitKey { out, .. } => {
            SecretKey::generate()
                .write(&out)
                .with_context(|| init_key_advice(&out))?;
            println!("wrote master key {} (mode 0600)", out.display());
        }
        Command::InitEventKey { out } => {
            let key = generate_signing_key(&out)?;
            println!("{}", encode_public_key(&key.verifying_key()));
        }
    }
    // Give the last log lines a moment to reach stderr.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use twokey_runtime::cli::with_env;

    #[test]
    fn paths_in_the_config_file_are_relative_to_its_directory_and_flags_to_the_working_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vault.toml");
        let example = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vault.toml"),
        )
        .unwrap()
        .replace("/etc/twokey/vault/", "")
        .replace("/var/lib/twokey-vault", "data");
        std::fs::write(&file, example).unwrap();
        let cli = Cli::try_parse_from([
            "twokey-vault",
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--event-key-file",
            "keys/event.key",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let c = args.load().unwrap();
        assert_eq!(c.master_key_file, dir.path().join("master.key"));
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.tls.key, dir.path().join("vault.key"));
        assert_eq!(
            c.consent.unwrap().admins_file,
            dir.path().join("admins.allowed_signers")
        );
        assert_eq!(c.event_key_file, PathBuf::from("keys/event.key"));
    }

    #[test]
    fn every_flag_keeps_its_name_and_environment_variable() {
        let command = with_env(Cli::command(), ENV_PREFIX);
        command.clone().debug_assert();
        let serve: Vec<(String, String)> = command
            .find_subcommand("serve")
            .unwrap()
            .get_arguments()
            .filter_map(|a| Some((a.get_long()?.to_owned(), a.get_env()?.to_str()?.to_owned())))
            .collect();
        let want = [
            "config",
            "listen",
            "trust-domain",
            "data-dir",
            "master-key-file",
            "event-key-file",
            "broker-id",
            "grant-public-key",
            "audit-address",
            "audit-server-name",
            "audit-checkpoint-key",
            "audit-ack-timeout-ms",
            "log-format",
            "tls-cert",
            "tls-key",
            "tls-ca",
            "tls-crl",
            "store-backend",
            "store-postgres-url",
            "store-postgres-password-file",
            "store-postgres-ca-file",
        ];
        for flag in want {
            let var = format!("TWOKEY_VAULT_{}", flag.replace('-', "_").to_uppercase());
            assert!(
                serve.contains(&(flag.to_owned(), var)),
                "--{flag}: {serve:?}"
            );
        }
        assert_eq!(serve.len(), want.len(), "{serve:?}");
    }
}
