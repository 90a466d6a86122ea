//! The `twokey-broker` command: `serve` and `init-keys`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use twokey_runtime::{
    cli::ServiceFlags,
    config::{ConfigError, path, text},
    keys::{self, SecretKey},
    serve,
    start::StartError,
    telemetry,
};

use crate::{ServeOptions, config::BrokerConfig};

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

/// Flags of `serve`: the shared ones, then the broker's own; each
/// overrides the config file and has its `TWOKEY_BROKER_<FLAG>` variable.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    service: ServiceFlags,
    /// Address for the HTTP/JSON (Connect protocol) API, same mTLS; unset: off.
    #[arg(long)]
    http_listen: Option<String>,
    /// The policy file (TOML).
    #[arg(long)]
    policy_file: Option<PathBuf>,
    /// ed25519 key file that signs grants (init-keys makes it).
    #[arg(long)]
    grant_key_file: Option<PathBuf>,
    /// ed25519 key file that signs audit events.
    #[arg(long)]
    event_key_file: Option<PathBuf>,
    /// Key file for PIN hashes.
    #[arg(long)]
    pin_key_file: Option<PathBuf>,
    /// The vault, https://HOST:PORT.
    #[arg(long)]
    vault_address: Option<String>,
    /// Name in the vault's certificate [default: vault].
    #[arg(long)]
    vault_server_name: Option<String>,
    /// The audit service, https://HOST:PORT.
    #[arg(long)]
    audit_address: Option<String>,
    /// Name in the audit service's certificate [default: audit].
    #[arg(long)]
    audit_server_name: Option<String>,
    /// The audit service's checkpoint verifier key (receipts are checked).
    #[arg(long)]
    audit_checkpoint_key: Option<String>,
    /// How often expired requests are swept, e.g. "5s" [default: 5s].
    #[arg(long)]
    sweep_interval: Option<String>,
    /// Mailbox directory: one <name>.jsonl per recipient.
    #[arg(long)]
    notify_mailbox_dir: Option<PathBuf>,
    /// Webhook URL (http:// or https://).
    #[arg(long)]
    notify_webhook_url: Option<String>,
    /// File holding the webhook's HMAC secret (mode 0600).
    #[arg(long)]
    notify_webhook_secret_file: Option<PathBuf>,
    /// Send PINs to the webhook too (only if it is how requesters are reached).
    #[arg(long)]
    notify_webhook_send_pins: Option<bool>,
    /// Extra CA certificates (PEM) trusted for the webhook's https endpoint.
    #[arg(long, value_name = "FILE")]
    notify_webhook_ca_file: Option<PathBuf>,
    /// Slack Web API base URL [default: https://slack.com/api].
    #[arg(long)]
    notify_slack_api_base: Option<String>,
    /// File holding the Slack bot token (mode 0600).
    #[arg(long)]
    notify_slack_token_file: Option<PathBuf>,
    /// Channel for request news, e.g. "#root-access".
    #[arg(long)]
    notify_slack_channel: Option<String>,
    /// Extra CA certificates (PEM) trusted for the Slack API base.
    #[arg(long, value_name = "FILE")]
    notify_slack_ca_file: Option<PathBuf>,
    /// Where requests are kept: sled (in data_dir) or postgres [default: sled].
    #[arg(long)]
    store_backend: Option<String>,
    /// postgresql://ROLE@HOST:PORT/DATABASE?sslmode=verify-full, no password.
    #[arg(long)]
    store_postgres_url: Option<String>,
    /// File whose first line is the PostgreSQL role's password.
    #[arg(long, value_name = "FILE")]
    store_postgres_password_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the PostgreSQL server's certificate.
    #[arg(long, value_name = "FILE")]
    store_postgres_ca_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The configuration: the file, overridden by the flags.
    fn load(&self) -> Result<BrokerConfig, ConfigError> {
        let mut overrides = self.service.overrides();
        overrides.extend([
            ("http_listen", text(&self.http_listen)),
            ("policy_file", path(&self.policy_file)),
            ("grant_key_file", path(&self.grant_key_file)),
            ("event_key_file", path(&self.event_key_file)),
            ("pin_key_file", path(&self.pin_key_file)),
            ("vault_address", text(&self.vault_address)),
            ("vault_server_name", text(&self.vault_server_name)),
            ("audit_address", text(&self.audit_address)),
            ("audit_server_name", text(&self.audit_server_name)),
            ("audit_checkpoint_key", text(&self.audit_checkpoint_key)),
            ("sweep_interval", text(&self.sweep_interval)),
            ("notify.mailbox.dir", path(&self.notify_mailbox_dir)),
            ("notify.webhook.url", text(&self.notify_webhook_url)),
            (
                "notify.webhook.secret_file",
                path(&self.notify_webhook_secret_file),
            ),
            (
                "notify.webhook.send_pins",
                self.notify_webhook_send_pins.map(toml::Value::Boolean),
            ),
            ("notify.webhook.ca_file", path(&self.notify_webhook_ca_file)),
            ("notify.slack.api_base", text(&self.notify_slack_api_base)),
            (
                "notify.slack.token_file",
                path(&self.notify_slack_token_file),
            ),
            ("notify.slack.channel", text(&self.notify_slack_channel)),
            ("notify.slack.ca_file", path(&self.notify_slack_ca_file)),
            ("store.backend", text(&self.store_backend)),
            ("store.postgres.url", text(&self.store_postgres_url)),
            (
                "store.postgres.password_file",
                path(&self.store_postgres_password_file),
            ),
            ("store.postgres.ca_file", path(&self.store_postgres_ca_file)),
        ]);
        BrokerConfig::load(self.service.config.as_deref(), &overrides)
    }
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
            let config = a.load()?;
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
                let options = ServeOptions::default();
                crate::serve(config, options, listener, serve::shutdown_signal()).await
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
    use twokey_runtime::cli::with_env;

    use crate::config::ENV_PREFIX;

    #[test]
    fn the_command_line_is_well_formed() {
        with_env(super::Args::command(), ENV_PREFIX).debug_assert();
    }

    #[test]
    fn every_config_field_has_a_flag_and_an_env_variable() {
        let command = with_env(super::Args::command(), ENV_PREFIX);
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
