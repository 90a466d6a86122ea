//! The vault's store in PostgreSQL, shared by every vault replica (issue
//! 18). One table, `vault_kv (tree, key, value)`, holds what the sled store
//! keeps in its trees, with the same keys and the same encodings (records
//! as JSON, seeds sealed exactly as on sled: the database only ever sees
//! ciphertext). Each change is one READ COMMITTED transaction that first
//! locks what it reads: the account (`pg_advisory_xact_lock` on its id,
//! which also covers an account not enrolled yet), or the singleton it
//! changes (the policy chain, the keyring). Replicas changing one account
//! therefore take turns, each reading the other's committed result: the
//! account's highest released step ([`choose_step`]), its release times and
//! its requests' code counts are never counted twice. Used grant, release
//! and admin action ids are rows under the primary key, claimed with
//! `INSERT … ON CONFLICT DO NOTHING`: a second use of one id, on any
//! replica and at the same moment, waits for the first and is refused
//! ([`VaultStoreError::GrantUsed`]). The audit events go to the outbox
//! tables ([`PgOutbox::push`]) in the same transaction. Committed with
//! `synchronous_commit = on` (set on each session), an answered change is
//! durable, so [`VaultStore::commit`] and [`VaultStore::sync_now`] have
//! nothing left to do (the shipper wakes on the outbox's NOTIFY).
//!
//! The trait's methods are mostly synchronous and are called from tokio
//! workers: each runs on the store's own runtime (its sessions live
//! there) and the caller waits for it, as the audit store does.
//!
//! Not built on PostgreSQL yet: key rotation and master key replacement
//! (refused with [`VaultStoreError::Unsupported`], FAILED_PRECONDITION).
//! The keyring's first generation is written at the first start.

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio_postgres::Transaction;
use twokey_consent::{AdminHistory, ReleaseHistory};
use twokey_pgstore::{
    Migration, PgError, PgSettings,
    outbox::PgOutbox,
    sessions::{Sessions, StoreRuntime},
};
use twokey_runtime::{
    events::{EventDraft, EventSigner},
    shipper::AckTimeout,
    time::Clock,
};

use crate::{grpc::EventSink, service::AuditGate};

use super::{
    ACCOUNT_RELEASES, ACTION_ID, Abort, AccountRecord, AdminUse, Batch, CONSENT_TREE,
    EnabledChange, FinishedRotation, GRANT_ID_GRACE_SECS, GrantUse, KEY_CHECK, KEYRING_TREE,
    KeptSeed, LAST_ROTATION, MASTER_GENERATION, MASTER_LAST, MASTER_PENDING, MAX_RATE_WINDOW_SECS,
    NewAccount, NewGeneration, POLICIES_TREE, POLICY_HEAD, POLICY_VERSION, PendingMaster,
    RECOVERY_TREE, RELEASE_ID, REQUEST_CODES, ROTATION, Released, Removal, ReplacedMaster, Reseal,
    Restore, Rotation, StoredPolicy, UseKeys, UseReads, VaultStore, VaultStoreError, Withheld,
    be_u64, decide_use, decode_record, kept_list, key, name_ids, pack, refusal, refusal_of_use,
    request_count, times, unix,
};

/// The migration component of the vault's tables.
pub const COMPONENT: &str = "vault";

/// The vault's tables, in order (forward only).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "vault: one key-value table holding the sled store's trees",
    sql: "
CREATE TABLE vault_kv (
    tree  text  NOT NULL,
    key   bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tree, key)
);
",
}];

const ACCOUNTS: &str = "accounts";
const GRANTS: &str = "used_grants";
const META: &str = "meta";

/// Sessions one replica's store keeps open.
pub const SESSIONS: usize = 4;

/// The longest a call waits for the database before answering UNAVAILABLE.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a key rotation answers on PostgreSQL.
pub const NO_ROTATION: &str = "key rotation and master key replacement are not supported on the \
     postgres store yet; run them on a sled vault, or wait for a release that builds them";

/// Waits for an event to be settled in the PostgreSQL outbox, by whichever
/// vault replica ships; audit's receipts are checked by that shipper.
#[derive(Clone)]
pub struct PgGate(PgOutbox);

impl std::fmt::Debug for PgGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgGate").finish_non_exhaustive()
    }
}

impl AuditGate for PgGate {
    fn confirm(&self, seq: u64, timeout: Duration) -> BoxFuture<'_, Result<(), AckTimeout>> {
        Box::pin(async move {
            self.0.wait_settled(seq, timeout).await.map_err(|e| {
                tracing::warn!("event {seq} not settled: {e}");
                AckTimeout(seq)
            })
        })
    }
}

/// The seal service's events, into the PostgreSQL outbox once the store is
/// open (before that they cannot be recorded, and the seal service logs
/// so: a vault whose database is not ready cannot be unsealed either).
#[derive(Clone, Default)]
pub struct PgEvents(pub Arc<std::sync::OnceLock<PgOutbox>>);

