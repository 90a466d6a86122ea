//! The vault's domain core: the admin-signed policy (applied, persisted,
//! re-verified from the pinned admins at every start), enrollment, removal,
//! disabling and restore for a grant and M admins' signed consent, code
//! release for a grant and the people's signed consent, listing and status.
//! No tonic here; the gRPC layer maps [`VaultError`].
//!
//! Fail closed: a code (or an enrollment's registration codes) is computed
//! only after the audit service has acknowledged the event that records it.
//! Every refusal of consent is written to audit (`code.refused`,
//! `admin_action.refused`, `policy.refused`) before it is answered. Events
//! name the people whose signatures verified, never a field a caller filled
//! in.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::time::Instant;
use twokey_consent::{
    AdminAction, AdminActionRequest, ConsentError, GrantFacts, PolicyError, SignedStatement,
    TrustRoot, Verified, VerifiedAdminAction, VerifiedPolicy, check_admin_action, check_release,
    verify_policy_update,
};
use twokey_proto::{
    audit::v1::Outcome,
    vault::v1::{Grant, GrantPurpose, ReleaseEvidence, SignedGrant},
};
use twokey_runtime::{
    durable::StoreError,
    error::{ErrorKind, ServiceError},
    events::EventDraft,
    grant::{GrantError, GrantVerifier},
    shipper::{AckTimeout, ShipperHandle},
    time::{Clock, unix_seconds},
};

use crate::{
    crypto::MasterKey,
    keyring::{Keyring, KeyringError},
    master::MasterSeal,
    rotate::RotationPace,
    seed::{Seed, SeedError, SeedSpec},
    store::{
        AccountRecord, AdminUse, EnabledChange, GrantUse, KeptSeed, NewAccount, NewGeneration,
        ReleaseUse, Removal, Restore, SpentGrant, StoredPolicy, VaultStore, VaultStoreError,
        Withheld, remember_until,
    },
    totp::{CodeValue, code_for_step},
};

/// Waits for the audit service to acknowledge an event.
pub trait AuditGate: Send + Sync + std::fmt::Debug + 'static {
    /// Resolves once event `seq` is acknowledged, or fails after `timeout`.
    fn confirm(&self, seq: u64, timeout: Duration) -> BoxFuture<'_, Result<(), AckTimeout>>;

    /// `Err(message)` while audit's receipts are inconsistent with a
    /// checkpoint this source accepted before (see
    /// [`twokey_runtime::receipts`]); the message names both tree heads and
    /// says that `refused` until a consistent checkpoint is served.
    fn receipts(&self, refused: &str) -> Result<(), String> {
        let _ = refused;
        Ok(())
    }
}

impl AuditGate for ShipperHandle {
    fn confirm(&self, seq: u64, timeout: Duration) -> BoxFuture<'_, Result<(), AckTimeout>> {
        Box::pin(self.wait_acked(seq, timeout))
    }

    fn receipts(&self, refused: &str) -> Result<(), String> {
        ShipperHandle::receipts(self).check(refused)
    }
}

/// What a release keeps of its caller's deadline for itself once audit is
/// late: recording `code.withheld` (a sync) and answering, so the refusal
/// arrives before the caller gives up.
pub const ANSWER_RESERVE: Duration = Duration::from_millis(500);

/// What the vault does not do while audit's receipts are inconsistent.
const NO_CODE: &str = "no code is released";
/// The same, for any change the vault confirms after audit acknowledged it.
const NO_CHANGE: &str = "no code is released and no change is confirmed";

/// The answer when no signed policy is in force.
pub const NO_POLICY: &str =
    "no signed policy is in force; admins apply one with `twokey policy propose/sign/apply`";

/// Why a vault operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// The seed or its parameters are invalid.
    #[error("invalid seed: {0}")]
    Seed(#[from] SeedError),
    /// The grant was refused.
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// The grant is valid but names another account than the call.
    #[error(
        "grant {grant_id} is for account {granted:?}, not {asked:?}; ask the broker for a grant for this account"
    )]
    GrantForOtherAccount {
        /// The grant's id.
        grant_id: String,
        /// The account the grant names.
        granted: String,
        /// The account the call is for.
        asked: String,
    },
    /// The people's signed consent does not hold.
    #[error(transparent)]
    Consent(#[from] ConsentError),
    /// A policy update was refused; the active version stays in force.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No signed policy is in force.
    #[error("{NO_POLICY}")]
    NoPolicy,
    /// The stored policy chain does not verify from the pinned admins.
    #[error("{0}")]
    PolicyChain(String),
    /// Store-level refusal or failure.
    #[error(transparent)]
    Store(#[from] VaultStoreError),
    /// A stored seed does not open with the master key.
    #[error("the seed of {0} does not decrypt with the master key")]
    Integrity(String),
    /// The master key is not the one the data directory was created with.
    #[error(
        "the master key file is not the key this data directory was created with: no stored seed \
         can be read with it; start the vault with the master key it was created with (restore \
         that file from its backup), or with an empty data directory for a new vault"
    )]
    WrongMasterKey,
    /// Audit did not acknowledge in time.
    #[error("{0}")]
    AuditUnavailable(String),
    /// The keyring does not open.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The next master key's seal material could not be written, or a
    /// replacement is pending.
    #[error("{0}")]
    MasterSeal(String),
}

/// The service error kind of a consent or policy refusal.
pub fn consent_kind(kind: twokey_consent::ErrorKind) -> ErrorKind {
    match kind {
        twokey_consent::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
        twokey_consent::ErrorKind::FailedPrecondition => ErrorKind::FailedPrecondition,
        twokey_consent::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
    }
}

impl ServiceError for VaultError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidArgument(_) | Self::Seed(_) | Self::Grant(GrantError::Malformed(_)) => {
                ErrorKind::InvalidArgument
            }
            Self::Consent(e) | Self::Store(VaultStoreError::Consent(e)) => consent_kind(e.kind()),
            Self::Policy(e) => consent_kind(e.kind()),
            Self::Grant(_)
            | Self::GrantForOtherAccount { .. }
            | Self::Store(VaultStoreError::GrantUsed(_)) => ErrorKind::PermissionDenied,
            Self::NoPolicy
            | Self::Store(VaultStoreError::Disabled(_) | VaultStoreError::PolicyNotNewer { .. }) => {
                ErrorKind::FailedPrecondition
            }
            Self::Store(VaultStoreError::StepsUsed { .. }) => ErrorKind::Unavailable,
            Self::Store(VaultStoreError::AlreadyExists(_)) => ErrorKind::AlreadyExists,
            Self::Store(VaultStoreError::NotFound(_) | VaultStoreError::NothingKept(_)) => {
                ErrorKind::NotFound
            }
            Self::AuditUnavailable(_)
            | Self::Store(VaultStoreError::Store(_) | VaultStoreError::Database(_)) => {
                ErrorKind::Unavailable
            }
            Self::Store(VaultStoreError::Unsupported(_)) => ErrorKind::FailedPrecondition,
            Self::Store(VaultStoreError::Corrupt(_))
            | Self::Integrity(_)
            | Self::WrongMasterKey
            | Self::PolicyChain(_)
            | Self::Keyring(_)
            | Self::Store(VaultStoreError::Reseal(..) | VaultStoreError::PendingMismatch(_)) => {
                ErrorKind::Internal
            }
            Self::MasterSeal(_) => ErrorKind::Unavailable,
            Self::Store(VaultStoreError::Rotating(_)) => ErrorKind::AlreadyExists,
        }
    }
}

impl VaultError {
    /// Whether the message holds the vault's own details (storage, data
    /// integrity), which go to its log and not to the caller.
    pub fn is_private(&self) -> bool {
        matches!(
            self,
            Self::Store(
                VaultStoreError::Store(_)
                    | VaultStoreError::Corrupt(_)
                    | VaultStoreError::Reseal(..)
                    | VaultStoreError::PendingMismatch(_)
            ) | Self::Integrity(_)
                | Self::WrongMasterKey
                | Self::PolicyChain(_)
                | Self::Keyring(_)
        )
    }

    /// A refusal of the people's consent (or of its absence), which is
    /// written to audit.
    fn is_consent_refusal(&self) -> bool {
        matches!(
            self,
            Self::Consent(_)
                | Self::NoPolicy
                | Self::Store(VaultStoreError::Consent(_) | VaultStoreError::Disabled(_))
        )
    }
}

/// An enrollment as asked, validated: the account id is well formed and
/// the seed and its parameters parse.
#[derive(Debug)]
pub struct Enrollment {
    /// The account id.
    pub account_id: String,
    /// The seed and how codes are computed.
    pub spec: SeedSpec,
    /// Whether an existing account may be overwritten.
    pub replace: bool,
    /// Fewest seconds a released code must have left in its step, below the
    /// period; 0 for the default.
    pub min_seconds_left: u32,
    /// With `replace`: the admins' statements consenting to it.
    pub consent: Vec<SignedStatement>,
}

