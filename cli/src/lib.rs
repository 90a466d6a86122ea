//! The twokey command line: every human role's client for the broker and
//! audit services, offline audit verification, and development PKI.
//!
//! `main` parses [`Cli`] and calls [`run`]; each command group lives in its
//! own module and returns `Result<(), CliError>`. Answers go to stdout through
//! [`output`], errors to stderr as one line.
#![forbid(unsafe_code)]

pub mod account;
pub mod audit;
pub mod code;
pub mod completions;
pub mod demo;
pub mod error;
pub mod holder;
pub mod keys;
pub mod output;
pub mod pin;
pub mod pki;
pub mod policy;
pub mod profile;
pub mod reconcile;
pub mod request;
pub mod seal;
pub mod sign;
pub mod vault;
pub mod whoami;

use clap::{Parser, Subcommand};

pub use error::CliError;
use output::Output;
use profile::{ConnectionArgs, Settings};

/// twokey: TOTP codes for the most powerful accounts, released only with
/// approval, a verified PIN and an audit trail.
///
/// Connection settings come from flags or from a profile in the config file
/// ($TWOKEY_CONFIG, else ~/.config/twokey/config.toml), chosen with
/// --profile NAME or $TWOKEY_PROFILE; flags override the profile:
///
///   [profiles.alice]
///   broker = "https://127.0.0.1:7400"
///   audit = "https://127.0.0.1:7403"   # auditors only
///   cert = "/path/alice.crt"
///   key = "/path/alice.key"
///   ca = "/path/ca.crt"
///   ssh_key = "/path/alice.ssh"      # your OpenSSH key; signs your consent
///   connect_timeout = "5s"            # TCP connect, and again TLS handshake
///   timeout = "30s"                   # each call's answer (a stream's start)
///
/// Timeouts: --connect-timeout, else $TWOKEY_CONNECT_TIMEOUT, else the
/// profile's connect_timeout, else 5s; --timeout, else $TWOKEY_TIMEOUT, else
/// the profile's timeout, else 30s. For streams the deadline covers their
/// start; `request watch` then waits for events as long as it runs.
///
/// Requests, approvals, releases, policy versions and admin actions are
/// signed with your own OpenSSH key (ssh-ed25519): through the agent when
/// $SSH_AUTH_SOCK is set (the key whose public half is ssh_key.pub), else
/// with the unencrypted key file ssh_key.
///
/// Errors are one line on stderr, `twokey: MESSAGE`; with --json, one JSON
/// object on stderr instead, {"code": ..., "message": ..., "exit": ...},
/// where code is e.g. usage, config, input, unavailable, permission_denied,
/// or deadline_exceeded when a service did not answer in time.
///
/// Exit codes: 0 success, 1 failure (a service refused, failed or did not
/// answer in time), 2 usage (bad flags, missing settings, or `account
/// remove` / `enroll --replace` without a terminal to confirm on and
/// without --yes).
#[derive(Debug, Parser)]
#[command(
    name = "twokey",
    version,
    propagate_version = true,
    verbatim_doc_comment
)]
pub struct Cli {
    /// Print the proto3 JSON mapping of the answer and nothing else
    /// (streams: one JSON object per line); errors become one JSON object
    /// on stderr: {"code": ..., "message": ..., "exit": ...}.
    #[arg(long, global = true)]
    pub json: bool,
    /// Where to connect and as whom.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The command groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show who the broker thinks you are and your roles per account.
    Whoami,
    /// File, list, watch, approve, deny and cancel requests for codes.
    #[command(subcommand)]
    Request(request::RequestCommand),
    /// Verify the PIN the requester reads out, or have a new one sent.
    #[command(subcommand)]
    Pin(pin::PinCommand),
    /// Release a code for a verified request.
    #[command(subcommand)]
    Code(code::CodeCommand),
    /// Enroll, list and remove accounts (seeds live in the vault); admin
    /// actions that M admins sign.
    #[command(subcommand)]
    Account(account::AccountCommand),
    /// Propose, sign, apply and show the admin-signed consent policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Query, export, checkpoint, verify and prove the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Make development certificates.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// The vault's seal and keys: unseal a `shamir`-sealed vault with your
    /// share, see where it stands; rotate the key that seals the seeds.
    #[command(subcommand)]
    Vault(vault::VaultCommand),
    /// Print a shell completion script.
    Completions(completions::CompletionsArgs),
    /// Run the whole story on loopback: PKI, the three services, an account,
    /// a request approved, PIN-verified and released, the audit log verified.
    Demo(demo::DemoArgs),
}

/// Runs a parsed command line; returns the process exit code. Errors are
/// printed here, as one line on stderr.
pub fn run(cli: Cli) -> i32 {
    let json = cli.json;
    match execute(cli) {
        Ok(()) | Err(CliError::BrokenPipe) => 0,
        Err(err) => {
            report(&err, json);
            err.exit_code()
        }
    }
}

/// Prints an error on stderr: one line, or with `--json` one JSON object.
pub fn report(err: &CliError, json: bool) {
    if json {
        eprintln!("{}", err.json());
    } else {
        eprintln!("twokey: {}", err.one_line());
    }
}

/// Parses the command line; a usage error is printed (as JSON when --json
/// is among the arguments) and becomes `Err(exit code)`. Help and version
/// print as usual.
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, i32> {
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            use clap::error::ErrorKind;
            let json = args.iter().skip(1).any(|a| a == "--json");
            let informational = matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            if json && !informational {
                let text = e.render().to_string();
                let first = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default()
                    .trim_start_matches("error: ");
                report(&CliError::Usage(first.to_owned()), true);
                Err(error::EXIT_USAGE)
            } else {
                let _ = e.print();
                Err(e.exit_code())
            }
        }
    }
}

fn execute(cli: Cli) -> Result<(), CliError> {
    let out = Output { json: cli.json };
    match cli.command {
        Command::Pki(cmd) => pki::run(cmd, &cli.connection, out),
        Command::Completions(args) => completions::run(&args),
        Command::Demo(args) => demo::run(args, out),
        Command::Whoami => with_runtime(whoami::run(Settings::resolve(&cli.connection)?, out)),
        Command::Request(cmd) => {
            with_runtime(request::run(cmd, Settings::resolve(&cli.connection)?, out))
        }
        Command::Pin(cmd) => with_runtime(pin::run(cmd, Settings::resolve(&cli.connection)?, out)),
        Command::Code(cmd) => code::run(cmd, Settings::resolve(&cli.connection)?, out),
        Command::Account(cmd) => {
            with_runtime(account::run(cmd, Settings::resolve(&cli.connection)?, out))
        }
        Command::Policy(cmd) => {
            with_runtime(policy::run(cmd, Settings::resolve(&cli.connection)?, out))
        }
        Command::Audit(cmd) => audit::run(cmd, &cli.connection, out),
        Command::Vault(cmd) => {
            with_runtime(vault::run(cmd, Settings::resolve(&cli.connection)?, out))
        }
    }
}

/// Runs a future on a single-threaded runtime.
pub fn with_runtime<T>(
    fut: impl std::future::Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(format!("cannot start the async runtime: {e}")))?
        .block_on(fut)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "twokey",
            "request",
            "list",
            "--broker",
            "https://b:1",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.connection.broker.as_deref(), Some("https://b:1"));
    }
}