impl std::fmt::Debug for PgEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEvents")
            .field("ready", &self.0.get().is_some())
            .finish()
    }
}

impl EventSink for PgEvents {
    fn emit(&self, draft: EventDraft) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let outbox = self.0.get().ok_or_else(|| {
                "the vault's database is not ready yet; the event is not recorded".to_owned()
            })?;
            outbox.emit(draft).await.map_err(|e| e.to_string())
        })
    }
}

/// Brings the vault's tables and the outbox's to this binary's version
/// (what a replica does at start, before it serves).
pub async fn migrate(settings: &PgSettings) -> Result<(), PgError> {
    let mut client = twokey_pgstore::connect(settings).await?;
    twokey_pgstore::outbox::migrate(&mut client).await?;
    twokey_pgstore::migrate(&mut client, COMPONENT, MIGRATIONS).await?;
    Ok(())
}

/// A PostgreSQL failure as the vault answers it: nothing was changed.
fn pg(e: impl Into<PgError>) -> VaultStoreError {
    let e = e.into();
    if e.is_unavailable() {
        VaultStoreError::Database(format!(
            "the vault's database is unavailable ({e}); nothing was changed: retry, through \
             another vault replica if this one stays down"
        ))
    } else {
        VaultStoreError::Database(format!(
            "the vault's database refused a change ({e}); nothing was changed"
        ))
    }
}

/// Why a transaction body stopped: a refusal (rolled back, answered as
/// the sled store answers it) or the database.
enum Fail {
    Abort(Abort),
    Db(VaultStoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Db(pg(e))
    }
}

impl From<VaultStoreError> for Fail {
    fn from(e: VaultStoreError) -> Self {
        Fail::Db(e)
    }
}

fn fail<T>(why: Abort) -> Result<T, Fail> {
    Err(Fail::Abort(why))
}

struct Inner {
    sessions: Sessions,
    outbox: PgOutbox,
    source: String,
    rt: StoreRuntime,
}

/// The vault's store in PostgreSQL; see the module documentation.
#[derive(Clone)]
pub struct PgVaultStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgVaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgVaultStore")
            .field("settings", self.inner.sessions.settings())
            .finish_non_exhaustive()
    }
}

/// Runs `$body` (an expression of type `Result<T, Fail>` using `$tx`) in one
/// transaction on a session of `$store`: committed when it is `Ok`, rolled
/// back otherwise. Evaluates to `Result<Result<T, Abort>, VaultStoreError>`.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        async {
            let mut guard = $store.sessions.get().await.map_err(pg)?;
            let client = guard
                .as_mut()
                .ok_or_else(|| VaultStoreError::Database("no PostgreSQL session".into()))?;
            let $tx = client.transaction().await.map_err(pg)?;
            let out = async { $body }.await;
            match out {
                Ok(v) => {
                    $tx.commit().await.map_err(pg)?;
                    Ok(Ok(v))
                }
                Err(Fail::Abort(why)) => {
                    let _ = $tx.rollback().await;
                    Ok(Err(why))
                }
                Err(Fail::Db(e)) => {
                    let _ = $tx.rollback().await;
                    // The session may be broken: open a new one next time.
                    *guard = None;
                    Err(e)
                }
            }
        }
    }};
}

/// Runs `$body` as an account change of `$account` on `$store` (blocking):
/// the account's lock, the grant id (`Some((id, expires_at))`) and the
/// admins' action id (`Option<&AdminUse>`) first, all in one transaction.
macro_rules! account_change {
    ($store:expr, $account:expr, $grant:expr, $admin:expr, |$tx:ident| $body:expr) => {{
        let inner = &$store.inner;
        let account: &str = $account;
        let grant: Option<(&str, u64)> = $grant;
        let admin: Option<&AdminUse> = $admin;
        $store.block(async move {
            in_tx!(inner, |$tx| {
                lock(&$tx, &account_lock(account)).await?;
                if let Some((grant_id, expires_at)) = grant {
                    claim_grant(&$tx, grant_id, expires_at).await?;
                }
                if let Some(admin) = admin {
                    claim_action(&$tx, admin).await?;
                }
                $body
            })
            .await
        })
    }};
}

async fn get(tx: &Transaction<'_>, tree: &str, k: &[u8]) -> Result<Option<Vec<u8>>, Fail> {
    Ok(tx
        .query_opt(
            "SELECT value FROM vault_kv WHERE tree = $1 AND key = $2",
            &[&tree, &k],
        )
        .await?
        .map(|r| r.get(0)))
}

async fn put(tx: &Transaction<'_>, tree: &str, k: &[u8], v: &[u8]) -> Result<(), Fail> {
    tx.execute(
        "INSERT INTO vault_kv (tree, key, value) VALUES ($1, $2, $3)
         ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
        &[&tree, &k, &v],
    )
    .await?;
    Ok(())
}

