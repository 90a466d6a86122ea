//! The people's signed consent at the broker: the admin-signed policy the
//! vault holds, cached here after re-verifying its whole chain from the
//! pinned admins ([`SignedPolicy`]); the statements as stored with a request
//! ([`RequestConsent`]); and the early checks of one statement as it is
//! handed in — its signature and policy version (`twokey_consent`), its
//! signer (the caller) and what it binds. The vault checks the whole chain
//! again at release; the broker refuses a bad statement when it comes, with
//! the same words.

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use twokey_consent::{
    ConsentError, ErrorKind as ConsentKind, PolicyError as SignedPolicyError, StatementRef,
    TrustRoot, VerifiedPolicy,
    statement::{
        AdminAction, AdminActionBinding, Binding, ReleaseBinding, RequestBinding, SignedStatement,
        Statement, StatementKind, decode_statement, kind_name, reason_digest, statement_digest,
    },
    verify_policy_update, verify_statement,
};
use twokey_runtime::{SpiffeId, error::ErrorKind};

use crate::{
    error::BrokerError,
    vault::{PolicyVersion, Vault},
};

/// How far a request statement's creation time may be from the broker's
/// clock.
pub const CREATED_AT_SLACK: Duration = Duration::from_secs(300);

/// The runtime kind of a consent refusal.
fn kind_of(kind: ConsentKind) -> ErrorKind {
    match kind {
        ConsentKind::InvalidArgument => ErrorKind::InvalidArgument,
        ConsentKind::FailedPrecondition => ErrorKind::FailedPrecondition,
        ConsentKind::PermissionDenied => ErrorKind::PermissionDenied,
    }
}

impl From<ConsentError> for BrokerError {
    fn from(e: ConsentError) -> Self {
        Self::Consent {
            kind: kind_of(e.kind()),
            message: e.to_string(),
        }
    }
}

impl From<SignedPolicyError> for BrokerError {
    fn from(e: SignedPolicyError) -> Self {
        Self::Consent {
            kind: kind_of(e.kind()),
            message: e.to_string(),
        }
    }
}

/// A consent refusal of `kind` the broker words itself.
pub fn refused(kind: ErrorKind, message: impl Into<String>) -> BrokerError {
    BrokerError::Consent {
        kind,
        message: message.into(),
    }
}

mod b64 {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A signed statement as stored: its exact bytes and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStatement {
    /// The statement's encoded bytes, exactly as signed.
    #[serde(with = "b64")]
    pub statement: Vec<u8>,
    /// The sshsig signature.
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
}

impl StoredStatement {
    /// SHA-256 of the statement's bytes.
    pub fn digest(&self) -> [u8; 32] {
        statement_digest(&self.statement)
    }
}

impl From<&SignedStatement> for StoredStatement {
    fn from(s: &SignedStatement) -> Self {
        Self {
            statement: s.statement.clone(),
            signature: s.signature.clone(),
        }
    }
}

impl From<&StoredStatement> for SignedStatement {
    fn from(s: &StoredStatement) -> Self {
        Self {
            statement: s.statement.clone(),
            signature: s.signature.clone(),
        }
    }
}

/// The signed consent of one request, stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestConsent {
    /// The policy version the request statement is bound to.
    pub policy_version: u64,
    /// The request statement.
    pub request: StoredStatement,
    /// The approval statements, in the order they came.
    #[serde(default)]
    pub approvals: Vec<StoredStatement>,
    /// Release statements the operator signed at VerifyPin (delivery =
    /// "requester"), not used yet, oldest first.
    #[serde(default)]
    pub releases: Vec<StoredStatement>,
    /// Release ids used so far.
    #[serde(default)]
    pub used_release_ids: Vec<String>,
}

/// A statement whose signature verified (or, with no signed policy in
/// force, that decoded).
#[derive(Debug, Clone)]
pub struct Opened {
    /// The statement.
    pub statement: Statement,
    /// SHA-256 of its bytes.
    pub digest: [u8; 32],
    /// The SPIFFE ID it names as signer.
    pub signer: String,
}

/// The policy version a statement names, if its bytes decode at all.
pub fn named_version(signed: &SignedStatement) -> Option<u64> {
    decode_statement(&signed.statement)
        .ok()
        .map(|s| s.policy_version)
}

