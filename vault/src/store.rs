//! The vault's store: sealed seeds with their metadata, used grant ids (kept
//! until their grant expires, so a restart does not reopen a replay), the
//! key-check value, every applied version of the admin-signed policy, the
//! consent history (used release and admin-action ids, codes released per
//! request, release times per account) and the seeds kept for restore.
//! Every change writes its audit event into the outbox in the same sled
//! transaction. Grant uses, the hot path, are group-committed: concurrent
//! uses share one sled transaction (one log write instead of one per code)
//! and the one sync after it, each still checked and answered on its own. The transaction that uses a
//! release grant checks again, against what it reads inside itself, that
//! the release id is unused, that the request has codes left, that the
//! account's rate allows one more, that the account is enabled and that the
//! policy the evidence was checked under is still the active one, and
//! records all of it with the grant use: no race between check and use.
//! Each account keeps the highest time step whose code it handed out,
//! written in the same transaction, so no step is handed out twice, across
//! restarts too.
//! The keyring (issue 19): one data key per generation, each sealed under
//! the master key, in its own tree; every sealed seed (kept ones too)
//! records its generation. A rotation adds a generation with its progress
//! record in one transaction, re-seals seeds in batches (one transaction
//! each, progress with them) and retires old generations in the
//! transaction that ends it. A rotation also replaces the master key: the
//! transaction that starts it records the next master key sealed under the
//! current one, with the keyring, the key check and the policy head sealed
//! under the next ([`PendingMaster`]); once the next key's seal material is
//! written, one transaction promotes those and drops the old ones.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
};
use twokey_consent::{AdminHistory, ConsentError, RateLimit, ReleaseHistory, StatementRef};
use twokey_runtime::{
    durable::{DurableDb, StoreError},
    events::EventDraft,
    outbox::Outbox,
};

pub mod postgres;

use crate::{
    seed::TotpParams,
    totp::{MAX_STEPS_AHEAD, choose_step, min_seconds_left},
};

/// The tree of applied policy versions: key the version as a big-endian
/// u64, value a [`StoredPolicy`] as JSON.
pub const POLICIES_TREE: &str = "policies";
/// The consent history tree (see the key prefixes below).
pub const CONSENT_TREE: &str = "consent_history";
/// The tree of seeds kept for restore: key the account id, value a JSON list
/// of [`KeptSeed`], oldest first.
pub const RECOVERY_TREE: &str = "recovery";

/// The keyring tree: key a generation (u32 big-endian), value its data key
/// sealed under the master key; generation 0, the master key itself, is
/// stored with an empty value while seeds sealed before the keyring exist.
pub const KEYRING_TREE: &str = "keyring";

/// Consent history: a used release id → when it may be forgotten.
const RELEASE_ID: &[u8] = b"r/";
/// Consent history: a request statement's digest → codes released (u32) and
/// when the count may be forgotten (u64), big-endian.
const REQUEST_CODES: &[u8] = b"q/";
/// Consent history: an account → the Unix times of its releases (u64s,
/// big-endian), pruned to the rate window on each release.
const ACCOUNT_RELEASES: &[u8] = b"a/";
/// Consent history: a used admin action id → when it may be forgotten.
const ACTION_ID: &[u8] = b"x/";

/// Longest window a release rate can have (the policy's maximum).
const MAX_RATE_WINDOW_SECS: u64 = 7 * 86_400;

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
    /// M admins disabled code release for the account. Absent in records
    /// written before it existed, which load as enabled.
    #[serde(default)]
    pub disabled: bool,
    /// The keyring generation whose data key sealed the seed. Absent in
    /// records written before the keyring: generation 0, sealed under the
    /// master key itself.
    #[serde(default)]
    pub key_generation: u32,
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

/// A replaced or removed account kept, seed sealed as it was, for restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptSeed {
    /// The account as it was.
    pub record: AccountRecord,
    /// Unix time it was replaced or removed.
    pub kept_at: u64,
    /// Unix time after which it is purged.
    pub until: u64,
    /// `replaced`, `removed` or `restored over`.
    pub reason: String,
    /// The admin action that put it here.
    pub action_id: String,
}

/// Where a rotation's walk over the sealed seeds is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationCursor {
    /// Walking the accounts, after this account id (none: from the start).
    Accounts(Option<String>),
    /// Walking the kept seeds, after this account id.
    Kept(Option<String>),
    /// Walked both: count what still names an older generation, then
    /// retire or walk again.
    Check,
}

impl RotationCursor {
    /// The phase's name, for status and events.
    pub fn phase(&self) -> &'static str {
        match self {
            Self::Accounts(_) => "resealing accounts",
            Self::Kept(_) => "resealing kept seeds",
            Self::Check => "checking",
        }
    }
}

/// A key rotation in progress, as stored (in the transaction that added
/// its generation, then with every batch).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rotation {
    /// The generation seeds are re-sealed to.
    pub generation: u32,
    /// The admins' single-use action id.
    pub action_id: String,
    /// The admins' SPIFFE IDs, comma-separated.
    pub admins: String,
    /// Unix time it started.
    pub started_at: u64,
    /// Seeds re-sealed so far.
    pub resealed: u64,
    /// Where the walk is.
    pub cursor: RotationCursor,
    /// Walks begun (a seed sealed under an older generation meanwhile
    /// makes another).
    pub passes: u32,
}

/// A finished rotation, kept so that its action id answers again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FinishedRotation {
    /// The rotation.
    pub rotation: Rotation,
    /// Unix time it finished.
    pub finished_at: u64,
    /// The generations it retired.
    pub retired: Vec<u32>,
}

/// A generation to add to the keyring, as [`VaultStore::add_generation`]
/// takes it.
#[derive(Debug, Clone)]
pub struct NewGeneration {
    /// The generation (above every stored one).
    pub generation: u32,
    /// Its data key, sealed under the master key.
    pub sealed_key: Vec<u8>,
    /// Also record generation 0 (seeds sealed before the keyring exist).
    pub with_generation_zero: bool,
    /// The rotation it starts (none: the keyring's first generation).
    pub rotation: Option<Rotation>,
    /// The admins' consent whose action id it uses up.
    pub admin: Option<AdminUse>,
    /// The master key replacement it starts (none: the master key stays).
    pub pending_master: Option<PendingMaster>,
    /// The event.
    pub event: EventDraft,
}

/// A master key replacement in progress, as stored from the transaction
/// that starts a rotation until the one that promotes the next key. Binary
/// fields are base64; none is in the clear.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingMaster {
    /// The next master key's generation (the current one's plus one).
    pub generation: u32,
    /// The next master key, sealed under the current one.
    pub sealed_master: String,
    /// The next master key's key check.
    pub key_check: String,
    /// The keyring (every generation's data key, the new one included)
    /// sealed under the next master key.
    pub keyring: BTreeMap<u32, String>,
    /// The policy head sealed under the next master key, when a policy is
    /// applied.
    pub policy_head: Option<String>,
    /// The rotation's action id.
    pub action_id: String,
    /// The admins' SPIFFE IDs, comma-separated.
    pub admins: String,
    /// Unix time it started.
    pub started_at: u64,
}

impl PendingMaster {
    fn bytes(text: &str) -> Vec<u8> {
        B64.decode(text).unwrap_or_default()
    }

    /// The next master key, sealed under the current one.
    pub fn sealed_master(&self) -> Vec<u8> {
        Self::bytes(&self.sealed_master)
    }

    /// The next master key's key check.
    pub fn key_check(&self) -> Vec<u8> {
        Self::bytes(&self.key_check)
    }
}

/// The last master key replacement, kept for `KeyStatus`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplacedMaster {
    /// The master key's generation it made current.
    pub generation: u32,
    /// The rotation's action id.
    pub action_id: String,
    /// Unix time it was promoted.
    pub replaced_at: u64,
}

/// What one re-seal batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Seeds re-sealed in it.
    pub resealed: u64,
    /// The rotation after it (none: no rotation in progress).
    pub rotation: Option<Rotation>,
    /// Its event's sequence number, if it wrote one.
    pub seq: Option<u64>,
}

/// Re-seals one record to the rotation's generation (the seed opened with
/// its own generation's key, sealed with the new one); an `Err` names why
/// it cannot be opened.
pub type Reseal<'a> = &'a (dyn Fn(&AccountRecord) -> Result<AccountRecord, String> + Sync);

/// One applied policy version as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredPolicy {
    /// The version.
    pub version: u64,
    /// The exact document the admins signed.
    pub document: String,
    /// The detached signatures, base64.
    pub signatures: Vec<String>,
    /// The admins whose signatures verified.
    pub signed_by: Vec<String>,
    /// SHA-256 of the document, base64.
    pub digest: String,
    /// Unix time the vault applied it.
    pub applied_at: u64,
}

impl StoredPolicy {
    /// The signatures' bytes (base64 that does not decode gives an empty
    /// signature, which then fails verification).
    pub fn signature_bytes(&self) -> Vec<Vec<u8>> {
        self.signatures
            .iter()
            .map(|s| B64.decode(s).unwrap_or_default())
            .collect()
    }

