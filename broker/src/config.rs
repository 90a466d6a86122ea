//! The broker's configuration: a TOML file, every field overridable by a
//! flag and by `TWOKEY_BROKER_<FIELD>` in the environment, loaded by
//! `twokey_runtime::config::load`. Relative paths in the file are taken
//! relative to the file's directory.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use twokey_runtime::{
    config::{self, ConfigError},
    telemetry::LogFormat,
    time::parse_duration,
    tls::TlsFiles,
};

/// The prefix of every broker environment variable.
pub const ENV_PREFIX: &str = "TWOKEY_BROKER_";

/// The complete, checked configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the HTTP/JSON (Connect) listener; none to serve gRPC only.
    #[serde(default, deserialize_with = "non_empty")]
    pub http_listen: Option<String>,
    /// Trust domain of every identity.
    #[serde(default = "default_trust_domain")]
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
    #[serde(default = "default_vault_server_name")]
    pub vault_server_name: String,
    /// Milliseconds a release's code call to the vault may take (sent as
    /// its `grpc-timeout`): the vault's wait for audit's acknowledgement
    /// ends half a second before it, so this caps the vault's
    /// `audit_ack_timeout_ms`. Raise both together.
    #[serde(default = "default_release_deadline_ms")]
    pub release_deadline_ms: u64,
    /// The audit service, `https://HOST:PORT`; none to keep events in the outbox.
    #[serde(default, deserialize_with = "non_empty")]
    pub audit_address: Option<String>,
    /// Name in the audit service's certificate.
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
    /// Log line format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// This broker's certificate, key and CA.
    pub tls: TlsFiles,
    /// Notifiers.
    #[serde(default)]
    pub notify: NotifyConfig,
    /// How often the sweeper expires requests.
    #[serde(default = "default_sweep_interval", deserialize_with = "interval")]
    pub sweep_interval: Duration,
    /// How often reconciliation findings are read from audit to alert the
    /// accounts' admins (issue 20, docs/RECONCILE.md; needs audit to list the
    /// broker in `[reconcile] readers`).
    #[serde(
        default = "default_findings_interval",
        deserialize_with = "findings_interval"
    )]
    pub findings_interval: Duration,
    /// The pinned admins the signed policy is verified from; none to check
    /// no statement (the vault still checks every release).
    #[serde(default)]
    pub consent: Option<ConsentConfig>,
    /// Where requests are kept: `[store]`.
    #[serde(default)]
    pub store: StoreConfig,
}

pub use twokey_pgstore::config::{StoreBackend, StoreConfig};

/// `[consent]`: the root of trust of the signed policy, the same as the
/// vault's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentConfig {
    /// OpenSSH `allowed_signers` file of the pinned admins (principals:
    /// their SPIFFE IDs).
    pub admins_file: PathBuf,
    /// M: distinct pinned admins that sign the first policy version.
    pub threshold: u32,
}

/// The mailbox notifier's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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

/// Which notifiers run. A webhook runs once its url or secret file is set,
/// Slack once its token file or channel is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NotifyFile")]
pub struct NotifyConfig {
    /// File mailbox.
    pub mailbox: Option<MailboxConfig>,
    /// Signed webhook.
    pub webhook: Option<WebhookConfig>,
    /// Slack.
    pub slack: Option<SlackConfig>,
}

/// `[notify]` as written: every notifier field optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyFile {
    #[serde(default)]
    mailbox: Option<MailboxConfig>,
    #[serde(default)]
    webhook: WebhookFile,
    #[serde(default)]
    slack: SlackFile,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    url: Option<String>,
    secret_file: Option<PathBuf>,
    send_pins: Option<bool>,
    ca_file: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackFile {
    api_base: Option<String>,
    token_file: Option<PathBuf>,
    channel: Option<String>,
    ca_file: Option<PathBuf>,
}

impl TryFrom<NotifyFile> for NotifyConfig {
    type Error = String;

