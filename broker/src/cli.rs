//! The `twokey-broker` command: `serve` and `init-keys`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use twokey_runtime::{
    keys::{self, SecretKey},
    serve, telemetry,
};

use twokey_runtime::start::StartError;

use crate::config::{BrokerConfig, PartialConfig};

/// The twokey broker: policy, approvals, PINs and signed grants.
#[derive(Debug, Parser)]
#[command(name = "twokey-broker", version)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the broker API over mTLS.
    Serve(Box<ServeArgs>),
    /// Makes grant.key, event.key and pin.key (mode 0600) in a directory and
    /// prints the public keys the vault and audit configs need.
    InitKeys(InitKeysArgs),
    /// Prints the OpenAPI 3.1 document of the HTTP/JSON API, generated from
    /// the proto descriptors (`twokey-broker openapi > docs/openapi.json`).
    Openapi,
}

/// Flags of `serve`.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The TOML config file; flags and TWOKEY_BROKER_* variables override it.
    #[arg(long, env = "TWOKEY_BROKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: PartialConfig,
}

/// Flags of `init-keys`.
#[derive(Debug, clap::Args)]
struct InitKeysArgs {
    /// Directory for the key files (created if needed; existing keys are never overwritten).
    #[arg(long)]
    dir: PathBuf,
}

/// Runs the command.
pub fn run(args: Args) -> Result<(), StartError> {
    match args.command {
        Command::Serve(a) => {
            let a = *a;
            let config = BrokerConfig::resolve(a.config.as_deref(), a.overrides)
                .map_err(|e| StartError::Setting(e.to_string()))?;
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| StartError::refused(format!("the async runtime: {e}")))?;
            // The exporters' connections live on the runtime: start them
            // inside it, and flush them (guard dropped) before it goes away.
            let mut telemetry = {
                let _inside = runtime.enter();
                telemetry::init("twokey-broker", config.log_format)
            };
            twokey_runtime::metrics::observe_certificate_expiry("twokey-broker", &config.tls.cert);
            let result = runtime.block_on(async move {
                let listener = serve::bind(&config.listen).await?;
                crate::serve(config, listener, serve::shutdown_signal()).await
            });
            telemetry.shutdown();
            result
        }
        Command::Openapi => {
            print!("{}", crate::http::openapi::json_text());
            Ok(())
        }
        Command::InitKeys(a) => {
            std::fs::create_dir_all(&a.dir).map_err(|source| {
                StartError::Key(keys::KeyError::Io {
                    path: a.dir.clone(),
                    source,
                })
            })?;
            let grant = keys::generate_signing_key(&a.dir.join("grant.key"))?;
            let event = keys::generate_signing_key(&a.dir.join("event.key"))?;
            SecretKey::generate().write(&a.dir.join("pin.key"))?;
            eprintln!(
                "wrote grant.key, event.key and pin.key (mode 0600) in {}",
                a.dir.display()
            );
            println!(
                "grant_public_key = \"{}\"",
                keys::encode_public_key(&grant.verifying_key())
            );
            println!(
                "event_public_key = \"{}\"",
                keys::encode_public_key(&event.verifying_key())
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Args::command().debug_assert();
    }

    #[test]
    fn every_config_field_has_a_flag_and_an_env_variable() {
        let command = super::Args::command();
        let serve = command.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments().filter(|a| a.get_long().is_some()) {
            let long = arg.get_long().unwrap();
            if long == "help" {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{long} has no env variable"));
            let expected = format!("TWOKEY_BROKER_{}", long.replace('-', "_").to_uppercase());
            assert_eq!(env.to_str().unwrap(), expected, "--{long}");
        }
    }
}
