//! `twokey pki init`: a development CA and certificates for the vault, the
//! broker, the audit service and each user, an OpenSSH signing key for each
//! user (`NAME.ssh`), plus a profile file for the users (the work is
//! `twokey_testkit::pki::init`). Keys are written 0600. Production brings
//! its own CA, and people their own SSH keys.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use twokey_testkit::pki::{
    self, Addresses, DEFAULT_TRUST_DOMAIN, InitReport, UserSpec, parse_user,
};

use crate::{
    error::CliError,
    output::{Output, table},
    profile::{ConnectionArgs, normalize_address},
};

/// The broker address written into profiles by default.
pub const DEFAULT_BROKER: &str = "https://127.0.0.1:7400";
/// The audit address written into auditors' profiles by default.
pub const DEFAULT_AUDIT: &str = "https://127.0.0.1:7403";

/// PKI commands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a development CA and certificates for vault, broker, audit and
    /// each --user, an OpenSSH signing key per user (NAME.ssh, NAME.ssh.pub),
    /// and a profile file (twokey.toml) with one profile per user.
    Init(InitArgs),
}

/// `pki init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing, mode 0700).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// SPIFFE trust domain of every certificate.
    #[arg(long, value_name = "DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// A user certificate, as NAME:ROLE (requester, approver, operator, admin,
    /// auditor, intake); repeat for more.
    #[arg(long = "user", value_name = "NAME:ROLE", value_parser = parse_user)]
    pub users: Vec<UserSpec>,
    /// Write into a non-empty directory, replacing files of the same names.
    #[arg(long)]
    pub force: bool,
}

/// Runs a PKI command.
/// `--broker`/`--audit`, when given, are the addresses written into profiles.
pub fn run(cmd: PkiCommand, conn: &ConnectionArgs, out: Output) -> Result<(), CliError> {
    let PkiCommand::Init(args) = cmd;
    let broker = conn
        .broker
        .as_deref()
        .map_or_else(|| DEFAULT_BROKER.to_owned(), normalize_address);
    let audit = conn
        .audit
        .as_deref()
        .map_or_else(|| DEFAULT_AUDIT.to_owned(), normalize_address);
    let report = init(&args, &broker, &audit)?;
    out.answer(&report, || human(&report))
}

/// Writes the CA, the service certificates, the user certificates and the
/// profile file. `broker`/`audit` are the addresses written into profiles.
pub fn init(args: &InitArgs, broker: &str, audit: &str) -> Result<InitReport, CliError> {
    Ok(pki::init(
        &args.dir,
        &args.trust_domain,
        &args.users,
        args.force,
        Addresses { broker, audit },
    )?)
}

fn human(r: &InitReport) -> String {
    let rows: Vec<Vec<String>> = r
        .identities
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.role.clone(),
                i.spiffe_id.clone(),
                match &i.ssh_key {
                    Some(_) => format!("{n}.crt / {n}.key / {n}.ssh", n = i.name),
                    None => format!("{n}.crt / {n}.key", n = i.name),
                },
            ]
        })
        .collect();
    let mut s = format!(
        "wrote a development CA for trust domain {} in {} (ca.crt, ca.key)\n\n{}\n",
        r.trust_domain,
        r.dir.display(),
        table(&["NAME", "ROLE", "SPIFFE ID", "FILES"], &rows)
    );
    if let Some(config) = &r.config {
        s.push_str(&format!(
            "\nprofiles for each user in {}; use them with\n  TWOKEY_CONFIG={} twokey --profile NAME whoami\n",
            config.display(),
            config.display()
        ));
    }
    if r.identities.iter().any(|i| i.ssh_key.is_some()) {
        s.push_str(
            "\neach user signs their requests, approvals, releases and admin actions with NAME.ssh \
             (ssh_key in the profile; with SSH_AUTH_SOCK set, through the agent); admins list \
             NAME.ssh.pub in the signed policy\n",
        );
    }
    s.push_str("keys are mode 0600; keep ca.key away from the services in production");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use twokey_testkit::pki::UserRole;

    #[test]
    fn users_parse_as_name_and_role() {
        assert_eq!(
            parse_user("alice:requester").unwrap(),
            UserSpec {
                name: "alice".into(),
                role: UserRole::Requester
            }
        );
        assert!(parse_user("alice").is_err());
        assert!(parse_user("al ice:admin").is_err());
        assert!(
            parse_user("alice:boss")
                .unwrap_err()
                .contains("unknown role")
        );
        assert!(parse_user("vault:admin").is_err());
    }
}
