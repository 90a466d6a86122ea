//! `twokey vault unseal|status|holder-key`: a share holder decrypts their
//! share of a `shamir`-sealed vault locally — with their OpenSSH key file
//! (age), or with the key derived through ssh-agent (`holder`) — and
//! submits it to the vault over mTLS with their own certificate; anyone of
//! the trust domain can ask how far unsealing is.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use tonic::transport::Channel;
use twokey_proto::vault::v1::{
    SealProgress, SealStatusRequest, UnsealRequest, seal_service_client::SealServiceClient,
};
use zeroize::Zeroizing;

use crate::{
    error::{CliError, Target},
    output::Output,
    profile::{Settings, normalize_address},
};

/// The vault's seal: unseal it with your share, or see where it stands.
#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Decrypt your share (`<name>.share.age`) and submit it: with your
    /// ssh-ed25519 key file when the share was encrypted to that key, or,
    /// with `--ssh-agent`, with the key `holder-key` derived through the
    /// agent when it was encrypted to that `age1…` recipient.
    Unseal(UnsealArgs),
    /// Print your share recipient (`age1…`) for `twokey-vault init-key
    /// --holder NAME=SPIFFE_ID=FILE`: derived from your ssh-ed25519 key's
    /// signature of a fixed challenge, through ssh-agent (`--ssh-agent`) or
    /// the key file, so a key that lives only in the agent can decrypt the
    /// share. The signature never leaves this machine.
    HolderKey(HolderKeyArgs),
    /// Sealed or unsealed, K of N received, and by whom; a reshare in
    /// progress, its plan and whose shares are in.
    Status(VaultArgs),
    /// Seal the running vault with M admins' statement files (`twokey
    /// vault sign-action seal`): it drops its key and serves no code until
    /// K holders unseal it.
    Seal(crate::seal::SealArgs),
    /// Re-share the running key among new holders: `reshare start` (a
    /// current holder) names K' and the holders; then K current holders
    /// each submit their share for the plan with `reshare --plan ID --share
    /// FILE`.
    Reshare(crate::seal::ReshareArgs),
    /// Sign your statement for a vault-wide admin action (rotate-key,
    /// seal) into a file; the first admin starts the action, the others
    /// sign its id.
    SignAction(crate::keys::SignActionArgs),
    /// Rotate the key that seals the seeds, online, with M admins'
    /// statement files; the vault re-seals every seed and retires the old
    /// key generations.
    RotateKey(crate::keys::RotateKeyArgs),
    /// The key generations, seeds per generation, and a rotation's
    /// progress (`--wait`: until it ends).
    KeyStatus(crate::keys::KeyStatusArgs),
}

/// Where the vault is.
#[derive(Debug, Args)]
pub struct VaultArgs {
    /// The vault's address, e.g. https://127.0.0.1:7401.
    #[arg(long, env = "TWOKEY_VAULT", value_name = "URL")]
    pub vault: String,
    /// Name the vault's certificate must carry.
    #[arg(long, default_value = "vault", value_name = "NAME")]
    pub vault_server_name: String,
}

/// `vault unseal`'s flags.
#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// Where the vault is.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Your encrypted share, `<name>.share.age`.
    #[arg(long, value_name = "FILE")]
    pub share: PathBuf,
    /// Your OpenSSH ssh-ed25519 private key file (a passphrase is asked for
    /// when it has one); with --ssh-agent, the key whose FILE.pub the agent
    /// holds [default: ~/.ssh/id_ed25519].
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Decrypt with the key derived through ssh-agent ($SSH_AUTH_SOCK), for
    /// a share encrypted to the recipient `holder-key` printed.
    #[arg(long)]
    pub ssh_agent: bool,
    /// With --ssh-agent: your holder name [default: NAME of NAME.share.age].
    #[arg(long, value_name = "NAME")]
    pub holder: Option<String>,
}

/// `vault holder-key`'s flags.
#[derive(Debug, Args)]
pub struct HolderKeyArgs {
    /// Your holder name, the NAME of init-key's --holder NAME=SPIFFE_ID=FILE.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Sign through ssh-agent ($SSH_AUTH_SOCK) instead of with the key file.
    #[arg(long)]
    pub ssh_agent: bool,
    /// Your ssh-ed25519 key: the private key file, or with --ssh-agent the
    /// key whose FILE.pub the agent holds [default: ~/.ssh/id_ed25519].
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
}

