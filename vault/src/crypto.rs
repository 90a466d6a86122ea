//! Sealing seeds at rest: XChaCha20-Poly1305 under the master key, with a
//! random 192-bit nonce per seal and the account id as associated data, so a
//! sealed seed cannot be moved to another account.

use twokey_runtime::{
    keys::SecretKey,
    seal::{OpenError, Sealer},
};
use zeroize::Zeroizing;

const AAD_PREFIX: &[u8] = b"twokey-seed-v1\0";
const KEY_CHECK_AAD: &[u8] = b"twokey-key-check-v1\0";
const KEY_CHECK_PLAINTEXT: &[u8] = b"twokey master key check";
const POLICY_HEAD_AAD: &[u8] = b"twokey-policy-head-v1\0";

/// The key that seals every seed. Kept outside sled; Debug is redacted.
#[derive(Debug, Clone)]
pub struct MasterKey(Sealer);

impl MasterKey {
    /// Wraps a loaded key.
    pub fn new(key: SecretKey) -> Self {
        Self(Sealer::new(&key))
    }

    fn seal_with(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.0.seal(aad, plaintext)
    }

    fn open_with(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.0.open(aad, sealed)
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

    /// The head of the policy chain (the newest version and its document's
    /// digest), sealed: someone who can write the data directory but does
    /// not hold the master key cannot make a head for a chain they cut or
    /// extended.
    pub fn seal_policy_head(&self, version: u64, digest: &[u8]) -> Vec<u8> {
        self.seal_with(
            POLICY_HEAD_AAD,
            &[&version.to_be_bytes()[..], digest].concat(),
        )
    }

    /// True when `head` was sealed by [`MasterKey::seal_policy_head`] with
    /// this key for exactly this version and digest.
    pub fn policy_head_matches(&self, head: &[u8], version: u64, digest: &[u8]) -> bool {
        self.open_with(POLICY_HEAD_AAD, head)
            .is_ok_and(|p| p.as_slice() == [&version.to_be_bytes()[..], digest].concat())
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