    fn try_from(file: NotifyFile) -> Result<Self, String> {
        let (w, s) = (file.webhook, file.slack);
        let webhook = match (w.url, w.secret_file) {
            (None, None) => None,
            (url, secret_file) => Some(WebhookConfig {
                url: need(url, "notify.webhook.url")?,
                secret_file: need(secret_file, "notify.webhook.secret_file")?,
                send_pins: w.send_pins.unwrap_or(false),
                ca_file: w.ca_file,
            }),
        };
        if let Some(w) = webhook.as_ref().filter(|w| w.send_pins) {
            refuse_plain_http(
                &w.url,
                "notify.webhook.url",
                "notify.webhook.send_pins is set",
            )?;
        }
        let slack = match (s.token_file, s.channel) {
            (None, None) => None,
            (token_file, channel) => Some(SlackConfig {
                api_base: s.api_base.unwrap_or_else(|| "https://slack.com/api".into()),
                token_file: need(token_file, "notify.slack.token_file")?,
                channel,
                ca_file: s.ca_file,
            }),
        };
        if let Some(s) = &slack {
            refuse_plain_http(&s.api_base, "notify.slack.api_base", "Slack DMs carry PINs")?;
        }
        Ok(Self {
            mailbox: file.mailbox,
            webhook,
            slack,
        })
    }
}

/// Refuses a plain `http://` URL for a notifier that carries PINs: they
/// would cross the network in the clear.
fn refuse_plain_http(url: &str, field: &str, why: &str) -> Result<(), String> {
    if url
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
    {
        return Err(format!(
            "{field} {url:?} is plain http:// and {why}: PINs would cross the network in the \
             clear; use https:// (with a ca_file for an internal CA)"
        ));
    }
    Ok(())
}

/// The message for a required field that is not set: where to set it.
fn required(field: &str) -> String {
    format!(
        "{field} is required; set it in the config file, with --{} or with {ENV_PREFIX}{}",
        field.replace(['_', '.'], "-"),
        field.replace('.', "_").to_uppercase()
    )
}

fn need<T>(value: Option<T>, field: &str) -> Result<T, String> {
    value.ok_or_else(|| required(field))
}

fn default_listen() -> String {
    "127.0.0.1:7400".into()
}

fn default_trust_domain() -> String {
    "twokey.local".into()
}

fn default_release_deadline_ms() -> u64 {
    crate::grpc::RELEASE_DEADLINE.as_millis() as u64
}

fn default_vault_server_name() -> String {
    "vault".into()
}

fn default_audit_server_name() -> String {
    "audit".into()
}

fn default_findings_interval() -> Duration {
    Duration::from_secs(30)
}

fn findings_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let every = parse_duration(&text)
        .map_err(|p| serde::de::Error::custom(format!("findings_interval: {p}")))?;
    if every.is_zero() {
        return Err(serde::de::Error::custom(
            "findings_interval: must be more than 0s",
        ));
    }
    Ok(every)
}

fn default_sweep_interval() -> Duration {
    Duration::from_secs(5)
}

/// An optional address; empty means unset.
fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|a| !a.is_empty()))
}

/// A sweep interval such as "5s"; never zero.
fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let every = parse_duration(&text)
        .map_err(|p| serde::de::Error::custom(format!("sweep_interval: {p}")))?;
    if every.is_zero() {
        return Err(serde::de::Error::custom(
            "sweep_interval: must be more than 0s",
        ));
    }
    Ok(every)
}

/// Fields of nested tables, by the name serde reports them missing under.
const NESTED: [(&str, &str); 4] = [
    ("tls", "tls.cert"),
    ("cert", "tls.cert"),
    ("key", "tls.key"),
    ("ca", "tls.ca"),
];

/// Names a missing field with its flag and variable.
fn name_missing(error: ConfigError) -> ConfigError {
    let ConfigError::Invalid { origin, message } = error else {
        return error;
    };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field);
    let message = match missing {
        Some(field) => required(
            NESTED
                .iter()
                .find(|(short, _)| *short == field)
                .map_or(field, |(_, full)| full),
        ),
        None => message,
    };
    ConfigError::Invalid { origin, message }
}

