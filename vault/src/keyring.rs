//! The keyring in memory: the master key and one data key per generation
//! (opened from the sealed keys the store holds). New seeds are sealed under
//! the newest generation; a seed opens under the generation it records.
//! Generation 0 is the master key itself, for seeds sealed before the
//! keyring. A retired generation's key is dropped (zeroized) here once the
//! store no longer holds it. A master key replacement swaps the master key
//! here once the store promoted the next one; the data keys stay.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use twokey_runtime::keys::SecretKey;
use zeroize::Zeroizing;

use crate::crypto::{DataKey, MasterKey};

/// Why the keyring cannot open a seed or a stored data key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// A stored data key does not open with the master key.
    #[error(
        "the data key of generation {0} does not open with the master key: the keyring was changed outside the vault, or this is not the master key it was sealed with"
    )]
    DataKey(u32),
    /// The seed names a generation the keyring does not hold.
    #[error("no key generation {0} in the keyring")]
    NoGeneration(u32),
    /// The seed does not open with its generation's key.
    #[error("the seed does not open with key generation {0}")]
    Open(u32),
}

/// The keys that seal seeds. `Debug` shows generations, never a key.
#[derive(Clone)]
pub struct Keyring {
    master: Arc<RwLock<MasterKey>>,
    keys: Arc<RwLock<BTreeMap<u32, DataKey>>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("generations", &self.generations())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Opens each stored generation (an empty value is generation 0, the
    /// master key itself) with `master`.
    pub fn open(master: MasterKey, stored: &BTreeMap<u32, Vec<u8>>) -> Result<Self, KeyringError> {
        let mut keys = BTreeMap::new();
        for (&generation, sealed) in stored {
            let key = if generation == 0 && sealed.is_empty() {
                master.generation_zero()
            } else {
                master
                    .open_data_key(generation, sealed)
                    .map_err(|_| KeyringError::DataKey(generation))?
            };
            keys.insert(generation, key);
        }
        Ok(Self {
            master: Arc::new(RwLock::new(master)),
            keys: Arc::new(RwLock::new(keys)),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, DataKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, DataKey>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The master key (the key check, the data keys and the policy head
    /// are sealed under it).
    pub fn master(&self) -> MasterKey {
        self.master
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Holds `master` as the master key (after the store promoted it); the
    /// data keys in memory do not change.
    pub fn set_master(&self, master: MasterKey) {
        *self.master.write().unwrap_or_else(|e| e.into_inner()) = master;
    }

    /// The newest generation (0 when the keyring is empty).
    pub fn current(&self) -> u32 {
        self.read().keys().next_back().copied().unwrap_or(0)
    }

    /// The generations held, oldest first.
    pub fn generations(&self) -> Vec<u32> {
        self.read().keys().copied().collect()
    }

    /// Seals a seed for `account_id` under the newest generation; returns
    /// the generation and the sealed bytes.
    pub fn seal_seed(&self, account_id: &str, seed: &[u8]) -> (u32, Vec<u8>) {
        let keys = self.read();
        match keys.iter().next_back() {
            Some((&generation, key)) => (generation, key.seal_seed(account_id, seed)),
            None => (0, self.master().seal_seed(account_id, seed)),
        }
    }

    /// Seals a seed for `account_id` under `generation` (a rotation's).
    pub fn seal_seed_as(
        &self,
        generation: u32,
        account_id: &str,
        seed: &[u8],
    ) -> Result<Vec<u8>, KeyringError> {
        let keys = self.read();
        let key = keys
            .get(&generation)
            .ok_or(KeyringError::NoGeneration(generation))?;
        Ok(key.seal_seed(account_id, seed))
    }

    /// Opens a seed sealed for `account_id` under `generation`.
    pub fn open_seed(
        &self,
        generation: u32,
        account_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let keys = self.read();
        let key = keys
            .get(&generation)
            .ok_or(KeyringError::NoGeneration(generation))?;
        key.open_seed(account_id, sealed)
            .map_err(|_| KeyringError::Open(generation))
    }

    /// A fresh data key for `generation`: the key to hold once the store
    /// has it durably, and its sealed bytes for the store.
    pub fn new_data_key(&self, generation: u32) -> (DataKey, Vec<u8>) {
        let key = SecretKey::generate();
        let sealed = self.master().seal_data_key(generation, &key);
        (DataKey::new(&key), sealed)
    }

    /// Holds `key` as `generation` (after the store made it durable).
    pub fn insert(&self, generation: u32, key: DataKey) {
        self.write().insert(generation, key);
    }

    /// Drops the keys of `generations` (after the store retired them).
    pub fn retire(&self, generations: &[u32]) {
        let mut keys = self.write();
        for generation in generations {
            keys.remove(generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_seal_under_the_newest_generation_and_open_under_their_own() {
        let master = MasterKey::new(SecretKey::generate());
        let old = master.seal_seed("acct", b"seed sealed before");
        let mut stored = BTreeMap::from([(0u32, Vec::new())]);
        let ring = Keyring::open(master.clone(), &stored).unwrap();
        assert_eq!(ring.current(), 0);
        let (key, sealed_key) = ring.new_data_key(1);
        ring.insert(1, key);
        stored.insert(1, sealed_key);
        let (generation, sealed) = ring.seal_seed("acct", b"a new seed");
        assert_eq!(generation, 1);
        // Reopened from what the store holds, both open.
        let ring = Keyring::open(master.clone(), &stored).unwrap();
        assert_eq!(ring.generations(), [0, 1]);
        assert_eq!(
            ring.open_seed(0, "acct", &old).unwrap().as_slice(),
            b"seed sealed before"
        );
        assert_eq!(
            ring.open_seed(1, "acct", &sealed).unwrap().as_slice(),
            b"a new seed"
        );
        // Under the wrong generation, or one retired: refused by name.
        assert_eq!(
            ring.open_seed(0, "acct", &sealed),
            Err(KeyringError::Open(0))
        );
        ring.retire(&[0]);
        assert_eq!(
            ring.open_seed(0, "acct", &old),
            Err(KeyringError::NoGeneration(0))
        );
        assert_eq!(format!("{ring:?}"), "Keyring { generations: [1], .. }");
        // A keyring sealed under another master key does not open.
        let other = MasterKey::new(SecretKey::generate());
        assert_eq!(
            Keyring::open(other, &stored).unwrap_err(),
            KeyringError::DataKey(1)
        );
    }
}
