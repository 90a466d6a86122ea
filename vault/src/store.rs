//! The vault's store: sealed seeds with their metadata, used grant ids (kept
//! until their grant expires, so a restart does not reopen a replay), and the
//! key-check value. Every change writes its audit event into the outbox in
//! the same sled transaction. Grant uses, the hot path, are group-committed:
//! concurrent uses share one sled transaction (one log write instead of one
//! per code), each still checked and answered on its own. Each account keeps
//! the highest time step whose code it handed out, written in the same
//! transaction as the grant use and its event, so no step is handed out
//! twice, across restarts too.

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use twokey_runtime::{
    durable::{DurableDb, StoreError},
    events::EventDraft,
    outbox::Outbox,
};

use crate::{
    seed::TotpParams,
    totp::{MAX_STEPS_AHEAD, choose_step, min_seconds_left},
};

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
    /// Fewest seconds a released code must have left in its step; 0 means
    /// the default (see [`min_seconds_left`]). Absent in records written
    /// before it existed, which load as 0.
    #[serde(default)]
    pub min_seconds_left: u32,
    /// The highest time step whose code was handed out (registration codes
    /// included). Absent in records written before it existed.
    #[serde(default)]
    pub last_step: Option<u64>,
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
    #[error(
        "grant {0} was already used; a grant is good for one use, ask the broker for a new one"
    )]
    GrantUsed(String),
    /// Every step the vault may hand out now was handed out already.
    #[error(
        "every code of account {account_id} up to {MAX_STEPS_AHEAD} steps ahead was handed out already; try again in {retry_in} s"
    )]
    StepsUsed {
        /// The account.
        account_id: String,
        /// Seconds until a step is free.
        retry_in: u64,
    },
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
    /// Marks an enrollment grant used and stores an account with its event;
    /// returns the event's sequence number. Refuses a used grant, and an
    /// existing account unless `replace`; a refusal changes nothing.
    fn put(&self, new: NewAccount<'_>, event: EventDraft) -> Result<u64, VaultStoreError>;
    /// Marks a grant used (until `expires_at`), chooses the step whose code
    /// it releases ([`choose_step`]) and stores it as the account's highest,
    /// stamps the account's last use, and records the event with the step;
    /// refuses a used grant, and a use with no step free yet
    /// ([`VaultStoreError::StepsUsed`]); a refusal changes nothing.
    fn use_grant(
        &self,
        grant: GrantUse,
    ) -> impl Future<Output = Result<Released, VaultStoreError>> + Send;
    /// Marks a removal grant used and deletes the account, with its event.
    fn remove(&self, removal: Removal) -> Result<u64, VaultStoreError>;
    /// Records an event that goes with no other change.
    fn record(&self, event: EventDraft) -> Result<u64, VaultStoreError>;
    /// Records `code.withheld` for a code of `step` that never left the
    /// vault, and gives the step back if it is still the account's highest
    /// (the one below it then counts as handed out, which is only cautious).
    fn withhold(
        &self,
        account_id: &str,
        step: u64,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError>;
    /// Forgets used grant ids whose grants expired before `now`.
    fn sweep_grants(&self, now: u64) -> Result<usize, VaultStoreError>;
    /// Makes every change so far durable and hands new events to the shipper.
    fn commit(&self) -> impl Future<Output = Result<(), VaultStoreError>> + Send;
}

/// One use of a release grant, as [`VaultStore::use_grant`] records it.
#[derive(Debug, Clone)]
pub struct GrantUse {
    /// The grant's id.
    pub grant_id: String,
    /// Unix time the grant expires (its id is kept until then, and a while).
    pub expires_at: u64,
    /// The account the code is for.
    pub account_id: String,
    /// Unix time now (the account's last use).
    pub now: u64,
    /// The `code.released` event.
    pub event: EventDraft,
}

/// What [`VaultStore::use_grant`] recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The `code.released` event's sequence number.
    pub seq: u64,
    /// The time step whose code the grant releases.
    pub step: u64,
}

