//! The vault's store: sealed seeds with their metadata, used grant ids (kept
//! until their grant expires, so a restart does not reopen a replay), and the
//! key-check value. Every change writes its audit event into the outbox in
//! the same sled transaction.

use std::future::Future;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use twokey_runtime::{
    durable::{DurableDb, StoreError},
    events::EventDraft,
    outbox::Outbox,
};

use crate::seed::TotpParams;

/// An enrolled account as stored: metadata and the sealed seed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountRecord {
    /// Account id.
    pub account_id: String,
    /// Issuer.
    pub issuer: String,
    /// Label.
    pub label: String,
    /// How codes are computed.
    pub params: TotpParams,
    /// Seed length in bits.
    pub seed_bits: u32,
    /// Unix time of enrollment.
    pub created_at: u64,
    /// Unix time a code was last computed.
    pub last_used_at: Option<u64>,
    /// Nonce ‖ XChaCha20-Poly1305 ciphertext of the seed, base64.
    pub sealed_seed: String,
}

impl AccountRecord {
    /// The sealed seed bytes.
    pub fn sealed(&self) -> Vec<u8> {
        B64.decode(&self.sealed_seed).unwrap_or_default()
    }

    /// Sets the sealed seed.
    pub fn set_sealed(&mut self, sealed: &[u8]) {
        self.sealed_seed = B64.encode(sealed);
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultStoreError {
    /// The account exists and replacing was not asked for.
    #[error("account {0} already exists; enroll with replace to overwrite it")]
    AlreadyExists(String),
    /// No such account.
    #[error("no account {0}")]
    NotFound(String),
    /// The grant id was used before.
    #[error("grant {0} was already used; each grant yields one code")]
    GrantUsed(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record is unreadable.
    #[error("stored record for {0} is unreadable")]
    Corrupt(String),
}

/// What the vault needs from storage.
pub trait VaultStore: Send + Sync + 'static {
    /// The stored key-check value, if any.
    fn key_check(&self) -> Result<Option<Vec<u8>>, VaultStoreError>;
    /// Stores the key-check value (first start).
    fn set_key_check(&self, check: &[u8]) -> Result<(), VaultStoreError>;
    /// One account.
    fn get(&self, account_id: &str) -> Result<Option<AccountRecord>, VaultStoreError>;
    /// All accounts, ordered by id.
    fn list(&self) -> Result<Vec<AccountRecord>, VaultStoreError>;
    /// Number of accounts.
    fn count(&self) -> usize;
    /// Stores an account with its event; returns the event's sequence number.
    fn put(
        &self,
        record: &AccountRecord,
        replace: bool,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError>;
    /// Marks a grant used (until `expires_at`), stamps the account's
    /// last use, and records the event; refuses a used grant.
    fn use_grant(
        &self,
        grant_id: &str,
        expires_at: u64,
        account_id: &str,
        now: u64,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError>;
    /// Marks a removal grant used and deletes the account, with its event.
    fn remove(
        &self,
        grant_id: &str,
        expires_at: u64,
        account_id: &str,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError>;
    /// Records an event that goes with no other change.
    fn record(&self, event: EventDraft) -> Result<u64, VaultStoreError>;
    /// Forgets used grant ids whose grants expired before `now`.
    fn sweep_grants(&self, now: u64) -> Result<usize, VaultStoreError>;
    /// Makes every change so far durable and hands new events to the shipper.
    fn commit(&self) -> impl Future<Output = Result<(), VaultStoreError>> + Send;
}

/// The sled implementation.
#[derive(Debug, Clone)]
pub struct SledVaultStore {
    db: DurableDb,
    accounts: sled::Tree,
    grants: sled::Tree,
    meta: sled::Tree,
    outbox: Outbox,
}

const KEY_CHECK: &[u8] = b"key_check";
/// Used grant ids are kept this long past their expiry.
const GRANT_ID_GRACE_SECS: u64 = 600;

enum Abort {
    Exists,
    Missing,
    Used,
}

fn sled_err(db: &DurableDb) -> impl Fn(sled::Error) -> VaultStoreError + '_ {
    move |source| {
        VaultStoreError::Store(StoreError::Sled {
            path: db.path().to_owned(),
            source,
        })
    }
}

impl SledVaultStore {
    /// Opens the store's trees in `db`; events go to `outbox`.
    pub fn open(db: &DurableDb, outbox: Outbox) -> Result<Self, VaultStoreError> {
        Ok(Self {
            accounts: db.tree("accounts")?,
            grants: db.tree("used_grants")?,
            meta: db.tree("meta")?,
            db: db.clone(),
            outbox,
        })
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<AccountRecord, VaultStoreError> {
        serde_json::from_slice(bytes).map_err(|_| VaultStoreError::Corrupt(id.to_owned()))
    }

    fn finish(
        &self,
        result: Result<u64, TransactionError<Abort>>,
        id: &str,
    ) -> Result<u64, VaultStoreError> {
        match result {
            Ok(seq) => Ok(seq),
            Err(TransactionError::Abort(Abort::Exists)) => {
                Err(VaultStoreError::AlreadyExists(id.to_owned()))
            }
            Err(TransactionError::Abort(Abort::Missing)) => {
                Err(VaultStoreError::NotFound(id.to_owned()))
            }
            Err(TransactionError::Abort(Abort::Used)) => {
                Err(VaultStoreError::GrantUsed(id.to_owned()))
            }
            Err(TransactionError::Storage(e)) => Err(sled_err(&self.db)(e)),
        }
    }
}

impl VaultStore for SledVaultStore {
    fn key_check(&self) -> Result<Option<Vec<u8>>, VaultStoreError> {
        Ok(self
            .meta
            .get(KEY_CHECK)
            .map_err(sled_err(&self.db))?
            .map(|v| v.to_vec()))
    }

    fn set_key_check(&self, check: &[u8]) -> Result<(), VaultStoreError> {
        self.meta
            .insert(KEY_CHECK, check)
            .map_err(sled_err(&self.db))?;
        self.db.sync_blocking()?;
        Ok(())
    }

    fn get(&self, account_id: &str) -> Result<Option<AccountRecord>, VaultStoreError> {
        self.accounts
            .get(account_id)
            .map_err(sled_err(&self.db))?
            .map(|v| self.decode(account_id, &v))
            .transpose()
    }

    fn list(&self) -> Result<Vec<AccountRecord>, VaultStoreError> {
        self.accounts
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err(&self.db))?;
                self.decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    fn count(&self) -> usize {
        self.accounts.len()
    }

    fn put(
        &self,
        record: &AccountRecord,
        replace: bool,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let bytes = serde_json::to_vec(record).expect("records serialize");
        let result = (&self.accounts, self.outbox.tree()).transaction(|(accounts, outbox)| {
            if !replace && accounts.get(&record.account_id)?.is_some() {
                return Err(ConflictableTransactionError::Abort(Abort::Exists));
            }
            accounts.insert(record.account_id.as_bytes(), bytes.as_slice())?;
            self.outbox.push(outbox, event.clone())
        });
        self.finish(result, &record.account_id)
    }

    fn use_grant(
        &self,
        grant_id: &str,
        expires_at: u64,
        account_id: &str,
        now: u64,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let result = (&self.grants, &self.accounts, self.outbox.tree()).transaction(
            |(grants, accounts, outbox)| {
                if grants.get(grant_id)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(Abort::Used));
                }
                let Some(bytes) = accounts.get(account_id)? else {
                    return Err(ConflictableTransactionError::Abort(Abort::Missing));
                };
                grants.insert(grant_id.as_bytes(), &expires_at.to_be_bytes())?;
                if let Ok(mut record) = serde_json::from_slice::<AccountRecord>(&bytes) {
                    record.last_used_at = Some(now);
                    let updated = serde_json::to_vec(&record).expect("records serialize");
                    accounts.insert(account_id.as_bytes(), updated)?;
                }
                self.outbox.push(outbox, event.clone())
            },
        );
        match self.finish(result, account_id) {
            Err(VaultStoreError::GrantUsed(_)) => Err(VaultStoreError::GrantUsed(grant_id.into())),
            other => other,
        }
    }

    fn remove(
        &self,
        grant_id: &str,
        expires_at: u64,
        account_id: &str,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let result = (&self.grants, &self.accounts, self.outbox.tree()).transaction(
            |(grants, accounts, outbox)| {
                if grants.get(grant_id)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(Abort::Used));
                }
                if accounts.remove(account_id.as_bytes())?.is_none() {
                    return Err(ConflictableTransactionError::Abort(Abort::Missing));
                }
                grants.insert(grant_id.as_bytes(), &expires_at.to_be_bytes())?;
                self.outbox.push(outbox, event.clone())
            },
        );
        match self.finish(result, account_id) {
            Err(VaultStoreError::GrantUsed(_)) => Err(VaultStoreError::GrantUsed(grant_id.into())),
            other => other,
        }
    }

    fn record(&self, event: EventDraft) -> Result<u64, VaultStoreError> {
        let result = self
            .outbox
            .tree()
            .transaction(|outbox| self.outbox.push(outbox, event.clone()));
        result.map_err(|e| match e {
            TransactionError::Abort(()) => VaultStoreError::Corrupt("outbox".into()),
            TransactionError::Storage(e) => sled_err(&self.db)(e),
        })
    }

    fn sweep_grants(&self, now: u64) -> Result<usize, VaultStoreError> {
        let mut removed = 0;
        for item in self.grants.iter() {
            let (id, expiry) = item.map_err(sled_err(&self.db))?;
            let expiry = expiry
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            // Keep ids a while past expiry in case the clock steps back.
            if expiry.saturating_add(GRANT_ID_GRACE_SECS) < now {
                self.grants.remove(id).map_err(sled_err(&self.db))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn commit(&self) -> Result<(), VaultStoreError> {
        self.db.sync().await?;
        self.outbox.committed();
        Ok(())
    }
}