    /// The digest's bytes.
    pub fn digest_bytes(&self) -> Vec<u8> {
        B64.decode(&self.digest).unwrap_or_default()
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
    /// The consent, checked again inside the transaction, no longer holds
    /// (a replayed release or action id, codes or rate used up, another
    /// policy version in force).
    #[error(transparent)]
    Consent(ConsentError),
    /// Code release is disabled for the account.
    #[error(
        "account {0} is disabled: it releases no codes until M admins enable it (`twokey account enable`)"
    )]
    Disabled(String),
    /// No replaced or removed seed of the account is kept.
    #[error(
        "no replaced or removed seed of account {0} is kept; the recovery window may have passed"
    )]
    NothingKept(String),
    /// A policy version not above the stored one.
    #[error("policy version {proposed} is not above the stored version {stored}")]
    PolicyNotNewer {
        /// The version to store.
        proposed: u64,
        /// The newest stored.
        stored: u64,
    },
    /// A key rotation is in progress already.
    #[error("key rotation to generation {0} is in progress; `twokey vault key-status` shows it")]
    Rotating(u32),
    /// The keyring changed between a master key replacement's start and
    /// its promotion.
    #[error(
        "the pending master key replacement does not match the keyring (generations {0}); the keyring was changed outside the vault"
    )]
    PendingMismatch(String),
    /// A stored seed does not open with its generation's key.
    #[error("the seed of {0} cannot be re-sealed: {1}")]
    Reseal(String, String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The PostgreSQL store cannot reach its database (or it refused the
    /// change): nothing was changed; the message says what to do.
    #[error("{0}")]
    Database(String),
    /// The store does not do this yet (the PostgreSQL store and key
    /// rotation); the message says so.
    #[error("{0}")]
    Unsupported(String),
    /// A stored record is unreadable.
    #[error("stored record for {0} is unreadable")]
    Corrupt(String),
}

/// What the vault needs from storage. Its [`ReleaseHistory`] and
/// [`AdminHistory`] read the consent history outside any transaction, for
/// the checks before a use; the uses check it again inside theirs.
pub trait VaultStore: ReleaseHistory + AdminHistory + Send + Sync + 'static {
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
    /// returns the event's sequence number. Refuses a used grant, an
    /// existing account unless `replace`, and a used admin action id; a
    /// replaced account is kept for restore. A refusal changes nothing.
    fn put(&self, new: NewAccount<'_>, event: EventDraft) -> Result<u64, VaultStoreError>;
    /// Marks a grant used (until `expires_at`), checks and records the
    /// release's consent history ([`ReleaseUse`]), chooses the step whose
    /// code it releases ([`choose_step`]) and stores it as the account's
    /// highest, stamps the account's last use, and records the event with
    /// the step; refuses a used grant, a disabled account, consent that no
    /// longer holds, and a use with no step free yet
    /// ([`VaultStoreError::StepsUsed`]); a refusal changes nothing.
    /// Durable when it answers: the use and its event are synced (group
    /// commit: concurrent uses share one transaction and one sync) and the
    /// shipper is woken, unless [`Released::sync_error`] says the sync
    /// failed. No [`VaultStore::commit`] is needed after it.
    fn use_grant(
        &self,
        grant: GrantUse,
    ) -> impl Future<Output = Result<Released, VaultStoreError>> + Send;
    /// Marks a removal grant and its admin action used and moves the
    /// account to the kept seeds, with its event.
    fn remove(&self, removal: Removal) -> Result<u64, VaultStoreError>;
    /// Marks a grant and its admin action used and sets the account's
    /// `disabled` flag, with its event; returns the event's sequence number
    /// and the account.
    fn set_enabled(&self, change: EnabledChange) -> Result<(u64, AccountRecord), VaultStoreError>;
    /// Marks a grant and its admin action used and brings back the newest
    /// kept seed of the account; an account enrolled under the id meanwhile
    /// is kept in its place. Returns the event's sequence number, the
    /// restored account and what was kept.
    fn restore(&self, restore: Restore) -> Result<(u64, AccountRecord, KeptSeed), VaultStoreError>;
    /// Records an event that goes with no other change.
    fn record(&self, event: EventDraft) -> Result<u64, VaultStoreError>;
    /// Marks a vault-wide admin action (a seal) used, with its event, in
    /// one transaction; refuses a used action id. Not durable until
    /// [`VaultStore::commit`].
    fn use_vault_action(&self, admin: &AdminUse, event: EventDraft)
    -> Result<u64, VaultStoreError>;
    /// Records `code.withheld` for a code of `step` that never left the
    /// vault, and gives the step back if it is still the account's highest
    /// (the one below it then counts as handed out, which is only cautious).
    fn withhold(&self, withheld: Withheld<'_>, event: EventDraft) -> Result<u64, VaultStoreError>;
    /// Forgets used grant ids whose grants expired before `now`, consent
    /// history past its time, and purges kept seeds whose recovery window
    /// ended (each with an `account.recovery.purged` event).
    fn sweep(&self, now: u64) -> Result<usize, VaultStoreError>;
    /// Every applied policy version, oldest first.
    fn policies(&self) -> Result<Vec<StoredPolicy>, VaultStoreError>;
    /// The sealed head of the policy chain (the newest version and its
    /// digest, sealed with the master key), if any.
    fn policy_head(&self) -> Result<Option<Vec<u8>>, VaultStoreError>;
    /// Stores a new policy version above every stored one, with its sealed
    /// head and its event.
    fn put_policy(
        &self,
        policy: &StoredPolicy,
        head: &[u8],
        event: EventDraft,
    ) -> Result<u64, VaultStoreError>;
    /// Makes every change so far durable and hands new events to the shipper.
    fn commit(&self) -> impl Future<Output = Result<(), VaultStoreError>> + Send;
    /// The vault's own SPIFFE ID, the actor of what it does by itself.
    fn source(&self) -> String;
    /// Makes every change so far durable now, blocking (at start).
    fn sync_now(&self) -> Result<(), VaultStoreError>;
    /// The keyring: each generation's sealed data key (empty for
    /// generation 0, the master key itself).
    fn keyring(&self) -> Result<std::collections::BTreeMap<u32, Vec<u8>>, VaultStoreError>;
    /// Whether no account and no kept seed is stored.
    fn is_empty(&self) -> Result<bool, VaultStoreError>;
    /// The rotation in progress, if any.
    fn rotation(&self) -> Result<Option<Rotation>, VaultStoreError>;
    /// The last finished rotation, if any.
    fn last_rotation(&self) -> Result<Option<FinishedRotation>, VaultStoreError>;
    /// Adds a generation to the keyring, with the rotation it starts (its
    /// action id used up) and its event, in one transaction; refuses a
    /// generation not above the stored ones and a second rotation
    /// ([`VaultStoreError::Rotating`]). Not durable until
    /// [`VaultStore::commit`].
    fn add_generation(&self, new: NewGeneration) -> Result<u64, VaultStoreError>;
    /// Re-seals up to `limit` seeds of older generations from where the
    /// rotation's walk is, and moves the walk on, in one transaction with
    /// an event (`key.rotation.batch`, when it re-sealed any); at the end
    /// of the accounts the walk goes on with the kept seeds, then to
    /// [`RotationCursor::Check`]. Not durable until [`VaultStore::commit`].
    fn reseal_batch(
        &self,
        limit: usize,
        reseal: Reseal<'_>,
        event: EventDraft,
    ) -> Result<Batch, VaultStoreError>;
    /// Seeds (accounts and kept seeds) per generation.
    fn seeds_per_generation(&self)
    -> Result<std::collections::BTreeMap<u32, u64>, VaultStoreError>;
    /// Starts the rotation's walk again from the first account (a seed of
    /// an older generation was found at the check), with its event.
    fn rewalk(&self, event: EventDraft) -> Result<Option<Rotation>, VaultStoreError>;
    /// Ends the rotation: removes the `retire`d generations from the
    /// keyring and the rotation record, keeps it as the last one, with its
    /// event, in one transaction. The caller checks first, with every
    /// writer of seeds held off, that no seed names a retired generation.
    fn finish_rotation(
        &self,
        retire: &[u32],
        now: u64,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError>;
    /// The master key replacement in progress, if any.
    fn pending_master(&self) -> Result<Option<PendingMaster>, VaultStoreError>;
    /// The master key's generation (1 until the first replacement).
    fn master_generation(&self) -> Result<u32, VaultStoreError>;
    /// The last master key replacement, if any.
    fn last_master(&self) -> Result<Option<ReplacedMaster>, VaultStoreError>;
    /// Promotes the pending master key, in one transaction with its event:
    /// its keyring, key check and policy head become current, the old ones
    /// and the pending record are removed, its generation and `replaced`
    /// are kept. Refused ([`VaultStoreError::PendingMismatch`]) when the
    /// keyring's generations are not the pending record's. Not durable
    /// until [`VaultStore::commit`] or [`VaultStore::sync_now`].
    fn promote_master(
        &self,
        replaced: &ReplacedMaster,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError>;
}

/// A code recorded as released that never left the vault, as
/// [`VaultStore::withhold`] gives it back: its step, the request's count and
/// the account's rate slot are free again (its grant and release ids stay
/// used: a retry is a new release, signed again).
#[derive(Debug, Clone, Copy)]
pub struct Withheld<'a> {
    /// The account.
    pub account_id: &'a str,
    /// The step the use recorded.
    pub step: u64,
    /// SHA-256 of the request statement whose count the use raised.
    pub request_digest: &'a [u8; 32],
    /// The Unix time the use recorded in the account's release times.
    pub released_at: u64,
}

/// What a release's consent adds to its grant use: checked again and
/// recorded in the transaction.
#[derive(Debug, Clone)]
pub struct ReleaseUse {
    /// The policy version the evidence verified under; the use is refused
    /// if another is active by the time it is written.
    pub policy_version: u64,
    /// The single-use release id.
    pub release_id: String,
    /// The release id is remembered until then (Unix time).
    pub release_id_until: u64,
    /// SHA-256 of the request statement.
    pub request_digest: [u8; 32],
    /// The request id (for messages).
    pub request_id: String,
    /// The request's count is remembered until then (Unix time).
    pub request_until: u64,
    /// Codes the request may release.
    pub codes_per_request: u32,
    /// The account's release rate.
    pub rate: RateLimit,
    /// The operator's SPIFFE ID (for messages).
    pub operator: String,
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
    /// The release's consent.
    pub consent: ReleaseUse,
    /// The `code.released` event.
    pub event: EventDraft,
}

/// What [`VaultStore::use_grant`] recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The `code.released` event's sequence number.
    pub seq: u64,
    /// The time step whose code the grant releases.
    pub step: u64,
    /// Why the group's sync failed, if it did: the use is written but not
    /// known to be durable, so no code may leave (the caller withholds it).
    /// `None`: the use and its event are on stable storage.
    pub sync_error: Option<String>,
}

/// A verified admin action as the store records it.
#[derive(Debug, Clone)]
pub struct AdminUse {
    /// The single-use action id.
    pub action_id: String,
    /// The action id is remembered until then (Unix time).
    pub action_until: u64,
    /// Unix time now.
    pub now: u64,
    /// A seed this action replaces or removes is kept until then.
    pub keep_until: u64,
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
    /// The admins' consent to replacing (none for a new account).
    pub admin: Option<&'a AdminUse>,
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
    /// The admins' consent.
    pub admin: AdminUse,
    /// The `account.removed` event.
    pub event: EventDraft,
}

/// A change of an account's `disabled` flag.
#[derive(Debug, Clone)]
pub struct EnabledChange {
    /// The grant it uses up.
    pub grant: SpentGrant,
    /// The account.
    pub account_id: String,
    /// Release codes (true) or not.
    pub enabled: bool,
    /// The admins' consent.
    pub admin: AdminUse,
    /// The event.
    pub event: EventDraft,
}

/// A restore of a kept seed.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The grant it uses up.
    pub grant: SpentGrant,
    /// The account.
    pub account_id: String,
    /// The admins' consent.
    pub admin: AdminUse,
    /// The `account.restored` event.
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
    policies: sled::Tree,
    consent: sled::Tree,
    recovery: sled::Tree,
    keyring: sled::Tree,
    outbox: Outbox,
    /// Grant uses waiting for a leader to write them.
    queued: Arc<Mutex<Vec<QueuedUse>>>,
    /// Held by the caller writing the queue out (one group at a time).
    leader: Arc<tokio::sync::Mutex<()>>,
    /// The number of accounts, counted once and forgotten by every change
    /// of the account set (sled's `len` walks the whole tree, and `Status`
    /// answers the count on every call).
    account_count: Arc<Mutex<Option<usize>>>,
}

const KEY_CHECK: &[u8] = b"key_check";
/// The sealed head of the policy chain.
const POLICY_HEAD: &[u8] = b"policy_head";
/// The active policy version (u64 big-endian), read by grant uses.
const POLICY_VERSION: &[u8] = b"policy_version";
/// The rotation in progress (JSON [`Rotation`]).
const ROTATION: &[u8] = b"key_rotation";
/// The last finished rotation (JSON [`FinishedRotation`]).
const LAST_ROTATION: &[u8] = b"key_rotation_last";
/// The master key replacement in progress (JSON [`PendingMaster`]).
const MASTER_PENDING: &[u8] = b"master_pending";
/// The master key's generation (u32 big-endian; absent: 1).
const MASTER_GENERATION: &[u8] = b"master_generation";
/// The last master key replacement (JSON [`ReplacedMaster`]).
const MASTER_LAST: &[u8] = b"master_last";
/// Used grant ids are kept this long past their expiry.
const GRANT_ID_GRACE_SECS: u64 = 600;

enum Abort {
    Exists,
    Missing,
    Used,
    Corrupt,
    Wait(u64),
    Disabled,
    PolicyChanged(u64),
    ReleaseUsed,
    CodesUsed(u32),
    Rate(u32),
    ActionUsed,
    NothingKept,
    NotNewer(u64),
    Rotating(u32),
    Reseal(String, String),
}

type TxResult<T> = Result<T, ConflictableTransactionError<Abort>>;

fn abort<T>(why: Abort) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(why))
}

