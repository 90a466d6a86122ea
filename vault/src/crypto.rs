//! Sealing seeds at rest: XChaCha20-Poly1305 under the master key, with a
//! random 192-bit nonce per seal and the account id as associated data, so a
//! sealed seed cannot be moved to another account.

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, OsRng, Payload},
};
use twokey_runtime::keys::SecretKey;
use zeroize::Zeroizing;

const NONCE_LEN: usize = 24;
const AAD_PREFIX: &[u8] = b"twokey-seed-v1\0";
const KEY_CHECK_AAD: &[u8] = b"twokey-key-check-v1\0";
const KEY_CHECK_PLAINTEXT: &[u8] = b"twokey master key check";

/// The sealed bytes do not open under this key for this account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed data does not open with this master key")]
pub struct OpenError;

/// The key that seals every seed. Kept outside sled; Debug is redacted.
#[derive(Debug, Clone)]
pub struct MasterKey(SecretKey);

impl MasterKey {
    /// Wraps a loaded key.
    pub fn new(key: SecretKey) -> Self {
        Self(key)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.0.expose().into())
    }

    fn seal_with(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of a bounded message cannot fail");
        [nonce.as_slice(), &ciphertext].concat()
    }

    fn open_with(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(OpenError);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError)
    }

    /// Seals a seed for `account_id`.
    pub fn seal_seed(&self, account_id: &str, seed: &[u8]) -> Vec<u8> {
        self.seal_with(&[AAD_PREFIX, account_id.as_bytes()].concat(), seed)
    }

    /// Opens a seed sealed for `account_id`.
    pub fn open_seed(
        &self,
        account_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.open_with(&[AAD_PREFIX, account_id.as_bytes()].concat(), sealed)
    }

    /// A value stored beside the data that tells whether a key is the right one.
    pub fn key_check(&self) -> Vec<u8> {
        self.seal_with(KEY_CHECK_AAD, KEY_CHECK_PLAINTEXT)
    }

    /// True when `check` was made by [`MasterKey::key_check`] with this key.
    pub fn matches(&self, check: &[u8]) -> bool {
        self.open_with(KEY_CHECK_AAD, check)
            .is_ok_and(|p| p.as_slice() == KEY_CHECK_PLAINTEXT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_seeds_open_only_for_their_account_and_key() {
        let key = MasterKey::new(SecretKey::generate());
        let sealed = key.seal_seed("aws-prod-root", b"0123456789abcdef");
        assert!(!sealed.windows(16).any(|w| w == b"0123456789abcdef"));
        assert_eq!(
            key.open_seed("aws-prod-root", &sealed).unwrap().as_slice(),
            b"0123456789abcdef"
        );
        assert_eq!(key.open_seed("aws-dev-root", &sealed), Err(OpenError));
        let other = MasterKey::new(SecretKey::generate());
        assert_eq!(other.open_seed("aws-prod-root", &sealed), Err(OpenError));
        assert_eq!(
            key.open_seed("aws-prod-root", &sealed[..10]),
            Err(OpenError)
        );
    }

    #[test]
    fn key_check_tells_keys_apart() {
        let key = MasterKey::new(SecretKey::generate());
        let check = key.key_check();
        assert!(key.matches(&check));
        assert!(!MasterKey::new(SecretKey::generate()).matches(&check));
    }
}