/// An enrollment grant whose signature, purpose and lifetime the vault has
/// verified (see [`Vault::verify_enroll_grant`]); its account and single use
/// are checked by [`Vault::enroll`].
#[derive(Debug)]
pub struct EnrollGrant(Grant);

/// What an enrollment returns.
#[derive(Debug)]
pub struct Enrolled {
    /// Account metadata.
    pub account: AccountRecord,
    /// Code for the current step.
    pub current: CodeValue,
    /// Code for the next step.
    pub next: CodeValue,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// How the vault waits for audit: the gate and how long a release waits.
#[derive(Debug, Clone)]
pub struct AuditWait {
    /// What acknowledges events.
    pub gate: Arc<dyn AuditGate>,
    /// How long an acknowledgement may take.
    pub timeout: Duration,
}

/// The vault.
#[derive(Debug)]
pub struct Vault<S> {
    pub(crate) store: S,
    /// The master key and the data keys of every generation in use.
    pub(crate) keys: Keyring,
    /// Held (read) by every writer of sealed seeds around its seal and its
    /// write, and (write) by a rotation's last check and retirement, so no
    /// seed of a retired generation can be written meanwhile.
    pub(crate) seal_lock: tokio::sync::RwLock<()>,
    /// One rotation start at a time.
    pub(crate) rotating: tokio::sync::Mutex<()>,
    /// The rotation worker, while one runs.
    pub(crate) worker: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How fast a rotation re-seals.
    pub(crate) pace: RotationPace,
    /// Writes a new master key's seal material (none: rotations keep the
    /// master key).
    pub(crate) master_seal: Option<Arc<dyn MasterSeal>>,
    grants: GrantVerifier,
    audit: AuditWait,
    clock: Arc<dyn Clock>,
    root: TrustRoot,
    policy: RwLock<Option<Arc<VerifiedPolicy>>>,
    /// The sealed policy head `policy` was loaded with: another replica
    /// sharing the store (PostgreSQL) that applies a version changes it.
    policy_head: std::sync::Mutex<Option<Vec<u8>>>,
    /// One policy update (or master key replacement) at a time.
    pub(crate) applying: tokio::sync::Mutex<()>,
}

/// Checks an account id: 1 to 64 characters of `[a-z0-9._-]`.
pub fn validate_account_id(id: &str) -> Result<(), VaultError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VaultError::InvalidArgument(format!(
            "invalid account id {:?}: use 1 to 64 characters of a-z, 0-9, '.', '_' or '-'",
            id.chars().take(70).collect::<String>()
        )))
    }
}

/// Unix second a verified grant expires (verification ensures it is set).
fn grant_expiry(grant: &Grant) -> u64 {
    grant
        .expires_at
        .as_ref()
        .map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0))
}

fn spent(grant: &Grant) -> SpentGrant {
    SpentGrant {
        grant_id: grant.grant_id.clone(),
        expires_at: grant_expiry(grant),
    }
}

