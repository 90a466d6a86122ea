//! Connection settings: flags, or a named profile from a TOML config file
//! (`$TWOKEY_CONFIG`, else `~/.config/twokey/config.toml`), flags winning.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::{service::interceptor::InterceptedService, transport::Channel};
use twokey_proto::{
    audit::v1::audit_service_client::AuditServiceClient,
    broker::v1::broker_service_client::BrokerServiceClient,
};
use twokey_runtime::trace::SendTraceparent;
use twokey_runtime::{serve::MAX_MESSAGE_BYTES, tls::TlsFiles};

use crate::error::{CliError, Target};

/// The TLS server name the dev PKI gives the broker's certificate.
pub const BROKER_SERVER_NAME: &str = "broker";
/// The TLS server name the dev PKI gives the audit service's certificate.
pub const AUDIT_SERVER_NAME: &str = "audit";

/// Where to connect and as whom. Every flag overrides the profile's value.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectionArgs {
    /// Profile to use from the config file.
    #[arg(long, global = true, env = "TWOKEY_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,
    /// Config file holding profiles [default: ~/.config/twokey/config.toml].
    #[arg(long, global = true, env = "TWOKEY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Broker address, e.g. https://127.0.0.1:7400; replicas
    /// comma-separated (a dead one is passed over).
    #[arg(long, global = true, value_name = "URL[,URL…]")]
    pub broker: Option<String>,
    /// Audit service address, e.g. https://127.0.0.1:7403 (auditors
    /// only); replicas comma-separated.
    #[arg(long, global = true, value_name = "URL[,URL…]")]
    pub audit: Option<String>,
    /// Your certificate (PEM), carrying your SPIFFE ID.
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Your private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The CA the services' certificates chain to (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Your OpenSSH signing key (ssh-ed25519): the private key file, or
    /// with $SSH_AUTH_SOCK set, the key the agent signs with (its public
    /// half is read from FILE.pub, else from FILE).
    #[arg(long, global = true, value_name = "FILE")]
    pub ssh_key: Option<PathBuf>,
    /// Name the broker's certificate must carry [default: broker].
    #[arg(long, global = true, value_name = "NAME")]
    pub broker_server_name: Option<String>,
    /// Name the audit service's certificate must carry [default: audit].
    #[arg(long, global = true, value_name = "NAME")]
    pub audit_server_name: Option<String>,
    /// Longest wait for a service's TCP connection, and again for its TLS
    /// handshake, e.g. 5s, 500ms, 1m [default: 5s; profile: connect_timeout].
    #[arg(long, global = true, env = "TWOKEY_CONNECT_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Deadline of each call, from sending it to its answer; for streams
    /// (request watch, audit query and export) until the stream starts,
    /// after which `request watch` waits for events without one
    /// [default: 30s; profile: timeout].
    #[arg(long, global = true, env = "TWOKEY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

/// The default of --connect-timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default of --timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the CLI waits for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For the TCP connection, and again for the TLS handshake.
    pub connect: Duration,
    /// For each call's answer (a stream's start).
    pub call: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT_TIMEOUT,
            call: DEFAULT_TIMEOUT,
        }
    }
}

/// Parses a duration: a positive whole number with a unit, `ms`, `s`, `m`
/// or `h` (`5s`, `500ms`, `2m`); a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration: give e.g. 5s, 500ms or 2m");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if duration.is_zero() {
        return Err(format!(
            "{text:?} is no time at all: give more than 0, e.g. 5s"
        ));
    }
    Ok(duration)
}

/// A duration as people write it: `5s`, `1500ms`.
pub fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One profile: the connection settings of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Broker address; replicas comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// Audit service address (auditors only); replicas comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
    /// Certificate, PEM. Relative paths are relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Private key, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA certificate, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The person's OpenSSH signing key: the private key file (its public
    /// half beside it as `FILE.pub`), used through `$SSH_AUTH_SOCK` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<PathBuf>,
    /// Name the broker's certificate must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_server_name: Option<String>,
    /// Name the audit service's certificate must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_server_name: Option<String>,
    /// Longest wait for a connection and its TLS handshake (`5s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Deadline of each call (`30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// The config file: `[profiles.NAME]` tables and an optional `default_profile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Profile used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_profile: Option<String>,
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

