//! Sealing seeds at rest: XChaCha20-Poly1305 with a random 192-bit nonce per
//! seal and the account id as associated data, so a sealed seed cannot be
//! moved to another account. Seeds are sealed under a data key of the
//! keyring ([`DataKey`], see [`crate::keyring`]); each data key is sealed
//! under the master key, bound to its generation. Generation 0, the data
//! written before the keyring, is sealed under the master key itself.

use twokey_runtime::{
    keys::SecretKey,
    seal::{OpenError, Sealer},
};
use zeroize::Zeroizing;

const AAD_PREFIX: &[u8] = b"twokey-seed-v1\0";
const KEY_CHECK_AAD: &[u8] = b"twokey-key-check-v1\0";
const KEY_CHECK_PLAINTEXT: &[u8] = b"twokey master key check";
const POLICY_HEAD_AAD: &[u8] = b"twokey-policy-head-v1\0";
const DATA_KEY_AAD: &[u8] = b"twokey-data-key-v1\0";
const MASTER_KEY_AAD: &[u8] = b"twokey-next-master-key-v1\0";

fn seed_aad(account_id: &str) -> Vec<u8> {
    [AAD_PREFIX, account_id.as_bytes()].concat()
}

/// One generation's data key: seals and opens seeds. Debug is redacted.
#[derive(Debug, Clone)]
pub struct DataKey(Sealer);

impl DataKey {
    /// Wraps a data key.
    pub fn new(key: &SecretKey) -> Self {
        Self(Sealer::new(key))
    }

    /// Seals a seed for `account_id`.
    pub fn seal_seed(&self, account_id: &str, seed: &[u8]) -> Vec<u8> {
        self.0.seal(&seed_aad(account_id), seed)
    }

    /// Opens a seed sealed for `account_id`.
    pub fn open_seed(
        &self,
        account_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.0.open(&seed_aad(account_id), sealed)
    }
}

/// The key that seals the keyring. Kept outside sled; Debug is redacted.
#[derive(Clone)]
pub struct MasterKey(Sealer, SecretKey);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MasterKey").field(&self.0).finish()
    }
}

impl MasterKey {
    /// Wraps a loaded key.
    pub fn new(key: SecretKey) -> Self {
        Self(Sealer::new(&key), key)
    }

    /// The key's bytes, for writing its seal material (a key file, a
    /// split, an HSM wrap) when it replaces the master key.
    pub fn secret(&self) -> &SecretKey {
        &self.1
    }

    /// Seals the next master key (`generation`) under this one: the
    /// pending replacement's record, so a restart with this key can finish
    /// writing the next one's seal material.
    pub fn seal_next_master(&self, generation: u32, next: &MasterKey) -> Vec<u8> {
        self.seal_with(&master_aad(generation), next.1.expose())
    }

    /// Opens the master key of `generation` sealed by
    /// [`MasterKey::seal_next_master`].
    pub fn open_next_master(&self, generation: u32, sealed: &[u8]) -> Result<MasterKey, OpenError> {
        let bytes = self.open_with(&master_aad(generation), sealed)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| OpenError)?;
        Ok(MasterKey::new(SecretKey::from_bytes(key)))
    }

    /// The data key of `generation` sealed under this key, re-sealed under
    /// `to` (the data key itself does not change). Generation 0 stored
    /// empty (this key itself) becomes an explicit data key under `to`.
    pub fn reseal_data_key(
        &self,
        generation: u32,
        sealed: &[u8],
        to: &MasterKey,
    ) -> Result<Vec<u8>, OpenError> {
        if generation == 0 && sealed.is_empty() {
            return Ok(to.seal_with(&data_key_aad(0), self.1.expose()));
        }
        let bytes = self.open_with(&data_key_aad(generation), sealed)?;
        Ok(to.seal_with(&data_key_aad(generation), &bytes))
    }

    /// The policy head sealed under this key, re-sealed under `to`.
    pub fn reseal_policy_head(&self, head: &[u8], to: &MasterKey) -> Result<Vec<u8>, OpenError> {
        let bytes = self.open_with(POLICY_HEAD_AAD, head)?;
        Ok(to.seal_with(POLICY_HEAD_AAD, &bytes))
    }

    fn seal_with(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.0.seal(aad, plaintext)
    }

    fn open_with(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.0.open(aad, sealed)
    }

    /// Seals a seed for `account_id` directly under the master key, as
    /// generation 0 (the vault before the keyring) did.
    pub fn seal_seed(&self, account_id: &str, seed: &[u8]) -> Vec<u8> {
        self.seal_with(&seed_aad(account_id), seed)
    }

    /// Opens a seed sealed for `account_id` directly under the master key
    /// (generation 0).
    pub fn open_seed(
        &self,
        account_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.open_with(&seed_aad(account_id), sealed)
    }

    /// Generation 0's data key: the master key itself.
    pub fn generation_zero(&self) -> DataKey {
        DataKey(self.0.clone())
    }

    /// Seals the data key of `generation` (its slot is bound: it does not
    /// open as another generation's).
    pub fn seal_data_key(&self, generation: u32, key: &SecretKey) -> Vec<u8> {
        self.seal_with(&data_key_aad(generation), key.expose())
    }

    /// Opens the data key of `generation`.
    pub fn open_data_key(&self, generation: u32, sealed: &[u8]) -> Result<DataKey, OpenError> {
        let bytes = self.open_with(&data_key_aad(generation), sealed)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| OpenError)?;
        Ok(DataKey::new(&SecretKey::from_bytes(key)))
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

