//! `twokey vault sign-action|rotate-key|key-status`: vault-wide admin
//! actions, which no account's broker workflow collects. Each admin signs
//! their own statement into a file (`sign-action`, the first one choosing
//! the action id, the others signing the same id); anyone then hands the
//! files to the vault (`rotate-key --consent FILES...`), which checks M
//! admins of its policy itself. `key-status` shows the keyring's
//! generations and a rotation's progress, and `--wait` polls until it ends.

use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use twokey_consent::{AdminAction, Binding, admin_binding, decode_statement, new_id};
use twokey_proto::{
    consent::v1::SignedStatement,
    vault::v1::{
        AdminConsent, KeyRotation, KeyStatusRequest, KeyringState, MasterReplaced,
        RotateKeyRequest, key_service_client::KeyServiceClient,
    },
};

use crate::{
    error::CliError,
    output::Output,
    profile::Settings,
    sign::{Signing, SshSigner},
    vault::{VaultArgs, channel},
};

/// A vault-wide action M admins sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VaultAction {
    /// Rotate the key that seals the seeds (`twokey vault rotate-key`).
    RotateKey,
    /// Seal the running vault (`twokey vault seal`).
    Seal,
}

impl VaultAction {
    fn admin_action(self) -> AdminAction {
        match self {
            Self::RotateKey => AdminAction::RotateKey,
            Self::Seal => AdminAction::SealVault,
        }
    }

    fn command(self) -> &'static str {
        match self {
            Self::RotateKey => "rotate-key",
            Self::Seal => "seal",
        }
    }
}

/// `vault sign-action`'s flags.
#[derive(Debug, Args)]
pub struct SignActionArgs {
    /// The action: rotate-key or seal.
    #[arg(value_enum)]
    pub action: VaultAction,
    /// The action id the first admin's signing printed; without it a new
    /// action is started.
    #[arg(long, value_name = "ID")]
    pub action_id: Option<String>,
    /// Where to write your signed statement (JSON); hand it to whoever runs
    /// the action.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `vault rotate-key`'s flags.
#[derive(Debug, Args)]
pub struct RotateKeyArgs {
    /// Where the vault is.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// The admins' statement files (`twokey vault sign-action rotate-key`),
    /// at least M of them, one action id.
    #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
    pub consent: Vec<PathBuf>,
}

/// `vault key-status`'s flags.
#[derive(Debug, Args)]
pub struct KeyStatusArgs {
    /// Where the vault is.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Poll until no rotation is in progress, printing its progress.
    #[arg(long)]
    pub wait: bool,
    /// How often `--wait` asks, e.g. 2s.
    #[arg(long, default_value = "2s", value_parser = crate::profile::parse_duration)]
    pub interval: Duration,
}

/// Signs this admin's statement for a vault-wide action into a file.
pub async fn sign_action(
    args: SignActionArgs,
    settings: Settings,
    out: Output,
) -> Result<(), CliError> {
    let signer = SshSigner::from_settings(&settings)?;
    let (mut broker, target) = settings.broker()?;
    let signing = Signing::ask(&mut broker, &target).await?;
    if !signing.required() {
        return Err(CliError::Input(
            "vault-wide admin actions need a signed policy in force, and none is: admins apply one with `twokey policy propose FILE`, `twokey policy sign VERSION` and `twokey policy apply VERSION`".into(),
        ));
    }
    let action_id = args.action_id.clone().unwrap_or_else(new_id);
    let statement = signing.sign(
        &signer,
        admin_binding("", args.action.admin_action(), &action_id),
    )?;
    write_statement(&args.out, &statement)?;
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Signed<'a> {
        action: &'static str,
        action_id: &'a str,
        file: String,
    }
    let answer = Signed {
        action: args.action.command(),
        action_id: &action_id,
        file: args.out.display().to_string(),
    };
    out.answer(&answer, || {
        format!(
            "signed {} of the vault, action {action_id}, into {}\nother admins: twokey vault sign-action {} --action-id {action_id} --out NAME.json\nthen, with M statements: twokey vault {} --vault URL --consent FILE...",
            args.action.command(),
            args.out.display(),
            args.action.command(),
            args.action.command(),
        )
    })
}