impl Config {
    /// Reads a config file; relative paths in profiles become relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(CliError::io("read config", path))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            CliError::Config(format!(
                "config file {} is not valid: {} — see `twokey --help` for the profile format",
                path.display(),
                crate::error::one_line(e.message())
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for profile in config.profiles.values_mut() {
            for file in [
                &mut profile.cert,
                &mut profile.key,
                &mut profile.ca,
                &mut profile.ssh_key,
            ]
            .into_iter()
            .flatten()
            {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        Ok(config)
    }

    /// Writes the config as TOML (for `pki init`, the demo and tests).
    pub fn write(&self, path: &Path) -> Result<(), CliError> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| CliError::Config(format!("cannot encode config: {e}")))?;
        std::fs::write(path, text).map_err(CliError::io("write", path))
    }
}

/// The default config path: `$XDG_CONFIG_HOME/twokey/config.toml`, else
/// `~/.config/twokey/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("twokey/config.toml"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".config/twokey/config.toml"))
}

/// A broker client: every call carries this command's `traceparent`.
pub type BrokerClient = BrokerServiceClient<InterceptedService<Channel, SendTraceparent>>;
/// An audit client: every call carries this command's `traceparent`.
pub type AuditClient = AuditServiceClient<InterceptedService<Channel, SendTraceparent>>;

/// Resolved connection settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// The profile they came from, if any.
    pub profile: Option<String>,
    /// Merged values.
    pub values: Profile,
    /// The timeouts, flag over `$TWOKEY_*` over profile over default.
    pub timeouts: Timeouts,
}

