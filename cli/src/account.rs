//! `twokey account …`: enroll a seed (read from stdin only, never argv),
//! list accounts, and the admin actions that need M admins: remove, enroll
//! with replace, disable, enable and restore. The first admin starts an
//! action (signing a statement with a new action id with their ssh_key),
//! the others sign it with `sign-action ID`, and once enough signed, the
//! command with `--action ID` carries it out; the vault checks every
//! admin's signature.

use std::io::{IsTerminal, Read};

use clap::{Args, Subcommand, ValueEnum};
use twokey_consent::{AdminAction, admin_binding, new_id};
use twokey_proto::{
    broker::v1::{
        AdminActionProposal, EnrollAccountRequest, EnrollAccountResponse, ListAccountsRequest,
        ListAdminActionsRequest, RemoveAccountRequest, RestoreAccountRequest,
        SetAccountEnabledRequest, SignAdminActionRequest, enroll_account_request::Seed,
    },
    types::v1::{Account, Algorithm, Code},
};
use zeroize::Zeroizing;

use crate::{
    error::{CliError, Target},
    output::{Output, enum_name, seconds_until, short_id, table, time},
    profile::{BrokerClient, Settings},
    sign::{Signing, SshSigner},
};

/// Account commands.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Enroll a seed (admin). Pipe the otpauth:// URI or the Base32 secret
    /// into stdin; it is never taken from the command line. Prints the codes
    /// for two consecutive steps, which AWS asks for to finish registering an
    /// MFA device. With --replace (M admins): without --action it starts the
    /// admin action and reads no seed; with --action ID it replaces the seed.
    Enroll(EnrollArgs),
    /// List the accounts you have a role on.
    List,
    /// Remove an account (M admins): without --action it starts the admin
    /// action; with --action ID, once enough admins signed, it removes the
    /// seed, which the vault keeps sealed for the policy's recovery window.
    Remove(RemoveArgs),
    /// Stop releasing codes for an account (M admins; see `remove`).
    Disable(ActionArgs),
    /// Release codes for a disabled account again (M admins; see `remove`).
    Enable(ActionArgs),
    /// Bring back a seed replaced or removed within the recovery window (M
    /// admins; see `remove`).
    Restore(ActionArgs),
    /// Sign an admin action another admin started, with your ssh_key.
    SignAction(ActionIdArg),
    /// List the admin actions still collecting signatures.
    Actions,
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
    /// Fewest seconds a released code must have left in its step; with fewer,
    /// the next step's code is released instead. Must be below the period
    /// [default: 10, or a third of the period if that is shorter].
    #[arg(long, value_name = "N")]
    pub min_seconds_left: Option<u32>,
    /// With --replace: the admin action (signed by enough admins) to carry out.
    #[arg(long, value_name = "ID", requires = "replace")]
    pub action: Option<String>,
    /// With --replace: do not ask for confirmation (for scripts; without a
    /// terminal the command refuses to run without it).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// An admin action on an account.
#[derive(Debug, Args)]
pub struct ActionArgs {
    /// The account.
    #[arg(value_name = "ACCOUNT")]
    pub account: String,
    /// Carry out this admin action, which enough admins signed; without it,
    /// start a new one.
    #[arg(long, value_name = "ID")]
    pub action: Option<String>,
}