fn master_aad(generation: u32) -> Vec<u8> {
    [MASTER_KEY_AAD, &generation.to_be_bytes()].concat()
}

fn data_key_aad(generation: u32) -> Vec<u8> {
    [DATA_KEY_AAD, &generation.to_be_bytes()].concat()
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

    #[test]
    fn a_data_key_opens_only_under_its_master_key_and_generation() {
        let master = MasterKey::new(SecretKey::generate());
        let data = SecretKey::generate();
        let sealed = master.seal_data_key(3, &data);
        assert!(!sealed.windows(32).any(|w| w == data.expose()));
        let key = master.open_data_key(3, &sealed).unwrap();
        let seed = key.seal_seed("acct", b"0123456789abcdef");
        assert_eq!(
            DataKey::new(&data)
                .open_seed("acct", &seed)
                .unwrap()
                .as_slice(),
            b"0123456789abcdef"
        );
        // Another generation's slot, another master key: refused.
        assert!(master.open_data_key(4, &sealed).is_err());
        let other = MasterKey::new(SecretKey::generate());
        assert!(other.open_data_key(3, &sealed).is_err());
        // A seed under a data key is not a seed under the master key.
        assert_eq!(master.open_seed("acct", &seed), Err(OpenError));
        // Generation 0 is the master key.
        let old = master.seal_seed("acct", b"old seed");
        assert_eq!(
            master
                .generation_zero()
                .open_seed("acct", &old)
                .unwrap()
                .as_slice(),
            b"old seed"
        );
        assert_eq!(format!("{key:?}"), "DataKey(Sealer([redacted]))");
    }

    #[test]
    fn a_replacement_moves_data_keys_and_the_policy_head_under_the_next_master_key() {
        let old = MasterKey::new(SecretKey::generate());
        let next = MasterKey::new(SecretKey::generate());
        let sealed_next = old.seal_next_master(2, &next);
        assert!(!sealed_next.windows(32).any(|w| w == next.secret().expose()));
        let opened = old.open_next_master(2, &sealed_next).unwrap();
        assert!(opened.matches(&next.key_check()));
        assert!(old.open_next_master(3, &sealed_next).is_err());
        assert!(next.open_next_master(2, &sealed_next).is_err());
        // A data key keeps its bytes, now sealed under the next key only.
        let data = SecretKey::generate();
        let moved = old
            .reseal_data_key(4, &old.seal_data_key(4, &data), &next)
            .unwrap();
        let seed = DataKey::new(&data).seal_seed("acct", b"seed");
        assert_eq!(
            next.open_data_key(4, &moved)
                .unwrap()
                .open_seed("acct", &seed)
                .unwrap()
                .as_slice(),
            b"seed"
        );
        assert!(old.open_data_key(4, &moved).is_err());
        // Generation 0 (the old key itself) becomes a data key under the next.
        let zero = old.reseal_data_key(0, &[], &next).unwrap();
        let old_seed = old.seal_seed("acct", b"old seed");
        assert_eq!(
            next.open_data_key(0, &zero)
                .unwrap()
                .open_seed("acct", &old_seed)
                .unwrap()
                .as_slice(),
            b"old seed"
        );
        let head = old.seal_policy_head(7, b"digest");
        let head = old.reseal_policy_head(&head, &next).unwrap();
        assert!(next.policy_head_matches(&head, 7, b"digest"));
        assert!(!old.policy_head_matches(&head, 7, b"digest"));
        assert_eq!(format!("{next:?}"), "MasterKey(Sealer([redacted]))");
    }
}