impl Settings {
    /// Merges the flags over the chosen profile, if any.
    pub fn resolve(args: &ConnectionArgs) -> Result<Self, CliError> {
        let config_path = args.config.clone().or_else(default_config_path);
        let (profile_name, base) = match (&args.profile, &config_path) {
            (Some(name), Some(path)) => {
                if !path.exists() {
                    return Err(CliError::Config(format!(
                        "profile {name:?} asked for, but config file {} does not exist — create it or give --config FILE",
                        path.display()
                    )));
                }
                let config = Config::load(path)?;
                let profile = pick(&config, name, path)?;
                (Some(name.clone()), profile)
            }
            (Some(name), None) => {
                return Err(CliError::Config(format!(
                    "profile {name:?} asked for, but there is no config file: set TWOKEY_CONFIG or give --config FILE"
                )));
            }
            (None, Some(path)) if path.exists() => {
                let config = Config::load(path)?;
                match &config.default_profile {
                    Some(name) => (Some(name.clone()), pick(&config, name, path)?),
                    None => (None, Profile::default()),
                }
            }
            (None, _) => (None, Profile::default()),
        };
        let over = |flag: &Option<String>, base: Option<String>| flag.clone().or(base);
        let over_path = |flag: &Option<PathBuf>, base: Option<PathBuf>| flag.clone().or(base);
        let timeout = |flag: Option<Duration>,
                       base: &Option<String>,
                       key: &str,
                       default: Duration|
         -> Result<Duration, CliError> {
            if let Some(d) = flag {
                return Ok(d);
            }
            match base {
                Some(text) => parse_duration(text).map_err(|e| {
                    CliError::Config(format!(
                        "{key} in profile {:?}: {e}",
                        profile_name.as_deref().unwrap_or_default()
                    ))
                }),
                None => Ok(default),
            }
        };
        let timeouts = Timeouts {
            connect: timeout(
                args.connect_timeout,
                &base.connect_timeout,
                "connect_timeout",
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            call: timeout(args.timeout, &base.timeout, "timeout", DEFAULT_TIMEOUT)?,
        };
        Ok(Self {
            profile: profile_name,
            timeouts,
            values: Profile {
                broker: over(&args.broker, base.broker),
                audit: over(&args.audit, base.audit),
                cert: over_path(&args.cert, base.cert),
                key: over_path(&args.key, base.key),
                ca: over_path(&args.ca, base.ca),
                ssh_key: over_path(&args.ssh_key, base.ssh_key),
                broker_server_name: over(&args.broker_server_name, base.broker_server_name),
                audit_server_name: over(&args.audit_server_name, base.audit_server_name),
                connect_timeout: base.connect_timeout.clone(),
                timeout: base.timeout.clone(),
            },
        })
    }

    /// The profile's name for messages: `profile "alice"`, or `the flags`.
    pub fn source(&self) -> String {
        match &self.profile {
            Some(p) => format!("profile {p:?}"),
            None => "the flags".to_owned(),
        }
    }

    fn where_from(&self) -> String {
        match &self.profile {
            Some(p) => format!(" (profile {p:?} has none)"),
            None => String::new(),
        }
    }

    /// The TLS files, all three required.
    pub fn tls(&self) -> Result<TlsFiles, CliError> {
        let v = &self.values;
        let missing: Vec<&str> = [
            ("--cert", v.cert.is_none()),
            ("--key", v.key.is_none()),
            ("--ca", v.ca.is_none()),
        ]
        .into_iter()
        .filter_map(|(flag, missing)| missing.then_some(flag))
        .collect();
        match (&v.cert, &v.key, &v.ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                crl: None,
            }),
            _ => Err(CliError::Usage(format!(
                "no {} given{}: pass them or choose a profile with --profile NAME (twokey pki init writes one)",
                missing.join(", "),
                self.where_from()
            ))),
        }
    }

    fn target(&self, service: &'static str) -> Result<Target, CliError> {
        let address = match service {
            "audit" => &self.values.audit,
            _ => &self.values.broker,
        };
        let Some(address) = address else {
            return Err(CliError::Usage(format!(
                "no {service} address given{}: pass --{service} https://HOST:PORT or choose a profile with --profile NAME",
                self.where_from()
            )));
        };
        Ok(Target {
            service,
            address: normalize_address(address),
            timeouts: self.timeouts,
        })
    }

    fn channel(
        &self,
        service: &'static str,
        server_name: &str,
    ) -> Result<(Channel, Target), CliError> {
        let target = self.target(service)?;
        let tls = self.tls()?;
        let Timeouts { connect, call } = self.timeouts;
        // The connect timeout bounds the TCP connection and, separately,
        // the TLS handshake; the call timeout bounds each call's answer (a
        // stream's start), so no command waits for ever on a silent peer.
        // Several comma-separated addresses are replicas of one service:
        // each gets the connect timeout, and a dead one is passed over.
        let list = twokey_runtime::failover::split_addresses(&target.address);
        let endpoint = twokey_runtime::tls::endpoint_list(&list, &target.address)
            .map_err(|e| match e {
                // A bad address is a bad setting (exit 2), not a failure.
                twokey_runtime::tls::TlsError::NotHttps(_)
                | twokey_runtime::tls::TlsError::BadAddress(_) => CliError::Usage(e.to_string()),
                e => e.into(),
            })?
            .connect_timeout(connect)
            .timeout(call)
            .tls_config(tls.client_config(server_name)?.timeout(connect))
            .map_err(twokey_runtime::tls::TlsError::from)?;
        let channel = twokey_runtime::tls::connect_lazy(endpoint, &list, connect)?;
        Ok((channel, target))
    }

    /// A broker client and its target (for error messages).
    pub fn broker(&self) -> Result<(BrokerClient, Target), CliError> {
        let name = self
            .values
            .broker_server_name
            .as_deref()
            .unwrap_or(BROKER_SERVER_NAME);
        let (channel, target) = self.channel("broker", name)?;
        Ok((
            BrokerServiceClient::with_interceptor(channel, SendTraceparent::process_root())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            target,
        ))
    }

    /// An audit client and its target (for error messages).
    pub fn audit(&self) -> Result<(AuditClient, Target), CliError> {
        let name = self
            .values
            .audit_server_name
            .as_deref()
            .unwrap_or(AUDIT_SERVER_NAME);
        let (channel, target) = self.channel("audit", name)?;
        Ok((
            AuditServiceClient::with_interceptor(channel, SendTraceparent::process_root())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            target,
        ))
    }
}