/// An account to store, as [`VaultStore::put`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct NewAccount<'a> {
    /// The account record, its seed sealed.
    pub record: &'a AccountRecord,
    /// Whether it may replace an enrolled account with the same id.
    pub replace: bool,
    /// The enrollment grant it uses up.
    pub grant: &'a SpentGrant,
}

/// An enrollment grant used up by [`VaultStore::put`].
#[derive(Debug, Clone)]
pub struct SpentGrant {
    /// The grant's id.
    pub grant_id: String,
    /// Unix time the grant expires (its id is kept until then, and a while).
    pub expires_at: u64,
}

/// One use of a removal grant, as [`VaultStore::remove`] records it.
#[derive(Debug, Clone)]
pub struct Removal {
    /// The grant's id.
    pub grant_id: String,
    /// Unix time the grant expires (its id is kept until then, and a while).
    pub expires_at: u64,
    /// The account to delete.
    pub account_id: String,
    /// The `account.removed` event.
    pub event: EventDraft,
}

/// A grant use queued for the next group transaction, with where to answer.
/// (Its event draft carries the caller's trace, whichever thread writes it.)
type QueuedUse = (
    GrantUse,
    tokio::sync::oneshot::Sender<Result<Released, VaultStoreError>>,
);

/// The sled implementation.
#[derive(Debug, Clone)]
pub struct SledVaultStore {
    db: DurableDb,
    accounts: sled::Tree,
    grants: sled::Tree,
    meta: sled::Tree,
    outbox: Outbox,
    /// Grant uses waiting for a leader to write them.
    queued: Arc<Mutex<Vec<QueuedUse>>>,
    /// Held by the caller writing the queue out (one group at a time).
    leader: Arc<tokio::sync::Mutex<()>>,
}

const KEY_CHECK: &[u8] = b"key_check";
/// Used grant ids are kept this long past their expiry.
const GRANT_ID_GRACE_SECS: u64 = 600;