/// Decrypts `share`: with the key file `identity`, or with `ssh_agent`
/// through the key `holder-key` derived for `holder` (default: the NAME of
/// NAME.share.age).
pub fn read_share(
    share: &std::path::Path,
    identity: Option<PathBuf>,
    ssh_agent: bool,
    holder: Option<String>,
) -> Result<Zeroizing<Vec<u8>>, CliError> {
    if !ssh_agent {
        return decrypt_share(share, &identity_path(identity)?);
    }
    let name = holder
        .or_else(|| crate::holder::name_of_share(share))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{} is not named NAME.share.age: pass your holder name with --holder NAME",
                share.display()
            ))
        })?;
    let signer = crate::holder::signer(&identity_path(identity)?, true)?;
    crate::holder::decrypt_share(share, &signer, &name)
}

/// Runs a `vault` command.
pub async fn run(cmd: VaultCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    match cmd {
        VaultCommand::Unseal(args) => {
            let share = read_share(&args.share, args.identity, args.ssh_agent, args.holder)?;
            let (mut client, target) = client(&settings, &args.vault)?;
            let progress = client
                .unseal(UnsealRequest {
                    share: share.to_vec(),
                })
                .await
                .map_err(|s| target.error(s))?
                .into_inner()
                .progress
                .unwrap_or_default();
            out.answer(&progress, || human(&progress))
        }
        VaultCommand::HolderKey(args) => {
            let signer = crate::holder::signer(&identity_path(args.identity)?, args.ssh_agent)?;
            let recipient = crate::holder::recipient(&signer, &args.name)?;
            out.answer(
                &serde_json::json!({ "name": args.name, "recipient": recipient }),
                || recipient.clone(),
            )
        }
        VaultCommand::Status(args) => {
            let (mut client, target) = client(&settings, &args)?;
            let progress = client
                .seal_status(SealStatusRequest {})
                .await
                .map_err(|s| target.error(s))?
                .into_inner()
                .progress
                .unwrap_or_default();
            out.answer(&progress, || human(&progress))
        }
        VaultCommand::Seal(args) => crate::seal::seal(args, settings, out).await,
        VaultCommand::Reshare(args) => crate::seal::reshare(args, settings, out).await,
        VaultCommand::SignAction(args) => crate::keys::sign_action(args, settings, out).await,
        VaultCommand::RotateKey(args) => crate::keys::rotate_key(args, settings, out).await,
        VaultCommand::KeyStatus(args) => crate::keys::key_status(args, settings, out).await,
    }
}

pub(crate) fn identity_path(given: Option<PathBuf>) -> Result<PathBuf, CliError> {
    given
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh/id_ed25519")))
        .ok_or_else(|| {
            CliError::Usage(
                "no --identity given and no $HOME to find ~/.ssh/id_ed25519: pass --identity FILE"
                    .into(),
            )
        })
}

/// Asks for a key's passphrase on the terminal.
#[derive(Clone)]
struct Prompt;

impl age::Callbacks for Prompt {
    fn display_message(&self, message: &str) {
        eprintln!("{message}");
    }
    fn confirm(&self, _: &str, _: &str, _: Option<&str>) -> Option<bool> {
        None
    }
    fn request_public_string(&self, _: &str) -> Option<String> {
        None
    }
    fn request_passphrase(&self, description: &str) -> Option<age::secrecy::SecretString> {
        rpassword::prompt_password(format!("{description}: "))
            .ok()
            .map(Into::into)
    }
}

