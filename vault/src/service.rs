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
    store::{
        AccountRecord, GrantUse, NewAccount, Removal, SpentGrant, VaultStore, VaultStoreError,
    },
    totp::{CodeValue, code_for_step},
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
            Self::Store(VaultStoreError::StepsUsed { .. }) => ErrorKind::Unavailable,
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
    /// Fewest seconds a released code must have left in its step, below the
    /// period; 0 for the default.
    pub min_seconds_left: u32,
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
            min_seconds_left,
        } = request;
        if grant.account_id != account_id {
            return Err(VaultError::GrantForOtherAccount {
                grant_id: grant.grant_id,
                granted: grant.account_id.chars().take(70).collect(),
                asked: account_id,
            });
        }
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
        let new = NewAccount {
            record: &record,
            replace,
            grant: &spent,
        };
        let seq = self.store.put(new, event)?;
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

    /// Computes one code for a valid, unused release grant: the code of the
    /// step the store chose and recorded with the grant use, a step never
    /// handed out before for the account, with enough time left in it
    /// (`valid_from` may be in the future).
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
        let released = self
            .store
            .use_grant(GrantUse {
                grant_id: grant.grant_id.clone(),
                expires_at: expires,
                account_id: grant.account_id.clone(),
                now: self.now(),
                event,
            })
            .await?;
        if let Err(e) = self
            .commit_and_confirm(released.seq, "no code released")
            .await
        {
            // The log holds `code.released` for this grant; say that the code
            // never left, so the log stays true.
            let withheld = EventDraft::new(grant.operator.clone(), "code.withheld")
                .account(&grant.account_id)
                .request(&grant.request_id)
                .outcome(twokey_proto::audit::v1::Outcome::Failure)
                .attr("grant_id", &grant.grant_id)
                .attr("step", released.step.to_string())
                .attr("reason", "audit did not acknowledge code.released in time");
            if self
                .store
                .withhold(&grant.account_id, released.step, withheld)
                .is_ok()
            {
                let _ = self.store.commit().await;
            }
            return Err(e);
        }
        tracing::info!(account = %grant.account_id, request = %grant.request_id, grant = %grant.grant_id, "code released");
        Ok((
            code_for_step(&seed, record.params, released.step),
            grant.grant_id,
        ))
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

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use ed25519_dalek::SigningKey;
    use twokey_runtime::{
        durable::DurableDb, events::EventSigner, identity::SpiffeId, keys::SecretKey,
        outbox::Outbox, time::ManualClock,
    };
    use twokey_testkit::grants;

    use super::*;
    use crate::{
        seed::{Algorithm, TotpParams},
        store::SledVaultStore,
    };

    /// Acknowledges every event at once, unless set down.
    #[derive(Debug, Default)]
    struct Gate(std::sync::atomic::AtomicBool);

    impl AuditGate for Arc<Gate> {
        fn confirm(&self, seq: u64, _: Duration) -> BoxFuture<'_, Result<(), AckTimeout>> {
            let down = self.0.load(std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move { if down { Err(AckTimeout(seq)) } else { Ok(()) } })
        }
    }

    /// A start time on a whole minute, so on a 30 s step boundary too.
    const T0: u64 = 1_800_000_000;

    struct Fx {
        vault: Vault<SledVaultStore>,
        clock: ManualClock,
        key: SigningKey,
        audit: Arc<Gate>,
        _dir: tempfile::TempDir,
        ids: std::sync::atomic::AtomicU32,
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
            let key = SigningKey::from_bytes(&[9; 32]);
            let audit = Arc::new(Gate::default());
            let vault = Vault::open(
                store,
                MasterKey::new(SecretKey::from_bytes([3; 32])),
                GrantVerifier::new(key.verifying_key()),
                AuditWait {
                    gate: Arc::new(audit.clone()),
                    timeout: Duration::from_secs(1),
                },
                Arc::new(clock.clone()),
            )
            .unwrap();
            Self {
                vault,
                clock,
                key,
                audit,
                _dir: dir,
                ids: Default::default(),
            }
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
            };
            self.vault.enroll(grant, enrollment).await.unwrap()
        }

        async fn release(&self, account: &str) -> Result<CodeValue, VaultError> {
            let grant = self.signed(account, GrantPurpose::Release);
            self.vault.generate_code(Some(&grant)).await.map(|(c, _)| c)
        }
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
        let grant = fx.signed("aws-root", GrantPurpose::Release);
        let refused = fx.vault.generate_code(Some(&grant)).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert_eq!(
            refused.to_string(),
            "every code of account aws-root up to 2 steps ahead was handed out already; try again in 27 s"
        );
        fx.place(1, 0);
        let later = fx.vault.generate_code(Some(&grant)).await.unwrap();
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
        let grants: Vec<_> = (0..3)
            .map(|_| fx.signed("aws-root", GrantPurpose::Release))
            .collect();
        let tasks: Vec<_> = grants
            .into_iter()
            .map(|g| {
                let fx = fx.clone();
                tokio::spawn(async move { fx.vault.generate_code(Some(&g)).await.unwrap().0 })
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
}