impl BrokerConfig {
    /// Reads `file` (if any), lays `overrides` (flags and environment, as
    /// `(field, value)`) over it and checks the result. Relative paths from
    /// the file are taken relative to its directory.
    pub fn load(
        file: Option<&Path>,
        overrides: &[(&str, Option<toml::Value>)],
    ) -> Result<Self, ConfigError> {
        let mut config: Self = config::load(file, overrides, ENV_PREFIX).map_err(name_missing)?;
        config::paths_relative_to_file(
            file,
            |field| config::overridden(overrides, field),
            config.paths_mut(),
        );
        config
            .store
            .postgres()
            .map_err(|message| ConfigError::Invalid {
                origin: file.map_or_else(
                    || "from flags and environment".to_owned(),
                    |p| p.display().to_string(),
                ),
                message,
            })?;
        Ok(config)
    }

    /// Every path field, by its dotted name.
    fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let mut paths = vec![
            ("data_dir", &mut self.data_dir),
            ("policy_file", &mut self.policy_file),
            ("grant_key_file", &mut self.grant_key_file),
            ("event_key_file", &mut self.event_key_file),
            ("pin_key_file", &mut self.pin_key_file),
            ("tls.cert", &mut self.tls.cert),
            ("tls.key", &mut self.tls.key),
            ("tls.ca", &mut self.tls.ca),
        ];
        paths.extend(self.tls.crl.as_mut().map(|p| ("tls.crl", p)));
        if let Some(c) = self.consent.as_mut() {
            paths.push(("consent.admins_file", &mut c.admins_file));
        }
        let n = &mut self.notify;
        if let Some(m) = n.mailbox.as_mut() {
            paths.push(("notify.mailbox.dir", &mut m.dir));
        }
        if let Some(w) = n.webhook.as_mut() {
            paths.push(("notify.webhook.secret_file", &mut w.secret_file));
            paths.extend(w.ca_file.as_mut().map(|p| ("notify.webhook.ca_file", p)));
        }
        if let Some(s) = n.slack.as_mut() {
            paths.push(("notify.slack.token_file", &mut s.token_file));
            paths.extend(s.ca_file.as_mut().map(|p| ("notify.slack.ca_file", p)));
        }
        paths.extend(self.store.paths_mut());
        paths
    }
}