fn sled_err(db: &DurableDb) -> impl Fn(sled::Error) -> VaultStoreError + '_ {
    move |source| {
        VaultStoreError::Store(StoreError::Sled {
            path: db.path().to_owned(),
            source,
        })
    }
}

fn key(prefix: &[u8], id: &[u8]) -> Vec<u8> {
    [prefix, id].concat()
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(u64::MAX, u64::from_be_bytes)
}

/// Release times packed as big-endian u64s.
fn times(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(be_u64).collect()
}

fn pack(times: &[u64]) -> Vec<u8> {
    times.iter().flat_map(|t| t.to_be_bytes()).collect()
}

/// A request's count and how long it is kept.
fn request_count(bytes: Option<&[u8]>) -> (u32, u64) {
    match bytes {
        Some(b) if b.len() == 12 => (
            u32::from_be_bytes(b[..4].try_into().unwrap_or_default()),
            be_u64(&b[4..]),
        ),
        Some(_) => (u32::MAX, u64::MAX),
        None => (0, 0),
    }
}

fn kept_list(bytes: Option<&[u8]>) -> Result<Vec<KeptSeed>, Abort> {
    match bytes {
        Some(b) => serde_json::from_slice(b).map_err(|_| Abort::Corrupt),
        None => Ok(Vec::new()),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Marks an admin action id used, refusing one used before.
fn use_action(consent: &TransactionalTree, admin: &AdminUse) -> TxResult<()> {
    let k = key(ACTION_ID, admin.action_id.as_bytes());
    if consent.get(&k)?.is_some() {
        return abort(Abort::ActionUsed);
    }
    consent.insert(k, &admin.action_until.to_be_bytes())?;
    Ok(())
}

/// Marks a grant id used, refusing one used before.
fn use_grant_id(grants: &TransactionalTree, grant: &SpentGrant) -> TxResult<()> {
    if grants.get(&grant.grant_id)?.is_some() {
        return abort(Abort::Used);
    }
    grants.insert(grant.grant_id.as_bytes(), &grant.expires_at.to_be_bytes())?;
    Ok(())
}

/// Adds `record` to the account's kept seeds.
fn keep(
    recovery: &TransactionalTree,
    record: AccountRecord,
    admin: &AdminUse,
    reason: &str,
) -> TxResult<()> {
    let id = record.account_id.clone();
    let mut list = match kept_list(recovery.get(&id)?.as_deref()) {
        Ok(l) => l,
        Err(e) => return abort(e),
    };
    list.push(KeptSeed {
        record,
        kept_at: admin.now,
        until: admin.keep_until,
        reason: reason.to_owned(),
        action_id: admin.action_id.clone(),
    });
    recovery.insert(
        id.as_bytes(),
        serde_json::to_vec(&list).expect("kept seeds serialize"),
    )?;
    Ok(())
}

fn decode_record(bytes: &[u8]) -> Result<AccountRecord, Abort> {
    serde_json::from_slice(bytes).map_err(|_| Abort::Corrupt)
}

/// Where a grant use's consent history lives in the consent tree: its
/// release id, its request's code count and its account's release times.
struct UseKeys {
    release: Vec<u8>,
    request: Vec<u8>,
    rate: Vec<u8>,
}

impl UseKeys {
    fn of(u: &GrantUse) -> Self {
        Self {
            release: key(RELEASE_ID, u.consent.release_id.as_bytes()),
            request: key(REQUEST_CODES, &u.consent.request_digest),
            rate: key(ACCOUNT_RELEASES, u.account_id.as_bytes()),
        }
    }
}

/// What a grant use reads inside its transaction (its grant id already
/// claimed or checked), as stored.
struct UseReads {
    /// The active policy version (0: none).
    active_policy: u64,
    /// Whether the release id was used.
    release_used: bool,
    /// The request's code count.
    request_count: Option<Vec<u8>>,
    /// The account's record.
    account: Option<Vec<u8>>,
    /// The account's recent release times.
    recent: Option<Vec<u8>>,
}

/// What a grant use writes once every check passed, under [`UseKeys`]
/// and the account's id.
struct UseWrites {
    release: [u8; 8],
    request_count: Vec<u8>,
    recent: Vec<u8>,
    account: Vec<u8>,
    step: u64,
    event: EventDraft,
}

/// The release rules every store applies to a grant use, in one place:
/// the policy version it was checked under is still active, its release
/// id is unused, its request has codes left, the account exists and is
/// enabled, its release rate has room, and a step is free
/// ([`choose_step`]: never one handed out before). Pure: the stores read
/// and write, inside their own transactions.
fn decide_use(u: &GrantUse, r: UseReads) -> Result<UseWrites, Abort> {
    let c = &u.consent;
    if r.active_policy != c.policy_version {
        return Err(Abort::PolicyChanged(r.active_policy));
    }
    if r.release_used {
        return Err(Abort::ReleaseUsed);
    }
    let (released, _) = request_count(r.request_count.as_deref());
    if released >= c.codes_per_request {
        return Err(Abort::CodesUsed(released));
    }
    let mut record = decode_record(&r.account.ok_or(Abort::Missing)?)?;
    if record.disabled {
        return Err(Abort::Disabled);
    }
    let since = u.now.saturating_sub(c.rate.per.as_secs());
    let mut recent: Vec<u64> = r
        .recent
        .map(|v| times(&v))
        .unwrap_or_default()
        .into_iter()
        .filter(|&t| t >= since)
        .collect();
    let count = u32::try_from(recent.len()).unwrap_or(u32::MAX);
    if count >= c.rate.max {
        return Err(Abort::Rate(count));
    }
    let period = record.params.period;
    let min_left = min_seconds_left(record.min_seconds_left, period);
    let step = choose_step(u.now, period, min_left, record.last_step).map_err(Abort::Wait)?;
    let mut request_count = (released + 1).to_be_bytes().to_vec();
    request_count.extend(c.request_until.to_be_bytes());
    recent.push(u.now);
    record.last_used_at = Some(u.now);
    record.last_step = Some(step);
    Ok(UseWrites {
        release: c.release_id_until.to_be_bytes(),
        request_count,
        recent: pack(&recent),
        account: serde_json::to_vec(&record).expect("records serialize"),
        step,
        event: u.event.clone().attr("step", step.to_string()).attr(
            "codes_released",
            format!("{} of {}", released + 1, c.codes_per_request),
        ),
    })
}

impl SledVaultStore {
    /// Opens the store's trees in `db`; events go to `outbox`.
    pub fn open(db: &DurableDb, outbox: Outbox) -> Result<Self, VaultStoreError> {
        Ok(Self {
            accounts: db.tree("accounts")?,
            grants: db.tree("used_grants")?,
            meta: db.tree("meta")?,
            policies: db.tree(POLICIES_TREE)?,
            consent: db.tree(CONSENT_TREE)?,
            recovery: db.tree(RECOVERY_TREE)?,
            keyring: db.tree(KEYRING_TREE)?,
            db: db.clone(),
            outbox,
            queued: Arc::default(),
            leader: Arc::default(),
            account_count: Arc::default(),
        })
    }

    /// Forgets the account count after a change that may add or remove an
    /// account (called after its transaction, so a count taken meanwhile
    /// is forgotten too).
    fn forget_count(&self) {
        *self.account_count.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// One grant use inside a group transaction: every check, then every
    /// write. An `Err` refuses this use alone (nothing of it is written).
    fn write_use(
        &self,
        u: &GrantUse,
        (grants, accounts, outbox, consent, meta): (
            &TransactionalTree,
            &TransactionalTree,
            &TransactionalTree,
            &TransactionalTree,
            &TransactionalTree,
        ),
    ) -> Result<Result<Released, Abort>, ConflictableTransactionError<std::convert::Infallible>>
    {
        if grants.get(&u.grant_id)?.is_some() {
            return Ok(Err(Abort::Used));
        }
        let keys = UseKeys::of(u);
        let reads = UseReads {
            active_policy: meta.get(POLICY_VERSION)?.map_or(0, |v| be_u64(&v)),
            release_used: consent.get(&keys.release)?.is_some(),
            request_count: consent.get(&keys.request)?.map(|v| v.to_vec()),
            account: accounts.get(&u.account_id)?.map(|v| v.to_vec()),
            recent: consent.get(&keys.rate)?.map(|v| v.to_vec()),
        };
        let w = match decide_use(u, reads) {
            Ok(w) => w,
            Err(why) => return Ok(Err(why)),
        };
        grants.insert(u.grant_id.as_bytes(), &u.expires_at.to_be_bytes())?;
        consent.insert(keys.release, w.release.as_slice())?;
        consent.insert(keys.request, w.request_count)?;
        consent.insert(keys.rate, w.recent)?;
        accounts.insert(u.account_id.as_bytes(), w.account)?;
        let seq = self.outbox.push(outbox, w.event)?;
        Ok(Ok(Released {
            seq,
            step: w.step,
            sync_error: None,
        }))
    }

    /// Writes a group of grant uses in one transaction, makes it durable
    /// with one sync, and answers each: a use refused by any check (also
    /// against an earlier use in the same group) is refused on its own; the
    /// others are recorded. A later use of the same account in the group
    /// reads the record an earlier one wrote, so it gets the next step.
    /// `written` is told once the transaction is written (before the sync),
    /// so that the next group can be written while this one syncs. Nothing
    /// is answered before the sync: a use answered `Ok` with no
    /// `sync_error` is on stable storage, its event too (the shipper is
    /// woken then).
    fn write_uses(&self, group: Vec<QueuedUse>, written: Option<tokio::sync::oneshot::Sender<()>>) {
        let (uses, replies): (Vec<GrantUse>, Vec<_>) = group.into_iter().unzip();
        let result = (
            &self.grants,
            &self.accounts,
            self.outbox.tree(),
            &self.consent,
            &self.meta,
        )
            .transaction(|(grants, accounts, outbox, consent, meta)| {
                let mut answers = Vec::with_capacity(uses.len());
                for u in &uses {
                    answers.push(self.write_use(u, (grants, accounts, outbox, consent, meta))?);
                }
                Ok::<_, ConflictableTransactionError<std::convert::Infallible>>(answers)
            });
        let answers = match result {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            Err(TransactionError::Abort(never)) => match never {},
            Err(TransactionError::Storage(e)) => {
                let why = e.to_string();
                uses.iter().map(|_| Err(why.clone())).collect::<Vec<_>>()
            }
        };
        if let Some(written) = written {
            let _ = written.send(());
        }
        let wrote_any = answers.iter().any(|a| matches!(a, Ok(Ok(_))));
        let sync_error = if wrote_any {
            match self.db.sync_blocking() {
                Ok(()) => {
                    self.outbox.committed();
                    None
                }
                Err(e) => Some(e.to_string()),
            }
        } else {
            None
        };
        for ((u, reply), answer) in uses.iter().zip(replies).zip(answers) {
            let answer = match answer {
                Ok(Ok(released)) => Ok(Released {
                    sync_error: sync_error.clone(),
                    ..released
                }),
                Ok(Err(why)) => Err(refusal_of_use(u, why)),
                Err(why) => Err(VaultStoreError::Store(StoreError::Sync(format!(
                    "cannot record the grant use: {why}"
                )))),
            };
            let _ = reply.send(answer);
        }
    }

    /// One transaction of an account change under `grant` (and, where
    /// given, the admins' consent `admin`): the grant id and the action id
    /// are used first, then `change` runs on the accounts, the outbox and
    /// the kept seeds.
    fn account_change<T>(
        &self,
        grant: &SpentGrant,
        admin: Option<&AdminUse>,
        change: impl Fn(&TransactionalTree, &TransactionalTree, &TransactionalTree) -> TxResult<T>,
    ) -> Result<T, TransactionError<Abort>> {
        (
            &self.grants,
            &self.accounts,
            self.outbox.tree(),
            &self.consent,
            &self.recovery,
        )
            .transaction(|(grants, accounts, outbox, consent, recovery)| {
                use_grant_id(grants, grant)?;
                if let Some(admin) = admin {
                    use_action(consent, admin)?;
                }
                change(accounts, outbox, recovery)
            })
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<AccountRecord, VaultStoreError> {
        serde_json::from_slice(bytes).map_err(|_| VaultStoreError::Corrupt(id.to_owned()))
    }

    fn finish<T>(
        &self,
        result: Result<T, TransactionError<Abort>>,
        id: &str,
    ) -> Result<T, VaultStoreError> {
        match result {
            Ok(v) => Ok(v),
            Err(TransactionError::Abort(why)) => Err(refusal(why, id, "")),
            Err(TransactionError::Storage(e)) => Err(sled_err(&self.db)(e)),
        }
    }

    /// A JSON value of the meta tree.
    fn meta_json<T: serde::de::DeserializeOwned>(
        &self,
        k: &[u8],
        what: &str,
    ) -> Result<Option<T>, VaultStoreError> {
        self.meta
            .get(k)
            .map_err(sled_err(&self.db))?
            .map(|v| serde_json::from_slice(&v).map_err(|_| VaultStoreError::Corrupt(what.into())))
            .transpose()
    }

    fn consent_get(&self, k: &[u8]) -> Option<sled::IVec> {
        // A read that fails counts as present: the checks then refuse, and
        // the transaction that would use it reports the storage failure.
        self.consent
            .get(k)
            .unwrap_or_else(|_| Some(sled::IVec::from(&[0xff; 12][..])))
    }
}

/// The store error for a refused use of `u`.
fn refusal_of_use(u: &GrantUse, why: Abort) -> VaultStoreError {
    let c = &u.consent;
    match why {
        Abort::PolicyChanged(active) => VaultStoreError::Consent(ConsentError::PolicyVersion {
            statement: StatementRef::Release,
            signer: c.operator.clone(),
            bound: c.policy_version,
            active,
        }),
        Abort::ReleaseUsed => VaultStoreError::Consent(ConsentError::ReleaseReplayed {
            release_id: c.release_id.clone(),
            signer: c.operator.clone(),
        }),
        Abort::CodesUsed(released) => VaultStoreError::Consent(ConsentError::CodesExhausted {
            request_id: c.request_id.clone(),
            released,
            allowed: c.codes_per_request,
        }),
        Abort::Rate(released) => VaultStoreError::Consent(ConsentError::RateLimited {
            account: u.account_id.clone(),
            released,
            max: c.rate.max,
            per_secs: c.rate.per.as_secs(),
        }),
        Abort::Used => VaultStoreError::GrantUsed(u.grant_id.clone()),
        other => refusal(other, &u.account_id, &u.grant_id),
    }
}

/// The store error for `why`, about account `id` (and grant `grant_id`).
fn refusal(why: Abort, id: &str, grant_id: &str) -> VaultStoreError {
    let id = id.to_owned();
    match why {
        Abort::Exists => VaultStoreError::AlreadyExists(id),
        Abort::Missing => VaultStoreError::NotFound(id),
        Abort::Used => VaultStoreError::GrantUsed(grant_id.to_owned()),
        Abort::Corrupt => VaultStoreError::Corrupt(id),
        Abort::Wait(retry_in) => VaultStoreError::StepsUsed {
            account_id: id,
            retry_in,
        },
        Abort::Disabled => VaultStoreError::Disabled(id),
        Abort::ActionUsed => VaultStoreError::Consent(ConsentError::AdminActionReplayed {
            action_id: grant_id.to_owned(),
        }),
        Abort::NothingKept => VaultStoreError::NothingKept(id),
        Abort::NotNewer(stored) => VaultStoreError::PolicyNotNewer {
            proposed: 0,
            stored,
        },
        Abort::Rotating(generation) => VaultStoreError::Rotating(generation),
        Abort::Reseal(account, why) => VaultStoreError::Reseal(account, why),
        Abort::PolicyChanged(_) | Abort::ReleaseUsed | Abort::CodesUsed(_) | Abort::Rate(_) => {
            VaultStoreError::Corrupt(id)
        }
    }
}

impl ReleaseHistory for SledVaultStore {
    fn release_id_used(&self, release_id: &str) -> bool {
        self.consent_get(&key(RELEASE_ID, release_id.as_bytes()))
            .is_some()
    }

    fn codes_released(&self, request_digest: &[u8; 32]) -> u32 {
        request_count(
            self.consent_get(&key(REQUEST_CODES, request_digest))
                .as_deref(),
        )
        .0
    }

    fn releases_since(&self, account_id: &str, since: SystemTime) -> u32 {
        let since = unix(since);
        let n = self
            .consent_get(&key(ACCOUNT_RELEASES, account_id.as_bytes()))
            .map_or(0, |v| times(&v).into_iter().filter(|&t| t >= since).count());
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

impl AdminHistory for SledVaultStore {
    fn action_id_used(&self, action_id: &str) -> bool {
        self.consent_get(&key(ACTION_ID, action_id.as_bytes()))
            .is_some()
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
        let mut count = self.account_count.lock().unwrap_or_else(|e| e.into_inner());
        *count.get_or_insert_with(|| self.accounts.len())
    }

    fn put(&self, new: NewAccount<'_>, event: EventDraft) -> Result<u64, VaultStoreError> {
        let NewAccount {
            record,
            replace,
            grant,
            admin,
        } = new;
        let result = self.account_change(grant, admin, |accounts, outbox, recovery| {
            let old = accounts.get(&record.account_id)?;
            if !replace && old.is_some() {
                return abort(Abort::Exists);
            }
            let mut record = record.clone();
            if let Some(old) = old {
                let Ok(old) = decode_record(&old) else {
                    return abort(Abort::Corrupt);
                };
                // A replaced account keeps its highest step if that is
                // higher, so a re-enrolled seed never repeats a step,
                // and stays disabled if it was.
                record.last_step = record.last_step.max(old.last_step);
                record.disabled = old.disabled;
                let Some(admin) = admin else {
                    // Replacing needs the admins' consent (checked by
                    // the vault before this); without it, nothing.
                    return abort(Abort::Exists);
                };
                keep(recovery, old, admin, "replaced")?;
            }
            let bytes = serde_json::to_vec(&record).expect("records serialize");
            accounts.insert(record.account_id.as_bytes(), bytes.as_slice())?;
            self.outbox.push(outbox, event.clone())
        });
        self.forget_count();
        match self.finish(result, &record.account_id) {
            Err(VaultStoreError::GrantUsed(_)) => {
                Err(VaultStoreError::GrantUsed(grant.grant_id.clone()))
            }
            Err(VaultStoreError::Consent(ConsentError::AdminActionReplayed { .. })) => Err(
                VaultStoreError::Consent(ConsentError::AdminActionReplayed {
                    action_id: admin.map(|a| a.action_id.clone()).unwrap_or_default(),
                }),
            ),
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
            // It holds the lead only until the group's transaction is
            // written: the next group is written while this one syncs, and
            // each use is answered only after its group's sync.
            let _lead = self.leader.lock().await;
            let group = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
            if !group.is_empty() {
                let this = self.clone();
                let (written, was_written) = tokio::sync::oneshot::channel();
                // Not awaited past the write: the task answers every use of
                // its group itself (a failed task drops the answers, which
                // each use reports below).
                drop(tokio::task::spawn_blocking(move || {
                    this.write_uses(group, Some(written))
                }));
                let _ = was_written.await;
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
            admin,
            event,
        } = &removal;
        let spent = SpentGrant {
            grant_id: grant_id.clone(),
            expires_at: *expires_at,
        };
        let result = self.account_change(&spent, Some(admin), |accounts, outbox, recovery| {
            let Some(old) = accounts.remove(account_id.as_bytes())? else {
                return abort(Abort::Missing);
            };
            let Ok(old) = decode_record(&old) else {
                return abort(Abort::Corrupt);
            };
            keep(recovery, old, admin, "removed")?;
            self.outbox.push(outbox, event.clone())
        });
        self.forget_count();
        self.finish(result, account_id)
            .map_err(|e| name_ids(e, grant_id, &admin.action_id))
    }

    fn set_enabled(&self, change: EnabledChange) -> Result<(u64, AccountRecord), VaultStoreError> {
        let EnabledChange {
            grant,
            account_id,
            enabled,
            admin,
            event,
        } = &change;
        let result = self.account_change(grant, Some(admin), |accounts, outbox, _| {
            let Some(bytes) = accounts.get(account_id.as_bytes())? else {
                return abort(Abort::Missing);
            };
            let Ok(mut record) = decode_record(&bytes) else {
                return abort(Abort::Corrupt);
            };
            record.disabled = !enabled;
            let bytes = serde_json::to_vec(&record).expect("records serialize");
            accounts.insert(account_id.as_bytes(), bytes)?;
            let seq = self.outbox.push(outbox, event.clone())?;
            Ok((seq, record))
        });
        self.finish(result, account_id)
            .map_err(|e| name_ids(e, &grant.grant_id, &admin.action_id))
    }

    fn restore(&self, restore: Restore) -> Result<(u64, AccountRecord, KeptSeed), VaultStoreError> {
        let Restore {
            grant,
            account_id,
            admin,
            event,
        } = &restore;
        let result = self.account_change(grant, Some(admin), |accounts, outbox, recovery| {
            let mut list = match kept_list(recovery.get(account_id.as_bytes())?.as_deref()) {
                Ok(l) => l,
                Err(e) => return abort(e),
            };
            list.retain(|k| k.until >= admin.now);
            let Some(kept) = list.pop() else {
                return abort(Abort::NothingKept);
            };
            if list.is_empty() {
                recovery.remove(account_id.as_bytes())?;
            } else {
                let bytes = serde_json::to_vec(&list).expect("kept seeds serialize");
                recovery.insert(account_id.as_bytes(), bytes)?;
            }
            let mut record = kept.record.clone();
            if let Some(current) = accounts.get(account_id.as_bytes())? {
                let Ok(current) = decode_record(&current) else {
                    return abort(Abort::Corrupt);
                };
                // Never a step twice for the account, whichever seed.
                record.last_step = record.last_step.max(current.last_step);
                keep(recovery, current, admin, "restored over")?;
            }
            let bytes = serde_json::to_vec(&record).expect("records serialize");
            accounts.insert(account_id.as_bytes(), bytes)?;
            let event = event
                .clone()
                .attr("kept_reason", kept.reason.clone())
                .attr("kept_at", kept.kept_at.to_string())
                .attr("kept_by_action", kept.action_id.clone());
            let seq = self.outbox.push(outbox, event)?;
            Ok((seq, record, kept))
        });
        self.forget_count();
        self.finish(result, account_id)
            .map_err(|e| name_ids(e, &grant.grant_id, &admin.action_id))
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

    fn use_vault_action(
        &self,
        admin: &AdminUse,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let result = (&self.consent, self.outbox.tree()).transaction(|(consent, outbox)| {
            use_action(consent, admin)?;
            self.outbox.push::<Abort>(outbox, event.clone())
        });
        self.finish(result, &admin.action_id)
    }

    fn withhold(&self, w: Withheld<'_>, event: EventDraft) -> Result<u64, VaultStoreError> {
        let result = (&self.accounts, &self.consent, self.outbox.tree()).transaction(
            |(accounts, consent, outbox)| {
                if let Some(bytes) = accounts.get(w.account_id)?
                    && let Ok(mut record) = serde_json::from_slice::<AccountRecord>(&bytes)
                    && record.last_step == Some(w.step)
                {
                    record.last_step = w.step.checked_sub(1);
                    let updated = serde_json::to_vec(&record).expect("records serialize");
                    accounts.insert(w.account_id.as_bytes(), updated)?;
                }
                let request_key = key(REQUEST_CODES, w.request_digest);
                let (released, until) = request_count(consent.get(&request_key)?.as_deref());
                if released > 0 && released != u32::MAX {
                    let mut value = (released - 1).to_be_bytes().to_vec();
                    value.extend(until.to_be_bytes());
                    consent.insert(request_key, value)?;
                }
                let rate_key = key(ACCOUNT_RELEASES, w.account_id.as_bytes());
                if let Some(v) = consent.get(&rate_key)? {
                    let mut recent = times(&v);
                    if let Some(i) = recent.iter().rposition(|&t| t == w.released_at) {
                        recent.remove(i);
                        consent.insert(rate_key, pack(&recent))?;
                    }
                }
                self.outbox.push(outbox, event.clone())
            },
        );
        self.finish(result, w.account_id)
    }

    fn sweep(&self, now: u64) -> Result<usize, VaultStoreError> {
        let err = sled_err(&self.db);
        let mut removed = 0;
        for item in self.grants.iter() {
            let (id, expiry) = item.map_err(&err)?;
            // Keep ids a while past expiry in case the clock steps back.
            if be_u64(&expiry).saturating_add(GRANT_ID_GRACE_SECS) < now {
                self.grants.remove(id).map_err(&err)?;
                removed += 1;
            }
        }
        for item in self.consent.iter() {
            let (k, v) = item.map_err(&err)?;
            let expired = if k.starts_with(ACCOUNT_RELEASES) {
                times(&v)
                    .iter()
                    .all(|&t| t.saturating_add(MAX_RATE_WINDOW_SECS) < now)
            } else if k.starts_with(REQUEST_CODES) {
                request_count(Some(&v)).1 < now
            } else {
                be_u64(&v) < now
            };
            if expired {
                self.consent.remove(k).map_err(&err)?;
                removed += 1;
            }
        }
        for item in self.recovery.iter() {
            let (k, v) = item.map_err(&err)?;
            let Ok(list) = serde_json::from_slice::<Vec<KeptSeed>>(&v) else {
                continue;
            };
            if list.iter().all(|kept| kept.until >= now) {
                continue;
            }
            let account_id = String::from_utf8_lossy(&k).into_owned();
            let source = self.outbox.signer().source().to_string();
            let result = (&self.recovery, self.outbox.tree()).transaction(|(recovery, outbox)| {
                let Ok(list) = kept_list(recovery.get(&k)?.as_deref()) else {
                    return Ok(0);
                };
                let (gone, keep): (Vec<KeptSeed>, Vec<KeptSeed>) =
                    list.into_iter().partition(|kept| kept.until < now);
                if keep.is_empty() {
                    recovery.remove(&k)?;
                } else {
                    let bytes = serde_json::to_vec(&keep).expect("kept seeds serialize");
                    recovery.insert(&k, bytes)?;
                }
                for kept in &gone {
                    let event = EventDraft::new(source.clone(), "account.recovery.purged")
                        .account(&account_id)
                        .attr("kept_reason", kept.reason.clone())
                        .attr("kept_at", kept.kept_at.to_string())
                        .attr("kept_by_action", kept.action_id.clone());
                    self.outbox.push::<Abort>(outbox, event)?;
                }
                Ok(gone.len())
            });
            removed += self.finish(result, &account_id)?;
        }
        Ok(removed)
    }

    fn policies(&self) -> Result<Vec<StoredPolicy>, VaultStoreError> {
        self.policies
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err(&self.db))?;
                serde_json::from_slice(&v)
                    .map_err(|_| VaultStoreError::Corrupt(format!("policy version {}", be_u64(&k))))
            })
            .collect()
    }

    fn policy_head(&self) -> Result<Option<Vec<u8>>, VaultStoreError> {
        Ok(self
            .meta
            .get(POLICY_HEAD)
            .map_err(sled_err(&self.db))?
            .map(|v| v.to_vec()))
    }

    fn put_policy(
        &self,
        policy: &StoredPolicy,
        head: &[u8],
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let bytes = serde_json::to_vec(policy).expect("policies serialize");
        let result = (&self.policies, &self.meta, self.outbox.tree()).transaction(
            |(policies, meta, outbox)| {
                let stored = meta.get(POLICY_VERSION)?.map_or(0, |v| be_u64(&v));
                if policy.version <= stored {
                    return abort(Abort::NotNewer(stored));
                }
                policies.insert(&policy.version.to_be_bytes(), bytes.as_slice())?;
                meta.insert(POLICY_HEAD, head)?;
                meta.insert(POLICY_VERSION, &policy.version.to_be_bytes())?;
                self.outbox.push(outbox, event.clone())
            },
        );
        match self.finish(result, "policy") {
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
        self.db.sync().await?;
        self.outbox.committed();
        Ok(())
    }

    fn source(&self) -> String {
        self.outbox.signer().source().to_string()
    }

    fn sync_now(&self) -> Result<(), VaultStoreError> {
        self.db.sync_blocking()?;
        self.outbox.committed();
        Ok(())
    }

    fn keyring(&self) -> Result<BTreeMap<u32, Vec<u8>>, VaultStoreError> {
        self.keyring
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err(&self.db))?;
                let generation = k
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| VaultStoreError::Corrupt("the keyring".into()))?;
                Ok((generation, v.to_vec()))
            })
            .collect()
    }

    fn is_empty(&self) -> Result<bool, VaultStoreError> {
        Ok(self.accounts.first().map_err(sled_err(&self.db))?.is_none()
            && self.recovery.first().map_err(sled_err(&self.db))?.is_none())
    }

    fn rotation(&self) -> Result<Option<Rotation>, VaultStoreError> {
        self.meta_json(ROTATION, "the key rotation record")
    }

    fn last_rotation(&self) -> Result<Option<FinishedRotation>, VaultStoreError> {
        self.meta_json(LAST_ROTATION, "the last key rotation record")
    }

    fn add_generation(&self, new: NewGeneration) -> Result<u64, VaultStoreError> {
        let generation = new.generation;
        let result = (&self.keyring, &self.meta, &self.consent, self.outbox.tree()).transaction(
            |(keyring, meta, consent, outbox)| {
                if keyring.get(generation.to_be_bytes())?.is_some() {
                    return abort(Abort::Exists);
                }
                if new.rotation.is_some()
                    && let Some(bytes) = meta.get(ROTATION)?
                {
                    let Ok(running) = serde_json::from_slice::<Rotation>(&bytes) else {
                        return abort(Abort::Corrupt);
                    };
                    return abort(Abort::Rotating(running.generation));
                }
                if let Some(admin) = &new.admin {
                    use_action(consent, admin)?;
                }
                if new.with_generation_zero {
                    keyring.insert(&0u32.to_be_bytes(), &[][..])?;
                }
                keyring.insert(&generation.to_be_bytes(), new.sealed_key.as_slice())?;
                if let Some(rotation) = &new.rotation {
                    let bytes = serde_json::to_vec(rotation).expect("rotations serialize");
                    meta.insert(ROTATION, bytes)?;
                }
                if let Some(pending) = &new.pending_master {
                    if meta.get(MASTER_PENDING)?.is_some() {
                        return abort(Abort::Exists);
                    }
                    let bytes = serde_json::to_vec(pending).expect("pending masters serialize");
                    meta.insert(MASTER_PENDING, bytes)?;
                }
                self.outbox.push(outbox, new.event.clone())
            },
        );
        let action_id = new.admin.as_ref().map_or("", |a| a.action_id.as_str());
        match result {
            Ok(seq) => Ok(seq),
            Err(TransactionError::Abort(Abort::Exists)) => Err(VaultStoreError::Corrupt(format!(
                "key generation {generation}, stored already"
            ))),
            Err(TransactionError::Abort(why)) => Err(refusal(why, "the keyring", action_id)),
            Err(TransactionError::Storage(e)) => Err(sled_err(&self.db)(e)),
        }
    }

    fn reseal_batch(
        &self,
        limit: usize,
        reseal: Reseal<'_>,
        event: EventDraft,
    ) -> Result<Batch, VaultStoreError> {
        let err = sled_err(&self.db);
        let Some(rotation) = self.rotation()? else {
            return Ok(Batch {
                resealed: 0,
                rotation: None,
                seq: None,
            });
        };
        let target = rotation.generation;
        let (tree, after, kept) = match &rotation.cursor {
            RotationCursor::Accounts(after) => (&self.accounts, after.clone(), false),
            RotationCursor::Kept(after) => (&self.recovery, after.clone(), true),
            RotationCursor::Check => {
                return Ok(Batch {
                    resealed: 0,
                    rotation: Some(rotation),
                    seq: None,
                });
            }
        };
        let older = |v: &[u8]| {
            if kept {
                kept_list(Some(v))
                    .map_or(true, |l| l.iter().any(|k| k.record.key_generation < target))
            } else {
                decode_record(v).map_or(true, |r| r.key_generation < target)
            }
        };
        // Choose the batch outside the transaction; each is read again in it.
        let walk = match &after {
            Some(a) => tree.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => tree.iter(),
        };
        let limit = limit.max(1);
        let (mut chosen, mut last, mut at_end, mut visited) = (Vec::new(), None, true, 0);
        for item in walk {
            let (k, v) = item.map_err(&err)?;
            visited += 1;
            if older(&v) {
                chosen.push(k.clone());
            }
            last = Some(String::from_utf8_lossy(&k).into_owned());
            if chosen.len() >= limit || visited >= limit.saturating_mul(16) {
                at_end = false;
                break;
            }
        }
        let next = match (&rotation.cursor, at_end) {
            (RotationCursor::Accounts(_), true) => RotationCursor::Kept(None),
            (RotationCursor::Accounts(_), false) => RotationCursor::Accounts(last),
            (_, true) => RotationCursor::Check,
            (_, false) => RotationCursor::Kept(last),
        };
        let reseal_one = |record: &AccountRecord| -> Result<AccountRecord, Abort> {
            match reseal(record) {
                Ok(r) if r.key_generation == target => Ok(r),
                Ok(_) => Err(Abort::Reseal(
                    record.account_id.clone(),
                    "re-sealed to another generation".into(),
                )),
                Err(why) => Err(Abort::Reseal(record.account_id.clone(), why)),
            }
        };
        let result = (tree, &self.meta, self.outbox.tree()).transaction(|(t, meta, outbox)| {
            let Some(bytes) = meta.get(ROTATION)? else {
                return Ok((0, None, None));
            };
            let Ok(mut r) = serde_json::from_slice::<Rotation>(&bytes) else {
                return abort(Abort::Corrupt);
            };
            let mut n = 0u64;
            for k in &chosen {
                let Some(v) = t.get(k)? else { continue };
                if kept {
                    let mut list = match kept_list(Some(&v)) {
                        Ok(l) => l,
                        Err(e) => return abort(e),
                    };
                    let mut changed = false;
                    for entry in &mut list {
                        if entry.record.key_generation < target {
                            entry.record = match reseal_one(&entry.record) {
                                Ok(r) => r,
                                Err(e) => return abort(e),
                            };
                            n += 1;
                            changed = true;
                        }
                    }
                    if changed {
                        t.insert(k, serde_json::to_vec(&list).expect("kept seeds serialize"))?;
                    }
                } else {
                    let Ok(record) = decode_record(&v) else {
                        return abort(Abort::Corrupt);
                    };
                    if record.key_generation < target {
                        let record = match reseal_one(&record) {
                            Ok(r) => r,
                            Err(e) => return abort(e),
                        };
                        t.insert(k, serde_json::to_vec(&record).expect("records serialize"))?;
                        n += 1;
                    }
                }
            }
            r.resealed += n;
            r.cursor = next.clone();
            meta.insert(
                ROTATION,
                serde_json::to_vec(&r).expect("rotations serialize"),
            )?;
            let seq = if n > 0 {
                let event = event
                    .clone()
                    .attr("generation", target.to_string())
                    .attr("resealed", n.to_string())
                    .attr("resealed_total", r.resealed.to_string())
                    .attr("phase", rotation.cursor.phase());
                Some(self.outbox.push(outbox, event)?)
            } else {
                None
            };
            Ok((n, Some(r), seq))
        });
        match result {
            Ok((resealed, rotation, seq)) => Ok(Batch {
                resealed,
                rotation,
                seq,
            }),
            Err(TransactionError::Abort(why)) => Err(refusal(why, "a kept seed", "")),
            Err(TransactionError::Storage(e)) => Err(err(e)),
        }
    }

    fn seeds_per_generation(&self) -> Result<BTreeMap<u32, u64>, VaultStoreError> {
        let err = sled_err(&self.db);
        let mut counts = BTreeMap::new();
        for item in self.accounts.iter() {
            let (k, v) = item.map_err(&err)?;
            let record = self.decode(&String::from_utf8_lossy(&k), &v)?;
            *counts.entry(record.key_generation).or_default() += 1;
        }
        for item in self.recovery.iter() {
            let (k, v) = item.map_err(&err)?;
            let list = kept_list(Some(&v))
                .map_err(|_| VaultStoreError::Corrupt(String::from_utf8_lossy(&k).into_owned()))?;
            for kept in list {
                *counts.entry(kept.record.key_generation).or_default() += 1;
            }
        }
        Ok(counts)
    }

    fn rewalk(&self, event: EventDraft) -> Result<Option<Rotation>, VaultStoreError> {
        let result = (&self.meta, self.outbox.tree()).transaction(|(meta, outbox)| {
            let Some(bytes) = meta.get(ROTATION)? else {
                return Ok(None);
            };
            let Ok(mut r) = serde_json::from_slice::<Rotation>(&bytes) else {
                return abort(Abort::Corrupt);
            };
            r.cursor = RotationCursor::Accounts(None);
            r.passes += 1;
            meta.insert(
                ROTATION,
                serde_json::to_vec(&r).expect("rotations serialize"),
            )?;
            let event = event
                .clone()
                .attr("generation", r.generation.to_string())
                .attr("pass", r.passes.to_string());
            self.outbox.push(outbox, event)?;
            Ok(Some(r))
        });
        self.finish(result, "the key rotation record")
    }

    fn finish_rotation(
        &self,
        retire: &[u32],
        now: u64,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let result = (&self.keyring, &self.meta, self.outbox.tree()).transaction(
            |(keyring, meta, outbox)| {
                let Some(bytes) = meta.get(ROTATION)? else {
                    return abort(Abort::Missing);
                };
                let Ok(rotation) = serde_json::from_slice::<Rotation>(&bytes) else {
                    return abort(Abort::Corrupt);
                };
                for generation in retire {
                    keyring.remove(&generation.to_be_bytes())?;
                }
                meta.remove(ROTATION)?;
                let finished = FinishedRotation {
                    rotation,
                    finished_at: now,
                    retired: retire.to_vec(),
                };
                let bytes = serde_json::to_vec(&finished).expect("rotations serialize");
                meta.insert(LAST_ROTATION, bytes)?;
                self.outbox.push(outbox, event.clone())
            },
        );
        self.finish(result, "the key rotation record")
    }

    fn pending_master(&self) -> Result<Option<PendingMaster>, VaultStoreError> {
        self.meta_json(MASTER_PENDING, "the pending master key record")
    }

    fn master_generation(&self) -> Result<u32, VaultStoreError> {
        Ok(self
            .meta
            .get(MASTER_GENERATION)
            .map_err(sled_err(&self.db))?
            .and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(1))
    }

    fn last_master(&self) -> Result<Option<ReplacedMaster>, VaultStoreError> {
        self.meta_json(MASTER_LAST, "the last master key replacement record")
    }

    fn promote_master(
        &self,
        replaced: &ReplacedMaster,
        event: EventDraft,
    ) -> Result<u64, VaultStoreError> {
        let last = serde_json::to_vec(replaced).expect("replacements serialize");
        // Generations are added and retired only by rotations, which wait
        // for a pending replacement: a generation the pending record lacks
        // would stay sealed under the old key.
        if let Some(pending) = self.pending_master()?
            && !pending.keyring.keys().eq(self.keyring()?.keys())
        {
            return Err(VaultStoreError::PendingMismatch(
                pending
                    .keyring
                    .keys()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ));
        }
        let result = (&self.keyring, &self.meta, self.outbox.tree()).transaction(
            |(keyring, meta, outbox)| {
                let Some(bytes) = meta.get(MASTER_PENDING)? else {
                    return abort(Abort::Missing);
                };
                let Ok(pending) = serde_json::from_slice::<PendingMaster>(&bytes) else {
                    return abort(Abort::Corrupt);
                };
                // Each generation the keyring holds gets its key sealed
                // under the next master key; one the keyring does not hold
                // (or lacks) means it changed outside the vault.
                for (&generation, sealed) in &pending.keyring {
                    if keyring.get(generation.to_be_bytes())?.is_none() {
                        return abort(Abort::Reseal(
                            "keyring".into(),
                            pending
                                .keyring
                                .keys()
                                .map(u32::to_string)
                                .collect::<Vec<_>>()
                                .join(","),
                        ));
                    }
                    let Ok(sealed) = B64.decode(sealed) else {
                        return abort(Abort::Corrupt);
                    };
                    keyring.insert(&generation.to_be_bytes(), sealed)?;
                }
                meta.insert(KEY_CHECK, pending.key_check())?;
                if let Some(head) = &pending.policy_head {
                    let Ok(head) = B64.decode(head) else {
                        return abort(Abort::Corrupt);
                    };
                    meta.insert(POLICY_HEAD, head)?;
                }
                meta.insert(MASTER_GENERATION, &pending.generation.to_be_bytes())?;
                meta.insert(MASTER_LAST, last.as_slice())?;
                meta.remove(MASTER_PENDING)?;
                self.outbox.push(outbox, event.clone())
            },
        );
        match result {
            Ok(seq) => Ok(seq),
            Err(TransactionError::Abort(Abort::Reseal(_, generations))) => {
                Err(VaultStoreError::PendingMismatch(generations))
            }
            other => self.finish(other, "the pending master key record"),
        }
    }
}

/// Names the grant and action ids in a refusal the transaction could only
/// say the kind of.
fn name_ids(e: VaultStoreError, grant_id: &str, action_id: &str) -> VaultStoreError {
    match e {
        VaultStoreError::GrantUsed(_) => VaultStoreError::GrantUsed(grant_id.to_owned()),
        VaultStoreError::Consent(ConsentError::AdminActionReplayed { .. }) => {
            VaultStoreError::Consent(ConsentError::AdminActionReplayed {
                action_id: action_id.to_owned(),
            })
        }
        other => other,
    }
}

/// How long a used id or a count is remembered: `window` from `now`, and a
/// margin for clock skew.
pub fn remember_until(now: u64, window: Duration) -> u64 {
    now.saturating_add(window.as_secs())
        .saturating_add(GRANT_ID_GRACE_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::UNIX_EPOCH;
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
            disabled: false,
            key_generation: 0,
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
                    admin: None,
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

    /// A use at Unix time 1 (step 0, 29 s left), its release id the grant
    /// id, for a request of its own (a digest made of the grant id), under
    /// no policy (version 0), 1000 codes an hour.
    fn grant_use(grant_id: &str, account_id: &str) -> GrantUse {
        let mut digest = [0u8; 32];
        for (d, b) in digest.iter_mut().zip(grant_id.bytes()) {
            *d = b;
        }
        GrantUse {
            grant_id: grant_id.into(),
            expires_at: u64::MAX / 2,
            account_id: account_id.into(),
            now: 1,
            consent: ReleaseUse {
                policy_version: 0,
                release_id: grant_id.into(),
                release_id_until: u64::MAX / 2,
                request_digest: digest,
                request_id: format!("req-{grant_id}"),
                request_until: u64::MAX / 2,
                codes_per_request: 1,
                rate: RateLimit {
                    max: 1000,
                    per: Duration::from_secs(3600),
                },
                operator: "spiffe://t/user/olivia".into(),
            },
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
        store.write_uses(group, None);
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
                    admin: Some(&admin_use("act-1")),
                },
                EventDraft::new("admin", "account.enrolled.replace"),
            )
            .unwrap();
        assert_eq!(store.get("aws-root").unwrap().unwrap().last_step, Some(100));
    }

    fn admin_use(action_id: &str) -> AdminUse {
        AdminUse {
            action_id: action_id.into(),
            action_until: u64::MAX / 2,
            now: 100,
            keep_until: 1000,
        }
    }

    #[test]
    fn a_replace_without_admin_consent_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut record = store.get("aws-root").unwrap().unwrap();
        record.seed_bits = 1;
        let grant = SpentGrant {
            grant_id: "g-replace".into(),
            expires_at: u64::MAX / 2,
        };
        let new = NewAccount {
            record: &record,
            replace: true,
            grant: &grant,
            admin: None,
        };
        let err = store.put(new, EventDraft::new("admin", "x")).unwrap_err();
        assert!(matches!(err, VaultStoreError::AlreadyExists(_)), "{err:?}");
        assert_eq!(store.get("aws-root").unwrap().unwrap().seed_bits, 160);
        assert!(store.grants.get("g-replace").unwrap().is_none());
    }

    #[test]
    fn a_withheld_code_gives_back_its_step_its_requests_count_and_its_rate_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        enroll(&store, "acct");
        let rated = |id: &str| {
            let mut u = grant_use(id, "acct");
            u.consent.rate.max = 1;
            u.consent.request_digest = [7; 32];
            u
        };
        let first = one_group(&store, vec![rated("g-1")]).remove(0).unwrap();
        // Used up: the request's one code and the account's one an hour.
        assert!(one_group(&store, vec![rated("g-2")])[0].is_err());
        store
            .withhold(
                Withheld {
                    account_id: "acct",
                    step: first.step,
                    request_digest: &[7; 32],
                    released_at: 1,
                },
                EventDraft::new("op", "code.withheld"),
            )
            .unwrap();
        assert_eq!(store.codes_released(&[7; 32]), 0);
        assert_eq!(store.releases_since("acct", UNIX_EPOCH), 0);
        // A new release (new grant, new release id) gets the same step again.
        let again = one_group(&store, vec![rated("g-3")]).remove(0).unwrap();
        assert_eq!(again.step, first.step);
        // The withheld release's own ids stay used.
        let mut replay = rated("g-4");
        replay.consent.release_id = "g-1".into();
        store
            .withhold(
                Withheld {
                    account_id: "acct",
                    step: again.step,
                    request_digest: &[7; 32],
                    released_at: 1,
                },
                EventDraft::new("op", "code.withheld"),
            )
            .unwrap();
        assert!(one_group(&store, vec![replay])[0].is_err());
    }

    #[test]
    fn release_ids_codes_per_request_and_the_rate_hold_inside_one_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        for i in 0..3 {
            enroll(&store, &format!("acct-{i}"));
        }
        // The same release id twice in one group: the second is refused.
        let mut replay = grant_use("g-2", "acct-0");
        replay.consent.release_id = "g-1".into();
        let answers = one_group(&store, vec![grant_use("g-1", "acct-0"), replay]);
        assert!(answers[0].is_ok());
        assert!(
            matches!(
                &answers[1],
                Err(VaultStoreError::Consent(ConsentError::ReleaseReplayed { release_id, .. })) if release_id == "g-1"
            ),
            "{:?}",
            answers[1]
        );
        // Two codes of one request that allows one: the second is refused.
        let first = grant_use("g-3", "acct-1");
        let mut second = grant_use("g-4", "acct-1");
        second.consent.request_digest = first.consent.request_digest;
        let answers = one_group(&store, vec![first, second]);
        assert!(answers[0].is_ok());
        assert!(
            matches!(
                &answers[1],
                Err(VaultStoreError::Consent(ConsentError::CodesExhausted {
                    released: 1,
                    allowed: 1,
                    ..
                }))
            ),
            "{:?}",
            answers[1]
        );
        // A rate of 2 an hour: the third in one group is refused.
        let rated = |id: &str| {
            let mut u = grant_use(id, "acct-2");
            u.consent.rate.max = 2;
            u
        };
        let answers = one_group(&store, vec![rated("g-5"), rated("g-6"), rated("g-7")]);
        assert!(answers[0].is_ok() && answers[1].is_ok());
        assert!(
            matches!(
                &answers[2],
                Err(VaultStoreError::Consent(ConsentError::RateLimited {
                    released: 2,
                    max: 2,
                    ..
                }))
            ),
            "{:?}",
            answers[2]
        );
        // Nothing of a refused use is written: its grant is unspent.
        for id in ["g-2", "g-4", "g-7"] {
            assert!(store.grants.get(id).unwrap().is_none(), "{id}");
        }
        // And what was recorded is what the checks read.
        assert!(store.release_id_used("g-1"));
        assert!(!store.release_id_used("g-2"));
        assert_eq!(store.releases_since("acct-2", UNIX_EPOCH), 2);
    }

    #[test]
    fn a_use_under_another_policy_version_or_of_a_disabled_account_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut under_v1 = grant_use("g-1", "aws-root");
        under_v1.consent.policy_version = 1;
        let answers = one_group(&store, vec![under_v1]);
        assert!(
            matches!(
                &answers[0],
                Err(VaultStoreError::Consent(ConsentError::PolicyVersion {
                    bound: 1,
                    active: 0,
                    ..
                }))
            ),
            "{:?}",
            answers[0]
        );
        let change = EnabledChange {
            grant: SpentGrant {
                grant_id: "g-disable".into(),
                expires_at: u64::MAX / 2,
            },
            account_id: "aws-root".into(),
            enabled: false,
            admin: admin_use("act-disable"),
            event: EventDraft::new("admins", "account.disabled"),
        };
        let (_, record) = store.set_enabled(change.clone()).unwrap();
        assert!(record.disabled);
        let answers = one_group(&store, vec![grant_use("g-2", "aws-root")]);
        assert!(
            matches!(&answers[0], Err(VaultStoreError::Disabled(_))),
            "{:?}",
            answers[0]
        );
        // The action id is single use.
        let again = EnabledChange {
            grant: SpentGrant {
                grant_id: "g-disable-2".into(),
                expires_at: u64::MAX / 2,
            },
            ..change
        };
        let err = store.set_enabled(again).unwrap_err();
        assert!(
            matches!(
                err,
                VaultStoreError::Consent(ConsentError::AdminActionReplayed { ref action_id }) if action_id == "act-disable"
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_removed_seed_is_kept_restored_and_purged_after_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        // The count `Status` answers follows every change of the account
        // set (it is kept between calls, not walked each time).
        assert_eq!(store.count(), 1);
        let removal = Removal {
            grant_id: "g-remove".into(),
            expires_at: u64::MAX / 2,
            account_id: "aws-root".into(),
            admin: admin_use("act-remove"),
            event: EventDraft::new("admins", "account.removed"),
        };
        store.remove(removal).unwrap();
        assert!(store.get("aws-root").unwrap().is_none());
        assert_eq!(store.count(), 0);
        let restore = |grant: &str, action: &str, now: u64| Restore {
            grant: SpentGrant {
                grant_id: grant.into(),
                expires_at: u64::MAX / 2,
            },
            account_id: "aws-root".into(),
            admin: AdminUse {
                now,
                ..admin_use(action)
            },
            event: EventDraft::new("admins", "account.restored"),
        };
        let (_, record, kept) = store.restore(restore("g-r1", "act-r1", 500)).unwrap();
        assert_eq!(record.seed_bits, 160);
        assert_eq!(kept.reason, "removed");
        assert!(store.get("aws-root").unwrap().is_some());
        assert_eq!(store.count(), 1);
        enroll(&store, "aws-second");
        assert_eq!(store.count(), 2);
        // Nothing left to restore now.
        let err = store.restore(restore("g-r2", "act-r2", 500)).unwrap_err();
        assert!(matches!(err, VaultStoreError::NothingKept(_)), "{err:?}");
        // Removed again; past its window it is purged and cannot come back.
        store
            .remove(Removal {
                grant_id: "g-remove-2".into(),
                expires_at: u64::MAX / 2,
                account_id: "aws-root".into(),
                admin: admin_use("act-remove-2"),
                event: EventDraft::new("admins", "account.removed"),
            })
            .unwrap();
        assert_eq!(store.sweep(999).unwrap(), 0);
        assert_eq!(store.recovery.len(), 1);
        assert_eq!(store.sweep(1001).unwrap(), 1);
        assert_eq!(store.recovery.len(), 0);
        let err = store.restore(restore("g-r3", "act-r3", 1002)).unwrap_err();
        assert!(matches!(err, VaultStoreError::NothingKept(_)), "{err:?}");
    }
}
