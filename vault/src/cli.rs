//! The `twokey-vault` command line: `serve` and key generation.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use twokey_runtime::{
    config::{self, path, text},
    keys::{SecretKey, encode_public_key, generate_signing_key},
    telemetry::{self, LogFormat},
};

use crate::config::VaultConfig;

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
    /// Write a fresh 32-byte master key to a new file (mode 0600).
    InitKey {
        /// The file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a fresh ed25519 event-signing key (mode 0600) and print its
    /// public half for the audit service's `[[sources]]`.
    InitEventKey {
        /// The file to create.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Flags of `serve`; each overrides the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "TWOKEY_VAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "TWOKEY_VAULT_LISTEN")]
    listen: Option<String>,
    /// SPIFFE trust domain.
    #[arg(long, env = "TWOKEY_VAULT_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Data directory.
    #[arg(long, env = "TWOKEY_VAULT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Master key file.
    #[arg(long, env = "TWOKEY_VAULT_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// Event signing key file.
    #[arg(long, env = "TWOKEY_VAULT_EVENT_KEY_FILE")]
    event_key_file: Option<PathBuf>,
    /// The broker's SPIFFE ID.
    #[arg(long, env = "TWOKEY_VAULT_BROKER_ID")]
    broker_id: Option<String>,
    /// The broker's grant public key (base64).
    #[arg(long, env = "TWOKEY_VAULT_GRANT_PUBLIC_KEY")]
    grant_public_key: Option<String>,
    /// Audit service address.
    #[arg(long, env = "TWOKEY_VAULT_AUDIT_ADDRESS")]
    audit_address: Option<String>,
    /// Name in the audit service's certificate.
    #[arg(long, env = "TWOKEY_VAULT_AUDIT_SERVER_NAME")]
    audit_server_name: Option<String>,
    /// Milliseconds a release waits for audit.
    #[arg(long, env = "TWOKEY_VAULT_AUDIT_ACK_TIMEOUT_MS")]
    audit_ack_timeout_ms: Option<u64>,
    /// Log format.
    #[arg(long, env = "TWOKEY_VAULT_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Certificate file.
    #[arg(long, env = "TWOKEY_VAULT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key file.
    #[arg(long, env = "TWOKEY_VAULT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA certificate file.
    #[arg(long, env = "TWOKEY_VAULT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Certificate revocation list (PEM) from the CA; listed client
    /// certificates are refused in the handshake.
    #[arg(long, env = "TWOKEY_VAULT_TLS_CRL")]
    tls_crl: Option<PathBuf>,
}

impl ServeArgs {
    fn load(&self) -> Result<VaultConfig, config::ConfigError> {
        let log = self.log_format.map(|f| {
            toml::Value::String(
                if f == LogFormat::Json {
                    "json"
                } else {
                    "human"
                }
                .into(),
            )
        });
        config::load(
            self.config.as_deref(),
            &[
                ("listen", text(&self.listen)),
                ("trust_domain", text(&self.trust_domain)),
                ("data_dir", path(&self.data_dir)),
                ("master_key_file", path(&self.master_key_file)),
                ("event_key_file", path(&self.event_key_file)),
                ("broker_id", text(&self.broker_id)),
                ("grant_public_key", text(&self.grant_public_key)),
                ("audit_address", text(&self.audit_address)),
                ("audit_server_name", text(&self.audit_server_name)),
                (
                    "audit_ack_timeout_ms",
                    self.audit_ack_timeout_ms
                        .map(|v| toml::Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))),
                ),
                ("log_format", log),
                ("tls.cert", path(&self.tls_cert)),
                ("tls.key", path(&self.tls_key)),
                ("tls.ca", path(&self.tls_ca)),
                ("tls.crl", path(&self.tls_crl)),
            ],
            "TWOKEY_VAULT_",
        )
    }
}

/// Runs the command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.load()?;
            let _telemetry = telemetry::init("twokey-vault", config.log_format);
            twokey_runtime::metrics::observe_certificate_expiry("twokey-vault", &config.tls.cert);
            let listener = twokey_runtime::serve::bind(&config.listen).await?;
            crate::serve(config, listener, twokey_runtime::serve::shutdown_signal()).await?;
        }
        Command::InitKey { out } => {
            SecretKey::generate()
                .write(&out)
                .with_context(|| "cannot create the master key; it must not exist yet")?;
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
