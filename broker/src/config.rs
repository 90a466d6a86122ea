//! The broker's configuration: a TOML file, every field overridable by a
//! flag and by `TWOKEY_BROKER_<FIELD>` in the environment. Relative paths in
//! the file are taken relative to the file's directory.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use twokey_runtime::{telemetry::LogFormat, tls::TlsFiles};

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A required field is missing.
    #[error(
        "config: {field} is required; set it in the config file, with --{flag} or with TWOKEY_BROKER_{env}"
    )]
    Missing {
        /// The field.
        field: &'static str,
        /// The flag.
        flag: String,
        /// The variable suffix.
        env: String,
    },
    /// A field's value is wrong.
    #[error("config: {field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The mailbox notifier's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxConfig {
    /// Directory of `<name>.jsonl` files.
    pub dir: PathBuf,
}

/// The webhook notifier's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Where to POST.
    pub url: String,
    /// File holding the HMAC secret (mode 0600).
    pub secret_file: PathBuf,
    /// Whether PIN messages go to the webhook too (only when the webhook is
    /// how requesters are reached).
    pub send_pins: bool,
    /// Extra CA certificates (PEM) for an internal https endpoint.
    pub ca_file: Option<PathBuf>,
}

/// The Slack notifier's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackConfig {
    /// Web API base, e.g. `https://slack.com/api`.
    pub api_base: String,
    /// File holding the bot token (mode 0600).
    pub token_file: PathBuf,
    /// Channel for request news; none to send only PIN DMs.
    pub channel: Option<String>,
    /// Extra CA certificates (PEM), e.g. for a proxy or a test server.
    pub ca_file: Option<PathBuf>,
}

/// Which notifiers run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyConfig {
    /// File mailbox.
    pub mailbox: Option<MailboxConfig>,
    /// Signed webhook.
    pub webhook: Option<WebhookConfig>,
    /// Slack.
    pub slack: Option<SlackConfig>,
}

/// The complete, checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Address to listen on.
    pub listen: String,
    /// Address of the HTTP/JSON (Connect) listener; none to serve gRPC only.
    pub http_listen: Option<String>,
    /// Trust domain of every identity.
    pub trust_domain: String,
    /// sled data directory.
    pub data_dir: PathBuf,
    /// The policy file.
    pub policy_file: PathBuf,
    /// ed25519 key that signs grants.
    pub grant_key_file: PathBuf,
    /// ed25519 key that signs audit events.
    pub event_key_file: PathBuf,
    /// 32-byte key for PIN hashes.
    pub pin_key_file: PathBuf,
    /// The vault, `https://HOST:PORT`.
    pub vault_address: String,
    /// Name in the vault's certificate.
    pub vault_server_name: String,
    /// The audit service, `https://HOST:PORT`; none to keep events in the outbox.
    pub audit_address: Option<String>,
    /// Name in the audit service's certificate.
    pub audit_server_name: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// This broker's certificate, key and CA.
    pub tls: TlsFiles,
    /// Notifiers.
    pub notify: NotifyConfig,
    /// How often the sweeper expires requests.
    pub sweep_interval: Duration,
}

/// Every field, optional: what the file says, or what the flags say.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    /// Address to listen on [default: 127.0.0.1:7400].
    #[arg(long, env = "TWOKEY_BROKER_LISTEN")]
    pub listen: Option<String>,
    /// Address for the HTTP/JSON (Connect protocol) API, same mTLS; unset: off.
    #[arg(long, env = "TWOKEY_BROKER_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Trust domain of every identity [default: twokey.local].
    #[arg(long, env = "TWOKEY_BROKER_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// sled data directory.
    #[arg(long, env = "TWOKEY_BROKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The policy file (TOML).
    #[arg(long, env = "TWOKEY_BROKER_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// ed25519 key file that signs grants (init-keys makes it).
    #[arg(long, env = "TWOKEY_BROKER_GRANT_KEY_FILE")]
    pub grant_key_file: Option<PathBuf>,
    /// ed25519 key file that signs audit events.
    #[arg(long, env = "TWOKEY_BROKER_EVENT_KEY_FILE")]
    pub event_key_file: Option<PathBuf>,
    /// Key file for PIN hashes.
    #[arg(long, env = "TWOKEY_BROKER_PIN_KEY_FILE")]
    pub pin_key_file: Option<PathBuf>,
    /// The vault, https://HOST:PORT.
    #[arg(long, env = "TWOKEY_BROKER_VAULT_ADDRESS")]
    pub vault_address: Option<String>,
    /// Name in the vault's certificate [default: vault].
    #[arg(long, env = "TWOKEY_BROKER_VAULT_SERVER_NAME")]
    pub vault_server_name: Option<String>,
    /// The audit service, https://HOST:PORT.
    #[arg(long, env = "TWOKEY_BROKER_AUDIT_ADDRESS")]
    pub audit_address: Option<String>,
    /// Name in the audit service's certificate [default: audit].
    #[arg(long, env = "TWOKEY_BROKER_AUDIT_SERVER_NAME")]
    pub audit_server_name: Option<String>,
    /// Log line format [default: human].
    #[arg(long, env = "TWOKEY_BROKER_LOG_FORMAT", value_enum)]
    #[serde(default)]
    pub log_format: Option<LogFormat>,
    /// How often expired requests are swept, e.g. "5s" [default: 5s].
    #[arg(long, env = "TWOKEY_BROKER_SWEEP_INTERVAL")]
    pub sweep_interval: Option<String>,
    #[command(flatten)]
    #[serde(default)]
    /// TLS files.
    pub tls: PartialTls,
    #[command(flatten)]
    #[serde(default)]
    /// Notifiers.
    pub notify: PartialNotify,
}