/// Opens a statement: with a signed policy in force its signature, signer
/// and policy version are verified (`twokey_consent::verify_statement`);
/// without one it is only decoded (the vault still verifies everything).
pub fn open(
    policy: Option<&VerifiedPolicy>,
    at: StatementRef,
    signed: &SignedStatement,
    kind: StatementKind,
    now: SystemTime,
) -> Result<Opened, BrokerError> {
    if let Some(policy) = policy {
        let o = verify_statement(policy, at, signed, kind, now)?;
        return Ok(Opened {
            statement: o.statement,
            digest: o.digest,
            signer: o.signer.spiffe_id,
        });
    }
    let statement =
        decode_statement(&signed.statement).map_err(|detail| ConsentError::Malformed {
            statement: at,
            detail,
        })?;
    if statement.kind != kind as i32 {
        return Err(ConsentError::WrongKind {
            statement: at,
            expected: kind_name(kind),
            found: kind_name(StatementKind::try_from(statement.kind).unwrap_or_default()),
        }
        .into());
    }
    Ok(Opened {
        digest: statement_digest(&signed.statement),
        signer: statement.signer.clone(),
        statement,
    })
}

/// Refuses a statement someone else than the caller signed.
pub fn signed_by(opened: &Opened, at: StatementRef, who: &SpiffeId) -> Result<(), BrokerError> {
    if opened.signer == who.as_str() {
        return Ok(());
    }
    Err(refused(
        ErrorKind::PermissionDenied,
        format!(
            "{at} is signed by {}, not by {who}; each person signs their own statement with their own key",
            opened.signer
        ),
    ))
}

fn wrong(at: StatementRef, signer: &str, field: &'static str, detail: String) -> BrokerError {
    ConsentError::WrongBinding {
        statement: at,
        signer: signer.to_owned(),
        field,
        detail,
    }
    .into()
}

fn malformed(at: StatementRef, detail: String) -> BrokerError {
    ConsentError::Malformed {
        statement: at,
        detail,
    }
    .into()
}