/// Writes a signed statement as its proto3 JSON.
pub fn write_statement(
    path: &std::path::Path,
    statement: &SignedStatement,
) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(statement)
        .map_err(|e| CliError::Input(format!("cannot encode the statement: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|source| CliError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

/// Reads the statement files for `action`: each must be an admin's
/// statement for that vault-wide action, all with one action id.
pub fn read_statements(
    paths: &[PathBuf],
    action: VaultAction,
) -> Result<Vec<SignedStatement>, CliError> {
    let mut first_id: Option<(String, &PathBuf)> = None;
    let mut all = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        let not_one = |why: String| {
            CliError::Input(format!(
                "{} is not a statement for `twokey vault {}` ({why}); each admin writes theirs with `twokey vault sign-action {} --out FILE`",
                path.display(),
                action.command(),
                action.command()
            ))
        };
        let signed: SignedStatement =
            serde_json::from_str(&text).map_err(|e| not_one(e.to_string()))?;
        let statement = decode_statement(&signed.statement).map_err(not_one)?;
        let Some(Binding::AdminAction(b)) = statement.binding else {
            return Err(not_one("it binds no admin action".into()));
        };
        if b.action != action.admin_action() as i32 || !b.account_id.is_empty() {
            return Err(not_one(format!(
                "it consents to {}",
                twokey_consent::admin::describe(
                    AdminAction::try_from(b.action).unwrap_or_default(),
                    &b.account_id
                )
            )));
        }
        match &first_id {
            None => first_id = Some((b.action_id.clone(), path)),
            Some((id, first)) if *id != b.action_id => {
                return Err(CliError::Input(format!(
                    "{} is for action {}, {} for action {id}: every admin signs the same action (--action-id)",
                    path.display(),
                    b.action_id,
                    first.display()
                )));
            }
            Some(_) => {}
        }
        all.push(signed);
    }
    Ok(all)
}

/// Hands the admins' statements to the vault.
pub async fn rotate_key(
    args: RotateKeyArgs,
    settings: Settings,
    out: Output,
) -> Result<(), CliError> {
    let statements = read_statements(&args.consent, VaultAction::RotateKey)?;
    let (channel, target) = channel(&settings, &args.vault)?;
    let answer = target.answer(
        KeyServiceClient::new(channel)
            .rotate_key(RotateKeyRequest {
                consent: Some(AdminConsent { statements }),
            })
            .await,
    )?;
    let state = answer.state.clone().unwrap_or_default();
    out.answer(&answer, || {
        let head = if answer.started {
            "key rotation started"
        } else {
            "a key rotation was started before"
        };
        let mut text = format!(
            "{head}; `twokey vault key-status --wait` follows it\n{}",
            human(&state)
        );
        if let Some(m) = &answer.master_replaced {
            text.push_str(&replaced(m));
        }
        text
    })
}

/// Where a replaced master key's new seal material is.
fn replaced(m: &MasterReplaced) -> String {
    let mut text = format!("\nthe master key was replaced: generation {}", m.generation);
    if !m.seal_id.is_empty() {
        text.push_str(&format!(", new seal id {}", m.seal_id));
    }
    let shares: Vec<&String> = m
        .files
        .iter()
        .filter(|f| f.ends_with(".share.age"))
        .collect();
    if shares.is_empty() {
        for f in &m.files {
            text.push_str(&format!("\n  written: {f}"));
        }
    } else {
        text.push_str(
            "\nshare holders: your old share is foreign from now on; fetch your new one from the vault host:",
        );
        for f in shares {
            text.push_str(&format!("\n  {f}"));
        }
    }
    text
}

/// Shows the keyring; with `--wait`, until no rotation is in progress.
pub async fn key_status(
    args: KeyStatusArgs,
    settings: Settings,
    out: Output,
) -> Result<(), CliError> {
    let (channel, target) = channel(&settings, &args.vault)?;
    let mut client = KeyServiceClient::new(channel);
    loop {
        let answer = target.answer(client.key_status(KeyStatusRequest {}).await)?;
        let state = answer.state.clone().unwrap_or_default();
        if !args.wait || state.rotation.is_none() {
            return out.answer(&answer, || human(&state));
        }
        if !out.json {
            eprintln!(
                "{}",
                progress(state.rotation.as_ref().unwrap_or(&KeyRotation::default()))
            );
        }
        tokio::time::sleep(args.interval).await;
    }
}

fn progress(r: &KeyRotation) -> String {
    let total = r.resealed + r.remaining;
    format!(
        "rotating to generation {}: {} re-sealed, {} to go ({}{})",
        r.generation,
        r.resealed,
        r.remaining,
        r.phase,
        (r.resealed.min(total) * 100)
            .checked_div(total)
            .map(|p| format!(", {p}%"))
            .unwrap_or_default()
    )
}

/// The keyring for people.
pub fn human(s: &KeyringState) -> String {
    let mut lines = vec![format!("current generation: {}", s.current_generation)];
    for g in &s.generations {
        let note = if g.generation == 0 {
            " (the master key itself)"
        } else {
            ""
        };
        lines.push(format!(
            "  generation {}{note}: {} seed{}",
            g.generation,
            g.seeds,
            if g.seeds == 1 { "" } else { "s" }
        ));
    }
    match &s.rotation {
        Some(r) => lines.push(progress(r)),
        None => lines.push("no rotation in progress".into()),
    }
    if let Some(m) = &s.master {
        let mut line = format!("master key: generation {}", m.generation);
        if !m.seal_mode.is_empty() {
            line.push_str(&format!(", {} seal", m.seal_mode));
        }
        if !m.seal_id.is_empty() {
            line.push_str(&format!(" {}", m.seal_id));
        }
        if m.pending_generation != 0 {
            line.push_str(&format!(
                "; replacement by generation {} pending (finished at the next start or `twokey vault rotate-key`)",
                m.pending_generation
            ));
        }
        lines.push(line);
    }
    if let Some(l) = &s.last_rotation {
        lines.push(format!(
            "last rotation: to generation {}, action {}, by {}, {} re-sealed, retired {}",
            l.generation,
            l.action_id,
            l.admins.join(", "),
            l.resealed,
            if l.retired.is_empty() {
                "none".to_owned()
            } else {
                l.retired
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use twokey_consent::new_statement;
    use twokey_proto::vault::v1::{KeyGeneration, MasterKeyState};

    use super::*;

    fn statement(action: AdminAction, account: &str, id: &str) -> SignedStatement {
        let s = new_statement(
            1,
            "spiffe://t/user/adam",
            std::time::SystemTime::now(),
            admin_binding(account, action, id),
        );
        SignedStatement {
            statement: prost::Message::encode_to_vec(&s),
            signature: b"-----BEGIN SSH SIGNATURE-----".to_vec(),
        }
    }

    #[test]
    fn statement_files_round_trip_and_wrong_ones_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, s: &SignedStatement| {
            let p = dir.path().join(name);
            write_statement(&p, s).unwrap();
            p
        };
        let adam = statement(AdminAction::RotateKey, "", "act-1");
        let anna = statement(AdminAction::RotateKey, "", "act-1");
        let read = read_statements(
            &[file("adam.json", &adam), file("anna.json", &anna)],
            VaultAction::RotateKey,
        )
        .unwrap();
        assert_eq!(read, [adam.clone(), anna]);

        let other_id = file("x.json", &statement(AdminAction::RotateKey, "", "act-2"));
        let err = read_statements(
            &[file("adam.json", &adam), other_id],
            VaultAction::RotateKey,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("every admin signs the same action (--action-id)"),
            "{err}"
        );

        let seal = file("seal.json", &statement(AdminAction::SealVault, "", "act-1"));
        let err = read_statements(&[seal], VaultAction::RotateKey)
            .unwrap_err()
            .to_string();
        assert!(err.contains("it consents to seal of the vault"), "{err}");
        assert!(
            err.contains("twokey vault sign-action rotate-key --out FILE"),
            "{err}"
        );

        let account = file(
            "acct.json",
            &statement(AdminAction::RotateKey, "aws", "act-1"),
        );
        let err = read_statements(&[account], VaultAction::RotateKey)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rotate-key of account aws"), "{err}");

        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "not json").unwrap();
        let err = read_statements(&[garbage], VaultAction::RotateKey)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not a statement for `twokey vault rotate-key`"),
            "{err}"
        );
    }

    #[test]
    fn the_keyring_reads_with_its_progress() {
        let state = KeyringState {
            current_generation: 3,
            generations: vec![
                KeyGeneration {
                    generation: 2,
                    seeds: 1,
                },
                KeyGeneration {
                    generation: 3,
                    seeds: 3,
                },
            ],
            rotation: Some(KeyRotation {
                generation: 3,
                resealed: 3,
                remaining: 1,
                phase: "resealing accounts".into(),
                ..Default::default()
            }),
            last_rotation: None,
            master: Some(MasterKeyState {
                generation: 2,
                pending_generation: 0,
                seal_mode: "shamir".into(),
                seal_id: "ab12".into(),
                replaced_at: None,
            }),
        };
        assert_eq!(
            human(&state),
            "current generation: 3\n  generation 2: 1 seed\n  generation 3: 3 seeds\nrotating to generation 3: 3 re-sealed, 1 to go (resealing accounts, 75%)\nmaster key: generation 2, shamir seal ab12"
        );
        let text = replaced(&MasterReplaced {
            generation: 2,
            seal_id: "ab12".into(),
            files: vec![
                "/seal/ab12/alice.share.age".into(),
                "/seal/ab12/bob.share.age".into(),
            ],
        });
        assert_eq!(
            text,
            "\nthe master key was replaced: generation 2, new seal id ab12\nshare holders: your old share is foreign from now on; fetch your new one from the vault host:\n  /seal/ab12/alice.share.age\n  /seal/ab12/bob.share.age"
        );
    }
}
