//! A share holder's age identity derived from their `ssh-ed25519` key, so a
//! key that lives only in ssh-agent can decrypt a share: age needs the
//! X25519 private key, and the agent only signs. The CLI asks the agent (or
//! the key file: the same key gives the same signature) to sign the fixed
//! challenge `twokey-share-holder-v1\0<holder name>`; Ed25519 signatures
//! are deterministic (RFC 8032), so the signature is a stable secret that
//! only the key's holder can make. HKDF-SHA256 of it is an X25519 secret,
//! whose native age recipient (`age1…`) `twokey-vault init-key --holder`
//! takes. The signature and the secret never leave this process and are
//! zeroized after use.
//!
//! Security keys (`sk-ssh-ed25519@openssh.com`) are refused: their
//! signatures carry a counter and flags, so they are not the same twice.
//! Whoever can use the agent socket can derive the identity too, as they
//! can sign with the key: do not forward the agent to a host you would not
//! give your share to.

use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use sha2::Sha256;
use twokey_consent::ssh_key::Algorithm;
use zeroize::Zeroizing;

use crate::{error::CliError, sign::SshSigner};

/// The signed challenge: this, a NUL, the holder's name.
pub const CHALLENGE: &str = "twokey-share-holder-v1";
/// HKDF-SHA256 salt and info of the derivation.
const HKDF_SALT: &[u8] = b"twokey-share-holder-v1";
const HKDF_INFO: &[u8] = b"age X25519 identity";

/// The bytes the key signs for holder `name`.
pub fn challenge(name: &str) -> Vec<u8> {
    [CHALLENGE.as_bytes(), b"\0", name.as_bytes()].concat()
}

/// Checks a holder name as the vault does (`[a-z0-9._-]`, 1 to 64).
pub fn check_name(name: &str) -> Result<(), CliError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "holder name {name:?}: 1 to 64 characters of [a-z0-9._-], the NAME of init-key's --holder NAME=SPIFFE_ID=FILE"
        )))
    }
}

/// The signer of the key at `key`: through the agent at `$SSH_AUTH_SOCK`
/// with `agent`, else the unencrypted key file.
pub fn signer(key: &Path, agent: bool) -> Result<SshSigner, CliError> {
    let sock = if agent {
        Some(
            std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .ok_or_else(|| {
                    CliError::Usage(
                        "--ssh-agent needs SSH_AUTH_SOCK: start ssh-agent and `ssh-add` your ssh-ed25519 key"
                            .into(),
                    )
                })?,
        )
    } else {
        None
    };
    Ok(SshSigner::open(key, sock)?.advising(WITHOUT_AGENT))
}

/// The way around the agent that `holder-key` and `unseal` name when the
/// agent refuses: these commands use it only with `--ssh-agent`.
const WITHOUT_AGENT: &str =
    "or drop --ssh-agent to derive the share key from the unencrypted key file";

/// Holder `name`'s age identity, derived from `signer`'s key.
pub fn identity(signer: &SshSigner, name: &str) -> Result<age::x25519::Identity, CliError> {
    check_name(name)?;
    let algorithm = signer.public_key().algorithm();
    if algorithm != Algorithm::Ed25519 {
        return Err(CliError::Input(format!(
            "a share key is derived only from an ssh-ed25519 key, not {algorithm}: a security key's signatures differ each time; use a plain ssh-ed25519 key"
        )));
    }
    let signature = signer.sign_ed25519(&challenge(name))?;
    let mut secret = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(HKDF_SALT), signature.as_slice())
        .expand(HKDF_INFO, secret.as_mut_slice())
        .map_err(|_| CliError::Input("cannot derive the share key".into()))?;
    let hrp = bech32::Hrp::parse("AGE-SECRET-KEY-")
        .map_err(|e| CliError::Input(format!("cannot encode the share key: {e}")))?;
    let encoded = Zeroizing::new(
        bech32::encode::<bech32::Bech32>(hrp, secret.as_slice())
            .map_err(|e| CliError::Input(format!("cannot encode the share key: {e}")))?
            .to_uppercase(),
    );
    encoded
        .parse::<age::x25519::Identity>()
        .map_err(|e| CliError::Input(format!("cannot make the share key: {e}")))
}

/// Holder `name`'s age recipient (`age1…`), for `init-key --holder`.
pub fn recipient(signer: &SshSigner, name: &str) -> Result<String, CliError> {
    Ok(identity(signer, name)?.to_public().to_string())
}

/// The holder name of a share file `<name>.share.age`, if it is named so.
pub fn name_of_share(share: &Path) -> Option<String> {
    let file = share.file_name()?.to_str()?;
    file.strip_suffix(".share.age").map(str::to_owned)
}

/// The decrypted share in `share`, with the identity derived for `name`.
pub fn decrypt_share(
    share: &Path,
    signer: &SshSigner,
    name: &str,
) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let encrypted = std::fs::read(share).map_err(CliError::io("read", share))?;
    let identity = identity(signer, name)?;
    age::decrypt(&identity, &encrypted)
        .map(Zeroizing::new)
        .map_err(|e| {
            CliError::Input(format!(
                "cannot decrypt {} with the key derived for holder {name} from {} ({e}); was the share made for the recipient `twokey vault holder-key --name {name}` prints? A share encrypted to the ssh-ed25519 key itself decrypts only with the key file: drop --ssh-agent",
                share.display(),
                signer.fingerprint(),
            ))
        })
}

#[cfg(test)]
mod tests {
    use twokey_consent::ssh_key::{LineEnding, PrivateKey, rand_core::OsRng};

    use super::*;

    fn key_file(dir: &Path, name: &str) -> PathBuf {
        let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, key.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
        path
    }

    #[test]
    fn the_recipient_is_stable_per_key_and_name_and_decrypts_what_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let alice = signer(&key_file(dir.path(), "alice"), false).unwrap();
        let other = signer(&key_file(dir.path(), "other"), false).unwrap();
        let r = recipient(&alice, "alice").unwrap();
        assert!(r.starts_with("age1"), "{r}");
        assert_eq!(recipient(&alice, "alice").unwrap(), r);
        assert_ne!(recipient(&alice, "bob").unwrap(), r);
        assert_ne!(recipient(&other, "alice").unwrap(), r);

        let parsed: age::x25519::Recipient = r.parse().unwrap();
        let share = dir.path().join("alice.share.age");
        std::fs::write(&share, age::encrypt(&parsed, b"a share").unwrap()).unwrap();
        assert_eq!(name_of_share(&share).as_deref(), Some("alice"));
        assert_eq!(
            decrypt_share(&share, &alice, "alice").unwrap().as_slice(),
            b"a share"
        );
        let e = decrypt_share(&share, &other, "alice")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot decrypt"), "{e}");
        assert!(e.contains("holder-key --name alice"), "{e}");
    }

    #[test]
    fn a_bad_holder_name_says_what_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let alice = signer(&key_file(dir.path(), "alice"), false).unwrap();
        let e = recipient(&alice, "Alice!").unwrap_err().to_string();
        assert!(e.contains("[a-z0-9._-]"), "{e}");
        assert_eq!(name_of_share(Path::new("x/alice.age")), None);
    }
}