/// TLS files, optional.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PartialTls {
    /// This broker's certificate (PEM).
    #[arg(long = "tls-cert", env = "TWOKEY_BROKER_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// This broker's private key (PEM).
    #[arg(long = "tls-key", env = "TWOKEY_BROKER_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// The CA that clients, the vault and audit chain to (PEM).
    #[arg(long = "tls-ca", env = "TWOKEY_BROKER_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Certificate revocation list (PEM) from the CA; listed client
    /// certificates are refused in the handshake.
    #[arg(long = "tls-crl", env = "TWOKEY_BROKER_TLS_CRL")]
    pub crl: Option<PathBuf>,
}

/// Notifier settings, optional.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PartialNotify {
    #[command(flatten)]
    #[serde(default)]
    /// Mailbox.
    pub mailbox: PartialMailbox,
    #[command(flatten)]
    #[serde(default)]
    /// Webhook.
    pub webhook: PartialWebhook,
    #[command(flatten)]
    #[serde(default)]
    /// Slack.
    pub slack: PartialSlack,
}

/// Mailbox settings, optional.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PartialMailbox {
    /// Mailbox directory: one <name>.jsonl per recipient.
    #[arg(long = "notify-mailbox-dir", env = "TWOKEY_BROKER_NOTIFY_MAILBOX_DIR")]
    pub dir: Option<PathBuf>,
}

/// Webhook settings, optional.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PartialWebhook {
    /// Webhook URL (http:// or https://).
    #[arg(long = "notify-webhook-url", env = "TWOKEY_BROKER_NOTIFY_WEBHOOK_URL")]
    pub url: Option<String>,
    /// File holding the webhook's HMAC secret (mode 0600).
    #[arg(
        long = "notify-webhook-secret-file",
        env = "TWOKEY_BROKER_NOTIFY_WEBHOOK_SECRET_FILE"
    )]
    pub secret_file: Option<PathBuf>,
    /// Send PINs to the webhook too (only if it is how requesters are reached).
    #[arg(
        long = "notify-webhook-send-pins",
        env = "TWOKEY_BROKER_NOTIFY_WEBHOOK_SEND_PINS"
    )]
    pub send_pins: Option<bool>,
    /// Extra CA certificates (PEM) trusted for the webhook's https endpoint.
    #[arg(
        id = "notify_webhook_ca_file",
        value_name = "FILE",
        long = "notify-webhook-ca-file",
        env = "TWOKEY_BROKER_NOTIFY_WEBHOOK_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,
}

/// Slack settings, optional.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PartialSlack {
    /// Slack Web API base URL [default: https://slack.com/api].
    #[arg(
        long = "notify-slack-api-base",
        env = "TWOKEY_BROKER_NOTIFY_SLACK_API_BASE"
    )]
    pub api_base: Option<String>,
    /// File holding the Slack bot token (mode 0600).
    #[arg(
        long = "notify-slack-token-file",
        env = "TWOKEY_BROKER_NOTIFY_SLACK_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// Channel for request news, e.g. "#root-access".
    #[arg(
        long = "notify-slack-channel",
        env = "TWOKEY_BROKER_NOTIFY_SLACK_CHANNEL"
    )]
    pub channel: Option<String>,
    /// Extra CA certificates (PEM) trusted for the Slack API base.
    #[arg(
        id = "notify_slack_ca_file",
        value_name = "FILE",
        long = "notify-slack-ca-file",
        env = "TWOKEY_BROKER_NOTIFY_SLACK_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,
}

