//! The service skeleton's command line: the flags every service's `serve`
//! takes (config file, listen address, trust domain, data directory, log
//! format, TLS files), flattened into each service's own flags, and the
//! parser that gives every long flag its `TWOKEY_<SERVICE>_<FLAG>` variable,
//! so no service spells its environment variables out by hand.

use std::path::PathBuf;

use clap::{Command, Parser};

use crate::{
    config::{path, text},
    telemetry::LogFormat,
};

/// Flags of `serve` shared by every service; each overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceFlags {
    /// The TOML config file; flags and environment variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7401.
    #[arg(long)]
    pub listen: Option<String>,
    /// SPIFFE trust domain of every peer, e.g. twokey.local.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// This server's certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This server's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA certificate that peers' certificates chain to (PEM).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Certificate revocation list (PEM) from the CA; listed client
    /// certificates are refused in the handshake.
    #[arg(long)]
    pub tls_crl: Option<PathBuf>,
}

impl ServiceFlags {
    /// The overrides these flags make, as `config::load` takes them.
    pub fn overrides(&self) -> Vec<(&'static str, Option<toml::Value>)> {
        let log = self.log_format.map(|f| {
            toml::Value::String(match f {
                LogFormat::Json => "json".into(),
                LogFormat::Human => "human".into(),
            })
        });
        vec![
            ("listen", text(&self.listen)),
            ("trust_domain", text(&self.trust_domain)),
            ("data_dir", path(&self.data_dir)),
            ("log_format", log),
            ("tls.cert", path(&self.tls_cert)),
            ("tls.key", path(&self.tls_key)),
            ("tls.ca", path(&self.tls_ca)),
            ("tls.crl", path(&self.tls_crl)),
        ]
    }
}

/// Gives every long flag of `command` and its subcommands that has no
/// variable yet the variable `<env_prefix><FLAG>` (`--tls-cert` with
/// `TWOKEY_VAULT_` → `TWOKEY_VAULT_TLS_CERT`). `--help` and `--version` get none.
pub fn with_env(command: Command, env_prefix: &str) -> Command {
    let prefix = env_prefix.to_owned();
    let command = command.mut_args(|arg| match arg.get_long() {
        Some(long) if arg.get_env().is_none() && long != "help" && long != "version" => {
            let env = format!("{prefix}{}", long.replace('-', "_").to_uppercase());
            arg.env(env)
        }
        _ => arg,
    });
    let names: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    names.into_iter().fold(command, |command, name| {
        command.mut_subcommand(name, |sub| with_env(sub, env_prefix))
    })
}

/// Parses the process's arguments into `C`, each long flag backed by its
/// `<env_prefix><FLAG>` variable (see [`with_env`]); exits with clap's
/// message on bad input, as `Parser::parse` does. Called only by the
/// binaries' `main`, it also makes storage errors that do not clear stop
/// the process ([`crate::durable::fail_stop_on_storage_errors`]): a
/// supervisor restarts a service, not a test.
pub fn parse<C: Parser>(env_prefix: &str) -> C {
    crate::durable::fail_stop_on_storage_errors();
    let matches = with_env(C::command(), env_prefix).get_matches();
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(Debug, Parser)]
    struct Sample {
        #[command(subcommand)]
        command: Sub,
    }
    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Serve {
            #[command(flatten)]
            flags: ServiceFlags,
            #[arg(long)]
            master_key_file: Option<PathBuf>,
        },
    }

    #[test]
    fn every_long_flag_gets_its_prefixed_variable() {
        let command = with_env(Sample::command(), "TWOKEY_T_");
        command.clone().debug_assert();
        let serve = command.find_subcommand("serve").unwrap();
        let mut seen = 0;
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                assert!(arg.get_env().is_none());
                continue;
            }
            let want = format!("TWOKEY_T_{}", long.replace('-', "_").to_uppercase());
            assert_eq!(arg.get_env().unwrap().to_str().unwrap(), want);
            seen += 1;
        }
        assert_eq!(seen, 10);
    }

    #[test]
    fn shared_flags_become_config_overrides() {
        let command = with_env(Sample::command(), "TWOKEY_T_");
        let matches = command
            .try_get_matches_from(["t", "serve", "--tls-cert", "c.pem", "--log-format", "json"])
            .unwrap();
        let Sub::Serve { flags, .. } = Sample::from_arg_matches(&matches).unwrap().command;
        let set: Vec<_> = flags
            .overrides()
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?.as_str()?.to_owned())))
            .collect();
        assert_eq!(
            set,
            [("log_format", "json".into()), ("tls.cert", "c.pem".into())]
        );
    }
}
