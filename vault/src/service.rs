//! The vault's domain core: enrollment and removal for a grant, code release
//! for a grant, listing and status. No tonic here; the gRPC layer maps [`VaultError`].
//!
//! Fail closed: a code (or an enrollment's registration codes) is computed
//! only after the audit service has acknowledged the event that records it.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use twokey_proto::vault::v1::{Grant, GrantPurpose, SignedGrant};
use twokey_runtime::{
    error::{ErrorKind, ServiceError},
    events::EventDraft,
    grant::{GrantError, GrantVerifier},
    shipper::{AckTimeout, ShipperHandle},
    time::{Clock, unix_seconds},
};

use crate::{
    crypto::MasterKey,
    seed::{Seed, SeedError, SeedSpec},
    store::{AccountRecord, GrantUse, Removal, SpentGrant, VaultStore, VaultStoreError},
    totp::{CodeValue, code_at, code_for_step},
};

/// Waits for the audit service to acknowledge an event.
pub trait AuditGate: Send + Sync + std::fmt::Debug + 'static {
    /// Resolves once event `seq` is acknowledged, or fails after `timeout`.
    fn confirm(&self, seq: u64, timeout: Duration) -> BoxFuture<'_, Result<(), AckTimeout>>;
}

impl AuditGate for ShipperHandle {
    fn confirm(&self, seq: u64, timeout: Duration) -> BoxFuture<'_, Result<(), AckTimeout>> {
        Box::pin(self.wait_acked(seq, timeout))
    }
}

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
    /// Store-level refusal or failure.
    #[error(transparent)]
    Store(#[from] VaultStoreError),
    /// A stored seed does not open with the master key.
    #[error("the seed of {0} does not decrypt with the master key")]
    Integrity(String),
    /// Audit did not acknowledge in time.
    #[error("{0}")]
    AuditUnavailable(String),
}

impl ServiceError for VaultError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidArgument(_) | Self::Seed(_) | Self::Grant(GrantError::Malformed(_)) => {
                ErrorKind::InvalidArgument
            }
            Self::Grant(_)
            | Self::GrantForOtherAccount { .. }
            | Self::Store(VaultStoreError::GrantUsed(_)) => ErrorKind::PermissionDenied,
            Self::Store(VaultStoreError::AlreadyExists(_)) => ErrorKind::AlreadyExists,
            Self::Store(VaultStoreError::NotFound(_)) => ErrorKind::NotFound,
            Self::AuditUnavailable(_) | Self::Store(VaultStoreError::Store(_)) => {
                ErrorKind::Unavailable
            }
            Self::Store(VaultStoreError::Corrupt(_)) | Self::Integrity(_) => ErrorKind::Internal,
        }
    }
}