async fn del(tx: &Transaction<'_>, tree: &str, k: &[u8]) -> Result<Option<Vec<u8>>, Fail> {
    Ok(tx
        .query_opt(
            "DELETE FROM vault_kv WHERE tree = $1 AND key = $2 RETURNING value",
            &[&tree, &k],
        )
        .await?
        .map(|r| r.get(0)))
}

/// Inserts a key that must be new (a used id): false when it was there.
/// A concurrent claim of the same key waits for the first to end.
async fn claim(tx: &Transaction<'_>, tree: &str, k: &[u8], v: &[u8]) -> Result<bool, Fail> {
    Ok(tx
        .execute(
            "INSERT INTO vault_kv (tree, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (tree, key) DO NOTHING",
            &[&tree, &k, &v],
        )
        .await?
        == 1)
}

/// Locks `what` until the transaction ends (every replica).
async fn lock(tx: &Transaction<'_>, what: &str) -> Result<(), Fail> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("twokey-vault:{what}")],
    )
    .await?;
    Ok(())
}

/// Takes `what`'s lock shared with other readers (held off by a writer).
async fn lock_shared(tx: &Transaction<'_>, what: &str) -> Result<(), Fail> {
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))",
        &[&format!("twokey-vault:{what}")],
    )
    .await?;
    Ok(())
}

fn account_lock(account_id: &str) -> String {
    format!("account:{account_id}")
}

/// A key and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

const POLICY_LOCK: &str = "policy";
const KEYRING_LOCK: &str = "keyring";

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

async fn claim_grant(tx: &Transaction<'_>, grant_id: &str, expires_at: u64) -> Result<(), Fail> {
    if !claim(tx, GRANTS, grant_id.as_bytes(), &expires_at.to_be_bytes()).await? {
        return fail(Abort::Used);
    }
    Ok(())
}

async fn claim_action(tx: &Transaction<'_>, admin: &AdminUse) -> Result<(), Fail> {
    let k = key(ACTION_ID, admin.action_id.as_bytes());
    if !claim(tx, CONSENT_TREE, &k, &admin.action_until.to_be_bytes()).await? {
        return fail(Abort::ActionUsed);
    }
    Ok(())
}

/// Adds `record` to the account's kept seeds (the account's lock held).
async fn keep(
    tx: &Transaction<'_>,
    record: AccountRecord,
    admin: &AdminUse,
    reason: &str,
) -> Result<(), Fail> {
    let id = record.account_id.clone();
    let mut list = match kept_list(get(tx, RECOVERY_TREE, id.as_bytes()).await?.as_deref()) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    list.push(KeptSeed {
        record,
        kept_at: admin.now,
        until: admin.keep_until,
        reason: reason.to_owned(),
        action_id: admin.action_id.clone(),
    });
    put(tx, RECOVERY_TREE, id.as_bytes(), &encode(&list)).await
}

async fn account(tx: &Transaction<'_>, account_id: &str) -> Result<Option<AccountRecord>, Fail> {
    match get(tx, ACCOUNTS, account_id.as_bytes()).await? {
        None => Ok(None),
        Some(bytes) => match decode_record(&bytes) {
            Ok(r) => Ok(Some(r)),
            Err(e) => fail(e),
        },
    }
}