fn pick(config: &Config, name: &str, path: &Path) -> Result<Profile, CliError> {
    config.profiles.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
        CliError::Config(format!(
            "no profile {name:?} in {}; it has: {}",
            path.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// `HOST:PORT` becomes `https://HOST:PORT`; URLs stay as they are; in a
/// comma-separated list of replicas, each.
pub fn normalize_address(address: &str) -> String {
    twokey_runtime::failover::split_addresses(address)
        .into_iter()
        .map(|a| {
            if a.contains("://") {
                a.to_owned()
            } else {
                format!("https://{a}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_replica_in_a_list_gets_https() {
        assert_eq!(normalize_address("b1:7443"), "https://b1:7443");
        assert_eq!(
            normalize_address("b1:7443, https://b2:7443"),
            "https://b1:7443,https://b2:7443"
        );
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const ALICE: &str = r#"
[profiles.alice]
broker = "https://127.0.0.1:7400"
audit = "https://127.0.0.1:7403"
cert = "alice.crt"
key = "/abs/alice.key"
ca = "ca.crt"
ssh_key = "alice.ssh"
"#;

    #[test]
    fn a_named_profile_loads_with_paths_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let args = ConnectionArgs {
            profile: Some("alice".into()),
            config: Some(write(dir.path(), ALICE)),
            ..Default::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.values.broker.as_deref(), Some("https://127.0.0.1:7400"));
        assert_eq!(s.values.cert, Some(dir.path().join("alice.crt")));
        assert_eq!(s.values.key, Some(PathBuf::from("/abs/alice.key")));
        assert_eq!(s.values.ssh_key, Some(dir.path().join("alice.ssh")));
        let tls = s.tls().unwrap();
        assert_eq!(tls.ca, dir.path().join("ca.crt"));
    }

    #[test]
    fn flags_override_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let args = ConnectionArgs {
            profile: Some("alice".into()),
            config: Some(write(dir.path(), ALICE)),
            broker: Some("https://10.0.0.1:9000".into()),
            cert: Some("/other.crt".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.values.broker.as_deref(), Some("https://10.0.0.1:9000"));
        assert_eq!(s.values.cert, Some(PathBuf::from("/other.crt")));
        assert_eq!(s.values.audit.as_deref(), Some("https://127.0.0.1:7403"));
    }

    #[test]
    fn an_unknown_profile_names_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let args = ConnectionArgs {
            profile: Some("bob".into()),
            config: Some(write(dir.path(), ALICE)),
            ..Default::default()
        };
        let err = Settings::resolve(&args).unwrap_err().one_line();
        assert!(err.contains("no profile \"bob\""), "{err}");
        assert!(err.contains("alice"), "{err}");
    }

    #[test]
    fn unknown_keys_in_a_profile_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let args = ConnectionArgs {
            profile: Some("a".into()),
            config: Some(write(dir.path(), "[profiles.a]\nbrokr = \"x\"\n")),
            ..Default::default()
        };
        let err = Settings::resolve(&args).unwrap_err().one_line();
        assert!(err.contains("brokr"), "{err}");
    }

    #[test]
    fn default_profile_is_used_when_none_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("default_profile = \"alice\"\n{ALICE}");
        let args = ConnectionArgs {
            config: Some(write(dir.path(), &text)),
            ..Default::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.profile.as_deref(), Some("alice"));
    }

    #[test]
    fn missing_tls_files_is_a_usage_error_naming_the_flags() {
        let s = Settings {
            profile: None,
            values: Profile {
                cert: Some("/c".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = s.tls().unwrap_err();
        assert_eq!(err.exit_code(), crate::error::EXIT_USAGE);
        assert!(err.one_line().contains("--key, --ca"));
    }

    #[test]
    fn a_config_round_trips_through_write_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.profiles.insert(
            "op".into(),
            Profile {
                broker: Some("https://127.0.0.1:1".into()),
                cert: Some(dir.path().join("op.crt")),
                ..Default::default()
            },
        );
        let path = dir.path().join("c.toml");
        config.write(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), config);
    }

    #[test]
    fn durations_take_a_unit_and_must_be_more_than_zero() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show_duration(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn timeouts_default_to_5s_and_30s_and_come_from_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{ALICE}connect_timeout = \"2s\"\ntimeout = \"1m\"\n");
        let args = ConnectionArgs {
            config: Some(write(dir.path(), &text)),
            ..Default::default()
        };
        assert_eq!(
            Settings::resolve(&args).unwrap().timeouts,
            Timeouts::default()
        );
        let args = ConnectionArgs {
            profile: Some("alice".into()),
            ..args
        };
        let t = Settings::resolve(&args).unwrap().timeouts;
        assert_eq!(
            (t.connect, t.call),
            (Duration::from_secs(2), Duration::from_secs(60))
        );
        let args = ConnectionArgs {
            timeout: Some(Duration::from_secs(9)),
            ..args
        };
        assert_eq!(
            Settings::resolve(&args).unwrap().timeouts.call,
            Duration::from_secs(9)
        );
    }

    #[test]
    fn bare_host_port_gets_https() {
        assert_eq!(
            normalize_address("127.0.0.1:7400"),
            "https://127.0.0.1:7400"
        );
        assert_eq!(normalize_address("http://x:1"), "http://x:1");
    }
}