fn default_audit_keep_days() -> u64 {
    twokey_runtime::shipper::DEFAULT_KEEP_DAYS
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
[consent]
admins_file = "admins.allowed_signers"
threshold = 2
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

    fn text(value: &str) -> Option<toml::Value> {
        Some(toml::Value::String(value.into()))
    }

    #[test]
    fn the_store_is_sled_by_default_and_postgres_needs_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let c = BrokerConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Sled);
        assert!(c.store.postgres().unwrap().is_none());

        let error = |extra: &str| {
            std::fs::write(&path, format!("{EXAMPLE}{extra}")).unwrap();
            BrokerConfig::load(Some(&path), &[])
                .unwrap_err()
                .to_string()
        };
        let e = error("[store]\nbackend = \"postgres\"\n");
        assert!(
            e.contains("store.backend = \"postgres\" needs [store.postgres] with url"),
            "{e}"
        );
        let e = error(
            "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgresql://broker@db.example/broker\"\n",
        );
        assert!(e.contains("needs ca_file"), "{e}");
        let e = error(
            "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgresql://broker:pw@db.example/broker\"\n",
        );
        assert!(e.contains("password_file"), "{e}");
        assert!(!e.contains(":pw@"), "{e}");
        let e = error("[store]\nbackend = \"mysql\"\n");
        assert!(e.contains("mysql"), "{e}");

        std::fs::write(dir.path().join("pg.pw"), "pg-hunter2\n").unwrap();
        std::fs::write(
            &path,
            format!(
                "{EXAMPLE}[store]\nbackend = \"postgres\"\n[store.postgres]\n\
                 url = \"postgresql://broker@127.0.0.1/broker?sslmode=disable\"\n\
                 password_file = \"pg.pw\"\n"
            ),
        )
        .unwrap();
        let c = BrokerConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Postgres);
        let p = c.store.postgres().unwrap().unwrap();
        assert_eq!(
            p.url,
            "postgresql://broker@127.0.0.1/broker?sslmode=disable"
        );
        assert_eq!(p.password_file.as_deref(), Some(&*dir.path().join("pg.pw")));
        assert!(!format!("{c:?}").contains("pg-hunter2"));
    }

    #[test]
    fn the_example_config_loads_with_paths_relative_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let c = BrokerConfig::load(Some(&path), &[]).unwrap();
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
        assert_eq!(c.release_deadline_ms, 3500, "the documented default");
        let consent = c.consent.unwrap();
        assert_eq!(
            consent.admins_file,
            dir.path().join("admins.allowed_signers")
        );
        assert_eq!(consent.threshold, 2);
    }

    #[test]
    fn plain_http_notifiers_that_would_carry_pins_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        let load = |text: String| {
            std::fs::write(&path, text).unwrap();
            BrokerConfig::load(Some(&path), &[]).map_err(|e| e.to_string())
        };
        let webhook = EXAMPLE.replace(
            "url = \"https://tickets.example/hooks/twokey\"",
            "url = \"HTTP://tickets.example/hooks/twokey\"\nsend_pins = true",
        );
        let err = load(webhook.clone()).unwrap_err();
        assert!(
            err.contains(
                "notify.webhook.url \"HTTP://tickets.example/hooks/twokey\" is plain http://"
            ) && err.contains("send_pins is set")
                && err.contains("use https://"),
            "{err}"
        );
        // Without PINs a plain http webhook is the operator's choice.
        load(webhook.replace("send_pins = true", "send_pins = false")).unwrap();
        let slack = EXAMPLE.replace("https://slack.com/api", "http://slack.internal/api");
        let err = load(slack).unwrap_err();
        assert!(
            err.contains("notify.slack.api_base \"http://slack.internal/api\" is plain http://")
                && err.contains("Slack DMs carry PINs"),
            "{err}"
        );
    }

    #[test]
    fn the_deployed_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/broker.toml");
        if path.exists() {
            let c = BrokerConfig::load(Some(&path), &[]).unwrap();
            assert_eq!(c.vault_server_name, "vault");
            assert!(c.notify.mailbox.is_some());
        }
    }

    #[test]
    fn flags_override_the_file_and_missing_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let flags = [
            ("listen", text("127.0.0.1:0")),
            ("tls.cert", text("/x/b.crt")),
        ];
        let c = BrokerConfig::load(Some(&path), &flags).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.tls.cert, PathBuf::from("/x/b.crt"));
        let e = BrokerConfig::load(None, &[]).unwrap_err().to_string();
        assert!(
            e.contains("data_dir is required") && e.contains("TWOKEY_BROKER_DATA_DIR"),
            "{e}"
        );
        std::fs::write(&path, "listen = 1\nbogus = 2\n").unwrap();
        let e = BrokerConfig::load(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.toml"), "{e}");
    }

    #[test]
    fn relative_flags_stay_relative_and_nested_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let c = BrokerConfig::load(Some(&path), &[("policy_file", text("p.toml"))]).unwrap();
        assert_eq!(c.policy_file, PathBuf::from("p.toml"));
        assert_eq!(c.grant_key_file, dir.path().join("grant.key"));
        let zero = [("sweep_interval", text("0s"))];
        let e = BrokerConfig::load(Some(&path), &zero)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sweep_interval: must be more than 0s"), "{e}");
        std::fs::write(&path, EXAMPLE.replace("key = \"broker.key\"\n", "")).unwrap();
        let e = BrokerConfig::load(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.key is required") && e.contains("TWOKEY_BROKER_TLS_KEY"),
            "{e}"
        );
        std::fs::write(
            &path,
            EXAMPLE.replace("secret_file = \"webhook.secret\"\n", ""),
        )
        .unwrap();
        let e = BrokerConfig::load(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("notify.webhook.secret_file is required"), "{e}");
    }
}
