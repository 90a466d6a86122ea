//! OpenSSH `sshsig` signatures (`PROTOCOL.sshsig`, what `ssh-keygen -Y sign`
//! writes) over twokey's namespaces, through RustCrypto's `ssh-key`: parsing
//! armored or raw signatures, signing with a private key, and verifying with
//! the namespace, the key and (for security keys) user presence checked.

use ssh_encoding::{Decode, Reader};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig, public::KeyData};

/// Largest signature accepted, armored or raw (an Ed25519 one is about 300
/// bytes armored).
pub const MAX_SIGNATURE_BYTES: usize = 4096;

/// The namespace people sign consent statements under.
pub fn consent_namespace(trust_domain: &str) -> String {
    format!("twokey-consent@{trust_domain}")
}

/// The namespace admins sign policy documents under.
pub fn policy_namespace(trust_domain: &str) -> String {
    format!("twokey-policy@{trust_domain}")
}

/// The SHA-256 fingerprint of a key, as `ssh-keygen -l` prints it
/// (`SHA256:<base64>`).
pub fn fingerprint(key: &KeyData) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Whether twokey accepts keys of this algorithm: `ssh-ed25519` and
/// `sk-ssh-ed25519@openssh.com`.
pub fn supported_algorithm(algorithm: &Algorithm) -> bool {
    matches!(algorithm, Algorithm::Ed25519 | Algorithm::SkEd25519)
}

/// Parses an sshsig signature: armored (`-----BEGIN SSH SIGNATURE-----`) or
/// the raw binary blob (starting with `SSHSIG`). Nothing may follow it.
pub fn parse_signature(bytes: &[u8]) -> Result<SshSig, String> {
    if bytes.is_empty() {
        return Err("the signature is empty".into());
    }
    if bytes.len() > MAX_SIGNATURE_BYTES {
        return Err(format!(
            "the signature is {} bytes, more than {MAX_SIGNATURE_BYTES}",
            bytes.len()
        ));
    }
    let sig = if bytes.starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(bytes).map_err(|_| "armored signature is not UTF-8")?;
        SshSig::from_pem(text.trim()).map_err(|e| format!("armored sshsig does not decode: {e}"))?
    } else {
        let mut reader: &[u8] = bytes;
        let sig =
            SshSig::decode(&mut reader).map_err(|e| format!("sshsig does not decode: {e}"))?;
        reader
            .finish(sig)
            .map_err(|_| "bytes follow the sshsig signature".to_string())?
    };
    if !supported_algorithm(&sig.public_key().algorithm()) {
        return Err(format!(
            "key algorithm {} is not supported (only ssh-ed25519 and sk-ssh-ed25519@openssh.com)",
            sig.public_key().algorithm()
        ));
    }
    Ok(sig)
}

/// Signs `message` under `namespace` with SHA-512 (as `ssh-keygen -Y sign`
/// does) and answers the armored signature. Only `ssh-ed25519` private keys
/// can sign here; security keys and agents sign through the CLI.
pub fn sign(key: &PrivateKey, namespace: &str, message: &[u8]) -> Result<Vec<u8>, String> {
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(format!("cannot sign with a {} key here", key.algorithm()));
    }
    let sig = key
        .sign(namespace, HashAlg::Sha512, message)
        .map_err(|e| format!("signing failed: {e}"))?;
    let pem = sig
        .to_pem(LineEnding::LF)
        .map_err(|e| format!("cannot armor the signature: {e}"))?;
    Ok(pem.into_bytes())
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VerifyFailure {
    /// Made under another namespace.
    Namespace(String),
    /// The cryptographic check failed, or a security key did not assert
    /// user presence.
    Signature(String),
}

/// Verifies `sig` over `message` under `namespace` with `key` (which must be
/// the key the signature names: the caller looked it up by fingerprint).
pub(crate) fn verify(
    sig: &SshSig,
    key: &PublicKey,
    namespace: &str,
    message: &[u8],
) -> Result<(), VerifyFailure> {
    if sig.namespace() != namespace {
        return Err(VerifyFailure::Namespace(sig.namespace().to_string()));
    }
    if key.key_data() != sig.public_key() {
        return Err(VerifyFailure::Signature(
            "the signature names another key".into(),
        ));
    }
    key.verify(namespace, message, sig)
        .map_err(|e| VerifyFailure::Signature(e.to_string()))?;
    if sig.public_key().is_sk_ed25519() {
        // sk signatures end with flags (1 byte) and counter (4 bytes); the
        // flags are signed, so checking them after verification is sound.
        let bytes = sig.signature_bytes();
        let flags = bytes
            .len()
            .checked_sub(5)
            .and_then(|i| bytes.get(i))
            .copied()
            .ok_or_else(|| VerifyFailure::Signature("security key signature too short".into()))?;
        if flags & SK_USER_PRESENT == 0 {
            return Err(VerifyFailure::Signature(
                "the security key did not confirm user presence (touch)".into(),
            ));
        }
    }
    Ok(())
}

/// FIDO flag: the user touched the key.
const SK_USER_PRESENT: u8 = 0x01;