fn rel(base: &Path, p: &mut Option<PathBuf>) {
    if let Some(path) = p
        && path.is_relative()
    {
        *path = base.join(&*path);
    }
}

fn or<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

impl PartialConfig {
    /// Reads a config file; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.policy_file,
            &mut config.grant_key_file,
            &mut config.event_key_file,
            &mut config.pin_key_file,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.tls.ca,
            &mut config.tls.crl,
            &mut config.notify.mailbox.dir,
            &mut config.notify.webhook.secret_file,
            &mut config.notify.slack.token_file,
            &mut config.notify.webhook.ca_file,
            &mut config.notify.slack.ca_file,
        ] {
            rel(base, p);
        }
        Ok(config)
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: Self) -> Self {
        Self {
            listen: or(self.listen, file.listen),
            http_listen: or(self.http_listen, file.http_listen),
            trust_domain: or(self.trust_domain, file.trust_domain),
            data_dir: or(self.data_dir, file.data_dir),
            policy_file: or(self.policy_file, file.policy_file),
            grant_key_file: or(self.grant_key_file, file.grant_key_file),
            event_key_file: or(self.event_key_file, file.event_key_file),
            pin_key_file: or(self.pin_key_file, file.pin_key_file),
            vault_address: or(self.vault_address, file.vault_address),
            vault_server_name: or(self.vault_server_name, file.vault_server_name),
            audit_address: or(self.audit_address, file.audit_address),
            audit_server_name: or(self.audit_server_name, file.audit_server_name),
            log_format: or(self.log_format, file.log_format),
            sweep_interval: or(self.sweep_interval, file.sweep_interval),
            tls: PartialTls {
                cert: or(self.tls.cert, file.tls.cert),
                key: or(self.tls.key, file.tls.key),
                ca: or(self.tls.ca, file.tls.ca),
                crl: or(self.tls.crl, file.tls.crl),
            },
            notify: PartialNotify {
                mailbox: PartialMailbox {
                    dir: or(self.notify.mailbox.dir, file.notify.mailbox.dir),
                },
                webhook: PartialWebhook {
                    url: or(self.notify.webhook.url, file.notify.webhook.url),
                    secret_file: or(
                        self.notify.webhook.secret_file,
                        file.notify.webhook.secret_file,
                    ),
                    send_pins: or(self.notify.webhook.send_pins, file.notify.webhook.send_pins),
                    ca_file: or(self.notify.webhook.ca_file, file.notify.webhook.ca_file),
                },
                slack: PartialSlack {
                    api_base: or(self.notify.slack.api_base, file.notify.slack.api_base),
                    token_file: or(self.notify.slack.token_file, file.notify.slack.token_file),
                    channel: or(self.notify.slack.channel, file.notify.slack.channel),
                    ca_file: or(self.notify.slack.ca_file, file.notify.slack.ca_file),
                },
            },
        }
    }

    /// Checks that every required field is there.
    pub fn finish(self) -> Result<BrokerConfig, ConfigError> {
        fn need<T>(v: Option<T>, field: &'static str) -> Result<T, ConfigError> {
            v.ok_or_else(|| ConfigError::Missing {
                field,
                flag: field.replace(['_', '.'], "-"),
                env: field.replace('.', "_").to_uppercase(),
            })
        }
        let webhook = match (self.notify.webhook.url, self.notify.webhook.secret_file) {
            (None, None) => None,
            (url, secret_file) => Some(WebhookConfig {
                url: need(url, "notify.webhook.url")?,
                secret_file: need(secret_file, "notify.webhook.secret_file")?,
                send_pins: self.notify.webhook.send_pins.unwrap_or(false),
                ca_file: self.notify.webhook.ca_file,
            }),
        };
        let slack = match (self.notify.slack.token_file, self.notify.slack.channel) {
            (None, None) => None,
            (token_file, channel) => Some(SlackConfig {
                api_base: self
                    .notify
                    .slack
                    .api_base
                    .unwrap_or_else(|| "https://slack.com/api".into()),
                token_file: need(token_file, "notify.slack.token_file")?,
                channel,
                ca_file: self.notify.slack.ca_file,
            }),
        };
        let sweep_interval = match self.sweep_interval {
            None => Duration::from_secs(5),
            Some(text) => {
                crate::policy::parse_duration(&text).map_err(|problem| ConfigError::Invalid {
                    field: "sweep_interval",
                    problem,
                })?
            }
        };
        if sweep_interval.is_zero() {
            return Err(ConfigError::Invalid {
                field: "sweep_interval",
                problem: "must be more than 0s".into(),
            });
        }
        Ok(BrokerConfig {
            listen: self.listen.unwrap_or_else(|| "127.0.0.1:7400".into()),
            http_listen: self.http_listen.filter(|a| !a.is_empty()),
            trust_domain: self.trust_domain.unwrap_or_else(|| "twokey.local".into()),
            data_dir: need(self.data_dir, "data_dir")?,
            policy_file: need(self.policy_file, "policy_file")?,
            grant_key_file: need(self.grant_key_file, "grant_key_file")?,
            event_key_file: need(self.event_key_file, "event_key_file")?,
            pin_key_file: need(self.pin_key_file, "pin_key_file")?,
            vault_address: need(self.vault_address, "vault_address")?,
            vault_server_name: self.vault_server_name.unwrap_or_else(|| "vault".into()),
            audit_address: self.audit_address.filter(|a| !a.is_empty()),
            audit_server_name: self.audit_server_name.unwrap_or_else(|| "audit".into()),
            log_format: self.log_format.unwrap_or_default(),
            tls: TlsFiles {
                cert: need(self.tls.cert, "tls.cert")?,
                key: need(self.tls.key, "tls.key")?,
                ca: need(self.tls.ca, "tls.ca")?,
                crl: self.tls.crl,
            },
            notify: NotifyConfig {
                mailbox: self.notify.mailbox.dir.map(|dir| MailboxConfig { dir }),
                webhook,
                slack,
            },
            sweep_interval,
        })
    }
}

