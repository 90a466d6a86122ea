//! The `twokey-audit` command line: `serve` and `init-key`.

use std::path::PathBuf;

use anyhow::Context;
use twokey_runtime::{
    keys::{encode_public_key, generate_signing_key},
    serve::{bind, shutdown_signal},
    telemetry,
};

use crate::{
    checkpoint::NoteVerifier,
    config::{AuditConfig, ConfigArgs},
};

/// The twokey audit service: an append-only, signed, verifiable event log.
#[derive(Debug, clap::Parser)]
#[command(name = "twokey-audit", version)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once at start")]
pub enum Command {
    /// Serves the audit gRPC API.
    Serve(ConfigArgs),
    /// Makes a new checkpoint signing key (mode 0600) and prints its verifier key.
    InitKey {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// The log's origin, which names the key in checkpoints.
        #[arg(
            long,
            env = "TWOKEY_AUDIT_ORIGIN",
            default_value = "twokey.local/audit"
        )]
        origin: String,
    },
}

/// Runs a parsed command line.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Serve(flags) => {
            let config = AuditConfig::load(&flags)?;
            let _telemetry = telemetry::init("twokey-audit", config.log_format);
            twokey_runtime::metrics::observe_certificate_expiry("twokey-audit", &config.tls.cert);
            let listener = bind(&config.listen).await?;
            crate::serve(config, listener, shutdown_signal()).await?;
            Ok(())
        }
        Command::InitKey { out, origin } => {
            // Check the name before writing anything.
            let probe = NoteVerifier::new(
                &origin,
                ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
            )?;
            drop(probe);
            let key = generate_signing_key(&out)
                .with_context(|| format!("cannot make the checkpoint key {}", out.display()))?;
            let verifier = NoteVerifier::new(&origin, key.verifying_key())?;
            println!("wrote checkpoint signing key {}", out.display());
            println!("verifier key: {verifier}");
            println!("public key: {}", encode_public_key(&key.verifying_key()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_line_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse_into_config_overrides() {
        let args = Args::try_parse_from([
            "twokey-audit",
            "serve",
            "--config",
            "/etc/twokey/audit.toml",
            "--listen",
            "127.0.0.1:0",
            "--auditors",
            "spiffe://t/user/a,spiffe://t/user/b",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Command::Serve(flags) = args.command else {
            panic!("not serve");
        };
        assert_eq!(flags.listen.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(flags.auditors.unwrap().len(), 2);
        assert_eq!(flags.log_format, Some(telemetry::LogFormat::Json));
    }
}
