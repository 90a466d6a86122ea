//! The `twokey-audit` command line: `serve` (the shared service flags plus
//! the audit service's own), `init-key` and `verify-store` (the whole
//! stored log rehashed offline against its checkpoint). Every long flag has its
//! `TWOKEY_AUDIT_<FLAG>` variable (`twokey_runtime::cli::parse`).

use std::path::PathBuf;

use anyhow::Context;
use twokey_runtime::{
    cli::ServiceFlags,
    config::{self, ConfigError, path, text},
    keys::{encode_public_key, generate_signing_key},
    serve::{bind, shutdown_signal},
    telemetry,
};

use crate::{checkpoint::NoteVerifier, config::AuditConfig};

/// The prefix of the audit service's environment variables.
pub const ENV_PREFIX: &str = "TWOKEY_AUDIT_";

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
    Serve(ServeArgs),
    /// Makes a new checkpoint signing key (mode 0600) and prints its verifier key.
    InitKey {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// The log's origin, which names the key in checkpoints.
        #[arg(long, default_value = "twokey.local/audit")]
        origin: String,
    },
    /// Checks a stopped audit's stored log offline: every entry rehashed to
    /// its leaf hash, every tile to its place in the level above, and the
    /// root at the checkpoint's size against the checkpoint
    /// (`DATA_DIR/log/checkpoint`); exits non-zero on any mismatch.
    VerifyStore {
        /// The audit service's data directory (its `data_dir`).
        #[arg(long)]
        data_dir: PathBuf,
        /// The log's verifier key (as `init-key` prints it): the checkpoint's
        /// signature is checked too when given.
        #[arg(long)]
        verifier: Option<String>,
    },
}

/// Flags of `twokey-audit serve`; each overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// The flags every service's `serve` takes.
    #[command(flatten)]
    pub flags: ServiceFlags,
    /// Checkpoint signing key file (make one with `twokey-audit init-key`).
    #[arg(long)]
    pub checkpoint_key_file: Option<PathBuf>,
    /// Checkpoint origin line, also the note key name.
    #[arg(long)]
    pub origin: Option<String>,
    /// SPIFFE IDs allowed to read the log (comma-separated; replaces the file's list).
    #[arg(long, value_delimiter = ',')]
    pub auditors: Option<Vec<String>>,
    /// Event sources as ID=BASE64_PUBLIC_KEY (comma-separated; replaces the file's list).
    #[arg(long, value_delimiter = ',')]
    pub sources: Option<Vec<String>>,
    /// Address of the HTTPS listener (tiles, checkpoint, EventBridge posts); off when unset.
    #[arg(long)]
    pub http_listen: Option<String>,
}

impl ServeArgs {
    /// The configuration: the file, then these flags over it.
    pub fn load(&self) -> Result<AuditConfig, ConfigError> {
        let overrides = self.overrides()?;
        let file = self.flags.config.as_deref();
        let config: AuditConfig = config::load(file, &overrides, ENV_PREFIX)?;
        config.finish(file, |field| {
            overrides.iter().any(|(k, v)| *k == field && v.is_some())
        })
    }

    fn overrides(&self) -> Result<Vec<(&'static str, Option<toml::Value>)>, ConfigError> {
        let strings = |list: &[String]| {
            toml::Value::Array(
                list.iter()
                    .map(|s| toml::Value::String(s.trim().to_owned()))
                    .collect(),
            )
        };
        let sources = match &self.sources {
            None => None,
            Some(list) => Some(toml::Value::Array(
                list.iter()
                    .enumerate()
                    .map(|(i, s)| source_flag(i, s))
                    .collect::<Result<_, _>>()?,
            )),
        };
        let mut overrides = self.flags.overrides();
        overrides.extend([
            ("checkpoint_key_file", path(&self.checkpoint_key_file)),
            ("origin", text(&self.origin)),
            ("auditors", self.auditors.as_deref().map(strings)),
            ("sources", sources),
            ("http_listen", text(&self.http_listen)),
        ]);
        Ok(overrides)
    }
}