impl PgVaultStore {
    /// Opens the store on the database of `settings`, which must be
    /// migrated ([`migrate`]); events are signed by `signer`. Opens the
    /// outbox's session now and the store's sessions when first needed.
    pub async fn open(
        settings: PgSettings,
        signer: Arc<EventSigner>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, VaultStoreError> {
        let rt = StoreRuntime::new("vault-postgres").map_err(pg)?;
        let source = signer.source().to_string();
        let outbox = {
            let settings = settings.clone();
            rt.handle()
                .spawn(async move {
                    PgOutbox::connect(&settings, signer, clock)
                        .await
                        .map(|o| o.reopening(&settings))
                })
                .await
                .map_err(|e| VaultStoreError::Database(format!("the PostgreSQL task failed: {e}")))?
                .map_err(pg)?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                sessions: Sessions::new(settings, SESSIONS),
                outbox,
                source,
                rt,
            }),
        })
    }

    /// The database this store works on.
    pub fn settings(&self) -> &PgSettings {
        self.inner.sessions.settings()
    }

    /// The outbox the store pushes its events to (for the shipper's gate).
    pub fn outbox(&self) -> PgOutbox {
        self.inner.outbox.clone()
    }

    /// What a release waits on: its event settled by whichever replica
    /// holds the shipping lease.
    pub fn audit_gate(&self) -> PgGate {
        PgGate(self.inner.outbox.clone())
    }

    /// Runs `fut` on the store's runtime and waits for it, blocking the
    /// caller (the trait's methods are synchronous), at most
    /// [`CALL_TIMEOUT`].
    fn block<T: Send>(
        &self,
        fut: impl Future<Output = Result<T, VaultStoreError>> + Send,
    ) -> Result<T, VaultStoreError> {
        let handle = self.inner.rt.handle();
        std::thread::scope(|s| {
            s.spawn(|| {
                handle.block_on(async {
                    tokio::time::timeout(CALL_TIMEOUT, fut)
                        .await
                        .unwrap_or_else(|_| Err(timed_out()))
                })
            })
            .join()
            .unwrap_or_else(|_| {
                Err(VaultStoreError::Database(
                    "the PostgreSQL call panicked".into(),
                ))
            })
        })
    }

    /// One value outside any transaction.
    fn read(&self, tree: &'static str, k: Vec<u8>) -> Result<Option<Vec<u8>>, VaultStoreError> {
        let inner = &self.inner;
        self.block(async move {
            let guard = inner.sessions.get().await.map_err(pg)?;
            let client = guard.as_ref().expect("connected by get");
            Ok(client
                .query_opt(
                    "SELECT value FROM vault_kv WHERE tree = $1 AND key = $2",
                    &[&tree, &k],
                )
                .await
                .map_err(pg)?
                .map(|r| r.get(0)))
        })
    }

    /// Every (key, value) of a tree, in key order.
    fn scan(&self, tree: &'static str) -> Result<Vec<KeyValue>, VaultStoreError> {
        let inner = &self.inner;
        self.block(async move {
            let guard = inner.sessions.get().await.map_err(pg)?;
            let client = guard.as_ref().expect("connected by get");
            Ok(client
                .query(
                    "SELECT key, value FROM vault_kv WHERE tree = $1 ORDER BY key",
                    &[&tree],
                )
                .await
                .map_err(pg)?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    fn meta_json<T: serde::de::DeserializeOwned>(
        &self,
        k: &[u8],
        what: &str,
    ) -> Result<Option<T>, VaultStoreError> {
        self.read(META, k.to_vec())?
            .map(|v| serde_json::from_slice(&v).map_err(|_| VaultStoreError::Corrupt(what.into())))
            .transpose()
    }

    /// A consent history value for the checks before a use; a read that
    /// fails counts as absent. Safe: the use's own transaction reads the
    /// release id, the request's count, the rate and the action id again
    /// under the account's lock and refuses there ([`decide_use`], the
    /// claims under the primary key), so a database that is down answers
    /// UNAVAILABLE from the use, not a made-up "used already".
    fn consent_get(&self, k: Vec<u8>) -> Option<Vec<u8>> {
        self.read(CONSENT_TREE, k).unwrap_or(None)
    }

    /// One grant use in its own transaction (see [`VaultStore::use_grant`]).
    async fn write_use(
        inner: &Inner,
        u: &GrantUse,
    ) -> Result<Result<Released, Abort>, VaultStoreError> {
        in_tx!(inner, |tx| {
            // The account first: every use of it, on every replica, takes
            // turns from here, reading what the one before committed.
            lock(&tx, &account_lock(&u.account_id)).await?;
            lock_shared(&tx, POLICY_LOCK).await?;
            claim_grant(&tx, &u.grant_id, u.expires_at).await?;
            let keys = UseKeys::of(u);
            let reads = UseReads {
                active_policy: get(&tx, META, POLICY_VERSION)
                    .await?
                    .map_or(0, |v| be_u64(&v)),
                release_used: get(&tx, CONSENT_TREE, &keys.release).await?.is_some(),
                request_count: get(&tx, CONSENT_TREE, &keys.request).await?,
                account: get(&tx, ACCOUNTS, u.account_id.as_bytes()).await?,
                recent: get(&tx, CONSENT_TREE, &keys.rate).await?,
            };
            let w = match decide_use(u, reads) {
                Ok(w) => w,
                Err(why) => return fail(why),
            };
            // Claimed, not overwritten: the primary key decides.
            if !claim(&tx, CONSENT_TREE, &keys.release, &w.release).await? {
                return fail(Abort::ReleaseUsed);
            }
            put(&tx, CONSENT_TREE, &keys.request, &w.request_count).await?;
            put(&tx, CONSENT_TREE, &keys.rate, &w.recent).await?;
            put(&tx, ACCOUNTS, u.account_id.as_bytes(), &w.account).await?;
            let seq = inner.outbox.push(&tx, w.event).await.map_err(pg)?;
            Ok(Released {
                seq,
                step: w.step,
                sync_error: None,
            })
        })
        .await
    }
}

fn timed_out() -> VaultStoreError {
    VaultStoreError::Database(format!(
        "the vault's database is unavailable (no answer within {CALL_TIMEOUT:?}); nothing was \
         changed that is not committed: retry, through another vault replica if this one stays down"
    ))
}

/// The answer of a transaction that refused with `why`, about `id`.
fn finish<T>(
    result: Result<Result<T, Abort>, VaultStoreError>,
    id: &str,
) -> Result<T, VaultStoreError> {
    match result? {
        Ok(v) => Ok(v),
        Err(why) => Err(refusal(why, id, "")),
    }
}

impl ReleaseHistory for PgVaultStore {
    fn release_id_used(&self, release_id: &str) -> bool {
        self.consent_get(key(RELEASE_ID, release_id.as_bytes()))
            .is_some()
    }

    fn codes_released(&self, request_digest: &[u8; 32]) -> u32 {
        request_count(
            self.consent_get(key(REQUEST_CODES, request_digest))
                .as_deref(),
        )
        .0
    }

    fn releases_since(&self, account_id: &str, since: std::time::SystemTime) -> u32 {
        let since = unix(since);
        let n = self
            .consent_get(key(ACCOUNT_RELEASES, account_id.as_bytes()))
            .map_or(0, |v| times(&v).into_iter().filter(|&t| t >= since).count());
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

impl AdminHistory for PgVaultStore {
    fn action_id_used(&self, action_id: &str) -> bool {
        self.consent_get(key(ACTION_ID, action_id.as_bytes()))
            .is_some()
    }
}

impl VaultStore for PgVaultStore {
    fn key_check(&self) -> Result<Option<Vec<u8>>, VaultStoreError> {
        self.read(META, KEY_CHECK.to_vec())
    }

    fn set_key_check(&self, check: &[u8]) -> Result<(), VaultStoreError> {
        // Replicas starting at once with the same master key write the
        // same value; the first one stays.
        let inner = &self.inner;
        let result = self.block(async move {
            in_tx!(inner, |tx| {
                claim(&tx, META, KEY_CHECK, check).await?;
                Ok(())
            })
            .await
        });
        finish(result, "the key check")
    }

    fn get(&self, account_id: &str) -> Result<Option<AccountRecord>, VaultStoreError> {
        self.read(ACCOUNTS, account_id.as_bytes().to_vec())?
            .map(|v| {
                serde_json::from_slice(&v).map_err(|_| VaultStoreError::Corrupt(account_id.into()))
            })
            .transpose()
    }

    fn list(&self) -> Result<Vec<AccountRecord>, VaultStoreError> {
        self.scan(ACCOUNTS)?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v)
                    .map_err(|_| VaultStoreError::Corrupt(String::from_utf8_lossy(&k).into_owned()))
            })
            .collect()
    }

    fn count(&self) -> usize {
        let inner = &self.inner;
        self.block(async move {
            let guard = inner.sessions.get().await.map_err(pg)?;
            let client = guard.as_ref().expect("connected by get");
            let row = client
                .query_one(
                    "SELECT count(*) FROM vault_kv WHERE tree = $1",
                    &[&ACCOUNTS],
                )
                .await
                .map_err(pg)?;
            Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
        .unwrap_or(0)
    }

    fn put(&self, new: NewAccount<'_>, event: EventDraft) -> Result<u64, VaultStoreError> {
        let NewAccount {
            record,
            replace,
            grant,
            admin,
        } = new;
        let outbox = &self.inner.outbox;
        let result = account_change!(
            self,
            &record.account_id,
            Some((grant.grant_id.as_str(), grant.expires_at)),
            admin,
            |tx| {
                let old = account(&tx, &record.account_id).await?;
                if !replace && old.is_some() {
                    return fail(Abort::Exists);
                }
                let mut record = record.clone();
                if let Some(old) = old {
                    record.last_step = record.last_step.max(old.last_step);
                    record.disabled = old.disabled;
                    let Some(admin) = admin else {
                        return fail(Abort::Exists);
                    };
                    keep(&tx, old, admin, "replaced").await?;
                }
                put(
                    &tx,
                    ACCOUNTS,
                    record.account_id.as_bytes(),
                    &encode(&record),
                )
                .await?;
                Ok(outbox.push(&tx, event).await.map_err(pg)?)
            }
        );
        finish(result, &record.account_id).map_err(|e| {
            name_ids(
                e,
                &grant.grant_id,
                admin.map_or("", |a| a.action_id.as_str()),
            )
        })
    }

    async fn use_grant(&self, grant: GrantUse) -> Result<Released, VaultStoreError> {
        let inner = self.inner.clone();
        self.inner
            .rt
            .handle()
            .spawn(async move {
                tokio::time::timeout(CALL_TIMEOUT, Self::write_use(&inner, &grant))
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
                    .map(|r| r.map_err(|why| refusal_of_use(&grant, why)))
            })
            .await
            .map_err(|e| VaultStoreError::Database(format!("the PostgreSQL task failed: {e}")))?
            .and_then(|answer| answer)
    }

    fn remove(&self, removal: Removal) -> Result<u64, VaultStoreError> {
        let Removal {
            grant_id,
            expires_at,
            account_id,
            admin,
            event,
        } = &removal;
        let outbox = &self.inner.outbox;
        let result = account_change!(
            self,
            account_id,
            Some((grant_id.as_str(), *expires_at)),
            Some(admin),
            |tx| {
                let Some(old) = del(&tx, ACCOUNTS, account_id.as_bytes()).await? else {
                    return fail(Abort::Missing);
                };
                let Ok(old) = decode_record(&old) else {
                    return fail(Abort::Corrupt);
                };
                keep(&tx, old, admin, "removed").await?;
                Ok(outbox.push(&tx, event.clone()).await.map_err(pg)?)
            }
        );
        finish(result, account_id).map_err(|e| name_ids(e, grant_id, &admin.action_id))
    }

    fn set_enabled(&self, change: EnabledChange) -> Result<(u64, AccountRecord), VaultStoreError> {
        let EnabledChange {
            grant,
            account_id,
            enabled,
            admin,
            event,
        } = &change;
        let outbox = &self.inner.outbox;
        let result = account_change!(
            self,
            account_id,
            Some((grant.grant_id.as_str(), grant.expires_at)),
            Some(admin),
            |tx| {
                let Some(mut record) = account(&tx, account_id).await? else {
                    return fail(Abort::Missing);
                };
                record.disabled = !enabled;
                put(&tx, ACCOUNTS, account_id.as_bytes(), &encode(&record)).await?;
                let seq = outbox.push(&tx, event.clone()).await.map_err(pg)?;
                Ok((seq, record))
            }
        );
        finish(result, account_id).map_err(|e| name_ids(e, &grant.grant_id, &admin.action_id))
    }

    fn restore(&self, restore: Restore) -> Result<(u64, AccountRecord, KeptSeed), VaultStoreError> {
        let Restore {
            grant,
            account_id,
            admin,
            event,
        } = &restore;
        let outbox = &self.inner.outbox;
        let result = account_change!(
            self,
            account_id,
            Some((grant.grant_id.as_str(), grant.expires_at)),
            Some(admin),
            |tx| {
                let mut list = match kept_list(
                    get(&tx, RECOVERY_TREE, account_id.as_bytes())
                        .await?
                        .as_deref(),
                ) {
                    Ok(l) => l,
                    Err(e) => return fail(e),
                };
                list.retain(|k| k.until >= admin.now);
                let Some(kept) = list.pop() else {
                    return fail(Abort::NothingKept);
                };
                if list.is_empty() {
                    del(&tx, RECOVERY_TREE, account_id.as_bytes()).await?;
                } else {
                    put(&tx, RECOVERY_TREE, account_id.as_bytes(), &encode(&list)).await?;
                }
                let mut record = kept.record.clone();
                if let Some(current) = account(&tx, account_id).await? {
                    record.last_step = record.last_step.max(current.last_step);
                    keep(&tx, current, admin, "restored over").await?;
                }
                put(&tx, ACCOUNTS, account_id.as_bytes(), &encode(&record)).await?;
                let event = event
                    .clone()
                    .attr("kept_reason", kept.reason.clone())
                    .attr("kept_at", kept.kept_at.to_string())
                    .attr("kept_by_action", kept.action_id.clone());
                let seq = outbox.push(&tx, event).await.map_err(pg)?;
                Ok((seq, record, kept))
            }
        );
        finish(result, account_id).map_err(|e| name_ids(e, &grant.grant_id, &admin.action_id))
    }

    fn record(&self, event: EventDraft) -> Result<u64, VaultStoreError> {
        let inner = &self.inner;
        let result = self.block(async move {
            in_tx!(inner, |tx| Ok(inner
                .outbox
                .push(&tx, event)
                .await
                .map_err(pg)?))
            .await
        });
        finish(result, "outbox")
    }

    fn use_vault_action(
        &self,
        admin: &AdminUse,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let inner = &self.inner;
        let result = self.block(async move {
            in_tx!(inner, |tx| {
                claim_action(&tx, admin).await?;
                Ok(inner.outbox.push(&tx, event).await.map_err(pg)?)
            })
            .await
        });
        finish(result, &admin.action_id)
    }

    fn withhold(&self, w: Withheld<'_>, event: EventDraft) -> Result<u64, VaultStoreError> {
        let outbox = &self.inner.outbox;
        let result = account_change!(self, w.account_id, None, None, |tx| {
            if let Some(bytes) = get(&tx, ACCOUNTS, w.account_id.as_bytes()).await?
                && let Ok(mut record) = serde_json::from_slice::<AccountRecord>(&bytes)
                && record.last_step == Some(w.step)
            {
                record.last_step = w.step.checked_sub(1);
                put(&tx, ACCOUNTS, w.account_id.as_bytes(), &encode(&record)).await?;
            }
            let request_key = key(REQUEST_CODES, w.request_digest);
            let (released, until) =
                request_count(get(&tx, CONSENT_TREE, &request_key).await?.as_deref());
            if released > 0 && released != u32::MAX {
                let mut value = (released - 1).to_be_bytes().to_vec();
                value.extend(until.to_be_bytes());
                put(&tx, CONSENT_TREE, &request_key, &value).await?;
            }
            let rate_key = key(ACCOUNT_RELEASES, w.account_id.as_bytes());
            if let Some(v) = get(&tx, CONSENT_TREE, &rate_key).await? {
                let mut recent = times(&v);
                if let Some(i) = recent.iter().rposition(|&t| t == w.released_at) {
                    recent.remove(i);
                    put(&tx, CONSENT_TREE, &rate_key, &pack(&recent)).await?;
                }
            }
            Ok(outbox.push(&tx, event).await.map_err(pg)?)
        });
        finish(result, w.account_id)
    }

    fn sweep(&self, now: u64) -> Result<usize, VaultStoreError> {
        let inner = &self.inner;
        let mut removed = 0;
        // Used ids and counts: each deleted only if it is still the value
        // read, so a concurrent change is never lost.
        for (tree, (k, v)) in self.scan(GRANTS)?.into_iter().map(|kv| (GRANTS, kv)).chain(
            self.scan(CONSENT_TREE)?
                .into_iter()
                .map(|kv| (CONSENT_TREE, kv)),
        ) {
            let expired = if tree == GRANTS {
                be_u64(&v).saturating_add(GRANT_ID_GRACE_SECS) < now
            } else if k.starts_with(ACCOUNT_RELEASES) {
                times(&v)
                    .iter()
                    .all(|&t| t.saturating_add(MAX_RATE_WINDOW_SECS) < now)
            } else if k.starts_with(REQUEST_CODES) {
                request_count(Some(&v)).1 < now
            } else {
                be_u64(&v) < now
            };
            if expired {
                removed += self.block(async move {
                    let guard = inner.sessions.get().await.map_err(pg)?;
                    let client = guard.as_ref().expect("connected by get");
                    client
                        .execute(
                            "DELETE FROM vault_kv WHERE tree = $1 AND key = $2 AND value = $3",
                            &[&tree, &k, &v],
                        )
                        .await
                        .map_err(pg)
                })? as usize;
            }
        }
        for (k, v) in self.scan(RECOVERY_TREE)? {
            let Ok(list) = serde_json::from_slice::<Vec<KeptSeed>>(&v) else {
                continue;
            };
            if list.iter().all(|kept| kept.until >= now) {
                continue;
            }
            let account_id = String::from_utf8_lossy(&k).into_owned();
            let source = self.inner.source.clone();
            let outbox = &self.inner.outbox;
            let (aid, kk) = (account_id.as_str(), k.as_slice());
            let result = account_change!(self, aid, None, None, |tx| {
                let Ok(list) = kept_list(get(&tx, RECOVERY_TREE, kk).await?.as_deref()) else {
                    return Ok(0);
                };
                let (gone, keep): (Vec<KeptSeed>, Vec<KeptSeed>) =
                    list.into_iter().partition(|kept| kept.until < now);
                if keep.is_empty() {
                    del(&tx, RECOVERY_TREE, kk).await?;
                } else {
                    put(&tx, RECOVERY_TREE, kk, &encode(&keep)).await?;
                }
                for kept in &gone {
                    let event = EventDraft::new(source.clone(), "account.recovery.purged")
                        .account(aid)
                        .attr("kept_reason", kept.reason.clone())
                        .attr("kept_at", kept.kept_at.to_string())
                        .attr("kept_by_action", kept.action_id.clone());
                    outbox.push(&tx, event).await.map_err(pg)?;
                }
                Ok(gone.len())
            });
            removed += finish(result, &account_id)?;
        }
        Ok(removed)
    }

    fn policies(&self) -> Result<Vec<StoredPolicy>, VaultStoreError> {
        self.scan(POLICIES_TREE)?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v)
                    .map_err(|_| VaultStoreError::Corrupt(format!("policy version {}", be_u64(&k))))
            })
            .collect()
    }

    fn policy_head(&self) -> Result<Option<Vec<u8>>, VaultStoreError> {
        self.read(META, POLICY_HEAD.to_vec())
    }

    fn put_policy(
        &self,
        policy: &StoredPolicy,
        head: &[u8],
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let bytes = encode(policy);
        let inner = &self.inner;
        let result = self.block(async move {
            in_tx!(inner, |tx| {
                lock(&tx, POLICY_LOCK).await?;
                let stored = get(&tx, META, POLICY_VERSION)
                    .await?
                    .map_or(0, |v| be_u64(&v));
                if policy.version <= stored {
                    return fail(Abort::NotNewer(stored));
                }
                put(&tx, POLICIES_TREE, &policy.version.to_be_bytes(), &bytes).await?;
                put(&tx, META, POLICY_HEAD, head).await?;
                put(&tx, META, POLICY_VERSION, &policy.version.to_be_bytes()).await?;
                Ok(inner.outbox.push(&tx, event).await.map_err(pg)?)
            })
            .await
        });
        match finish(result, "policy") {
            Err(VaultStoreError::PolicyNotNewer { stored, .. }) => {
                Err(VaultStoreError::PolicyNotNewer {
                    proposed: policy.version,
                    stored,
                })
            }
            other => other,
        }
    }

    async fn commit(&self) -> Result<(), VaultStoreError> {
        // Every change committed with synchronous_commit = on is durable,
        // and its NOTIFY woke the shipper.
        Ok(())
    }

    fn source(&self) -> String {
        self.inner.source.clone()
    }

    fn sync_now(&self) -> Result<(), VaultStoreError> {
        Ok(())
    }

    fn keyring(&self) -> Result<BTreeMap<u32, Vec<u8>>, VaultStoreError> {
        self.scan(KEYRING_TREE)?
            .into_iter()
            .map(|(k, v)| {
                let generation = k
                    .as_slice()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| VaultStoreError::Corrupt("the keyring".into()))?;
                Ok((generation, v))
            })
            .collect()
    }

    fn is_empty(&self) -> Result<bool, VaultStoreError> {
        Ok(self.scan(ACCOUNTS)?.is_empty() && self.scan(RECOVERY_TREE)?.is_empty())
    }

    fn rotation(&self) -> Result<Option<Rotation>, VaultStoreError> {
        self.meta_json(ROTATION, "the key rotation record")
    }

    fn last_rotation(&self) -> Result<Option<FinishedRotation>, VaultStoreError> {
        self.meta_json(LAST_ROTATION, "the last key rotation record")
    }

    fn add_generation(&self, new: NewGeneration) -> Result<u64, VaultStoreError> {
        if new.rotation.is_some() || new.pending_master.is_some() || new.admin.is_some() {
            return Err(VaultStoreError::Unsupported(NO_ROTATION.into()));
        }
        let generation = new.generation;
        let inner = &self.inner;
        let result = self.block(async move {
            in_tx!(inner, |tx| {
                lock(&tx, KEYRING_LOCK).await?;
                let stored = tx
                    .query_one(
                        "SELECT count(*) FROM vault_kv WHERE tree = $1",
                        &[&KEYRING_TREE],
                    )
                    .await?
                    .get::<_, i64>(0);
                if stored > 0 {
                    return fail(Abort::Exists);
                }
                if new.with_generation_zero {
                    put(&tx, KEYRING_TREE, &0u32.to_be_bytes(), &[]).await?;
                }
                put(
                    &tx,
                    KEYRING_TREE,
                    &generation.to_be_bytes(),
                    &new.sealed_key,
                )
                .await?;
                Ok(inner.outbox.push(&tx, new.event).await.map_err(pg)?)
            })
            .await
        });
        match result? {
            Ok(seq) => Ok(seq),
            Err(Abort::Exists) => Err(VaultStoreError::Database(format!(
                "key generation {generation} was written by another vault replica starting at the \
                 same time; start this replica again and it will use that one"
            ))),
            Err(why) => Err(refusal(why, "the keyring", "")),
        }
    }

    fn reseal_batch(
        &self,
        _limit: usize,
        _reseal: Reseal<'_>,
        _event: EventDraft,
    ) -> Result<Batch, VaultStoreError> {
        match self.rotation()? {
            None => Ok(Batch {
                resealed: 0,
                rotation: None,
                seq: None,
            }),
            Some(_) => Err(VaultStoreError::Unsupported(NO_ROTATION.into())),
        }
    }

    fn seeds_per_generation(&self) -> Result<BTreeMap<u32, u64>, VaultStoreError> {
        let mut counts = BTreeMap::new();
        for (k, v) in self.scan(ACCOUNTS)? {
            let record = decode_record(&v)
                .map_err(|_| VaultStoreError::Corrupt(String::from_utf8_lossy(&k).into_owned()))?;
            *counts.entry(record.key_generation).or_default() += 1;
        }
        for (k, v) in self.scan(RECOVERY_TREE)? {
            let list = kept_list(Some(&v))
                .map_err(|_| VaultStoreError::Corrupt(String::from_utf8_lossy(&k).into_owned()))?;
            for kept in list {
                *counts.entry(kept.record.key_generation).or_default() += 1;
            }
        }
        Ok(counts)
    }

    fn rewalk(&self, _event: EventDraft) -> Result<Option<Rotation>, VaultStoreError> {
        match self.rotation()? {
            None => Ok(None),
            Some(_) => Err(VaultStoreError::Unsupported(NO_ROTATION.into())),
        }
    }

    fn finish_rotation(
        &self,
        _retire: &[u32],
        _now: u64,
        _event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        Err(VaultStoreError::Unsupported(NO_ROTATION.into()))
    }

    fn pending_master(&self) -> Result<Option<PendingMaster>, VaultStoreError> {
        self.meta_json(MASTER_PENDING, "the pending master key record")
    }

    fn master_generation(&self) -> Result<u32, VaultStoreError> {
        Ok(self
            .read(META, MASTER_GENERATION.to_vec())?
            .and_then(|v| v.as_slice().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(1))
    }

    fn last_master(&self) -> Result<Option<ReplacedMaster>, VaultStoreError> {
        self.meta_json(MASTER_LAST, "the last master key replacement record")
    }

    fn promote_master(
        &self,
        _replaced: &ReplacedMaster,
        _event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        Err(VaultStoreError::Unsupported(NO_ROTATION.into()))
    }
}