enum Abort {
    Exists,
    Missing,
    Used,
    Corrupt,
    Wait(u64),
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
            queued: Arc::default(),
            leader: Arc::default(),
        })
    }

    /// Writes a group of grant uses in one transaction and answers each:
    /// a use of a grant used before (also earlier in the same group), of a
    /// missing account, or with no step free is refused on its own; the
    /// others are recorded. A later use of the same account in the group
    /// reads the record an earlier one wrote, so it gets the next step.
    fn write_uses(&self, group: Vec<QueuedUse>) {
        let (uses, replies): (Vec<GrantUse>, Vec<_>) = group.into_iter().unzip();
        let result = (&self.grants, &self.accounts, self.outbox.tree()).transaction(
            |(grants, accounts, outbox)| {
                let mut answers = Vec::with_capacity(uses.len());
                for u in &uses {
                    if grants.get(&u.grant_id)?.is_some() {
                        answers.push(Err(Abort::Used));
                        continue;
                    }
                    let Some(bytes) = accounts.get(&u.account_id)? else {
                        answers.push(Err(Abort::Missing));
                        continue;
                    };
                    let Ok(mut record) = serde_json::from_slice::<AccountRecord>(&bytes) else {
                        answers.push(Err(Abort::Corrupt));
                        continue;
                    };
                    let period = record.params.period;
                    let min_left = min_seconds_left(record.min_seconds_left, period);
                    let step = match choose_step(u.now, period, min_left, record.last_step) {
                        Ok(step) => step,
                        Err(wait) => {
                            answers.push(Err(Abort::Wait(wait)));
                            continue;
                        }
                    };
                    grants.insert(u.grant_id.as_bytes(), &u.expires_at.to_be_bytes())?;
                    record.last_used_at = Some(u.now);
                    record.last_step = Some(step);
                    let updated = serde_json::to_vec(&record).expect("records serialize");
                    accounts.insert(u.account_id.as_bytes(), updated)?;
                    let event = u.event.clone().attr("step", step.to_string());
                    let seq = self.outbox.push(outbox, event)?;
                    answers.push(Ok(Released { seq, step }));
                }
                Ok::<_, ConflictableTransactionError<std::convert::Infallible>>(answers)
            },
        );
        let answers = match result {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            Err(TransactionError::Abort(never)) => match never {},
            Err(TransactionError::Storage(e)) => {
                let why = e.to_string();
                uses.iter().map(|_| Err(why.clone())).collect::<Vec<_>>()
            }
        };
        for ((u, reply), answer) in uses.iter().zip(replies).zip(answers) {
            let answer = match answer {
                Ok(Ok(released)) => Ok(released),
                Ok(Err(Abort::Used)) => Err(VaultStoreError::GrantUsed(u.grant_id.clone())),
                Ok(Err(Abort::Wait(retry_in))) => Err(VaultStoreError::StepsUsed {
                    account_id: u.account_id.clone(),
                    retry_in,
                }),
                Ok(Err(Abort::Corrupt)) => Err(VaultStoreError::Corrupt(u.account_id.clone())),
                Ok(Err(Abort::Missing | Abort::Exists)) => {
                    Err(VaultStoreError::NotFound(u.account_id.clone()))
                }
                Err(why) => Err(VaultStoreError::Store(StoreError::Sync(format!(
                    "cannot record the grant use: {why}"
                )))),
            };
            let _ = reply.send(answer);
        }
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
            Err(TransactionError::Abort(Abort::Corrupt)) => {
                Err(VaultStoreError::Corrupt(id.to_owned()))
            }
            Err(TransactionError::Abort(Abort::Wait(retry_in))) => {
                Err(VaultStoreError::StepsUsed {
                    account_id: id.to_owned(),
                    retry_in,
                })
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

    fn put(&self, new: NewAccount<'_>, event: EventDraft) -> Result<u64, VaultStoreError> {
        let NewAccount {
            record,
            replace,
            grant,
        } = new;
        let result = (&self.grants, &self.accounts, self.outbox.tree()).transaction(
            |(grants, accounts, outbox)| {
                if grants.get(&grant.grant_id)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(Abort::Used));
                }
                let old = accounts.get(&record.account_id)?;
                if !replace && old.is_some() {
                    return Err(ConflictableTransactionError::Abort(Abort::Exists));
                }
                // A replaced account keeps its highest step if that is
                // higher, so a re-enrolled seed never repeats a step.
                let mut record = record.clone();
                if let Some(old) =
                    old.and_then(|b| serde_json::from_slice::<AccountRecord>(&b).ok())
                {
                    record.last_step = record.last_step.max(old.last_step);
                }
                let bytes = serde_json::to_vec(&record).expect("records serialize");
                grants.insert(grant.grant_id.as_bytes(), &grant.expires_at.to_be_bytes())?;
                accounts.insert(record.account_id.as_bytes(), bytes.as_slice())?;
                self.outbox.push(outbox, event.clone())
            },
        );
        match self.finish(result, &record.account_id) {
            Err(VaultStoreError::GrantUsed(_)) => {
                Err(VaultStoreError::GrantUsed(grant.grant_id.clone()))
            }
            other => other,
        }
    }

    async fn use_grant(&self, grant: GrantUse) -> Result<Released, VaultStoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((grant, reply));
        {
            // Whoever holds the lead writes out everything queued so far; a
            // use queued while a group is being written goes in the next.
            let _lead = self.leader.lock().await;
            let group = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
            if !group.is_empty() {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.write_uses(group))
                    .await
                    .map_err(|e| StoreError::Sync(format!("grant write task failed: {e}")))?;
            }
        }
        answer.await.map_err(|_| {
            VaultStoreError::Store(StoreError::Sync(
                "the grant use was not written; ask for a new grant".into(),
            ))
        })?
    }

    fn remove(&self, removal: Removal) -> Result<u64, VaultStoreError> {
        let Removal {
            grant_id,
            expires_at,
            account_id,
            event,
        } = &removal;
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
            Err(VaultStoreError::GrantUsed(_)) => Err(VaultStoreError::GrantUsed(removal.grant_id)),
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

    fn withhold(
        &self,
        account_id: &str,
        step: u64,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let result = (&self.accounts, self.outbox.tree()).transaction(|(accounts, outbox)| {
            if let Some(bytes) = accounts.get(account_id)?
                && let Ok(mut record) = serde_json::from_slice::<AccountRecord>(&bytes)
                && record.last_step == Some(step)
            {
                record.last_step = step.checked_sub(1);
                let updated = serde_json::to_vec(&record).expect("records serialize");
                accounts.insert(account_id.as_bytes(), updated)?;
            }
            self.outbox.push(outbox, event.clone())
        });
        self.finish(result, account_id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use twokey_runtime::{events::EventSigner, identity::SpiffeId, time::SystemClock};

    /// The store in `dir`, opened without enrolling anything.
    fn reopen(dir: &std::path::Path) -> SledVaultStore {
        let db = DurableDb::open(dir).unwrap();
        let signer = EventSigner::new(
            SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        );
        let outbox = Outbox::open(&db, signer, Arc::new(SystemClock)).unwrap();
        SledVaultStore::open(&db, outbox).unwrap()
    }

    fn enroll(store: &SledVaultStore, account_id: &str) {
        let record = AccountRecord {
            account_id: account_id.into(),
            issuer: String::new(),
            label: String::new(),
            params: TotpParams::default(),
            seed_bits: 160,
            created_at: 0,
            last_used_at: None,
            sealed_seed: String::new(),
            min_seconds_left: 0,
            last_step: None,
        };
        let grant = SpentGrant {
            grant_id: format!("g-enroll-{account_id}"),
            expires_at: u64::MAX / 2,
        };
        store
            .put(
                NewAccount {
                    record: &record,
                    replace: false,
                    grant: &grant,
                },
                EventDraft::new("admin", "account.enrolled"),
            )
            .unwrap();
    }

    fn store(dir: &std::path::Path) -> SledVaultStore {
        let store = reopen(dir);
        enroll(&store, "aws-root");
        store
    }

    /// A use at Unix time 1 (step 0, 29 s left).
    fn grant_use(grant_id: &str, account_id: &str) -> GrantUse {
        GrantUse {
            grant_id: grant_id.into(),
            expires_at: u64::MAX / 2,
            account_id: account_id.into(),
            now: 1,
            event: EventDraft::new("op", "code.released"),
        }
    }

    /// Writes `uses` as one group, as a leader does, and returns the answers.
    fn one_group(
        store: &SledVaultStore,
        uses: Vec<GrantUse>,
    ) -> Vec<Result<Released, VaultStoreError>> {
        let (group, answers): (Vec<QueuedUse>, Vec<_>) = uses
            .into_iter()
            .map(|u| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                ((u, tx), rx)
            })
            .unzip();
        store.write_uses(group);
        answers
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap())
            .collect()
    }

    /// Runs `uses` concurrently, so they share group transactions.
    async fn use_all(
        store: &SledVaultStore,
        uses: Vec<GrantUse>,
    ) -> Vec<Result<Released, VaultStoreError>> {
        let tasks: Vec<_> = uses
            .into_iter()
            .map(|u| {
                let store = store.clone();
                tokio::spawn(async move { store.use_grant(u).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_uses_of_one_grant_yield_exactly_one_success() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let results = use_all(
            &store,
            (0..48).map(|_| grant_use("g-1", "aws-root")).collect(),
        )
        .await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        for r in results.iter().filter(|r| r.is_err()) {
            assert!(
                matches!(r, Err(VaultStoreError::GrantUsed(id)) if id == "g-1"),
                "{r:?}"
            );
        }
        // And once written, it stays used.
        let again = store.use_grant(grant_use("g-1", "aws-root")).await;
        assert!(matches!(again, Err(VaultStoreError::GrantUsed(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_group_answers_each_use_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        // Forty accounts: one account has only three steps free at a time.
        for i in 0..40 {
            enroll(&store, &format!("acct-{i}"));
        }
        let mut uses: Vec<_> = (0..40)
            .map(|i| grant_use(&format!("g-{i}"), &format!("acct-{i}")))
            .collect();
        uses.push(grant_use("g-missing", "no-such-account"));
        let results = use_all(&store, uses).await;
        let seqs: BTreeSet<u64> = results[..40]
            .iter()
            .map(|r| r.as_ref().unwrap().seq)
            .collect();
        // The enrollments were events 1 to 40; every use got its own event.
        assert_eq!(seqs, (41..=80).collect());
        assert!(results[..40].iter().all(|r| r.as_ref().unwrap().step == 0));
        assert!(
            matches!(&results[40], Err(VaultStoreError::NotFound(id)) if id == "no-such-account")
        );
        // Nothing half-written: the missing account's grant is not marked used.
        assert!(store.grants.get("g-missing").unwrap().is_none());
        // The enrollments' grants and the forty uses.
        assert_eq!(store.grants.len(), 80);
        let record = store.get("acct-7").unwrap().unwrap();
        assert_eq!(record.last_used_at, Some(1));
        assert_eq!(record.last_step, Some(0));
    }

    #[test]
    fn uses_of_one_account_in_one_group_get_consecutive_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        // Unix time 3010: step 100 with 20 s left.
        let at = |id: &str| GrantUse {
            now: 3010,
            ..grant_use(id, "aws-root")
        };
        let answers = one_group(&store, vec![at("g-1"), at("g-2"), at("g-3"), at("g-4")]);
        let steps: Vec<u64> = answers[..3]
            .iter()
            .map(|a| a.as_ref().unwrap().step)
            .collect();
        assert_eq!(steps, [100, 101, 102]);
        // The fourth would be three steps ahead: refused, its grant unspent.
        let refused = answers[3].as_ref().unwrap_err();
        assert!(
            matches!(refused, VaultStoreError::StepsUsed { retry_in: 20, .. }),
            "{refused:?}"
        );
        assert_eq!(
            refused.to_string(),
            "every code of account aws-root up to 2 steps ahead was handed out already; try again in 20 s"
        );
        assert!(store.grants.get("g-4").unwrap().is_none());
        assert_eq!(store.get("aws-root").unwrap().unwrap().last_step, Some(102));
        // Once step 101 is current, the grant gets step 103.
        assert_eq!(step_at(&store, 3030, "g-4"), 103);
    }

    /// The step one grant use of `aws-root` at Unix time `now` is given.
    fn step_at(store: &SledVaultStore, now: u64, grant_id: &str) -> u64 {
        let used = one_group(
            store,
            vec![GrantUse {
                now,
                ..grant_use(grant_id, "aws-root")
            }],
        );
        used[0].as_ref().unwrap().step
    }

    #[test]
    fn the_highest_step_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = store(dir.path());
            assert_eq!(step_at(&store, 3010, "g-1"), 100);
            store.db.sync_blocking().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(step_at(&store, 3011, "g-2"), 101);
    }

    #[test]
    fn a_record_written_before_steps_were_kept_still_loads_and_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        // An account record exactly as an older vault wrote it.
        let old = r#"{"account_id":"old-root","issuer":"Amazon Web Services","label":"root","params":{"algorithm":"Sha1","digits":6,"period":30},"seed_bits":160,"created_at":1700000000,"last_used_at":1700000100,"sealed_seed":"AAAA"}"#;
        store.accounts.insert("old-root", old.as_bytes()).unwrap();
        let record = store.get("old-root").unwrap().unwrap();
        assert_eq!(record.min_seconds_left, 0);
        assert_eq!(record.last_step, None);
        assert_eq!(record.last_used_at, Some(1_700_000_100));
        let used = one_group(
            &store,
            vec![GrantUse {
                now: 3010,
                ..grant_use("g-1", "old-root")
            }],
        );
        assert_eq!(used[0].as_ref().unwrap().step, 100);
        assert_eq!(store.get("old-root").unwrap().unwrap().last_step, Some(100));
    }

    #[test]
    fn a_replaced_account_keeps_its_highest_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        one_group(
            &store,
            vec![GrantUse {
                now: 3010,
                ..grant_use("g-1", "aws-root")
            }],
        );
        let mut record = store.get("aws-root").unwrap().unwrap();
        record.last_step = Some(50);
        let grant = SpentGrant {
            grant_id: "g-replace".into(),
            expires_at: u64::MAX / 2,
        };
        store
            .put(
                NewAccount {
                    record: &record,
                    replace: true,
                    grant: &grant,
                },
                EventDraft::new("admin", "account.enrolled.replace"),
            )
            .unwrap();
        assert_eq!(store.get("aws-root").unwrap().unwrap().last_step, Some(100));
    }
}
