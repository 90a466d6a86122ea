//! `twokey vault seal|reshare`: M admins seal a running `shamir` vault with
//! their statement files (`twokey vault sign-action seal`), and the share
//! holders re-share the running key K'-of-N' among new holders: one holder
//! starts a plan (`reshare start`), K current holders each check it
//! (`twokey vault status`) and submit their own decrypted share for it
//! (`reshare --plan ID --share FILE`); the last one receives the new
//! encrypted shares, which the vault also writes beside its descriptor.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use twokey_proto::vault::v1::{
    AdminConsent, ReshareRequest, ReshareResponse, SealProgress, SealRequest, ShareHolder,
    StartReshareRequest, seal_service_client::SealServiceClient,
};

use crate::{
    error::CliError,
    keys::{VaultAction, read_statements},
    output::Output,
    profile::Settings,
    vault::{VaultArgs, channel, human, read_share},
};

/// `vault seal`'s flags.
#[derive(Debug, Args)]
pub struct SealArgs {
    /// Where the vault is.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// The admins' statement files (`twokey vault sign-action seal`), at
    /// least M of them, one action id.
    #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
    pub consent: Vec<PathBuf>,
}

/// `vault reshare`: submit your share for a plan, or start one.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReshareArgs {
    /// Start a plan instead.
    #[command(subcommand)]
    pub start: Option<ReshareCommand>,
    /// Where the vault is.
    #[command(flatten)]
    pub vault: Option<VaultArgs>,
    /// The plan id `reshare start` printed (check the plan first with
    /// `twokey vault status`).
    #[arg(long, value_name = "ID", required = true)]
    pub plan: Option<String>,
    /// Your current encrypted share, `<name>.share.age`.
    #[arg(long, value_name = "FILE", required = true)]
    pub share: Option<PathBuf>,
    /// Your OpenSSH ssh-ed25519 private key file; with --ssh-agent, the key
    /// whose FILE.pub the agent holds [default: ~/.ssh/id_ed25519].
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Decrypt with the key derived through ssh-agent ($SSH_AUTH_SOCK), for
    /// a share encrypted to the recipient `holder-key` printed.
    #[arg(long)]
    pub ssh_agent: bool,
    /// With --ssh-agent: your holder name [default: NAME of NAME.share.age].
    #[arg(long, value_name = "NAME")]
    pub holder: Option<String>,
    /// Where to write the new shares when yours is the K-th (a new
    /// directory; the vault writes them beside its descriptor too).
    #[arg(long, value_name = "DIR", default_value = "new-shares")]
    pub out: PathBuf,
}

/// `vault reshare start`.
#[derive(Debug, Subcommand)]
pub enum ReshareCommand {
    /// Start re-sharing the running key among new holders (a current
    /// holder only): nothing changes until K current holders submitted
    /// their shares for the plan.
    Start(ReshareStartArgs),
}

/// `vault reshare start`'s flags.
#[derive(Debug, Args)]
pub struct ReshareStartArgs {
    /// Where the vault is.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// K': the shares the new split needs.
    #[arg(long, value_name = "K")]
    pub threshold: u32,
    /// A new holder, NAME=SPIFFE_ID=FILE, FILE holding their ssh-ed25519
    /// public key or the age1… recipient `holder-key` printed; once per
    /// holder.
    #[arg(long = "holder", value_name = "NAME=SPIFFE_ID=FILE", required = true)]
    pub holders: Vec<String>,
}

/// Runs `vault seal`.
pub async fn seal(args: SealArgs, settings: Settings, out: Output) -> Result<(), CliError> {
    let statements = read_statements(&args.consent, VaultAction::Seal)?;
    let (channel, target) = channel(&settings, &args.vault)?;
    let answer = target.answer(
        SealServiceClient::new(channel)
            .seal(SealRequest {
                consent: Some(AdminConsent { statements }),
            })
            .await,
    )?;
    let progress = answer.progress.clone().unwrap_or_default();
    out.answer(&answer, || {
        format!(
            "sealed by {}: the vault holds no key and serves no code\n{}\nholders unseal it with `twokey vault unseal --share FILE`",
            answer.admins.join(", "),
            human(&progress)
        )
    })
}