/// The `aws_accounts` attribute of `policy.applied`: each account mapped to
/// an AWS account as `account=aws_account_id/window_secs`, comma-separated in
/// account order (empty when none is). Audit's reconciler learns the mapping
/// from this attribute of the latest signed version, never from a file.
fn aws_accounts(policy: &twokey_consent::Policy) -> String {
    policy
        .aws_accounts()
        .map(|(account, aws, window)| format!("{account}={aws}/{}", window.as_secs()))
        .collect::<Vec<_>>()
        .join(",")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The statement a consent refusal is about, for the audit event.
fn refused_statement(e: &ConsentError) -> String {
    match e {
        ConsentError::Missing { statement }
        | ConsentError::Malformed { statement, .. }
        | ConsentError::WrongKind { statement, .. }
        | ConsentError::UnknownIdentity { statement, .. }
        | ConsentError::UnknownKey { statement, .. }
        | ConsentError::WrongNamespace { statement, .. }
        | ConsentError::BadSignature { statement, .. }
        | ConsentError::PolicyVersion { statement, .. }
        | ConsentError::UnknownAccount { statement, .. }
        | ConsentError::MissingRole { statement, .. }
        | ConsentError::WrongBinding { statement, .. }
        | ConsentError::Stale { statement, .. }
        | ConsentError::FromTheFuture { statement, .. } => statement.to_string(),
        ConsentError::NotDistinct { second, .. }
        | ConsentError::DuplicateApproval { second, .. } => second.to_string(),
        ConsentError::TooFewApprovals { .. } => "the approval statements".into(),
        ConsentError::PinNotVerified { .. }
        | ConsentError::ReleaseReplayed { .. }
        | ConsentError::CodesExhausted { .. }
        | ConsentError::RateLimited { .. } => "the release statement".into(),
        ConsentError::GrantMismatch { .. } => "the grant".into(),
        ConsentError::TooFewAdmins { .. } | ConsentError::AdminActionReplayed { .. } => {
            "the admin statements".into()
        }
        _ => String::new(),
    }
}

/// The signer (or person) a consent refusal names, for the audit event.
fn refused_signer(e: &ConsentError) -> String {
    match e {
        ConsentError::UnknownKey { signer, .. }
        | ConsentError::WrongNamespace { signer, .. }
        | ConsentError::BadSignature { signer, .. }
        | ConsentError::PolicyVersion { signer, .. }
        | ConsentError::WrongBinding { signer, .. }
        | ConsentError::Stale { signer, .. }
        | ConsentError::FromTheFuture { signer, .. }
        | ConsentError::PinNotVerified { signer }
        | ConsentError::ReleaseReplayed { signer, .. } => signer.clone(),
        ConsentError::UnknownIdentity { id, .. } | ConsentError::MissingRole { id, .. } => {
            id.clone()
        }
        ConsentError::NotDistinct { person, .. }
        | ConsentError::DuplicateApproval { person, .. } => person.clone(),
        ConsentError::TooFewAdmins { have, .. } => have.join(","),
        _ => String::new(),
    }
}

/// A refusal event: what was refused, by whom it was asked (the caller's
/// verified SPIFFE ID), which statement and signer, why.
fn refusal_event(caller: &str, action: &str, grant: &Grant, error: &VaultError) -> EventDraft {
    let consent = match error {
        VaultError::Consent(e) | VaultError::Store(VaultStoreError::Consent(e)) => Some(e),
        _ => None,
    };
    let kind = error.kind().grpc_code();
    EventDraft::new(caller, action)
        .account(&grant.account_id)
        .request(&grant.request_id)
        .outcome(Outcome::Denied)
        .attr("grant_id", &grant.grant_id)
        .attr("status", format!("{kind:?}"))
        .attr(
            "statement",
            consent.map(refused_statement).unwrap_or_default(),
        )
        .attr("signer", consent.map(refused_signer).unwrap_or_default())
        .attr("reason", error.to_string())
}

/// The verified admins, as an event's actor: their SPIFFE IDs, in the order
/// presented, comma-separated.
fn admins_actor(action: &VerifiedAdminAction) -> String {
    action
        .admins
        .iter()
        .map(|a| a.spiffe_id.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// An admin action's event, naming the verified admins.
fn admin_event(name: &str, grant: &Grant, action: &VerifiedAdminAction) -> EventDraft {
    admin_attrs(
        EventDraft::new(admins_actor(action), name)
            .account(&action.account_id)
            .attr("grant_id", &grant.grant_id),
        action,
    )
}

/// `event` with what every admin action's event says of the action: its
/// id, the policy version it was checked under and the admins by name.
pub(crate) fn admin_attrs(event: EventDraft, action: &VerifiedAdminAction) -> EventDraft {
    event
        .attr("action_id", &action.action_id)
        .attr("policy_version", action.policy_version.to_string())
        .attr(
            "admins",
            action
                .admins
                .iter()
                .map(|a| a.person.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )
}

/// The `code.released` event: every name in it verified.
fn released_event(grant: &Grant, v: &Verified) -> EventDraft {
    let ids = |s: &[twokey_consent::Signer]| {
        s.iter()
            .map(|a| a.spiffe_id.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let people = |s: &[twokey_consent::Signer]| {
        s.iter()
            .map(|a| a.person.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    EventDraft::new(&v.operator.spiffe_id, "code.released")
        .account(&v.account_id)
        .request(&v.request_id)
        .attr("grant_id", &grant.grant_id)
        .attr("release_id", &v.release_id)
        .attr("policy_version", v.policy_version.to_string())
        .attr("requester", &v.requester_id)
        .attr("requester_person", &v.requester_person)
        .attr("filed_by", &v.filed_by.spiffe_id)
        .attr("approvers", ids(&v.approvers))
        .attr("approver_people", people(&v.approvers))
        .attr("operator_person", &v.operator.person)
        .attr("request_digest", hex(&v.request_digest))
        .attr("release_digest", hex(&v.release_digest))
}

/// Opens the keyring with `key`; on the first start with a keyring (a new
/// vault, or one whose seeds were all sealed under the master key), adds
/// generation 1, durably, before any seed uses it. Seeds sealed before
/// stay generation 0 (the master key) until a rotation re-seals them.
fn open_keyring<S: VaultStore>(store: &S, key: MasterKey) -> Result<Keyring, VaultError> {
    let stored = store.keyring()?;
    let keys = Keyring::open(key, &stored)?;
    if stored.is_empty() {
        let older = !store.is_empty()?;
        let (data_key, sealed_key) = keys.new_data_key(1);
        let event = EventDraft::new(store.source(), "key.generation.added")
            .attr("generation", "1")
            .attr(
                "note",
                if older {
                    "seeds sealed before the keyring stay generation 0 (the master key) until `twokey vault rotate-key`"
                } else {
                    "the keyring's first generation"
                },
            );
        store.add_generation(NewGeneration {
            generation: 1,
            sealed_key,
            with_generation_zero: older,
            rotation: None,
            admin: None,
            pending_master: None,
            event,
        })?;
        store.sync_now()?;
        if older {
            keys.insert(0, keys.master().generation_zero());
        }
        keys.insert(1, data_key);
        tracing::info!(
            "keyring: generation 1 added{}",
            if older {
                "; seeds sealed before stay generation 0 until `twokey vault rotate-key`"
            } else {
                ""
            }
        );
    }
    Ok(keys)
}

/// Verifies the stored policy chain from the pinned `root`, and that its
/// newest version is the one the sealed head names.
fn load_chain<S: VaultStore>(
    store: &S,
    key: &MasterKey,
    root: &TrustRoot,
) -> Result<Option<VerifiedPolicy>, VaultError> {
    const WHAT_TO_DO: &str = "either the data directory was changed outside the vault (restore it from a backup, or move it aside, start on an empty one and have the admins apply the policy again with `twokey policy apply`), or [consent] admins_file no longer pins the admins who signed the first version (put back the file the vault was set up with)";
    let tampered = |version: u64, why: String| {
        VaultError::PolicyChain(format!(
            "the stored policy chain does not verify from the pinned admins at version {version}: {why}; {WHAT_TO_DO}"
        ))
    };
    let mut current: Option<VerifiedPolicy> = None;
    for stored in store.policies()? {
        let verified = verify_policy_update(
            current.as_ref(),
            root,
            stored.document.as_bytes(),
            &stored.signature_bytes(),
        )
        .map_err(|e| tampered(stored.version, e.to_string()))?;
        if verified.version() != stored.version
            || verified.digest().as_slice() != stored.digest_bytes()
        {
            return Err(tampered(
                stored.version,
                format!(
                    "the document stored as version {} is version {} (or its digest differs)",
                    stored.version,
                    verified.version()
                ),
            ));
        }
        current = Some(verified);
    }
    match (store.policy_head()?, &current) {
        (None, None) => Ok(None),
        (Some(head), Some(c)) if key.policy_head_matches(&head, c.version(), &c.digest()) => {
            Ok(current)
        }
        (Some(_), Some(c)) => Err(tampered(
            c.version(),
            "it is not the newest version the vault applied (a newer one was deleted, or the sealed head was replaced)".into(),
        )),
        (Some(_), None) => Err(tampered(
            0,
            "the vault applied a policy but no version is stored (they were deleted)".into(),
        )),
        (None, Some(c)) => Err(tampered(
            c.version(),
            "versions are stored but the sealed head the vault writes with each is missing".into(),
        )),
    }
}

impl<S: VaultStore> Vault<S> {
    /// A vault over `store`, checking (or, on first start, recording) that
    /// `key` is the key the data was sealed with, and verifying the stored
    /// policy chain from the pinned `root`.
    pub fn open(
        store: S,
        key: MasterKey,
        grants: GrantVerifier,
        audit: AuditWait,
        clock: Arc<dyn Clock>,
        root: TrustRoot,
    ) -> Result<Self, VaultError> {
        match store.key_check()? {
            Some(check) if !key.matches(&check) => match store.pending_master()? {
                // Killed after the next master key's seal material was
                // written and before its promotion: promote now.
                Some(pending) if key.matches(&pending.key_check()) => {
                    crate::master::promote_at_start(&store, &pending, unix_seconds(clock.now()))?;
                }
                _ => return Err(VaultError::WrongMasterKey),
            },
            Some(_) => {}
            None => store.set_key_check(&key.key_check())?,
        }
        let policy_head = store.policy_head()?;
        let policy = load_chain(&store, &key, &root)?;
        if let Some(p) = &policy {
            tracing::info!("in force: {p}");
        }
        let keys = open_keyring(&store, key)?;
        Ok(Self {
            store,
            keys,
            seal_lock: tokio::sync::RwLock::new(()),
            rotating: tokio::sync::Mutex::new(()),
            worker: std::sync::Mutex::new(None),
            pace: RotationPace::default(),
            master_seal: None,
            grants,
            audit,
            clock,
            root,
            policy: RwLock::new(policy.map(Arc::new)),
            policy_head: std::sync::Mutex::new(policy_head),
            applying: tokio::sync::Mutex::new(()),
        })
    }

    /// Sets how fast a rotation re-seals (before the vault is shared).
    pub fn with_rotation_pace(mut self, pace: RotationPace) -> Self {
        self.pace = pace;
        self
    }

    /// Sets what writes a new master key's seal material: with it, a
    /// rotation also replaces the master key.
    pub fn with_master_seal(mut self, seal: Arc<dyn MasterSeal>) -> Self {
        self.master_seal = Some(seal);
        self
    }

    pub(crate) fn now(&self) -> u64 {
        unix_seconds(self.clock.now())
    }

    /// The policy in force, if any.
    pub fn active_policy(&self) -> Option<Arc<VerifiedPolicy>> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The policy in force now: when the stored sealed head is not the one
    /// the policy in memory was loaded with (another vault replica on the
    /// same PostgreSQL store applied a version), the chain is loaded and
    /// verified from the pinned admins again first. One read of the head
    /// per check.
    pub fn policy_now(&self) -> Result<Option<Arc<VerifiedPolicy>>, VaultError> {
        let head = self.store.policy_head()?;
        if *self.policy_head.lock().unwrap_or_else(|e| e.into_inner()) == head {
            return Ok(self.active_policy());
        }
        let loaded = load_chain(&self.store, &self.keys.master(), &self.root)?.map(Arc::new);
        if let Some(p) = &loaded {
            tracing::info!("in force (applied through another replica): {p}");
        }
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = loaded.clone();
        *self.policy_head.lock().unwrap_or_else(|e| e.into_inner()) = head;
        Ok(loaded)
    }

    /// Refuses (UNAVAILABLE) while audit's receipts are inconsistent.
    fn receipts_consistent(&self, refused: &str) -> Result<(), VaultError> {
        self.audit.gate.receipts(refused).map_err(|message| {
            tracing::warn!("refused: {message}");
            VaultError::AuditUnavailable(message)
        })
    }

    pub(crate) async fn commit_and_confirm(&self, seq: u64, what: &str) -> Result<(), VaultError> {
        self.commit_and_confirm_within(seq, what, None).await
    }

    /// [`Self::commit_and_confirm`], waiting for audit at most until
    /// [`ANSWER_RESERVE`] before `deadline` (the caller's), when that comes
    /// before `audit_ack_timeout_ms` runs out.
    async fn commit_and_confirm_within(
        &self,
        seq: u64,
        what: &str,
        deadline: Option<Instant>,
    ) -> Result<(), VaultError> {
        self.store.commit().await?;
        self.confirm_within(seq, what, deadline).await
    }

    /// Waits for audit to acknowledge the durable event `seq`, at most
    /// until [`ANSWER_RESERVE`] before `deadline` when that comes before
    /// `audit_ack_timeout_ms` runs out.
    async fn confirm_within(
        &self,
        seq: u64,
        what: &str,
        deadline: Option<Instant>,
    ) -> Result<(), VaultError> {
        let audit = &self.audit;
        let wait = deadline.map_or(audit.timeout, |d| {
            audit.timeout.min(
                d.saturating_duration_since(Instant::now())
                    .saturating_sub(ANSWER_RESERVE),
            )
        });
        audit.gate.confirm(seq, wait).await.map_err(|_| {
            tracing::warn!(seq, "audit did not acknowledge in time: {what}");
            VaultError::AuditUnavailable(format!("audit unavailable, {what}"))
        })?;
        // Acknowledged, but under a checkpoint inconsistent with one accepted before.
        self.receipts_consistent(NO_CHANGE)
    }

    /// Writes a refusal to audit and waits (bounded) for it to be
    /// acknowledged; the refusal is answered whatever happens here.
    pub(crate) async fn audit_refusal(&self, event: EventDraft) {
        let seq = match self.store.record(event) {
            Ok(seq) => seq,
            Err(e) => {
                tracing::warn!("cannot record a refusal: {e}");
                return;
            }
        };
        if let Err(e) = self
            .commit_and_confirm(seq, "a refusal is not yet in the log")
            .await
        {
            tracing::warn!("{e}");
        }
    }

    /// Audits `error` if it refuses consent; returns it.
    async fn refuse(
        &self,
        caller: &str,
        action: &str,
        grant: &Grant,
        error: VaultError,
    ) -> VaultError {
        if error.is_consent_refusal() {
            tracing::info!(account = %grant.account_id, "{action}: {error}");
            self.audit_refusal(refusal_event(caller, action, grant, &error))
                .await;
        }
        error
    }

    /// Audits `error` as a refused admin `action` if it refuses consent;
    /// returns it.
    async fn refuse_admin(
        &self,
        caller: &str,
        grant: &Grant,
        action: AdminAction,
        error: VaultError,
    ) -> VaultError {
        if error.is_consent_refusal() {
            let name = twokey_consent::admin::action_name(action);
            tracing::info!(account = %grant.account_id, "{name} refused: {error}");
            let event = refusal_event(caller, "admin_action.refused", grant, &error)
                .attr("admin_action", name);
            self.audit_refusal(event).await;
        }
        error
    }

    /// Checks M admins' consent to `action` on the grant's account; a
    /// refusal is audited.
    async fn admin_consent(
        &self,
        caller: &str,
        grant: &Grant,
        action: AdminAction,
        statements: &[SignedStatement],
    ) -> Result<(VerifiedAdminAction, AdminUse), VaultError> {
        let checked = match self.policy_now()? {
            None => Err(VaultError::NoPolicy),
            Some(policy) => check_admin_action(
                &policy,
                &AdminActionRequest {
                    account_id: grant.account_id.clone(),
                    action,
                },
                statements,
                self.clock.now(),
                &self.store,
            )
            .map(|v| (v, policy.admin_action_window()))
            .map_err(VaultError::Consent),
        };
        match checked {
            Ok((verified, window)) => {
                let now = self.now();
                let admin = AdminUse {
                    action_id: verified.action_id.clone(),
                    action_until: remember_until(now, window + Duration::from_secs(60)),
                    now,
                    keep_until: now.saturating_add(verified.recovery_window.as_secs()),
                };
                Ok((verified, admin))
            }
            Err(e) => Err(self.refuse_admin(caller, grant, action, e).await),
        }
    }

    /// Opens an account's seed under the generation it records. A seed
    /// read just before a rotation retired its generation is read again
    /// (it is re-sealed by then).
    pub(crate) fn open_seed(
        &self,
        record: &AccountRecord,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, VaultError> {
        let integrity = |_| VaultError::Integrity(record.account_id.clone());
        match self
            .keys
            .open_seed(record.key_generation, &record.account_id, &record.sealed())
        {
            Err(KeyringError::NoGeneration(_)) => {
                let again = self
                    .store
                    .get(&record.account_id)?
                    .ok_or_else(|| VaultStoreError::NotFound(record.account_id.clone()))?;
                self.keys
                    .open_seed(again.key_generation, &again.account_id, &again.sealed())
                    .map_err(integrity)
            }
            other => other.map_err(integrity),
        }
    }

    /// Checks an enrollment grant's signature, purpose and lifetime, before
    /// the request's seed is looked at.
    pub fn verify_enroll_grant(
        &self,
        signed: Option<&SignedGrant>,
    ) -> Result<EnrollGrant, VaultError> {
        let grant = self
            .grants
            .verify(signed, GrantPurpose::Enroll, self.clock.now())?;
        Ok(EnrollGrant(grant))
    }

    /// Enrolls a seed for a verified enrollment grant for the same account,
    /// used up here (once). A new account's event names the grant's
    /// operator, the admin the broker vouched for; a replacement needs M
    /// admins' signed consent (ENROLL_REPLACE), names them, and keeps the
    /// replaced seed sealed for the policy's recovery window. Nothing is
    /// stored on refusal.
    pub async fn enroll(
        &self,
        caller: &str,
        EnrollGrant(grant): EnrollGrant,
        request: Enrollment,
    ) -> Result<Enrolled, VaultError> {
        let Enrollment {
            account_id,
            spec,
            replace,
            min_seconds_left,
            consent,
        } = request;
        if grant.account_id != account_id {
            return Err(VaultError::GrantForOtherAccount {
                grant_id: grant.grant_id,
                granted: grant.account_id.chars().take(70).collect(),
                asked: account_id,
            });
        }
        let admin = if replace {
            Some(
                self.admin_consent(caller, &grant, AdminAction::EnrollReplace, &consent)
                    .await?,
            )
        } else {
            None
        };
        let now = self.now();
        // The registration codes: this step and the next, both handed out.
        let current_step = now / u64::from(spec.params.period.max(1));
        let mut record = AccountRecord {
            account_id,
            issuer: spec.issuer.clone(),
            label: spec.label.clone(),
            params: spec.params,
            seed_bits: u32::try_from(spec.seed.bits()).unwrap_or(u32::MAX),
            created_at: now,
            last_used_at: None,
            sealed_seed: String::new(),
            min_seconds_left,
            last_step: Some(current_step + 1),
            disabled: false,
            key_generation: 0,
        };
        // Sealed and written under the seal lock: a rotation's last check
        // sees this seed, or it is sealed under the rotation's generation.
        let sealing = self.seal_lock.read().await;
        let (generation, sealed) = self.keys.seal_seed(&record.account_id, spec.seed.expose());
        record.key_generation = generation;
        record.set_sealed(&sealed);
        let mut warnings = Vec::new();
        if spec.seed.is_weak() {
            warnings.push(format!(
                "weak seed: {} bits, below the 128 bits RFC 4226 asks for",
                spec.seed.bits()
            ));
        }
        let event = match &admin {
            Some((verified, use_)) => admin_event("account.enrolled.replace", &grant, verified)
                .attr("kept_until", use_.keep_until.to_string()),
            None => EventDraft::new(grant.operator.clone(), "account.enrolled")
                .account(&record.account_id)
                .attr("grant_id", &grant.grant_id),
        }
        .attr("seed_bits", record.seed_bits.to_string())
        .attr("weak_seed", spec.seed.is_weak().to_string());
        let spent = spent(&grant);
        let new = NewAccount {
            record: &record,
            replace,
            grant: &spent,
            admin: admin.as_ref().map(|(_, a)| a),
        };
        let put = self.store.put(new, event);
        drop(sealing);
        let seq = match put {
            Ok(seq) => seq,
            Err(e) => {
                return Err(self
                    .refuse_admin(caller, &grant, AdminAction::EnrollReplace, e.into())
                    .await);
            }
        };
        self.commit_and_confirm(
            seq,
            "no codes released; the seed is stored: enroll again with replace once audit is back",
        )
        .await?;
        let current = code_for_step(&spec.seed, spec.params, current_step);
        let next = code_for_step(&spec.seed, spec.params, current_step + 1);
        tracing::info!(account = %record.account_id, "account enrolled");
        Ok(Enrolled {
            account: record,
            current,
            next,
            warnings,
        })
    }

    /// Checks the people's signed consent to one code for `grant`.
    fn check_evidence(
        &self,
        grant: &Grant,
        evidence: Option<&ReleaseEvidence>,
    ) -> Result<(Verified, ReleaseUse), VaultError> {
        let policy = self.policy_now()?.ok_or(VaultError::NoPolicy)?;
        let none = SignedStatement::default();
        let (request, approvals, release) = match evidence {
            Some(e) => (
                e.request.as_ref().unwrap_or(&none),
                e.approvals.as_slice(),
                e.release.as_ref().unwrap_or(&none),
            ),
            None => (&none, &[][..], &none),
        };
        let facts = GrantFacts {
            grant_id: &grant.grant_id,
            account_id: &grant.account_id,
            request_id: &grant.request_id,
        };
        let verified = check_release(
            &policy,
            request,
            approvals,
            release,
            &facts,
            self.clock.now(),
            &self.store,
        )?;
        // check_release found the account in the policy.
        let account = policy
            .account(&verified.account_id)
            .ok_or(VaultError::NoPolicy)?;
        let now = self.now();
        let skew = Duration::from_secs(60);
        let use_ = ReleaseUse {
            policy_version: verified.policy_version,
            release_id: verified.release_id.clone(),
            release_id_until: remember_until(now, account.release_freshness + skew),
            request_digest: verified.request_digest,
            request_id: verified.request_id.clone(),
            request_until: remember_until(
                now,
                account.request_window + account.release_window + account.release_freshness + skew,
            ),
            codes_per_request: verified.codes_per_request,
            rate: account.release_rate,
            operator: verified.operator.spiffe_id.clone(),
        };
        Ok((verified, use_))
    }

    /// Computes one code for a valid, unused release grant and the people's
    /// signed consent to it (checked by [`check_release`] against the
    /// policy in force, and again for single use, codes per request and the
    /// account's rate in the transaction that uses the grant): the code of
    /// the step the store chose and recorded with the grant use, a step
    /// never handed out before for the account, with enough time left in it
    /// (`valid_from` may be in the future). A refusal of consent is audited
    /// as `code.refused` and releases nothing.
    ///
    /// With a `deadline` (the caller's), the wait for audit ends
    /// [`ANSWER_RESERVE`] before it, so that `code.withheld` is recorded
    /// and the refusal reaches the caller before it gives up.
    pub async fn generate_code(
        &self,
        caller: &str,
        signed: Option<&SignedGrant>,
        evidence: Option<&ReleaseEvidence>,
        deadline: Option<Instant>,
    ) -> Result<(CodeValue, String), VaultError> {
        let grant = self
            .grants
            .verify(signed, GrantPurpose::Release, self.clock.now())?;
        let record = self
            .store
            .get(&grant.account_id)?
            .ok_or_else(|| VaultStoreError::NotFound(grant.account_id.clone()))?;
        self.receipts_consistent(NO_CODE)?;
        let refused = |e: VaultError| self.refuse(caller, "code.refused", &grant, e);
        let (verified, consent) = match self.check_evidence(&grant, evidence) {
            Ok(ok) => ok,
            Err(e) => return Err(refused(e).await),
        };
        if record.disabled {
            return Err(refused(VaultStoreError::Disabled(record.account_id.clone()).into()).await);
        }
        let seed = self.open_seed(&record)?;
        let seed = Seed::from_bytes(seed.to_vec())?;
        let operator = verified.operator.spiffe_id.clone();
        let now = self.now();
        let released = self
            .store
            .use_grant(GrantUse {
                grant_id: grant.grant_id.clone(),
                expires_at: grant_expiry(&grant),
                account_id: grant.account_id.clone(),
                now,
                consent,
                event: released_event(&grant, &verified),
            })
            .await;
        let released = match released {
            Ok(r) => r,
            Err(e) => return Err(refused(e.into()).await),
        };
        // `use_grant` answered after its group's sync: the used grant and
        // `code.released` are durable and shipping, so only audit's
        // acknowledgement is waited for here (no second sync cycle).
        let confirmed = match &released.sync_error {
            None => {
                self.confirm_within(released.seq, "no code released", deadline)
                    .await
            }
            Some(why) => Err(VaultStoreError::Store(StoreError::Sync(why.clone())).into()),
        };
        if let Err(e) = confirmed {
            // The log holds `code.released` for this grant; say that the code
            // never left, so the log stays true.
            let withheld = EventDraft::new(operator, "code.withheld")
                .account(&grant.account_id)
                .request(&verified.request_id)
                .outcome(Outcome::Failure)
                .attr("grant_id", &grant.grant_id)
                .attr("release_id", &verified.release_id)
                .attr("step", released.step.to_string())
                .attr(
                    "reason",
                    if matches!(&e, VaultError::AuditUnavailable(m) if m.starts_with("audit served")) {
                        "audit acknowledged code.released under an inconsistent checkpoint"
                    } else {
                        "audit did not acknowledge code.released in time"
                    },
                );
            // The code never left: its step, the request's count and the
            // account's rate slot are given back (its ids stay used).
            let given_back = Withheld {
                account_id: &grant.account_id,
                step: released.step,
                request_digest: &verified.request_digest,
                released_at: now,
            };
            if self.store.withhold(given_back, withheld).is_ok() {
                let _ = self.store.commit().await;
            }
            return Err(e);
        }
        tracing::info!(account = %grant.account_id, request = %verified.request_id, grant = %grant.grant_id, "code released");
        Ok((
            code_for_step(&seed, record.params, released.step),
            grant.grant_id,
        ))
    }

    /// Removes an account for a valid removal grant and M admins' signed
    /// consent (REMOVE); its seed is kept sealed for the recovery window.
    pub async fn remove(
        &self,
        caller: &str,
        signed: Option<&SignedGrant>,
        consent: &[SignedStatement],
    ) -> Result<String, VaultError> {
        let grant = self
            .grants
            .verify(signed, GrantPurpose::Remove, self.clock.now())?;
        let (verified, admin) = self
            .admin_consent(caller, &grant, AdminAction::Remove, consent)
            .await?;
        let event = admin_event("account.removed", &grant, &verified)
            .attr("kept_until", admin.keep_until.to_string());
        let removal = Removal {
            grant_id: grant.grant_id.clone(),
            expires_at: grant_expiry(&grant),
            account_id: grant.account_id.clone(),
            admin,
            event,
        };
        let removed = {
            let _sealing = self.seal_lock.read().await;
            self.store.remove(removal)
        };
        let seq = match removed {
            Ok(seq) => seq,
            Err(e) => {
                return Err(self
                    .refuse_admin(caller, &grant, AdminAction::Remove, e.into())
                    .await);
            }
        };
        self.commit_and_confirm(seq, "removal recorded but not yet acknowledged by audit")
            .await?;
        Ok(grant.account_id)
    }

    /// Disables or enables code release for an account, for a valid
    /// SET_ENABLED grant and M admins' signed consent (DISABLE or ENABLE).
    pub async fn set_enabled(
        &self,
        caller: &str,
        signed: Option<&SignedGrant>,
        enabled: bool,
        consent: &[SignedStatement],
    ) -> Result<AccountRecord, VaultError> {
        let grant = self
            .grants
            .verify(signed, GrantPurpose::SetEnabled, self.clock.now())?;
        let action = if enabled {
            AdminAction::Enable
        } else {
            AdminAction::Disable
        };
        let (verified, admin) = self.admin_consent(caller, &grant, action, consent).await?;
        let name = if enabled {
            "account.enabled"
        } else {
            "account.disabled"
        };
        let change = EnabledChange {
            grant: spent(&grant),
            account_id: grant.account_id.clone(),
            enabled,
            admin,
            event: admin_event(name, &grant, &verified),
        };
        let (seq, record) = match self.store.set_enabled(change) {
            Ok(ok) => ok,
            Err(e) => {
                return Err(self.refuse_admin(caller, &grant, action, e.into()).await);
            }
        };
        self.commit_and_confirm(
            seq,
            "the change is recorded but not yet acknowledged by audit",
        )
        .await?;
        Ok(record)
    }

    /// Brings back the newest seed of the account replaced or removed
    /// within its recovery window, for a valid RESTORE grant and M admins'
    /// signed consent (RESTORE); an account enrolled under the id meanwhile
    /// is kept in its place (so a restore can be undone the same way).
    pub async fn restore(
        &self,
        caller: &str,
        signed: Option<&SignedGrant>,
        consent: &[SignedStatement],
    ) -> Result<(AccountRecord, KeptSeed), VaultError> {
        let grant = self
            .grants
            .verify(signed, GrantPurpose::Restore, self.clock.now())?;
        let (verified, admin) = self
            .admin_consent(caller, &grant, AdminAction::Restore, consent)
            .await?;
        let restore = Restore {
            grant: spent(&grant),
            account_id: grant.account_id.clone(),
            event: admin_event("account.restored", &grant, &verified),
            admin,
        };
        let restored = {
            let _sealing = self.seal_lock.read().await;
            self.store.restore(restore)
        };
        let (seq, record, kept) = match restored {
            Ok(ok) => ok,
            Err(e) => {
                return Err(self
                    .refuse_admin(caller, &grant, AdminAction::Restore, e.into())
                    .await);
            }
        };
        self.commit_and_confirm(
            seq,
            "the restore is recorded but not yet acknowledged by audit",
        )
        .await?;
        Ok((record, kept))
    }

    /// Checks M admins' consent to seal the vault (ADMIN_ACTION_SEAL_VAULT,
    /// the policy's own admins and threshold) and records the used action
    /// id with `vault.sealed` (naming the admins) durably; a refusal is
    /// audited as `admin_action.refused`. Answers the admins' SPIFFE IDs;
    /// the caller then drops the vault and its key. No wait for audit's
    /// acknowledgement: a seal only takes the key away, and must work while
    /// audit is down.
    pub async fn seal(
        &self,
        caller: &str,
        statements: &[SignedStatement],
    ) -> Result<Vec<String>, VaultError> {
        let action = AdminAction::SealVault;
        let checked = match self.policy_now()? {
            None => Err(VaultError::NoPolicy),
            Some(policy) => check_admin_action(
                &policy,
                &AdminActionRequest {
                    account_id: String::new(),
                    action,
                },
                statements,
                self.clock.now(),
                &self.store,
            )
            .map(|v| (v, policy.admin_action_window()))
            .map_err(VaultError::Consent),
        };
        let recorded = checked.and_then(|(verified, window)| {
            let now = self.now();
            let admin = AdminUse {
                action_id: verified.action_id.clone(),
                action_until: remember_until(now, window + Duration::from_secs(60)),
                now,
                keep_until: now,
            };
            let event = admin_attrs(
                EventDraft::new(admins_actor(&verified), "vault.sealed")
                    .outcome(Outcome::Success)
                    .attr("caller", caller),
                &verified,
            );
            self.store
                .use_vault_action(&admin, event)
                .map_err(VaultError::from)
                .map(|_| verified)
        });
        let verified = match recorded {
            Ok(verified) => verified,
            Err(e) => {
                if e.is_consent_refusal() {
                    tracing::info!("seal refused: {e}");
                    let kind = e.kind().grpc_code();
                    let consent = match &e {
                        VaultError::Consent(c) | VaultError::Store(VaultStoreError::Consent(c)) => {
                            Some(c)
                        }
                        _ => None,
                    };
                    let event = EventDraft::new(caller, "admin_action.refused")
                        .outcome(Outcome::Denied)
                        .attr("admin_action", twokey_consent::admin::action_name(action))
                        .attr("status", format!("{kind:?}"))
                        .attr(
                            "statement",
                            consent.map(refused_statement).unwrap_or_default(),
                        )
                        .attr("signer", consent.map(refused_signer).unwrap_or_default())
                        .attr("reason", e.to_string());
                    self.audit_refusal(event).await;
                }
                return Err(e);
            }
        };
        self.store.commit().await?;
        Ok(verified
            .admins
            .iter()
            .map(|a| a.spiffe_id.clone())
            .collect())
    }

    /// The SPIFFE IDs of the admins named `names` in the authority that
    /// signed the next version (the active policy, or the pinned root).
    fn admin_ids(&self, current: Option<&VerifiedPolicy>, names: &[String]) -> Vec<String> {
        names
            .iter()
            .map(|n| {
                let person = match current {
                    Some(c) => c.people().iter().find(|p| p.name() == n),
                    None => self.root.admins().iter().find(|p| p.name() == n),
                };
                person
                    .and_then(|p| p.ids().first().cloned())
                    .unwrap_or_else(|| n.clone())
            })
            .collect()
    }

    /// Applies a new policy version: at least M valid signatures by distinct
    /// admins of the active version (of the pinned root, for the first), a
    /// version above the active one. It is stored (with every earlier one)
    /// and synced before it is in force and answered; `policy.applied`
    /// names the admins who signed. A refusal leaves the active version in
    /// force and is audited as `policy.refused`.
    pub async fn apply_policy(
        &self,
        caller: &str,
        document: &str,
        signatures: &[Vec<u8>],
    ) -> Result<StoredPolicy, VaultError> {
        let _one_at_a_time = self.applying.lock().await;
        if self.store.pending_master()?.is_some() {
            return Err(VaultError::MasterSeal(
                "a master key replacement is pending and the policy head is sealed for it: restart the vault (or repeat `twokey vault rotate-key`) so it finishes, then apply the policy".into(),
            ));
        }
        let current = self.policy_now()?;
        let active = current.as_ref().map_or(0, |c| c.version());
        let verified = match verify_policy_update(
            current.as_deref(),
            &self.root,
            document.as_bytes(),
            signatures,
        ) {
            Ok(v) => v,
            Err(e) => {
                let proposed = twokey_consent::Policy::parse(document)
                    .map(|p| p.version().to_string())
                    .unwrap_or_default();
                tracing::info!("policy update refused: {e}");
                let event = EventDraft::new(caller, "policy.refused")
                    .outcome(Outcome::Denied)
                    .attr("proposed_version", proposed)
                    .attr("active_version", active.to_string())
                    .attr(
                        "status",
                        format!("{:?}", consent_kind(e.kind()).grpc_code()),
                    )
                    .attr("reason", e.to_string());
                self.audit_refusal(event).await;
                return Err(e.into());
            }
        };
        let now = self.now();
        let stored = StoredPolicy {
            version: verified.version(),
            document: verified.document().to_owned(),
            signatures: signatures
                .iter()
                .map(|s| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s))
                .collect(),
            signed_by: verified.signed_by().to_vec(),
            digest: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                verified.digest(),
            ),
            applied_at: now,
        };
        let head = self
            .keys
            .master()
            .seal_policy_head(verified.version(), &verified.digest());
        let admins = self.admin_ids(current.as_deref(), verified.signed_by());
        let event = EventDraft::new(admins.join(","), "policy.applied")
            .attr("policy_version", verified.version().to_string())
            .attr("previous_version", active.to_string())
            .attr("digest", hex(&verified.digest()))
            .attr("signed_by", verified.signed_by().join(","))
            .attr("aws_accounts", aws_accounts(&verified));
        let seq = self.store.put_policy(&stored, &head, event)?;
        self.store.commit().await?;
        tracing::info!("applied: {verified}");
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(verified));
        *self.policy_head.lock().unwrap_or_else(|e| e.into_inner()) = Some(head);
        let audit = &self.audit;
        audit.gate.confirm(seq, audit.timeout).await.map_err(|_| {
            VaultError::AuditUnavailable(format!(
                "audit unavailable: policy version {} is applied and in force, but audit has not acknowledged policy.applied yet",
                stored.version
            ))
        })?;
        Ok(stored)
    }

    /// Every applied policy version, newest first.
    pub fn policies(&self) -> Result<Vec<StoredPolicy>, VaultError> {
        let mut all = self.store.policies()?;
        all.reverse();
        Ok(all)
    }

    /// Every account (metadata and sealed seed), ordered by id.
    pub fn list(&self) -> Result<Vec<AccountRecord>, VaultError> {
        Ok(self.store.list()?)
    }

    /// Number of accounts.
    pub fn count(&self) -> usize {
        self.store.count()
    }

    /// Forgets expired used-grant ids and consent history, and purges kept
    /// seeds past their recovery window.
    pub fn sweep(&self) -> Result<usize, VaultError> {
        Ok(self.store.sweep(self.now())?)
    }

    /// The vault's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use ed25519_dalek::SigningKey;
    use twokey_consent::{
        Binding, approval_binding, new_id, new_statement, release_binding, request_binding,
        sign_statement,
    };
    use twokey_proto::vault::v1::ReleaseEvidence;
    use twokey_runtime::{
        durable::DurableDb, events::EventSigner, identity::SpiffeId, keys::SecretKey,
        outbox::Outbox, time::ManualClock,
    };
    use twokey_testkit::{
        consent::{AccountRoles, Person, PolicySpec, admins_allowed_signers, sign_policy},
        grants,
    };

    use super::*;
    use crate::{
        seed::{Algorithm, TotpParams},
        store::SledVaultStore,
    };

    /// Acknowledges every event at once, unless set down; its receipts
    /// are as `.1` says.
    #[derive(Debug)]
    struct Gate(
        std::sync::atomic::AtomicBool,
        tokio::sync::watch::Sender<Option<twokey_runtime::receipts::Inconsistency>>,
        twokey_runtime::receipts::ReceiptHealth,
    );

    impl Default for Gate {
        fn default() -> Self {
            let (tx, health) = twokey_runtime::receipts::ReceiptHealth::manual();
            Self(Default::default(), tx, health)
        }
    }

    impl AuditGate for Arc<Gate> {
        fn confirm(&self, seq: u64, _: Duration) -> BoxFuture<'_, Result<(), AckTimeout>> {
            let down = self.0.load(std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move { if down { Err(AckTimeout(seq)) } else { Ok(()) } })
        }

        fn receipts(&self, refused: &str) -> Result<(), String> {
            self.2.check(refused)
        }
    }

    /// A start time on a whole minute, so on a 30 s step boundary too.
    const T0: u64 = 1_800_000_000;

    const TD: &str = "t";

    struct Fx<S = SledVaultStore> {
        vault: Vault<S>,
        clock: ManualClock,
        key: SigningKey,
        audit: Arc<Gate>,
        _dir: tempfile::TempDir,
        /// The PostgreSQL server the store is on, if it is.
        pg: Option<twokey_testkit::postgres::TestPostgres>,
        ids: std::sync::atomic::AtomicU32,
        /// alice requests, bob approves, olivia operates, adam and anna admin.
        people: [Person; 5],
    }

    fn person(name: &str) -> Person {
        Person::generate(name, vec![format!("spiffe://{TD}/user/{name}")])
    }

    impl Fx {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(T0));
            let db = DurableDb::open(dir.path()).unwrap();
            let signer = EventSigner::new(
                SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
                SigningKey::from_bytes(&[7; 32]),
            );
            let outbox = Outbox::open(&db, signer, Arc::new(clock.clone())).unwrap();
            let store = SledVaultStore::open(&db, outbox).unwrap();
            Fx::with_store(store, clock, dir, None)
        }
    }

    impl Fx<crate::store::postgres::PgVaultStore> {
        /// The vault on a throwaway PostgreSQL server's database, migrated.
        async fn on_postgres() -> Self {
            let pg = twokey_testkit::postgres::TestPostgres::start()
                .expect("scripts/test installs PostgreSQL");
            pg.create_database("vault", "vault_role", "vault-pw")
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("vault_role.pw");
            std::fs::write(&file, "vault-pw\n").unwrap();
            let settings = twokey_pgstore::PgSettings {
                url: pg.url("vault", "vault_role"),
                password_file: Some(file),
                ca_file: None,
            };
            crate::store::postgres::migrate(&settings).await.unwrap();
            let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(T0));
            let signer = Arc::new(EventSigner::new(
                SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
                SigningKey::from_bytes(&[7; 32]),
            ));
            let store = crate::store::postgres::PgVaultStore::open(
                settings,
                signer,
                Arc::new(clock.clone()),
            )
            .await
            .unwrap();
            Fx::with_store(store, clock, dir, Some(pg))
        }

        /// A second vault replica on the same database, opened now.
        async fn replica(&self) -> Vault<crate::store::postgres::PgVaultStore> {
            let signer = Arc::new(EventSigner::new(
                SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
                SigningKey::from_bytes(&[7; 32]),
            ));
            let store = crate::store::postgres::PgVaultStore::open(
                self.vault.store.settings().clone(),
                signer,
                Arc::new(self.clock.clone()),
            )
            .await
            .unwrap();
            let root = TrustRoot::from_allowed_signers(
                TD,
                &admins_allowed_signers(&[&self.people[3], &self.people[4]]),
                2,
            )
            .unwrap();
            Vault::open(
                store,
                MasterKey::new(SecretKey::from_bytes([3; 32])),
                GrantVerifier::new(self.key.verifying_key()),
                AuditWait {
                    gate: Arc::new(self.audit.clone()),
                    timeout: Duration::from_secs(1),
                },
                Arc::new(self.clock.clone()),
                root,
            )
            .unwrap()
        }
    }

    impl<S: VaultStore> Fx<S> {
        fn with_store(
            store: S,
            clock: ManualClock,
            dir: tempfile::TempDir,
            pg: Option<twokey_testkit::postgres::TestPostgres>,
        ) -> Self {
            let key = SigningKey::from_bytes(&[9; 32]);
            let audit = Arc::new(Gate::default());
            let people = ["alice", "bob", "olivia", "adam", "anna"].map(person);
            let root = TrustRoot::from_allowed_signers(
                TD,
                &admins_allowed_signers(&[&people[3], &people[4]]),
                2,
            )
            .unwrap();
            let vault = Vault::open(
                store,
                MasterKey::new(SecretKey::from_bytes([3; 32])),
                GrantVerifier::new(key.verifying_key()),
                AuditWait {
                    gate: Arc::new(audit.clone()),
                    timeout: Duration::from_secs(1),
                },
                Arc::new(clock.clone()),
                root,
            )
            .unwrap();
            Self {
                vault,
                clock,
                key,
                audit,
                _dir: dir,
                pg,
                ids: Default::default(),
                people,
            }
        }

        /// Applies policy version 1: aws-root, 1000 codes an hour.
        async fn apply_policy(&self) {
            self.apply_version(1).await;
        }

        /// Applies policy `version` (the same roles) through this vault.
        async fn apply_version(&self, version: u64) {
            let spec = PolicySpec {
                version,
                trust_domain: TD.into(),
                people: self
                    .people
                    .iter()
                    .map(|p| (p.name.clone(), p.ids.clone(), p.public().clone()))
                    .collect(),
                admins: vec!["adam".into(), "anna".into()],
                threshold: 2,
                accounts: vec![AccountRoles {
                    releases_per_hour: 1000,
                    ..AccountRoles::new("aws-root", "alice", "bob", "olivia")
                }],
            };
            let doc = spec.to_toml();
            let sigs: Vec<Vec<u8>> = self.people[3..]
                .iter()
                .map(|p| sign_policy(&p.key, TD, &doc))
                .collect();
            self.vault
                .apply_policy("spiffe://t/svc/broker", &doc, &sigs)
                .await
                .unwrap();
        }

        /// A release grant and the people's consent to it.
        fn consented(&self, account: &str) -> (SignedGrant, ReleaseEvidence) {
            self.consented_under(1, account)
        }

        /// [`Self::consented`], the statements bound to policy `version`.
        fn consented_under(&self, version: u64, account: &str) -> (SignedGrant, ReleaseEvidence) {
            let [alice, bob, olivia, ..] = &self.people;
            let now = self.clock.now();
            let (request_id, grant_id) = (new_id(), new_id());
            let sign = |p: &Person, b: Binding| {
                sign_statement(&p.key, TD, &new_statement(version, p.id(), now, b)).unwrap()
            };
            let request = sign(
                alice,
                request_binding(&request_id, account, alice.id(), "why", "", now),
            );
            let approval = sign(bob, approval_binding(&request).unwrap());
            let approvals = vec![approval];
            let release = sign(
                olivia,
                release_binding(&request, &approvals, &grant_id, &new_id()).unwrap(),
            );
            let grant = Grant {
                request_id,
                ..grants::grant(&grant_id, account, GrantPurpose::Release, now)
            };
            (
                twokey_runtime::grant::sign_grant(&self.key, &grant),
                ReleaseEvidence {
                    request: Some(request),
                    approvals,
                    release: Some(release),
                },
            )
        }

        async fn generate(
            &self,
            (grant, evidence): &(SignedGrant, ReleaseEvidence),
        ) -> Result<(CodeValue, String), VaultError> {
            self.vault
                .generate_code("spiffe://t/svc/broker", Some(grant), Some(evidence), None)
                .await
        }

        fn now(&self) -> u64 {
            unix_seconds(self.clock.now())
        }

        /// Moves the clock to `second` seconds into the step `periods`
        /// whole periods of 30 s after the current one.
        fn place(&self, periods: u64, second: u64) {
            let now = self.now();
            let target = (now / 30 + periods) * 30 + second;
            self.clock
                .advance(Duration::from_secs(target.checked_sub(now).unwrap()));
        }

        fn signed(&self, account: &str, purpose: GrantPurpose) -> SignedGrant {
            let n = self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            grants::signed(
                &self.key,
                &format!("g-{n}"),
                account,
                purpose,
                self.clock.now(),
            )
        }

        async fn enroll(&self, account: &str, min_seconds_left: u32) -> Enrolled {
            let grant = self
                .vault
                .verify_enroll_grant(Some(&self.signed(account, GrantPurpose::Enroll)))
                .unwrap();
            let spec = SeedSpec {
                seed: Seed::from_bytes(b"12345678901234567890".to_vec()).unwrap(),
                params: TotpParams {
                    algorithm: Algorithm::Sha1,
                    digits: 6,
                    period: 30,
                },
                issuer: String::new(),
                label: String::new(),
            };
            let enrollment = Enrollment {
                account_id: account.into(),
                spec,
                replace: false,
                min_seconds_left,
                consent: Vec::new(),
            };
            if self.vault.active_policy().is_none() {
                self.apply_policy().await;
            }
            self.vault
                .enroll("spiffe://t/svc/broker", grant, enrollment)
                .await
                .unwrap()
        }

        async fn release(&self, account: &str) -> Result<CodeValue, VaultError> {
            let consented = self.consented(account);
            self.generate(&consented).await.map(|(c, _)| c)
        }
    }

    /// The vault on PostgreSQL (issue 18): enrollment and a release
    /// through the whole consent path, the same grant again refused as on
    /// sled, and no table the vault writes holds the seed: neither its
    /// Base32, nor its bytes, nor their hex.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres_a_release_works_once_and_the_database_holds_no_seed() {
        let fx = Fx::on_postgres().await;
        fx.place(0, 3);
        let enrolled = fx.enroll("aws-root", 0).await;
        let consented = fx.consented("aws-root");
        let (code, _) = fx.generate(&consented).await.unwrap();
        assert!(code.step > enrolled.next.step);
        let again = fx.generate(&consented).await.unwrap_err();
        assert_eq!(again.kind(), ErrorKind::PermissionDenied, "{again}");
        let pg = fx.pg.as_ref().unwrap();
        let mut dump = String::new();
        for sql in [
            "SELECT tree, encode(key, 'escape'), encode(value, 'escape'), encode(value, 'hex') FROM vault_kv",
            "SELECT encode(event, 'escape'), encode(event, 'hex') FROM twokey_outbox_pending",
            "SELECT encode(event, 'escape'), encode(event, 'hex') FROM twokey_outbox_kept",
        ] {
            dump.push_str(&pg.psql("vault", sql).unwrap());
        }
        assert!(
            dump.contains("aws-root") && dump.contains("code.released"),
            "{dump}"
        );
        let seed = b"12345678901234567890";
        let base32 = data_encoding::BASE32_NOPAD.encode(seed);
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        for needle in [base32.as_str(), "12345678901234567890", hex.as_str()] {
            assert!(
                !dump.to_lowercase().contains(&needle.to_lowercase()),
                "{needle} in the database"
            );
        }
    }

    /// Two vault replicas on one PostgreSQL store: a policy version applied
    /// through one is in force on the other at its next check (its chain
    /// loaded and verified again): a release consented under the new
    /// version works there, one under the old version is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres_a_version_applied_through_one_replica_is_in_force_on_the_other() {
        let fx = Fx::on_postgres().await;
        fx.place(0, 3);
        fx.enroll("aws-root", 0).await;
        let other = fx.replica().await;
        assert_eq!(other.active_policy().map(|p| p.version()), Some(1));
        fx.apply_version(2).await;

        let old = fx.consented_under(1, "aws-root");
        let refused = other
            .generate_code("spiffe://t/svc/broker", Some(&old.0), Some(&old.1), None)
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::FailedPrecondition, "{refused}");
        assert!(refused.to_string().contains("version"), "{refused}");
        assert_eq!(other.active_policy().map(|p| p.version()), Some(2));

        let new = fx.consented_under(2, "aws-root");
        let (code, _) = other
            .generate_code("spiffe://t/svc/broker", Some(&new.0), Some(&new.1), None)
            .await
            .expect("released under the version applied through the other replica");
        assert_eq!(code.code.len(), 6);
    }

    #[tokio::test]
    async fn a_release_right_after_enrollment_is_above_both_registration_codes() {
        let fx = Fx::new();
        fx.place(0, 3);
        let enrolled = fx.enroll("aws-root", 0).await;
        let step = fx.now() / 30;
        assert_eq!(
            (enrolled.current.step, enrolled.next.step),
            (step, step + 1)
        );
        let code = fx.release("aws-root").await.unwrap();
        assert_eq!(code.step, step + 2);
        assert_ne!(code.code, enrolled.current.code);
        assert_ne!(code.code, enrolled.next.code);
        assert!(code.valid_from > fx.now());
        assert_eq!(code.valid_from, (step + 2) * 30);
        assert_eq!(code.valid_until, code.valid_from + 30);
        // A third step ahead is refused, with the wait, and spends nothing.
        let grant = fx.consented("aws-root");
        let refused = fx.generate(&grant).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert_eq!(
            refused.to_string(),
            "every code of account aws-root up to 2 steps ahead was handed out already; try again in 27 s"
        );
        fx.place(1, 0);
        let later = fx.generate(&grant).await.unwrap();
        assert_eq!(later.0.step, step + 3);
    }

    #[tokio::test]
    async fn two_releases_in_one_step_get_different_steps_and_codes() {
        let fx = Fx::new();
        fx.enroll("aws-root", 0).await;
        fx.place(5, 5);
        let step = fx.now() / 30;
        let first = fx.release("aws-root").await.unwrap();
        let second = fx.release("aws-root").await.unwrap();
        assert_eq!(first.step, step);
        assert!(first.valid_from <= fx.now());
        assert_eq!(second.step, step + 1);
        assert_ne!(first.code, second.code);
        assert_eq!(second.valid_from, fx.now() + 25);
    }

    #[tokio::test]
    async fn with_fewer_than_ten_seconds_left_the_next_step_is_released() {
        let fx = Fx::new();
        fx.enroll("aws-root", 0).await;
        // 10 s left: still this step.
        fx.place(5, 20);
        let code = fx.release("aws-root").await.unwrap();
        assert_eq!(code.step, fx.now() / 30);
        // 9 s left: the next step, usable in 9 s.
        fx.place(5, 21);
        let code = fx.release("aws-root").await.unwrap();
        assert_eq!(code.step, fx.now() / 30 + 1);
        assert_eq!(code.valid_from, fx.now() + 9);
    }

    #[tokio::test]
    async fn an_accounts_own_minimum_is_kept() {
        let fx = Fx::new();
        let enrolled = fx.enroll("aws-root", 20).await;
        assert_eq!(enrolled.account.min_seconds_left, 20);
        // 15 s left is below 20: the next step.
        fx.place(5, 15);
        let code = fx.release("aws-root").await.unwrap();
        assert_eq!(code.step, fx.now() / 30 + 1);
        assert_eq!(code.valid_from, fx.now() + 15);
        // 25 s left two steps later: that step.
        fx.place(2, 5);
        let code = fx.release("aws-root").await.unwrap();
        assert_eq!(code.step, fx.now() / 30);
    }

    #[tokio::test]
    async fn concurrent_releases_for_one_account_get_distinct_steps() {
        let fx = Arc::new(Fx::new());
        fx.enroll("aws-root", 0).await;
        fx.place(5, 1);
        let step = fx.now() / 30;
        let grants: Vec<_> = (0..3).map(|_| fx.consented("aws-root")).collect();
        let tasks: Vec<_> = grants
            .into_iter()
            .map(|g| {
                let fx = fx.clone();
                tokio::spawn(async move { fx.generate(&g).await.unwrap().0 })
            })
            .collect();
        let mut steps = Vec::new();
        let mut codes = std::collections::BTreeSet::new();
        for t in tasks {
            let code = t.await.unwrap();
            steps.push(code.step);
            codes.insert(code.code.to_string());
        }
        steps.sort_unstable();
        assert_eq!(steps, [step, step + 1, step + 2]);
        assert_eq!(codes.len(), 3);
    }

    #[tokio::test]
    async fn a_withheld_code_gives_its_step_back() {
        let fx = Fx::new();
        fx.enroll("aws-root", 0).await;
        fx.place(5, 1);
        let step = fx.now() / 30;
        fx.audit.0.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = fx.release("aws-root").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        fx.audit
            .0
            .store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(fx.release("aws-root").await.unwrap().step, step);
        assert_eq!(fx.release("aws-root").await.unwrap().step, step + 1);
    }

    #[tokio::test]
    async fn no_code_is_released_while_audit_receipts_are_inconsistent() {
        use twokey_runtime::receipts::{Head, Inconsistency};
        let fx = Fx::new();
        fx.enroll("aws-root", 0).await;
        fx.place(5, 1);
        let step = fx.now() / 30;
        let (served, accepted) = (
            Head {
                size: 5,
                root: [1; 32],
            },
            Head {
                size: 7,
                root: [2; 32],
            },
        );
        fx.audit.1.send_replace(Some(Inconsistency {
            served,
            accepted,
            why: "a smaller tree".into(),
        }));
        let err = fx.release("aws-root").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        let hex = |b: u8| data_encoding::HEXLOWER.encode(&[b; 32]);
        let (s, a) = (hex(1), hex(2));
        assert_eq!(
            err.to_string(),
            format!(
                "audit served a checkpoint inconsistent with one it signed before: 5/{s} vs 7/{a}; \
                 no code is released until audit serves a checkpoint consistent with 7/{a} \
                 (a smaller tree)"
            )
        );
        // Nothing was used: once a consistent checkpoint clears it, the
        // release gets the step it would have got.
        fx.audit.1.send_replace(None);
        assert_eq!(fx.release("aws-root").await.unwrap().step, step);
    }

    #[test]
    fn the_minimum_must_be_below_the_period() {
        let request = twokey_proto::vault::v1::EnrollRequest {
            account_id: "a".into(),
            seed: Some(twokey_proto::vault::v1::enroll_request::Seed::Base32Secret(
                "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ".into(),
            )),
            min_seconds_left: 30,
            ..Default::default()
        };
        let err = Enrollment::try_from(&request).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.to_string().contains("below the period of 30 s"),
            "{err}"
        );
        let ok = Enrollment::try_from(&twokey_proto::vault::v1::EnrollRequest {
            min_seconds_left: 29,
            ..request
        })
        .unwrap();
        assert_eq!(ok.min_seconds_left, 29);
    }

    #[test]
    fn policy_applied_lists_each_mapped_aws_account_with_its_window() {
        let text = include_str!("../../consent/policy.example.toml").replace(
            "[accounts.aws-prod-root]\n",
            "[accounts.aws-prod-root]\naws_account_id = \"123456789012\"\nsignin_window = \"5m\"\n",
        );
        let policy = twokey_consent::Policy::parse(&text).unwrap();
        assert_eq!(aws_accounts(&policy), "aws-prod-root=123456789012/300");
        let unmapped =
            twokey_consent::Policy::parse(include_str!("../../consent/policy.example.toml"))
                .unwrap();
        assert_eq!(aws_accounts(&unmapped), "");
    }
}
