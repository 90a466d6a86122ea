//! `twokey pki init`: a development CA and certificates for the vault, the
//! broker, the audit service and each user, plus a profile file for the
//! users. Keys are written 0600. Production brings its own CA.

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand, ValueEnum};
use twokey_runtime::identity::SpiffeId;
use twokey_testkit::pki::{DevCa, LeafSpec};

use crate::{
    error::CliError,
    output::{Output, table},
    profile::{Config, ConnectionArgs, Profile, normalize_address},
};

/// The default trust domain of development certificates.
pub const DEFAULT_TRUST_DOMAIN: &str = "twokey.local";
/// The broker address written into profiles by default.
pub const DEFAULT_BROKER: &str = "https://127.0.0.1:7400";
/// The audit address written into auditors' profiles by default.
pub const DEFAULT_AUDIT: &str = "https://127.0.0.1:7403";
/// The profile file `pki init` writes next to the certificates.
pub const PROFILE_FILE: &str = "twokey.toml";
/// The services that get a certificate.
pub const SERVICES: [&str; 3] = ["vault", "broker", "audit"];

/// PKI commands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a development CA and certificates for vault, broker, audit and
    /// each --user, and a profile file (twokey.toml) with one profile per user.
    Init(InitArgs),
}

/// What a user does; decides the profile written for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserRole {
    /// Files requests.
    Requester,
    /// Approves requests.
    Approver,
    /// Verifies PINs and releases codes.
    Operator,
    /// Enrolls and removes accounts.
    Admin,
    /// Reads and verifies the audit log.
    Auditor,
    /// A service (a BPM) filing requests on requesters' behalf: gets a
    /// `svc/NAME` identity instead of `user/NAME`.
    Intake,
}

/// A `NAME:ROLE` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// The name in the SPIFFE ID and the profile.
    pub name: String,
    /// The role.
    pub role: UserRole,
}

/// Parses `NAME:ROLE`.
pub fn parse_user(text: &str) -> Result<UserSpec, String> {
    let (name, role) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not NAME:ROLE (e.g. alice:requester)"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "user name {name:?} may hold only letters, digits, '.', '-' and '_'"
        ));
    }
    if SERVICES.contains(&name) || name == "ca" {
        return Err(format!(
            "user name {name:?} is taken by a service certificate"
        ));
    }
    let role = UserRole::from_str(role, true).map_err(|_| {
        format!(
            "unknown role {role:?}: use requester, approver, operator, admin, auditor or intake"
        )
    })?;
    Ok(UserSpec {
        name: name.to_owned(),
        role,
    })
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

/// One certificate written.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    /// File stem: `vault`, `alice`.
    pub name: String,
    /// `service`, or the user's role.
    pub role: String,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// Certificate path.
    pub cert: PathBuf,
    /// Key path.
    pub key: PathBuf,
}

/// What `pki init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    /// The directory.
    pub dir: PathBuf,
    /// The trust domain.
    pub trust_domain: String,
    /// The CA certificate.
    pub ca: PathBuf,
    /// Every leaf certificate.
    pub identities: Vec<Issued>,
    /// The profile file, if users were given.
    pub config: Option<PathBuf>,
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
    let td = &args.trust_domain;
    SpiffeId::parse(&format!("spiffe://{td}/svc/vault"))
        .map_err(|e| CliError::Usage(format!("--trust-domain {td:?}: {e}")))?;
    let mut seen = std::collections::BTreeSet::new();
    for u in &args.users {
        if !seen.insert(u.name.as_str()) {
            return Err(CliError::Usage(format!(
                "user {:?} is given twice; give each --user once",
                u.name
            )));
        }
    }
    prepare_dir(&args.dir, args.force)?;
    let dir = &args.dir;

    let mut names: Vec<String> = vec!["ca".into()];
    names.extend(SERVICES.iter().map(|s| (*s).to_owned()));
    names.extend(args.users.iter().map(|u| u.name.clone()));
    if args.force {
        for name in &names {
            for ext in ["crt", "key"] {
                let path = dir.join(format!("{name}.{ext}"));
                if path.exists() {
                    std::fs::remove_file(&path).map_err(CliError::io("replace", &path))?;
                }
            }
        }
    }

    let ca = DevCa::new(td)?;
    ca.write(dir)?;
    let mut identities = Vec::new();
    for service in SERVICES {
        let id = format!("spiffe://{td}/svc/{service}");
        ca.issue_service(td, service)?.write(dir, service)?;
        identities.push(issued(dir, service, "service", id));
    }
    for u in &args.users {
        let id = match u.role {
            UserRole::Intake => format!("spiffe://{td}/svc/{}", u.name),
            _ => format!("spiffe://{td}/user/{}", u.name),
        };
        ca.issue(&LeafSpec::new(&id))?.write(dir, &u.name)?;
        let role = serde_json::to_value(u.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        identities.push(issued(dir, &u.name, &role, id));
    }

    let config = if args.users.is_empty() {
        None
    } else {
        let mut config = Config::default();
        for u in &args.users {
            config.profiles.insert(
                u.name.clone(),
                Profile {
                    broker: Some(broker.to_owned()),
                    audit: (u.role == UserRole::Auditor).then(|| audit.to_owned()),
                    cert: Some(format!("{}.crt", u.name).into()),
                    key: Some(format!("{}.key", u.name).into()),
                    ca: Some("ca.crt".into()),
                    ..Default::default()
                },
            );
        }
        let path = dir.join(PROFILE_FILE);
        if path.exists() {
            std::fs::remove_file(&path).map_err(CliError::io("replace", &path))?;
        }
        config.write(&path)?;
        Some(path)
    };

    Ok(InitReport {
        dir: dir.clone(),
        trust_domain: td.clone(),
        ca: dir.join("ca.crt"),
        identities,
        config,
    })
}

fn issued(dir: &Path, name: &str, role: &str, spiffe_id: String) -> Issued {
    Issued {
        name: name.to_owned(),
        role: role.to_owned(),
        spiffe_id,
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    }
}

fn prepare_dir(dir: &Path, force: bool) -> Result<(), CliError> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(CliError::Usage(format!(
                "{} exists and is not a directory; give --dir a directory",
                dir.display()
            )));
        }
        let mut entries = std::fs::read_dir(dir).map_err(CliError::io("read", dir))?;
        if entries.next().is_some() && !force {
            return Err(CliError::Input(format!(
                "{} is not empty; pick an empty directory, or pass --force to replace the twokey files in it",
                dir.display()
            )));
        }
        Ok(())
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(CliError::io("create", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(CliError::io("create", dir))
    }
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
                format!("{}.crt / {}.key", i.name, i.name),
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
    s.push_str("keys are mode 0600; keep ca.key away from the services in production");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