impl VaultError {
    /// Whether the message holds the vault's own details (storage, data
    /// integrity), which go to its log and not to the caller.
    pub fn is_private(&self) -> bool {
        matches!(
            self,
            Self::Store(VaultStoreError::Store(_) | VaultStoreError::Corrupt(_))
                | Self::Integrity(_)
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
    store: S,
    key: MasterKey,
    grants: GrantVerifier,
    audit: AuditWait,
    clock: Arc<dyn Clock>,
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

impl<S: VaultStore> Vault<S> {
    /// A vault over `store`, checking (or, on first start, recording) that
    /// `key` is the key the data was sealed with.
    pub fn open(
        store: S,
        key: MasterKey,
        grants: GrantVerifier,
        audit: AuditWait,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, VaultError> {
        match store.key_check()? {
            Some(check) if !key.matches(&check) => {
                return Err(VaultError::Integrity(
                    "this data directory: the master key file is not the key it was created with"
                        .into(),
                ));
            }
            Some(_) => {}
            None => store.set_key_check(&key.key_check())?,
        }
        Ok(Self {
            store,
            key,
            grants,
            audit,
            clock,
        })
    }

    fn now(&self) -> u64 {
        unix_seconds(self.clock.now())
    }

    async fn commit_and_confirm(&self, seq: u64, what: &str) -> Result<(), VaultError> {
        self.store.commit().await?;
        let audit = &self.audit;
        audit.gate.confirm(seq, audit.timeout).await.map_err(|_| {
            tracing::warn!(seq, "audit did not acknowledge in time: {what}");
            VaultError::AuditUnavailable(format!("audit unavailable, {what}"))
        })
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
    /// used up here (once); the audit event names the grant's operator, the
    /// admin the broker vouched for. Nothing is stored on refusal.
    pub async fn enroll(
        &self,
        EnrollGrant(grant): EnrollGrant,
        request: Enrollment,
    ) -> Result<Enrolled, VaultError> {
        let Enrollment {
            account_id,
            spec,
            replace,
        } = request;
        if grant.account_id != account_id {
            return Err(VaultError::GrantForOtherAccount {
                grant_id: grant.grant_id,
                granted: grant.account_id.chars().take(70).collect(),
                asked: account_id,
            });
        }
        let now = self.now();
        let mut record = AccountRecord {
            account_id,
            issuer: spec.issuer.clone(),
            label: spec.label.clone(),
            params: spec.params,
            seed_bits: u32::try_from(spec.seed.bits()).unwrap_or(u32::MAX),
            created_at: now,
            last_used_at: None,
            sealed_seed: String::new(),
        };
        record.set_sealed(&self.key.seal_seed(&record.account_id, spec.seed.expose()));
        let mut warnings = Vec::new();
        if spec.seed.is_weak() {
            warnings.push(format!(
                "weak seed: {} bits, below the 128 bits RFC 4226 asks for",
                spec.seed.bits()
            ));
        }
        let action = if replace {
            "account.enrolled.replace"
        } else {
            "account.enrolled"
        };
        let event = EventDraft::new(grant.operator.clone(), action)
            .account(&record.account_id)
            .attr("grant_id", &grant.grant_id)
            .attr("seed_bits", record.seed_bits.to_string())
            .attr("weak_seed", spec.seed.is_weak().to_string());
        let spent = SpentGrant {
            grant_id: grant.grant_id.clone(),
            expires_at: grant_expiry(&grant),
        };
        let seq = self.store.put(&record, replace, &spent, event)?;
        self.commit_and_confirm(
            seq,
            "no codes released; the seed is stored: enroll again with replace once audit is back",
        )
        .await?;
        let current = code_at(&spec.seed, spec.params, self.now());
        let next = code_for_step(&spec.seed, spec.params, current.step + 1);
        tracing::info!(account = %record.account_id, "account enrolled");
        Ok(Enrolled {
            account: record,
            current,
            next,
            warnings,
        })
    }

    /// Computes one code for a valid, unused release grant.
    pub async fn generate_code(
        &self,
        signed: Option<&SignedGrant>,
    ) -> Result<(CodeValue, String), VaultError> {
        let grant = self
            .grants
            .verify(signed, GrantPurpose::Release, self.clock.now())?;
        let record = self
            .store
            .get(&grant.account_id)?
            .ok_or_else(|| VaultStoreError::NotFound(grant.account_id.clone()))?;
        let seed = self
            .key
            .open_seed(&record.account_id, &record.sealed())
            .map_err(|_| VaultError::Integrity(record.account_id.clone()))?;
        let seed = Seed::from_bytes(seed.to_vec())?;
        let expires = grant_expiry(&grant);
        let event = EventDraft::new(grant.operator.clone(), "code.released")
            .account(&grant.account_id)
            .request(&grant.request_id)
            .attr("grant_id", &grant.grant_id)
            .attr("requester", &grant.requester)
            .attr("approvers", grant.approvers.join(","));
        let seq = self
            .store
            .use_grant(GrantUse {
                grant_id: grant.grant_id.clone(),
                expires_at: expires,
                account_id: grant.account_id.clone(),
                now: self.now(),
                event,
            })
            .await?;
        if let Err(e) = self.commit_and_confirm(seq, "no code released").await {
            // The log holds `code.released` for this grant; say that the code
            // never left, so the log stays true.
            let withheld = EventDraft::new(grant.operator.clone(), "code.withheld")
                .account(&grant.account_id)
                .request(&grant.request_id)
                .outcome(twokey_proto::audit::v1::Outcome::Failure)
                .attr("grant_id", &grant.grant_id)
                .attr("reason", "audit did not acknowledge code.released in time");
            if self.store.record(withheld).is_ok() {
                let _ = self.store.commit().await;
            }
            return Err(e);
        }
        tracing::info!(account = %grant.account_id, request = %grant.request_id, grant = %grant.grant_id, "code released");
        Ok((code_at(&seed, record.params, self.now()), grant.grant_id))
    }

    /// Removes an account for a valid removal grant.
    pub async fn remove(&self, signed: Option<&SignedGrant>) -> Result<String, VaultError> {
        let grant = self
            .grants
            .verify(signed, GrantPurpose::Remove, self.clock.now())?;
        let expires = grant_expiry(&grant);
        let event = EventDraft::new(grant.operator.clone(), "account.removed")
            .account(&grant.account_id)
            .request(&grant.request_id)
            .attr("grant_id", &grant.grant_id);
        let seq = self.store.remove(Removal {
            grant_id: grant.grant_id.clone(),
            expires_at: expires,
            account_id: grant.account_id.clone(),
            event,
        })?;
        self.commit_and_confirm(seq, "removal recorded but not yet acknowledged by audit")
            .await?;
        Ok(grant.account_id)
    }

    /// Every account (metadata and sealed seed), ordered by id.
    pub fn list(&self) -> Result<Vec<AccountRecord>, VaultError> {
        Ok(self.store.list()?)
    }

    /// Number of accounts.
    pub fn count(&self) -> usize {
        self.store.count()
    }

    /// Forgets expired used-grant ids.
    pub fn sweep(&self) -> Result<usize, VaultError> {
        Ok(self.store.sweep_grants(self.now())?)
    }

    /// The vault's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}