/// The decrypted share in `share`, with the OpenSSH key in `identity`.
pub fn decrypt_share(
    share: &std::path::Path,
    identity: &std::path::Path,
) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let io = |action, path: &std::path::Path| {
        let path = path.to_owned();
        move |source| CliError::Io {
            action,
            path,
            source,
        }
    };
    let key = std::fs::read(identity).map_err(io("read", identity))?;
    let encrypted = std::fs::read(share).map_err(io("read", share))?;
    let parsed = age::ssh::Identity::from_buffer(
        key.as_slice(),
        Some(identity.display().to_string()),
    )
    .map_err(|e| {
        CliError::Input(format!(
            "{} is not an OpenSSH private key ({e}); pass your ssh-ed25519 key file with --identity",
            identity.display()
        ))
    })?;
    if let age::ssh::Identity::Unsupported(_) = parsed {
        return Err(CliError::Input(format!(
            "{} is a key type age cannot decrypt with; shares are encrypted to ssh-ed25519 keys",
            identity.display()
        )));
    }
    let decrypted = age::decrypt(&parsed.with_callbacks(Prompt), &encrypted).map_err(|e| {
        CliError::Input(format!(
            "cannot decrypt {} with {}: {e}; is it your share, intact, and your key?",
            share.display(),
            identity.display()
        ))
    })?;
    Ok(Zeroizing::new(decrypted))
}

fn client(
    settings: &Settings,
    args: &VaultArgs,
) -> Result<(SealServiceClient<Channel>, Target), CliError> {
    let (channel, target) = channel(settings, args)?;
    Ok((SealServiceClient::new(channel), target))
}

/// A channel to the vault, with the caller's own certificate.
pub fn channel(settings: &Settings, args: &VaultArgs) -> Result<(Channel, Target), CliError> {
    let tls = settings.tls()?;
    let target = Target {
        service: "vault",
        address: normalize_address(&args.vault),
        timeouts: settings.timeouts,
    };
    let channel = twokey_runtime::tls::endpoint(&target.address)
        .map_err(|e| CliError::Usage(e.to_string()))?
        .connect_timeout(settings.timeouts.connect)
        .timeout(settings.timeouts.call)
        .tls_config(
            tls.client_config(&args.vault_server_name)?
                .timeout(settings.timeouts.connect),
        )
        .map_err(twokey_runtime::tls::TlsError::from)?
        .connect_lazy();
    Ok((channel, target))
}

/// Where sealing (and a reshare) stands, for people.
pub(crate) fn human(p: &SealProgress) -> String {
    if !p.sealed {
        let unsealed = format!("unsealed ({} of {} holders needed)", p.threshold, p.holders);
        return match crate::seal::human_reshare(p) {
            Some(reshare) => format!("{unsealed}\n{reshare}"),
            None => unsealed,
        };
    }
    format!(
        "sealed: {}",
        crate::seal::received(&p.received_from, p.threshold)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_sealed_with_who_or_unsealed() {
        let p = SealProgress {
            sealed: true,
            threshold: 2,
            holders: 3,
            received_from: vec!["alice".into()],
            ..Default::default()
        };
        assert_eq!(human(&p), "sealed: 1 of 2 shares received, from alice");
        let p = SealProgress {
            sealed: false,
            received_from: vec![],
            ..p
        };
        assert_eq!(human(&p), "unsealed (2 of 3 holders needed)");
    }

    #[test]
    fn a_share_decrypts_only_with_its_holders_key_and_a_wrong_key_says_so() {
        use twokey_consent::ssh_key::{LineEnding, PrivateKey, rand_core::OsRng};
        let dir = tempfile::tempdir().unwrap();
        let mine =
            PrivateKey::random(&mut OsRng, twokey_consent::ssh_key::Algorithm::Ed25519).unwrap();
        let other =
            PrivateKey::random(&mut OsRng, twokey_consent::ssh_key::Algorithm::Ed25519).unwrap();
        let recipient: age::ssh::Recipient =
            mine.public_key().to_openssh().unwrap().parse().unwrap();
        let share = dir.path().join("alice.share.age");
        std::fs::write(&share, age::encrypt(&recipient, b"a share").unwrap()).unwrap();
        for (name, key) in [("mine", &mine), ("other", &other)] {
            std::fs::write(
                dir.path().join(name),
                key.to_openssh(LineEnding::LF).unwrap().as_bytes(),
            )
            .unwrap();
        }
        assert_eq!(
            decrypt_share(&share, &dir.path().join("mine"))
                .unwrap()
                .as_slice(),
            b"a share"
        );
        let err = decrypt_share(&share, &dir.path().join("other")).unwrap_err();
        assert!(err.to_string().starts_with("cannot decrypt"), "{err}");
        let err = decrypt_share(&share, &dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read"), "{err}");
    }
}