/// An admin action's id.
#[derive(Debug, Args)]
pub struct ActionIdArg {
    /// The action id that `twokey account remove|disable|enable|restore` or
    /// `enroll --replace` printed.
    #[arg(value_name = "ID")]
    pub id: String,
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
    /// Carry out this admin action, which enough admins signed; without it,
    /// start a new one.
    #[arg(long, value_name = "ID")]
    pub action: Option<String>,
    /// Do not ask for confirmation (for scripts; without a terminal the
    /// command refuses to run without it).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Runs an account command.
pub async fn run(cmd: AccountCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    match cmd {
        AccountCommand::Enroll(a) if a.replace && a.action.is_none() => {
            confirm(a.yes, &replace_story(&a.account, None))?;
            start_action(&settings, out, &a.account, AdminAction::EnrollReplace, None).await
        }
        AccountCommand::Enroll(a) => {
            if a.replace {
                confirm(a.yes, &replace_story(&a.account, a.action.as_deref()))?;
            }
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
            confirm(
                a.yes,
                &remove_story(&a.account, &a.reason, a.action.as_deref()),
            )?;
            let Some(action_id) = a.action else {
                return start_action(
                    &settings,
                    out,
                    &a.account,
                    AdminAction::Remove,
                    Some(&a.reason),
                )
                .await;
            };
            let (mut broker, target) = settings.broker()?;
            let answer = broker
                .remove_account(RemoveAccountRequest {
                    account_id: a.account,
                    reason: a.reason,
                    action_id,
                })
                .await
                .map_err(|s| target.error(s))?
                .into_inner();
            out.answer(&answer, || {
                format!(
                    "removed {}; the vault keeps its seed sealed for the policy's recovery window (`twokey account restore {}` brings it back)",
                    answer.account_id, answer.account_id
                )
            })
        }
        AccountCommand::Disable(a) => set_enabled(&settings, out, a, false).await,
        AccountCommand::Enable(a) => set_enabled(&settings, out, a, true).await,
        AccountCommand::Restore(a) => {
            let Some(action_id) = a.action else {
                return start_action(&settings, out, &a.account, AdminAction::Restore, None).await;
            };
            let (mut broker, target) = settings.broker()?;
            let answer = target.answer(
                broker
                    .restore_account(RestoreAccountRequest {
                        account_id: a.account,
                        action_id,
                    })
                    .await,
            )?;
            out.answer(&answer, || {
                let acc = answer.account.clone().unwrap_or_default();
                format!("restored {}: its earlier seed is back", acc.account_id)
            })
        }
        AccountCommand::SignAction(a) => {
            let signer = SshSigner::from_settings(&settings)?;
            let (mut broker, target) = settings.broker()?;
            let signing = require_policy(&mut broker, &target).await?;
            let open =
                target.answer(broker.list_admin_actions(ListAdminActionsRequest {}).await)?;
            let Some(found) = open.actions.iter().find(|x| x.action_id == a.id) else {
                return Err(CliError::Input(format!(
                    "no open admin action {} (it was carried out, expired, or never started): `twokey account actions` lists the open ones",
                    a.id
                )));
            };
            let action = AdminAction::try_from(found.action).unwrap_or(AdminAction::Unspecified);
            let answer = sign_action(
                &mut broker,
                &target,
                &signer,
                &signing,
                &found.account_id,
                action,
                &a.id,
            )
            .await?;
            out.answer(&answer, || action_story("signed", &answer, None))
        }
        AccountCommand::Actions => {
            let (mut broker, target) = settings.broker()?;
            let open =
                target.answer(broker.list_admin_actions(ListAdminActionsRequest {}).await)?;
            out.answer(&open, || actions_table(&open.actions))
        }
    }
}

/// `disable` / `enable`: start the action, or carry it out.
async fn set_enabled(
    settings: &Settings,
    out: Output,
    a: ActionArgs,
    enabled: bool,
) -> Result<(), CliError> {
    let Some(action_id) = a.action else {
        let action = if enabled {
            AdminAction::Enable
        } else {
            AdminAction::Disable
        };
        return start_action(settings, out, &a.account, action, None).await;
    };
    let (mut broker, target) = settings.broker()?;
    let answer = target.answer(
        broker
            .set_account_enabled(SetAccountEnabledRequest {
                account_id: a.account,
                enabled,
                action_id,
            })
            .await,
    )?;
    out.answer(&answer, || {
        let acc = answer.account.clone().unwrap_or_default();
        if enabled {
            format!("enabled {}: it releases codes again", acc.account_id)
        } else {
            format!(
                "disabled {}: it releases no codes until admins enable it",
                acc.account_id
            )
        }
    })
}

/// The active policy version for an admin's statement; admin actions need
/// a signed policy in force.
async fn require_policy(broker: &mut BrokerClient, target: &Target) -> Result<Signing, CliError> {
    let signing = Signing::ask(broker, target).await?;
    if !signing.required() {
        return Err(CliError::Input(
            "admin actions need a signed policy in force, and none is: admins apply one with `twokey policy propose FILE`, `twokey policy sign VERSION` and `twokey policy apply VERSION`".into(),
        ));
    }
    Ok(signing)
}

/// Starts an admin action: a new action id, this admin's signed statement.
async fn start_action(
    settings: &Settings,
    out: Output,
    account: &str,
    action: AdminAction,
    reason: Option<&str>,
) -> Result<(), CliError> {
    let signer = SshSigner::from_settings(settings)?;
    let (mut broker, target) = settings.broker()?;
    let signing = require_policy(&mut broker, &target).await?;
    let answer = sign_action(
        &mut broker,
        &target,
        &signer,
        &signing,
        account,
        action,
        &new_id(),
    )
    .await?;
    out.answer(&answer, || action_story("started", &answer, reason))
}

async fn sign_action(
    broker: &mut BrokerClient,
    target: &Target,
    signer: &SshSigner,
    signing: &Signing,
    account: &str,
    action: AdminAction,
    action_id: &str,
) -> Result<AdminActionProposal, CliError> {
    let statement = signing.sign(signer, admin_binding(account, action, action_id))?;
    target
        .answer(
            broker
                .sign_admin_action(SignAdminActionRequest {
                    statement: Some(statement),
                })
                .await,
        )?
        .action
        .ok_or_else(|| CliError::Input("the broker sent no admin action back".into()))
}

/// The command that carries out an action once enough admins signed
/// (`reason`: a removal's, when known).
pub fn carry_out_command(p: &AdminActionProposal, reason: Option<&str>) -> String {
    let (account, id) = (&p.account_id, &p.action_id);
    match AdminAction::try_from(p.action) {
        Ok(AdminAction::Remove) => {
            let reason = reason.map_or_else(|| "REASON".to_owned(), |r| format!("{r:?}"));
            format!("twokey account remove {account} --reason {reason} --action {id}")
        }
        Ok(AdminAction::EnrollReplace) => {
            format!("twokey account enroll {account} --replace --action {id} < SEED")
        }
        Ok(AdminAction::Disable) => format!("twokey account disable {account} --action {id}"),
        Ok(AdminAction::Enable) => format!("twokey account enable {account} --action {id}"),
        Ok(AdminAction::Restore) => format!("twokey account restore {account} --action {id}"),
        _ => format!("(action {} is unknown to this twokey)", p.action),
    }
}

/// An action's lower-case name (`remove`, `enroll replace`).
pub fn action_name(action: i32) -> String {
    AdminAction::try_from(action).map_or_else(
        |_| format!("action {action}"),
        |a| enum_name(a.as_str_name(), "ADMIN_ACTION_").replace('_', " "),
    )
}

fn action_story(verb: &str, p: &AdminActionProposal, reason: Option<&str>) -> String {
    let signed = p.signed_by.len();
    let mut s = format!(
        "{verb} admin action {}: {} {}
  signed by  {} ({signed} of {} admins)
",
        p.action_id,
        action_name(p.action),
        p.account_id,
        p.signed_by
            .iter()
            .map(|id| short_id(id).to_owned())
            .collect::<Vec<_>>()
            .join(", "),
        p.needed
    );
    if (signed as u32) < p.needed {
        s.push_str(&format!(
            "next: {} more admin(s) run `twokey account sign-action {}`; then `{}`",
            p.needed as usize - signed,
            p.action_id,
            carry_out_command(p, reason)
        ));
    } else {
        s.push_str(&format!(
            "enough admins signed: carry it out with `{}`",
            carry_out_command(p, reason)
        ));
    }
    s
}

fn actions_table(actions: &[AdminActionProposal]) -> String {
    if actions.is_empty() {
        return "no open admin actions".to_owned();
    }
    let rows: Vec<Vec<String>> = actions
        .iter()
        .map(|p| {
            vec![
                p.action_id.clone(),
                action_name(p.action),
                p.account_id.clone(),
                format!("{}/{}", p.signed_by.len(), p.needed),
                time(p.created_at.as_ref()),
            ]
        })
        .collect();
    table(&["ID", "ACTION", "ACCOUNT", "SIGNED", "STARTED"], &rows)
}

/// What `account remove` is about to do.
fn remove_story(account: &str, reason: &str, action: Option<&str>) -> String {
    match action {
        None => format!(
            "This starts removing account {account} (reason: {reason:?}): it signs a new admin action with your ssh_key; once enough admins sign it, `--action ID` removes the seed, and {account} releases no codes from then on."
        ),
        Some(id) => format!(
            "This removes account {account} now (admin action {id}, reason: {reason:?}): it releases no codes from then on, and the vault keeps its seed sealed only for the policy's recovery window (`twokey account restore {account}` brings it back until then)."
        ),
    }
}

/// What `account enroll --replace` is about to do.
fn replace_story(account: &str, action: Option<&str>) -> String {
    match action {
        None => format!(
            "This starts replacing the seed of account {account}: it signs a new admin action with your ssh_key; once enough admins sign it, `--action ID` replaces the seed."
        ),
        Some(id) => format!(
            "This replaces the seed of account {account} now (admin action {id}) with the one from stdin: codes come from the new seed from then on, and the vault keeps the old seed sealed only for the policy's recovery window."
        ),
    }
}

/// Shows `story` and asks on the terminal before a destructive admin step;
/// `yes` (`--yes`) skips the question. Without a terminal (stderr not one,
/// or no controlling terminal to read from) it refuses, a usage error, so
/// that a script never destroys by accident.
fn confirm(yes: bool, story: &str) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    let tty = std::io::stderr()
        .is_terminal()
        .then(|| std::fs::OpenOptions::new().read(true).open("/dev/tty").ok())
        .flatten();
    let Some(tty) = tty else {
        return Err(CliError::Usage(format!(
            "{story} There is no terminal to confirm on: pass --yes to go ahead."
        )));
    };
    eprint!("{story}\nContinue? Type yes: ");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(tty), &mut line)
        .map_err(|e| CliError::Input(format!("cannot read the answer from the terminal: {e}")))?;
    if line.trim().eq_ignore_ascii_case("yes") || line.trim().eq_ignore_ascii_case("y") {
        Ok(())
    } else {
        Err(CliError::Input(
            "not confirmed: nothing was done (answer yes to go ahead, or pass --yes)".into(),
        ))
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
        action_id: a.action.clone().unwrap_or_default(),
        min_seconds_left: a.min_seconds_left.unwrap_or(0),
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
                if a.disabled {
                    format!("{} (disabled)", a.account_id)
                } else {
                    a.account_id.clone()
                },
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
            min_seconds_left: None,
            action: None,
            yes: false,
        }
    }

    #[test]
    fn min_seconds_left_fills_the_field_with_either_kind_of_seed() {
        assert_eq!(
            enroll_request(&args(), "JBSWY3DPEHPK3PXP")
                .unwrap()
                .min_seconds_left,
            0,
            "unset means the vault's default"
        );
        let a = EnrollArgs {
            min_seconds_left: Some(20),
            ..args()
        };
        for seed in [
            "JBSWY3DPEHPK3PXP",
            "otpauth://totp/AWS:root?secret=JBSWY3DPEHPK3PXP&issuer=AWS",
        ] {
            assert_eq!(enroll_request(&a, seed).unwrap().min_seconds_left, 20);
        }
    }

    #[test]
    fn the_min_seconds_left_flag_parses() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from([
            "twokey",
            "account",
            "enroll",
            "aws-prod-root",
            "--min-seconds-left",
            "15",
        ])
        .unwrap();
        let crate::Command::Account(crate::account::AccountCommand::Enroll(e)) = cli.command else {
            panic!("not an enroll: {cli:?}");
        };
        assert_eq!(e.min_seconds_left, Some(15));
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
    fn each_action_says_the_command_that_carries_it_out() {
        let p = |action: AdminAction| AdminActionProposal {
            action_id: "id-1".into(),
            account_id: "acct".into(),
            action: action as i32,
            needed: 2,
            ..Default::default()
        };
        assert_eq!(
            carry_out_command(&p(AdminAction::Remove), None),
            "twokey account remove acct --reason REASON --action id-1"
        );
        assert_eq!(
            carry_out_command(&p(AdminAction::Remove), Some("gone for good")),
            "twokey account remove acct --reason \"gone for good\" --action id-1"
        );
        assert_eq!(
            carry_out_command(&p(AdminAction::EnrollReplace), None),
            "twokey account enroll acct --replace --action id-1 < SEED"
        );
        assert_eq!(
            carry_out_command(&p(AdminAction::Restore), None),
            "twokey account restore acct --action id-1"
        );
        assert_eq!(
            action_name(AdminAction::EnrollReplace as i32),
            "enroll replace"
        );
        let story = action_story("started", &p(AdminAction::Disable), None);
        assert!(
            story.contains("2 more admin(s) run `twokey account sign-action id-1`"),
            "{story}"
        );
        assert!(
            story.contains("twokey account disable acct --action id-1"),
            "{story}"
        );
    }

    #[test]
    fn an_action_id_on_enroll_needs_replace() {
        use clap::Parser;
        let parse = |args: &[&str]| crate::Cli::try_parse_from(args);
        assert!(parse(&["twokey", "account", "enroll", "a", "--action", "x"]).is_err());
        assert!(
            parse(&[
                "twokey",
                "account",
                "enroll",
                "a",
                "--replace",
                "--action",
                "x"
            ])
            .is_ok()
        );
    }

    #[test]
    fn uri_parameters_cannot_be_overridden_by_flags() {
        let mut a = args();
        a.digits = Some(8);
        let err = enroll_request(&a, "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP").unwrap_err();
        assert_eq!(err.exit_code(), crate::error::EXIT_USAGE);
    }
}
