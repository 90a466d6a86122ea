//! `twokey account …`: enroll a seed (read from stdin only, never argv),
//! list accounts, remove one (admin).

use std::io::{IsTerminal, Read};

use clap::{Args, Subcommand, ValueEnum};
use twokey_proto::{
    broker::v1::{
        EnrollAccountRequest, EnrollAccountResponse, ListAccountsRequest, RemoveAccountRequest,
        enroll_account_request::Seed,
    },
    types::v1::{Account, Algorithm, Code},
};
use zeroize::Zeroizing;

use crate::{
    error::CliError,
    output::{Output, enum_name, seconds_until, table, time},
    profile::Settings,
};

/// Account commands.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Enroll a seed (admin). Pipe the otpauth:// URI or the Base32 secret
    /// into stdin; it is never taken from the command line. Prints the codes
    /// for two consecutive steps, which AWS asks for to finish registering an
    /// MFA device.
    Enroll(EnrollArgs),
    /// List the accounts you have a role on.
    List,
    /// Remove an account and its seed (admin).
    Remove(RemoveArgs),
}

/// A TOTP hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlgorithmArg {
    /// HMAC-SHA1 (AWS and most services).
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl From<AlgorithmArg> for Algorithm {
    fn from(a: AlgorithmArg) -> Self {
        match a {
            AlgorithmArg::Sha1 => Algorithm::Sha1,
            AlgorithmArg::Sha256 => Algorithm::Sha256,
            AlgorithmArg::Sha512 => Algorithm::Sha512,
        }
    }
}

/// `account enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Id for the account, as named in the policy (e.g. aws-prod-root).
    #[arg(value_name = "ACCOUNT")]
    pub account: String,
    /// Replace an account of the same id.
    #[arg(long)]
    pub replace: bool,
    /// With a Base32 secret: the issuer (e.g. "Amazon Web Services").
    #[arg(long)]
    pub issuer: Option<String>,
    /// With a Base32 secret: the label (usually the user name at the issuer).
    #[arg(long)]
    pub label: Option<String>,
    /// With a Base32 secret: digits per code [default: 6].
    #[arg(long)]
    pub digits: Option<u32>,
    /// With a Base32 secret: seconds per step [default: 30].
    #[arg(long)]
    pub period: Option<u32>,
    /// With a Base32 secret: the hash function [default: sha1].
    #[arg(long, value_enum)]
    pub algorithm: Option<AlgorithmArg>,
}

/// `account remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The account to remove.
    #[arg(value_name = "ACCOUNT")]
    pub account: String,
    /// Why (kept in the audit log).
    #[arg(long)]
    pub reason: String,
}

/// Runs an account command.
pub async fn run(cmd: AccountCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    match cmd {
        AccountCommand::Enroll(a) => {
            let raw = read_seed()?;
            let request = enroll_request(&a, &raw)?;
            drop(raw);
            let (mut broker, target) = settings.broker()?;
            let answer = broker
                .enroll_account(request)
                .await
                .map_err(|s| target.error(s))?
                .into_inner();
            if !out.json {
                for w in &answer.warnings {
                    eprintln!("warning: {}", crate::error::one_line(w));
                }
            }
            out.answer(&answer, || enrolled(&answer))
        }
        AccountCommand::List => {
            let (mut broker, target) = settings.broker()?;
            let answer = broker
                .list_accounts(ListAccountsRequest {})
                .await
                .map_err(|s| target.error(s))?
                .into_inner();
            out.answer(&answer, || accounts_table(&answer.accounts))
        }
        AccountCommand::Remove(a) => {
            let (mut broker, target) = settings.broker()?;
            let answer = broker
                .remove_account(RemoveAccountRequest {
                    account_id: a.account,
                    reason: a.reason,
                    ..Default::default()
                })
                .await
                .map_err(|s| target.error(s))?
                .into_inner();
            out.answer(&answer, || {
                format!(
                    "removed {}; its seed is gone from the vault",
                    answer.account_id
                )
            })
        }
    }
}

/// Reads the seed from stdin: without echo on a terminal, else all of it.
fn read_seed() -> Result<Zeroizing<String>, CliError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("paste the otpauth:// URI or the Base32 secret (not echoed), then Enter: ");
        return rpassword::read_password()
            .map(Zeroizing::new)
            .map_err(|e| CliError::Input(format!("cannot read the seed from the terminal: {e}")));
    }
    let mut raw = Zeroizing::new(String::new());
    stdin
        .lock()
        .take(64 * 1024)
        .read_to_string(&mut raw)
        .map_err(|e| {
            CliError::Input(format!(
                "cannot read the seed from stdin ({}); pipe the otpauth:// URI or Base32 secret in",
                e.kind()
            ))
        })?;
    Ok(raw)
}