/// Runs `vault reshare` and `vault reshare start`.
pub async fn reshare(args: ReshareArgs, settings: Settings, out: Output) -> Result<(), CliError> {
    if let Some(ReshareCommand::Start(start)) = args.start {
        return start_reshare(start, settings, out).await;
    }
    let missing = |flag: &str| CliError::Usage(format!("vault reshare needs {flag}"));
    let vault = args.vault.ok_or_else(|| missing("--vault URL"))?;
    let plan = args.plan.ok_or_else(|| missing("--plan ID"))?;
    let share_file = args.share.ok_or_else(|| missing("--share FILE"))?;
    if args.out.exists() {
        return Err(CliError::Usage(format!(
            "{} exists: name a new directory for the new shares with --out DIR",
            args.out.display()
        )));
    }
    let share = read_share(&share_file, args.identity, args.ssh_agent, args.holder)?;
    let (channel, target) = channel(&settings, &vault)?;
    let answer = target.answer(
        SealServiceClient::new(channel)
            .reshare(ReshareRequest {
                plan_id: plan,
                share: share.to_vec(),
            })
            .await,
    )?;
    let written = if answer.seal_id.is_empty() {
        Vec::new()
    } else {
        write_new_shares(&args.out, &answer)?
    };
    let progress = answer.progress.clone().unwrap_or_default();
    out.answer(&answer, || {
        if written.is_empty() {
            human(&progress)
        } else {
            format!(
                "reshared: the seal is now {} ({} of {} holders); the old shares no longer open this vault\nnew shares, each for its holder only:\n{}",
                answer.seal_id,
                progress.threshold,
                progress.holders,
                written
                    .iter()
                    .map(|p| format!("  {}", p.display()))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        }
    })
}

async fn start_reshare(
    args: ReshareStartArgs,
    settings: Settings,
    out: Output,
) -> Result<(), CliError> {
    let holders = args
        .holders
        .iter()
        .map(|h| holder(h))
        .collect::<Result<Vec<_>, _>>()?;
    let (channel, target) = channel(&settings, &args.vault)?;
    let answer = target.answer(
        SealServiceClient::new(channel)
            .start_reshare(StartReshareRequest {
                threshold: args.threshold,
                holders,
            })
            .await,
    )?;
    let progress = answer.progress.clone().unwrap_or_default();
    out.answer(&answer, || {
        let plan = progress
            .reshare
            .as_ref()
            .map(|r| r.plan_id.clone())
            .unwrap_or_default();
        format!(
            "{}\nnext: {} current holders check the plan with `twokey vault status` and run `twokey vault reshare --plan {plan} --share FILE`",
            human(&progress),
            progress.threshold,
        )
    })
}

/// A new holder from `NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY`; the vault
/// checks the name, the ID and the key again.
pub fn holder(text: &str) -> Result<ShareHolder, CliError> {
    let mut parts = text.splitn(3, '=');
    let (Some(name), Some(spiffe_id), Some(path)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(CliError::Usage(format!(
            "--holder {text:?}: write NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY"
        )));
    };
    let key = std::fs::read_to_string(path).map_err(|source| CliError::Io {
        action: "read",
        path: path.into(),
        source,
    })?;
    let key = key.trim();
    if !key.starts_with("ssh-ed25519 ") && !key.starts_with("age1") {
        return Err(CliError::Input(format!(
            "--holder {name}: {path} is neither an ssh-ed25519 public key (ssh-keygen -t ed25519 makes one) nor the age1… recipient `twokey vault holder-key` prints"
        )));
    }
    Ok(ShareHolder {
        name: name.into(),
        spiffe_id: spiffe_id.into(),
        public_key: key.into(),
    })
}

/// Writes the new encrypted shares into the new directory `dir`.
pub fn write_new_shares(dir: &Path, answer: &ReshareResponse) -> Result<Vec<PathBuf>, CliError> {
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| CliError::Io {
            action,
            path,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let mut written = Vec::new();
    for share in &answer.shares {
        let name = &share.holder;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            || name.starts_with('.')
        {
            return Err(CliError::Input(format!(
                "the vault sent a share for {name:?}, not a holder name"
            )));
        }
        let path = dir.join(format!("{name}.share.age"));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &share.encrypted))
            .map_err(io("write", &path))?;
        written.push(path);
    }
    Ok(written)
}

/// The reshare plan in `p`, for `twokey vault status`.
pub fn human_reshare(p: &SealProgress) -> Option<String> {
    let r = p.reshare.as_ref()?;
    Some(format!(
        "reshare {} started by {}: {} of {} new holders ({}); current shares: {}",
        r.plan_id,
        r.started_by,
        r.threshold,
        r.holders.len(),
        r.holders
            .iter()
            .map(|h| format!("{} {}", h.name, h.spiffe_id))
            .collect::<Vec<_>>()
            .join(", "),
        received(&r.received_from, p.threshold),
    ))
}