/// One `--sources` entry, `ID=BASE64_PUBLIC_KEY`, as a `[[sources]]` table.
fn source_flag(i: usize, flag: &str) -> Result<toml::Value, ConfigError> {
    let (id, key) = flag.split_once('=').ok_or_else(|| ConfigError::Invalid {
        origin: format!("--sources (or {ENV_PREFIX}SOURCES)"),
        message: format!("`sources[{i}]`: expected ID=BASE64_PUBLIC_KEY"),
    })?;
    let mut table = toml::Table::new();
    table.insert("id".into(), toml::Value::String(id.trim().to_owned()));
    table.insert(
        "public_key".into(),
        toml::Value::String(key.trim().to_owned()),
    );
    Ok(toml::Value::Table(table))
}

/// Runs a parsed command line.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Serve(flags) => {
            let config = flags.load()?;
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
        Command::VerifyStore { data_dir, verifier } => {
            let verifier = verifier
                .as_deref()
                .map(NoteVerifier::parse)
                .transpose()
                .context("--verifier is not a verifier key; pass the line init-key printed")?;
            let report =
                tokio::task::spawn_blocking(move || verify_store(&data_dir, verifier.as_ref()))
                    .await??;
            println!("{report}");
            Ok(())
        }
    }
}

/// Rehashes the whole log stored in `data_dir` and checks it against the
/// checkpoint next to its tiles (its signature too, given `verifier`);
/// answers what was checked, or the first mismatch as the error.
pub fn verify_store(
    data_dir: &std::path::Path,
    verifier: Option<&NoteVerifier>,
) -> anyhow::Result<String> {
    use crate::{
        checkpoint::Checkpoint,
        merkle::subtree_root,
        store::{LogStore, TileStore},
    };
    let head = data_dir.join(crate::head::FILE_NAME);
    // Opening would create a database where none is: refuse first.
    if !data_dir.join("db").is_file() || !head.is_file() {
        anyhow::bail!(
            "{} holds no audit log (no sled database `db` or no checkpoint {}); pass the audit \
             service's data_dir",
            data_dir.display(),
            head.display()
        );
    }
    let note = std::fs::read_to_string(&head)
        .with_context(|| format!("cannot read the checkpoint {}", head.display()))?;
    let (checkpoint, signature) = match verifier {
        Some(v) => (
            v.open_checkpoint(&note).with_context(|| {
                format!(
                    "the checkpoint {} is not signed by {v}: it was altered, or the key is not \
                     this log's",
                    head.display()
                )
            })?,
            format!("its signature by {} checked", v.name()),
        ),
        None => {
            let (text, _) = twokey_tlog::checkpoint::split_note(&note).with_context(|| {
                format!("the checkpoint {} is not a signed note", head.display())
            })?;
            (
                Checkpoint::parse_body(text).with_context(|| {
                    format!("the checkpoint {} is not a checkpoint", head.display())
                })?,
                "its signature not checked (pass --verifier to check it)".to_owned(),
            )
        }
    };
    let store = TileStore::open(data_dir)
        .map_err(|e| anyhow::anyhow!("{e}; stop the audit service before verifying its store"))?;
    if let Err(problem) = store.check() {
        anyhow::bail!(
            "the store in {} does not verify: {}",
            data_dir.display(),
            problem.why
        );
    }
    // What the journal holds beyond the tiles (a crash before they were
    // written) is checked and verified with them, read only.
    let journal = crate::journal::Journal::read(data_dir, store.size())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let replayed = crate::journal::replay_into(&store, &journal.replay)
        .map_err(|e| anyhow::anyhow!("the store in {} does not verify: {e}", data_dir.display()))?;
    let size = store.size();
    if size < checkpoint.size {
        anyhow::bail!(
            "the store in {} holds {size} entries, fewer than the {} its checkpoint signs: \
             entries were removed; restore the data directory from a backup",
            data_dir.display(),
            checkpoint.size
        );
    }
    let root = store.verify_all().map_err(|e| {
        anyhow::anyhow!(
            "the store in {} does not verify: {e}; restore the data directory from a backup",
            data_dir.display()
        )
    })?;
    let signed = subtree_root(0, checkpoint.size, &mut |l, i| store.node(l, i))?;
    if signed != checkpoint.root {
        anyhow::bail!(
            "the store in {} does not verify: its root at the checkpoint's size {} is {}, the \
             checkpoint signs {}; restore the data directory from a backup",
            data_dir.display(),
            checkpoint.size,
            hex::encode(signed),
            hex::encode(checkpoint.root)
        );
    }
    // The journal's newest checkpoint, signed after the file's, too.
    if let Some(note) = &journal.newest_checkpoint {
        let (text, _) = twokey_tlog::checkpoint::split_note(note)
            .context("the journal's newest checkpoint is not a signed note")?;
        let newest = match verifier {
            Some(v) => v
                .open_checkpoint(note)
                .with_context(|| format!("the journal's newest checkpoint is not signed by {v}"))?,
            None => Checkpoint::parse_body(text)
                .context("the journal's newest checkpoint is not a checkpoint")?,
        };
        if newest.size > size
            || subtree_root(0, newest.size, &mut |l, i| store.node(l, i))? != newest.root
        {
            anyhow::bail!(
                "the store in {} does not verify: the journal's newest checkpoint (size {}, root \
                 {}) does not match the entries; restore the data directory from a backup",
                data_dir.display(),
                newest.size,
                hex::encode(newest.root)
            );
        }
    }
    let journaled = if replayed > 0 {
        format!(" ({replayed} of them from the journal, not yet in the tiles)")
    } else {
        String::new()
    };
    Ok(format!(
        "verified {size} entries{journaled} in {}: every entry hashes to its leaf hash and every \
         tile to its place in the level above; root {}; the checkpoint {} (size {}, root {}) \
         matches, {signature}",
        data_dir.display(),
        hex::encode(root),
        head.display(),
        checkpoint.size,
        hex::encode(checkpoint.root)
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use clap::{CommandFactory, FromArgMatches};
    use twokey_runtime::{SpiffeId, cli::with_env, telemetry::LogFormat};

    fn parse(args: &[&str]) -> Args {
        let matches = with_env(Args::command(), ENV_PREFIX)
            .try_get_matches_from(args)
            .unwrap();
        Args::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        with_env(Args::command(), ENV_PREFIX).debug_assert();
    }

    #[test]
    fn every_flag_keeps_its_environment_variable() {
        let command = with_env(Args::command(), ENV_PREFIX);
        let env_of = |sub: &str| -> Vec<(String, String)> {
            command
                .find_subcommand(sub)
                .unwrap()
                .get_arguments()
                .filter_map(|a| Some((a.get_long()?.to_owned(), a.get_env()?.to_str()?.to_owned())))
                .collect()
        };
        let serve = env_of("serve");
        for (flag, var) in [
            ("config", "TWOKEY_AUDIT_CONFIG"),
            ("listen", "TWOKEY_AUDIT_LISTEN"),
            ("trust-domain", "TWOKEY_AUDIT_TRUST_DOMAIN"),
            ("data-dir", "TWOKEY_AUDIT_DATA_DIR"),
            ("checkpoint-key-file", "TWOKEY_AUDIT_CHECKPOINT_KEY_FILE"),
            ("origin", "TWOKEY_AUDIT_ORIGIN"),
            ("auditors", "TWOKEY_AUDIT_AUDITORS"),
            ("log-format", "TWOKEY_AUDIT_LOG_FORMAT"),
            ("tls-cert", "TWOKEY_AUDIT_TLS_CERT"),
            ("tls-key", "TWOKEY_AUDIT_TLS_KEY"),
            ("tls-ca", "TWOKEY_AUDIT_TLS_CA"),
            ("tls-crl", "TWOKEY_AUDIT_TLS_CRL"),
            ("sources", "TWOKEY_AUDIT_SOURCES"),
            ("http-listen", "TWOKEY_AUDIT_HTTP_LISTEN"),
        ] {
            assert!(
                serve.contains(&(flag.to_owned(), var.to_owned())),
                "--{flag}: {serve:?}"
            );
        }
        assert_eq!(serve.len(), 14, "{serve:?}");
        assert!(env_of("init-key").contains(&("origin".into(), "TWOKEY_AUDIT_ORIGIN".into())));
    }

    #[test]
    fn serve_flags_parse_into_config_overrides() {
        let args = parse(&[
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
        ]);
        let Command::Serve(flags) = args.command else {
            panic!("not serve");
        };
        assert_eq!(flags.flags.listen.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(flags.auditors.unwrap().len(), 2);
        assert_eq!(flags.flags.log_format, Some(LogFormat::Json));
    }

    fn key() -> String {
        twokey_runtime::keys::encode_public_key(
            &ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        )
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("audit.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn full(key: &str) -> String {
        format!(
            r#"
listen = "127.0.0.1:7403"
trust_domain = "twokey.local"
data_dir = "data"
checkpoint_key_file = "/etc/twokey/audit/checkpoint.key"
origin = "twokey.local/audit"
auditors = ["spiffe://twokey.local/user/carol"]
log_format = "json"
[tls]
cert = "audit.crt"
key = "audit.key"
ca = "ca.crt"
[[sources]]
id = "spiffe://twokey.local/svc/vault"
public_key = "{key}"
"#
        )
    }

    fn with_file(path: PathBuf) -> ServeArgs {
        ServeArgs {
            flags: ServiceFlags {
                config: Some(path),
                ..ServiceFlags::default()
            },
            ..ServeArgs::default()
        }
    }

    #[test]
    fn a_full_file_loads_with_paths_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &full(&key()));
        let c = with_file(path).load().unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.tls.ca, dir.path().join("ca.crt"));
        assert_eq!(
            c.checkpoint_key_file,
            PathBuf::from("/etc/twokey/audit/checkpoint.key")
        );
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.sources.len(), 1);
        assert!(
            c.auditors
                .contains(&SpiffeId::parse("spiffe://twokey.local/user/carol").unwrap())
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &full(&key()));
        let mut args = with_file(path);
        args.flags.listen = Some("127.0.0.1:0".into());
        args.auditors = Some(vec!["spiffe://twokey.local/user/dave".into()]);
        args.sources = Some(vec![format!("spiffe://twokey.local/svc/broker={}", key())]);
        args.http_listen = Some("127.0.0.1:7404".into());
        let c = args.load().unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.http_listen.as_deref(), Some("127.0.0.1:7404"));
        assert_eq!(
            c.auditors.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["spiffe://twokey.local/user/dave"]
        );
        assert_eq!(
            c.sources.keys().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["spiffe://twokey.local/svc/broker"]
        );
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &full("not-a-key"));
        let err = with_file(path.clone()).load().unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("sources[0].public_key"), "{err}");
        assert!(err.contains("invalid ed25519 public key"), "{err}");

        let path = write(
            dir.path(),
            &full(&key()).replace("origin = \"twokey.local/audit\"\n", ""),
        );
        let err = with_file(path).load().unwrap_err().to_string();
        assert!(err.contains("missing field `origin`"), "{err}");
        assert!(err.contains("TWOKEY_AUDIT_"), "{err}");

        let path = write(dir.path(), &format!("{}\nbogus = 1\n", full(&key())));
        let err = with_file(path).load().unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");

        let path = write(
            dir.path(),
            &full(&key()).replace("user/carol", "user/carol x"),
        );
        let err = with_file(path).load().unwrap_err().to_string();
        assert!(err.contains("auditors[0]"), "{err}");
    }

    #[test]
    fn errors_in_flags_name_the_flag() {
        let args = ServeArgs {
            flags: ServiceFlags {
                listen: Some("127.0.0.1:0".into()),
                trust_domain: Some("twokey.local".into()),
                data_dir: Some("d".into()),
                tls_cert: Some("c".into()),
                tls_key: Some("k".into()),
                tls_ca: Some("a".into()),
                ..ServiceFlags::default()
            },
            checkpoint_key_file: Some("k".into()),
            origin: Some("twokey.local/audit".into()),
            sources: Some(vec!["spiffe://twokey.local/svc/vault".into()]),
            ..ServeArgs::default()
        };
        let err = args.load().unwrap_err().to_string();
        assert!(err.contains("--sources (or TWOKEY_AUDIT_SOURCES)"), "{err}");
        assert!(err.contains("ID=BASE64_PUBLIC_KEY"), "{err}");
        let err = ServeArgs {
            sources: None,
            ..args
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing field `sources`"), "{err}");
    }
}