/// Builds the enrollment from the account flags and what stdin held. The
/// seed never appears in an error.
pub fn enroll_request(a: &EnrollArgs, raw: &str) -> Result<EnrollAccountRequest, CliError> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(CliError::Input(
            "no seed on stdin: pipe the otpauth:// URI or the Base32 secret into `twokey account enroll ACCOUNT`"
                .into(),
        ));
    }
    let has_params = a.issuer.is_some()
        || a.label.is_some()
        || a.digits.is_some()
        || a.period.is_some()
        || a.algorithm.is_some();
    let seed = if text.to_ascii_lowercase().starts_with("otpauth://") {
        if has_params {
            return Err(CliError::Usage(
                "--issuer, --label, --digits, --period and --algorithm go with a Base32 secret; the otpauth URI already carries them"
                    .into(),
            ));
        }
        if text.lines().count() > 1 {
            return Err(CliError::Input(
                "stdin holds more than one line: give exactly one otpauth:// URI".into(),
            ));
        }
        Seed::OtpauthUri(text.to_owned())
    } else {
        let secret: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if !secret
            .chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c) || c == '=')
        {
            return Err(CliError::Input(
                "stdin holds neither an otpauth:// URI nor a Base32 secret (letters A-Z and digits 2-7)"
                    .into(),
            ));
        }
        Seed::Base32Secret(secret)
    };
    Ok(EnrollAccountRequest {
        account_id: a.account.clone(),
        seed: Some(seed),
        algorithm: a.algorithm.map_or(0, |x| Algorithm::from(x) as i32),
        digits: a.digits.unwrap_or(0),
        period: a.period.unwrap_or(0),
        issuer: a.issuer.clone().unwrap_or_default(),
        label: a.label.clone().unwrap_or_default(),
        replace: a.replace,
        ..Default::default()
    })
}

fn algorithm_name(a: i32) -> String {
    match Algorithm::try_from(a) {
        Ok(Algorithm::Unspecified) | Err(_) => "sha1".to_owned(),
        Ok(alg) => enum_name(alg.as_str_name(), "ALGORITHM_"),
    }
}

fn code_line(which: &str, code: Option<&Code>) -> String {
    match code {
        Some(c) => format!(
            "  {which:<7} {}   valid until {} ({:.0} s left)",
            c.code,
            time(c.valid_until.as_ref()),
            c.valid_until
                .as_ref()
                .map_or(0.0, seconds_until)
                .max(0.0)
                .floor()
        ),
        None => format!("  {which:<7} (none sent)"),
    }
}

fn enrolled(a: &EnrollAccountResponse) -> String {
    let acc = a.account.clone().unwrap_or_default();
    format!(
        "enrolled {} ({} {}, {}, {} digits, {} s)\n\
         registration codes — type both into the service to finish registering the MFA device:\n{}\n{}",
        acc.account_id,
        acc.issuer,
        acc.label,
        algorithm_name(acc.algorithm),
        acc.digits,
        acc.period,
        code_line("first", a.current.as_ref()),
        code_line("second", a.next.as_ref())
    )
}

fn accounts_table(accounts: &[Account]) -> String {
    if accounts.is_empty() {
        return "no accounts".to_owned();
    }
    let rows: Vec<Vec<String>> = accounts
        .iter()
        .map(|a| {
            vec![
                a.account_id.clone(),
                a.issuer.clone(),
                a.label.clone(),
                format!("{}/{}/{}s", algorithm_name(a.algorithm), a.digits, a.period),
                format!(
                    "{}{}",
                    a.seed_bits,
                    if a.weak_seed { " (weak)" } else { "" }
                ),
                time(a.created_at.as_ref()),
                time(a.last_used_at.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "ACCOUNT",
            "ISSUER",
            "LABEL",
            "TOTP",
            "SEED BITS",
            "ENROLLED",
            "LAST USED",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> EnrollArgs {
        EnrollArgs {
            account: "aws-prod-root".into(),
            replace: false,
            issuer: None,
            label: None,
            digits: None,
            period: None,
            algorithm: None,
        }
    }

    #[test]
    fn an_otpauth_uri_is_sent_as_such() {
        let uri = "otpauth://totp/AWS:root?secret=JBSWY3DPEHPK3PXP&issuer=AWS\n";
        let r = enroll_request(&args(), uri).unwrap();
        assert_eq!(r.seed, Some(Seed::OtpauthUri(uri.trim().into())));
    }

    #[test]
    fn a_base32_secret_is_normalised() {
        let r = enroll_request(&args(), "jbsw y3dp ehpk 3pxp\n").unwrap();
        assert_eq!(r.seed, Some(Seed::Base32Secret("JBSWY3DPEHPK3PXP".into())));
    }

    #[test]
    fn garbage_is_refused_without_echoing_it() {
        let err = enroll_request(&args(), "not!a$seed")
            .unwrap_err()
            .one_line();
        assert!(!err.contains("not!a$seed"), "{err}");
    }

    #[test]
    fn empty_stdin_says_what_to_pipe() {
        let err = enroll_request(&args(), "\n").unwrap_err().one_line();
        assert!(err.contains("no seed on stdin"), "{err}");
    }

    #[test]
    fn uri_parameters_cannot_be_overridden_by_flags() {
        let mut a = args();
        a.digits = Some(8);
        let err = enroll_request(&a, "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP").unwrap_err();
        assert_eq!(err.exit_code(), crate::error::EXIT_USAGE);
    }
}