/// "N of K shares received, from A, B": what a vault has of the shares it
/// needs, for `twokey vault status` and the reshare plan.
pub(crate) fn received(from: &[String], threshold: u32) -> String {
    format!(
        "{} of {threshold} shares received{}",
        from.len(),
        if from.is_empty() {
            String::new()
        } else {
            format!(", from {}", from.join(", "))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use twokey_proto::vault::v1::{NewShare, ReshareProgress};

    #[test]
    fn a_holder_flag_reads_its_key_and_says_how_to_write_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = holder("alice").unwrap_err();
        assert!(
            err.to_string()
                .contains("NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY"),
            "{err}"
        );
        let rsa = dir.path().join("rsa.pub");
        std::fs::write(&rsa, "ssh-rsa AAAA x\n").unwrap();
        let err = holder(&format!("alice=spiffe://t/user/alice={}", rsa.display())).unwrap_err();
        assert!(
            err.to_string()
                .contains("is neither an ssh-ed25519 public key"),
            "{err}"
        );
        let ed = dir.path().join("ed.pub");
        std::fs::write(&ed, "ssh-ed25519 AAAAC3Nz alice@host\n").unwrap();
        let h = holder(&format!("alice=spiffe://t/user/alice={}", ed.display())).unwrap();
        assert_eq!(
            (h.name.as_str(), h.spiffe_id.as_str(), h.public_key.as_str()),
            (
                "alice",
                "spiffe://t/user/alice",
                "ssh-ed25519 AAAAC3Nz alice@host"
            )
        );
    }

    #[test]
    fn new_shares_go_to_new_files_named_for_their_holders_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new");
        let answer = |holder: &str| ReshareResponse {
            seal_id: "ab".into(),
            shares: vec![NewShare {
                holder: holder.into(),
                encrypted: b"age".to_vec(),
            }],
            ..Default::default()
        };
        let written = write_new_shares(&out, &answer("alice")).unwrap();
        assert_eq!(written, [out.join("alice.share.age")]);
        assert_eq!(std::fs::read(&written[0]).unwrap(), b"age");
        // Never overwritten.
        let err = write_new_shares(&out, &answer("alice")).unwrap_err();
        assert!(err.to_string().starts_with("cannot write"), "{err}");
        // A name that would leave the directory is refused.
        for bad in ["../x", "", ".hidden", "a/b"] {
            assert!(write_new_shares(&out, &answer(bad)).is_err(), "{bad:?}");
        }
    }

    fn parse(args: &[&str]) -> Result<crate::Cli, clap::Error> {
        use clap::Parser;
        crate::Cli::try_parse_from(["twokey", "vault"].iter().chain(args))
    }

    fn reshare_args(cli: crate::Cli) -> ReshareArgs {
        match cli.command {
            crate::Command::Vault(crate::vault::VaultCommand::Reshare(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reshare_submits_a_share_for_a_plan_or_starts_one() {
        let a = reshare_args(
            parse(&[
                "reshare",
                "--vault",
                "https://v",
                "--plan",
                "ab12",
                "--share",
                "me.share.age",
            ])
            .unwrap(),
        );
        assert!(a.start.is_none());
        assert_eq!(a.plan.as_deref(), Some("ab12"));
        assert_eq!(a.vault.unwrap().vault, "https://v");
        let a = reshare_args(
            parse(&[
                "reshare",
                "start",
                "--vault",
                "https://v",
                "--threshold",
                "3",
                "--holder",
                "a=b=c",
                "--holder",
                "d=e=f",
            ])
            .unwrap(),
        );
        match a.start {
            Some(ReshareCommand::Start(s)) => {
                assert_eq!((s.threshold, s.holders.len()), (3, 2));
            }
            None => panic!("no start"),
        }
        // A submission needs its plan and share; a start needs holders.
        for args in [
            &["reshare", "--vault", "https://v", "--share", "f"][..],
            &["reshare", "--vault", "https://v", "--plan", "p"],
            &[
                "reshare",
                "start",
                "--vault",
                "https://v",
                "--threshold",
                "2",
            ],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn a_reshare_in_progress_reads_with_its_plan_and_who_submitted() {
        let p = SealProgress {
            sealed: false,
            threshold: 2,
            holders: 3,
            reshare: Some(ReshareProgress {
                plan_id: "0123abcd".into(),
                threshold: 3,
                holders: vec![ShareHolder {
                    name: "olivia".into(),
                    spiffe_id: "spiffe://t/user/olivia".into(),
                    public_key: String::new(),
                }],
                started_by: "spiffe://t/user/alice".into(),
                received_from: vec!["alice".into()],
            }),
            ..Default::default()
        };
        assert_eq!(
            human_reshare(&p).unwrap(),
            "reshare 0123abcd started by spiffe://t/user/alice: 3 of 1 new holders (olivia spiffe://t/user/olivia); current shares: 1 of 2 shares received, from alice"
        );
        assert_eq!(human_reshare(&SealProgress::default()), None);
    }
}