impl BrokerConfig {
    /// Reads `file` (if any), lays `flags` over it and checks the result.
    pub fn resolve(file: Option<&Path>, flags: PartialConfig) -> Result<Self, ConfigError> {
        let from_file = match file {
            Some(path) => PartialConfig::load(path)?,
            None => PartialConfig::default(),
        };
        flags.over(from_file).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r##"
listen = "127.0.0.1:7400"
http_listen = "127.0.0.1:7404"
trust_domain = "twokey.local"
data_dir = "/var/lib/twokey-broker"
policy_file = "policy.toml"
grant_key_file = "grant.key"
event_key_file = "event.key"
pin_key_file = "pin.key"
vault_address = "https://127.0.0.1:7401"
vault_server_name = "vault"
audit_address = "https://127.0.0.1:7403"
audit_server_name = "audit"
log_format = "human"
[tls]
cert = "broker.crt"
key = "broker.key"
ca = "ca.crt"
[notify.mailbox]
dir = "mailbox"
[notify.webhook]
url = "https://tickets.example/hooks/twokey"
secret_file = "webhook.secret"
[notify.slack]
api_base = "https://slack.com/api"
token_file = "slack.token"
channel = "#root-access"
"##;

    #[test]
    fn the_example_config_loads_with_paths_relative_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let c = BrokerConfig::resolve(Some(&path), PartialConfig::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/twokey-broker"));
        assert_eq!(c.policy_file, dir.path().join("policy.toml"));
        assert_eq!(c.tls.ca, dir.path().join("ca.crt"));
        assert_eq!(c.notify.mailbox.unwrap().dir, dir.path().join("mailbox"));
        assert_eq!(
            c.notify.slack.unwrap().channel.as_deref(),
            Some("#root-access")
        );
        assert!(!c.notify.webhook.unwrap().send_pins);
        assert_eq!(c.audit_address.as_deref(), Some("https://127.0.0.1:7403"));
        assert_eq!(c.http_listen.as_deref(), Some("127.0.0.1:7404"));
    }

    #[test]
    fn the_deployed_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/broker.toml");
        if path.exists() {
            let c = BrokerConfig::resolve(Some(&path), PartialConfig::default()).unwrap();
            assert_eq!(c.vault_server_name, "vault");
            assert!(c.notify.mailbox.is_some());
        }
    }

    #[test]
    fn flags_override_the_file_and_missing_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let flags = PartialConfig {
            listen: Some("127.0.0.1:0".into()),
            tls: PartialTls {
                cert: Some("/x/b.crt".into()),
                ..PartialTls::default()
            },
            ..PartialConfig::default()
        };
        let c = BrokerConfig::resolve(Some(&path), flags).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.tls.cert, PathBuf::from("/x/b.crt"));
        let e = BrokerConfig::resolve(None, PartialConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data_dir is required") && e.contains("TWOKEY_BROKER_DATA_DIR"),
            "{e}"
        );
        std::fs::write(&path, "listen = 1\nbogus = 2\n").unwrap();
        let e = BrokerConfig::resolve(Some(&path), PartialConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.toml"), "{e}");
    }
}