/// Whether `id` is a UUID in its canonical lower-case hyphenated form.
pub fn is_uuid(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

fn need_uuid(at: StatementRef, what: &str, id: &str) -> Result<(), BrokerError> {
    if is_uuid(id) {
        Ok(())
    } else {
        Err(malformed(
            at,
            format!(
                "its {what} {:?} is not a UUID; let twokey choose one",
                id.chars().take(70).collect::<String>()
            ),
        ))
    }
}

fn short(d: &[u8]) -> String {
    hex::encode(d.get(..6).unwrap_or(d))
}

fn to_time(ts: Option<&twokey_proto::Timestamp>) -> Option<SystemTime> {
    let ts = ts?;
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// What a request statement must bind when it is filed.
#[derive(Debug, Clone, Copy)]
pub struct Filing<'a> {
    /// The account.
    pub account: &'a str,
    /// The requester (the caller, or whom an intake files for).
    pub requester: &'a SpiffeId,
    /// The reason.
    pub reason: &'a str,
    /// The ticket.
    pub ticket: &'a str,
    /// The broker's clock.
    pub now: SystemTime,
}

/// Checks what a request statement binds against the call filing it;
/// answers the request id and creation time it names.
pub fn check_request(opened: &Opened, filing: Filing<'_>) -> Result<RequestBinding, BrokerError> {
    let at = StatementRef::Request;
    let Some(Binding::Request(rb)) = &opened.statement.binding else {
        return Err(malformed(at, "binds no request".into()));
    };
    let signer = opened.signer.as_str();
    if rb.account_id != filing.account {
        return Err(wrong(
            at,
            signer,
            "account",
            format!(
                "it names account {}, the request is for {}",
                rb.account_id, filing.account
            ),
        ));
    }
    if rb.requester != filing.requester.as_str() {
        return Err(wrong(
            at,
            signer,
            "requester",
            format!(
                "it names requester {}, the request is for {}",
                rb.requester, filing.requester
            ),
        ));
    }
    if rb.reason_digest != reason_digest(filing.reason, filing.ticket) {
        return Err(wrong(
            at,
            signer,
            "reason and ticket",
            "its reason digest is not that of this reason and ticket".into(),
        ));
    }
    need_uuid(at, "request id", &rb.request_id)?;
    let Some(created) = to_time(rb.created_at.as_ref()) else {
        return Err(malformed(at, "its created_at is missing or invalid".into()));
    };
    let off = created
        .duration_since(filing.now)
        .or_else(|_| filing.now.duration_since(created))
        .unwrap_or(Duration::MAX);
    if off > CREATED_AT_SLACK {
        return Err(ConsentError::Stale {
            statement: at,
            signer: signer.to_owned(),
            detail: format!(
                "it was created {} s from the broker's time, more than {} s; check your clock and file again",
                off.as_secs(),
                CREATED_AT_SLACK.as_secs()
            ),
        }
        .into());
    }
    Ok(rb.clone())
}

/// The creation time a request binding names.
pub fn created_at(rb: &RequestBinding) -> Option<SystemTime> {
    to_time(rb.created_at.as_ref())
}

/// Checks that an approval statement binds exactly this request statement.
pub fn check_approval(
    opened: &Opened,
    at: StatementRef,
    request: &StoredStatement,
    request_id: &str,
    account: &str,
) -> Result<(), BrokerError> {
    let Some(Binding::Approval(ab)) = &opened.statement.binding else {
        return Err(malformed(at, "binds no approval".into()));
    };
    let digest = request.digest();
    if ab.request_digest != digest || ab.request_id != request_id || ab.account_id != account {
        return Err(wrong(
            at,
            &opened.signer,
            "request",
            format!(
                "it approves request {} of account {} (statement {}…), this is request {request_id} of {account} ({}…)",
                ab.request_id,
                ab.account_id,
                short(&ab.request_digest),
                short(&digest)
            ),
        ));
    }
    Ok(())
}

/// Checks that a release statement binds this request statement and
/// exactly its stored approvals, says the PIN was verified, and names a
/// grant id and a release id (UUIDs) not used by this request; answers the
/// binding.
pub fn check_release(
    opened: &Opened,
    consent: &RequestConsent,
    request_id: &str,
    account: &str,
) -> Result<ReleaseBinding, BrokerError> {
    let at = StatementRef::Release;
    let Some(Binding::Release(lb)) = &opened.statement.binding else {
        return Err(malformed(at, "binds no release".into()));
    };
    let digest = consent.request.digest();
    if lb.request_digest != digest || lb.request_id != request_id || lb.account_id != account {
        return Err(wrong(
            at,
            &opened.signer,
            "request",
            format!(
                "it releases request {} of account {} (statement {}…), this is request {request_id} of {account} ({}…)",
                lb.request_id,
                lb.account_id,
                short(&lb.request_digest),
                short(&digest)
            ),
        ));
    }
    let bound: BTreeSet<&[u8]> = lb.approval_digests.iter().map(Vec::as_slice).collect();
    let stored: Vec<[u8; 32]> = consent
        .approvals
        .iter()
        .map(StoredStatement::digest)
        .collect();
    let stored: BTreeSet<&[u8]> = stored.iter().map(<[u8; 32]>::as_slice).collect();
    if bound.len() != lb.approval_digests.len() || bound != stored {
        return Err(wrong(
            at,
            &opened.signer,
            "set of approvals",
            format!(
                "it binds {} approval statements, the request holds {} and they differ; bind exactly the approvals the request shows",
                lb.approval_digests.len(),
                consent.approvals.len()
            ),
        ));
    }
    if !lb.pin_verified {
        return Err(ConsentError::PinNotVerified {
            signer: opened.signer.clone(),
        }
        .into());
    }
    need_uuid(at, "grant id", &lb.grant_id)?;
    need_uuid(at, "release id", &lb.release_id)?;
    if consent.used_release_ids.contains(&lb.release_id) {
        return Err(ConsentError::ReleaseReplayed {
            release_id: lb.release_id.clone(),
            signer: opened.signer.clone(),
        }
        .into());
    }
    Ok(lb.clone())
}

/// The release binding of a stored (already checked) release statement.
pub fn release_of(stored: &StoredStatement) -> Option<ReleaseBinding> {
    match decode_statement(&stored.statement).ok()?.binding {
        Some(Binding::Release(lb)) => Some(lb),
        _ => None,
    }
}

/// Checks an admin's action statement names an action and a UUID action
/// id; answers its binding.
pub fn check_admin(opened: &Opened, at: StatementRef) -> Result<AdminActionBinding, BrokerError> {
    let Some(Binding::AdminAction(b)) = &opened.statement.binding else {
        return Err(malformed(at, "binds no admin action".into()));
    };
    if AdminAction::try_from(b.action).unwrap_or_default() == AdminAction::Unspecified {
        return Err(malformed(at, "it names no action".into()));
    }
    need_uuid(at, "action id", &b.action_id)?;
    Ok(b.clone())
}

/// Verifies the policy chain the vault holds (newest first, as its
/// `GetPolicy` answers) from the pinned admins, oldest first; the active
/// version, or none before the first.
pub fn verify_chain(
    root: &TrustRoot,
    versions: &[PolicyVersion],
) -> Result<Option<VerifiedPolicy>, SignedPolicyError> {
    let mut current: Option<VerifiedPolicy> = None;
    for v in versions.iter().rev() {
        current = Some(verify_policy_update(
            current.as_ref(),
            root,
            v.document.as_bytes(),
            &v.signatures,
        )?);
    }
    Ok(current)
}

/// The signed policy in force, as the broker last verified it from the
/// vault's chain: none without a `[consent]` root or before the first
/// version is applied.
#[derive(Debug)]
pub struct SignedPolicy {
    root: Option<TrustRoot>,
    cached: RwLock<Option<Arc<VerifiedPolicy>>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl SignedPolicy {
    /// A cache verifying from `root` (none: `[consent]` is not configured,
    /// and nothing is ever cached).
    pub fn new(root: Option<TrustRoot>) -> Self {
        Self {
            root,
            cached: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The pinned admins, if `[consent]` is configured.
    pub fn root(&self) -> Option<&TrustRoot> {
        self.root.as_ref()
    }

    /// The signed policy in force, if any.
    pub fn active(&self) -> Option<Arc<VerifiedPolicy>> {
        self.cached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The active version; 0 before the first.
    pub fn version(&self) -> u64 {
        self.active().map_or(0, |p| p.version())
    }

    /// Fetches the vault's chain, verifies it from the root and caches its
    /// active version.
    pub async fn refresh(
        &self,
        vault: &dyn Vault,
    ) -> Result<Option<Arc<VerifiedPolicy>>, BrokerError> {
        if self.root.is_none() {
            return Ok(None);
        }
        let _one = self.refreshing.lock().await;
        let versions = vault.get_policy().await?;
        self.adopt(&versions)
    }

    /// Verifies `versions` (the vault's chain, newest first) from the root
    /// and caches the active one. A chain that does not verify, or that
    /// would take the cache back to an older version, is refused and the
    /// cache is kept.
    pub fn adopt(
        &self,
        versions: &[PolicyVersion],
    ) -> Result<Option<Arc<VerifiedPolicy>>, BrokerError> {
        let Some(root) = &self.root else {
            return Ok(None);
        };
        let verified = verify_chain(root, versions).map_err(|e| {
            BrokerError::Consent {
                kind: ErrorKind::Internal,
                message: format!(
                    "the vault's policy chain does not verify from the pinned admins ([consent] admins_file): {e}"
                ),
            }
        })?;
        let mut cached = self.cached.write().unwrap_or_else(|e| e.into_inner());
        let have = cached.as_ref().map_or(0, |c| c.version());
        let got = verified.as_ref().map_or(0, |v| v.version());
        if got < have
            || (got == have
                && got > 0
                && verified.as_ref().map(VerifiedPolicy::digest)
                    != cached.as_ref().map(|c| c.digest()))
        {
            return Err(BrokerError::Consent {
                kind: ErrorKind::Internal,
                message: format!(
                    "the vault answers policy version {got}, the broker verified version {have} before; keeping version {have}"
                ),
            });
        }
        if got > have {
            if let Some(v) = &verified {
                tracing::info!(policy_version = v.version(), "signed policy in force: {v}");
            }
            *cached = verified.map(Arc::new);
        }
        Ok(cached.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_uuids_are_ids() {
        assert!(is_uuid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(!is_uuid("0F8FAD5B-D9CB-469F-A165-70867728950E"));
        assert!(!is_uuid("0f8fad5bd9cb469fa16570867728950e"));
        assert!(!is_uuid("r1"));
    }

    #[test]
    fn stored_statements_round_trip_as_base64() {
        let s = StoredStatement {
            statement: vec![1, 2, 3],
            signature: b"sig".to_vec(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"statement":"AQID","signature":"c2ln"}"#);
        assert_eq!(serde_json::from_str::<StoredStatement>(&json).unwrap(), s);
    }
}
