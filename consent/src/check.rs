//! The release check: a pure function of (verified policy, the request,
//! approval and release statements, the broker's grant, now, what the vault
//! has released) that says whether distinct people holding the needed roles
//! consented to this one code, within the policy's counts, windows and rate.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{ConsentError, Role, StatementRef};
use crate::history::ReleaseHistory;
use crate::policy::{Policy, VerifiedPolicy};
use crate::sshsig::{VerifyFailure, consent_namespace, fingerprint, parse_signature, verify};
use crate::statement::{
    Binding, SignedStatement, Statement, StatementKind, decode_statement, kind_name,
    statement_digest,
};
use crate::time::{MAX_CLOCK_SKEW_SECS, timestamp_secs, unix_secs};

/// Most approval statements accepted with one release.
pub const MAX_APPROVALS: usize = 16;
/// Longest request, release, grant or action id accepted.
pub const MAX_ID_LEN: usize = 128;

/// A person whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The person's name in the policy.
    pub person: String,
    /// The SPIFFE ID the statement names as signer.
    pub spiffe_id: String,
    /// SHA-256 fingerprint of the key that signed.
    pub key_fingerprint: String,
}

/// What the broker's grant (verified separately, by `runtime::grant`) says;
/// the evidence must agree with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantFacts<'a> {
    /// The grant's id.
    pub grant_id: &'a str,
    /// The account the grant is for.
    pub account_id: &'a str,
    /// The request the grant is for.
    pub request_id: &'a str,
}

/// A release whose consent verified. The vault writes these names, not any
/// field a caller filled in, into its `code.released` event, and records the
/// release in its history in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The active policy version the statements are bound to.
    pub policy_version: u64,
    /// The account.
    pub account_id: String,
    /// The request id.
    pub request_id: String,
    /// SHA-256 of the request statement: the request's identity for
    /// `codes_per_request`.
    pub request_digest: [u8; 32],
    /// The reason-and-ticket digest the request binds.
    pub reason_digest: [u8; 32],
    /// The person the request is for.
    pub requester_person: String,
    /// The requester's SPIFFE ID as the request names it.
    pub requester_id: String,
    /// Who signed the request: the requester, or an intake identity.
    pub filed_by: Signer,
    /// The approvers, in the order presented.
    pub approvers: Vec<Signer>,
    /// SHA-256 of each approval statement, in the order presented.
    pub approval_digests: Vec<[u8; 32]>,
    /// The operator who signed the release.
    pub operator: Signer,
    /// SHA-256 of the release statement.
    pub release_digest: [u8; 32],
    /// The single-use release id.
    pub release_id: String,
    /// The grant id the release binds.
    pub grant_id: String,
    /// Codes released for this request before this one.
    pub codes_released_before: u32,
    /// Codes the request may release.
    pub codes_per_request: u32,
}

/// A statement whose signature verified under the policy.
pub(crate) struct Opened {
    pub statement: Statement,
    pub digest: [u8; 32],
    pub person: usize,
    pub signer: Signer,
    pub issued_at: i64,
}

/// Decodes a statement, finds its signer in the policy, and verifies the
/// signature under the consent namespace with a key the policy lists for
/// that person; then checks the policy version and that it is not from the
/// future.
pub(crate) fn open(
    policy: &Policy,
    at: StatementRef,
    signed: &SignedStatement,
    expected: StatementKind,
    now: i64,
) -> Result<Opened, ConsentError> {
    if signed.statement.is_empty() && signed.signature.is_empty() {
        return Err(ConsentError::Missing { statement: at });
    }
    let malformed = |detail: String| ConsentError::Malformed {
        statement: at,
        detail,
    };
    let statement = decode_statement(&signed.statement).map_err(malformed)?;
    if statement.kind != expected as i32 {
        return Err(ConsentError::WrongKind {
            statement: at,
            expected: kind_name(expected),
            found: kind_name(StatementKind::try_from(statement.kind).unwrap_or_default()),
        });
    }
    let signer_id = statement.signer.clone();
    let person = policy
        .person_by_id(&signer_id)
        .ok_or_else(|| ConsentError::UnknownIdentity {
            statement: at,
            id: signer_id.clone(),
            policy_version: policy.version(),
        })?;
    let sig =
        parse_signature(&signed.signature).map_err(|e| malformed(format!("signature: {e}")))?;
    let namespace = consent_namespace(policy.trust_domain());
    if sig.namespace() != namespace {
        return Err(ConsentError::WrongNamespace {
            statement: at,
            signer: signer_id,
            expected: namespace,
            found: sig.namespace().to_string(),
        });
    }
    let fp = fingerprint(sig.public_key());
    let Some(key) = policy
        .person(person)
        .keys()
        .iter()
        .find(|k| k.key_data() == sig.public_key())
    else {
        return Err(ConsentError::UnknownKey {
            statement: at,
            signer: signer_id,
            fingerprint: fp.clone(),
            owner: policy
                .person_by_key(&fp)
                .map(|i| policy.person(i).name().to_string()),
        });
    };
    match verify(&sig, key, &namespace, &signed.statement) {
        Ok(()) => {}
        Err(VerifyFailure::Namespace(found)) => {
            return Err(ConsentError::WrongNamespace {
                statement: at,
                signer: signer_id,
                expected: namespace,
                found,
            });
        }
        Err(VerifyFailure::Signature(detail)) => {
            return Err(ConsentError::BadSignature {
                statement: at,
                signer: signer_id,
                detail,
            });
        }
    }
    if statement.policy_version != policy.version() {
        return Err(ConsentError::PolicyVersion {
            statement: at,
            signer: signer_id,
            bound: statement.policy_version,
            active: policy.version(),
        });
    }
    let issued_at = timestamp_secs(statement.issued_at.as_ref(), "issued_at").map_err(malformed)?;
    if issued_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(ConsentError::FromTheFuture {
            statement: at,
            signer: signer_id,
        });
    }
    Ok(Opened {
        digest: statement_digest(&signed.statement),
        signer: Signer {
            person: policy.person(person).name().to_string(),
            spiffe_id: signer_id,
            key_fingerprint: fp,
        },
        statement,
        person,
        issued_at,
    })
}

/// Checks an id field: non-empty, at most [`MAX_ID_LEN`] bytes.
pub(crate) fn check_id(at: StatementRef, what: &str, id: &str) -> Result<(), ConsentError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ConsentError::Malformed {
            statement: at,
            detail: format!("{what} must be 1 to {MAX_ID_LEN} bytes"),
        });
    }
    Ok(())
}

/// Fails unless `person` holds `role` on the account.
pub(crate) fn need_role(
    policy: &Policy,
    at: StatementRef,
    account: &str,
    person: usize,
    id: &str,
    role: Role,
) -> Result<(), ConsentError> {
    if policy
        .holders(account, role)
        .is_some_and(|s| s.contains(&person))
    {
        return Ok(());
    }
    Err(ConsentError::MissingRole {
        statement: at,
        person: policy.person(person).name().to_string(),
        id: id.to_string(),
        role,
        account: account.to_string(),
    })
}

/// The people acting on one request so far, to keep them distinct.
struct Parties<'p> {
    policy: &'p Policy,
    seen: Vec<(usize, StatementRef, Role)>,
}

impl Parties<'_> {
    fn add(&mut self, person: usize, at: StatementRef, role: Role) -> Result<(), ConsentError> {
        if let Some(&(_, first, first_role)) = self.seen.iter().find(|(p, ..)| *p == person) {
            let name = self.policy.person(person).name().to_string();
            return Err(if first_role == Role::Approver && role == Role::Approver {
                ConsentError::DuplicateApproval {
                    person: name,
                    first,
                    second: at,
                }
            } else {
                ConsentError::NotDistinct {
                    person: name,
                    first,
                    first_role,
                    second: at,
                    second_role: role,
                }
            });
        }
        self.seen.push((person, at, role));
        Ok(())
    }
}

fn stale(at: StatementRef, signer: &Signer, detail: String) -> ConsentError {
    ConsentError::Stale {
        statement: at,
        signer: signer.spiffe_id.clone(),
        detail,
    }
}

fn wrong_binding(
    at: StatementRef,
    signer: &Signer,
    field: &'static str,
    detail: String,
) -> ConsentError {
    ConsentError::WrongBinding {
        statement: at,
        signer: signer.spiffe_id.clone(),
        field,
        detail,
    }
}

fn short(d: &[u8]) -> String {
    hex::encode(d.get(..6).unwrap_or(d))
}

/// Checks the consent evidence for one code. Every signature must verify
/// under `twokey-consent@<trust domain>` with a key the active policy lists
/// for the person the statement names; the request must be signed by the
/// requester (or by an intake identity of the account, for a person who is
/// a requester); the approvals by at least `approvals_required` distinct
/// approvers; the release by an operator, saying the PIN was verified and
/// binding exactly these request and approvals and the grant's id; requester,
/// intake, approvers and operator distinct people; all bound to the active
/// policy version, the request and the grant; approvals within the request
/// window, the release within the release window and still fresh; the
/// release id unused; the request's codes and the account's rate not used
/// up.
pub fn check_release<H: ReleaseHistory + ?Sized>(
    policy: &VerifiedPolicy,
    request: &SignedStatement,
    approvals: &[SignedStatement],
    release: &SignedStatement,
    grant: &GrantFacts<'_>,
    now: SystemTime,
    already: &H,
) -> Result<Verified, ConsentError> {
    let policy: &Policy = policy;
    let now_secs = unix_secs(now);
    let at = StatementRef::Request;

    // The request.
    let req = open(policy, at, request, StatementKind::Request, now_secs)?;
    let Some(Binding::Request(rb)) = &req.statement.binding else {
        return Err(binding_mismatch(at));
    };
    check_id(at, "request_id", &rb.request_id)?;
    let Some(account) = policy.account(&rb.account_id) else {
        return Err(ConsentError::UnknownAccount {
            statement: at,
            account: rb.account_id.clone(),
            policy_version: policy.version(),
        });
    };
    let reason_digest: [u8; 32] =
        rb.reason_digest
            .as_slice()
            .try_into()
            .map_err(|_| ConsentError::Malformed {
                statement: at,
                detail: "reason_digest is not 32 bytes".into(),
            })?;
    let created_at = timestamp_secs(rb.created_at.as_ref(), "created_at").map_err(|detail| {
        ConsentError::Malformed {
            statement: at,
            detail,
        }
    })?;
    if created_at > now_secs.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(ConsentError::FromTheFuture {
            statement: at,
            signer: req.signer.spiffe_id.clone(),
        });
    }
    let requester =
        policy
            .person_by_id(&rb.requester)
            .ok_or_else(|| ConsentError::UnknownIdentity {
                statement: at,
                id: rb.requester.clone(),
                policy_version: policy.version(),
            })?;
    let mut parties = Parties {
        policy,
        seen: Vec::new(),
    };
    need_role(
        policy,
        at,
        &rb.account_id,
        requester,
        &rb.requester,
        Role::Requester,
    )?;
    parties.add(requester, at, Role::Requester)?;
    if req.person != requester {
        need_role(
            policy,
            at,
            &rb.account_id,
            req.person,
            &req.signer.spiffe_id,
            Role::Intake,
        )?;
        parties.add(req.person, at, Role::Intake)?;
    }
    if grant.account_id != rb.account_id {
        return Err(ConsentError::GrantMismatch {
            field: "account_id",
            grant: grant.account_id.to_string(),
            evidence: rb.account_id.clone(),
        });
    }
    if grant.request_id != rb.request_id {
        return Err(ConsentError::GrantMismatch {
            field: "request_id",
            grant: grant.request_id.to_string(),
            evidence: rb.request_id.clone(),
        });
    }

    // The approvals.
    if approvals.len() > MAX_APPROVALS {
        return Err(ConsentError::Malformed {
            statement: StatementRef::Approval(MAX_APPROVALS),
            detail: format!("more than {MAX_APPROVALS} approvals"),
        });
    }
    let request_window = i64::try_from(account.request_window.as_secs()).unwrap_or(i64::MAX);
    let mut approvers = Vec::with_capacity(approvals.len());
    let mut approval_digests = Vec::with_capacity(approvals.len());
    let mut approval_times = Vec::with_capacity(approvals.len());
    for (i, signed) in approvals.iter().enumerate() {
        let at = StatementRef::Approval(i);
        let a = open(policy, at, signed, StatementKind::Approval, now_secs)?;
        let Some(Binding::Approval(ab)) = &a.statement.binding else {
            return Err(binding_mismatch(at));
        };
        if ab.request_digest != req.digest {
            return Err(wrong_binding(
                at,
                &a.signer,
                "request",
                format!(
                    "it approves request statement {}…, this is {}…",
                    short(&ab.request_digest),
                    short(&req.digest)
                ),
            ));
        }
        if ab.request_id != rb.request_id || ab.account_id != rb.account_id {
            return Err(wrong_binding(
                at,
                &a.signer,
                "request",
                format!(
                    "it names request {} of account {}, the request is {} of {}",
                    ab.request_id, ab.account_id, rb.request_id, rb.account_id
                ),
            ));
        }
        need_role(
            policy,
            at,
            &rb.account_id,
            a.person,
            &a.signer.spiffe_id,
            Role::Approver,
        )?;
        parties.add(a.person, at, Role::Approver)?;
        if a.issued_at < created_at.saturating_sub(MAX_CLOCK_SKEW_SECS) {
            return Err(stale(
                at,
                &a.signer,
                "signed before the request was created".into(),
            ));
        }
        if a.issued_at > created_at.saturating_add(request_window) {
            return Err(stale(
                at,
                &a.signer,
                format!(
                    "signed {} s after the request was created, past the request window of {request_window} s; file a new request",
                    a.issued_at - created_at
                ),
            ));
        }
        approval_times.push(a.issued_at);
        approval_digests.push(a.digest);
        approvers.push(a.signer);
    }
    if approvers.len() < account.approvals_required as usize {
        return Err(ConsentError::TooFewApprovals {
            account: rb.account_id.clone(),
            have: approvers.len(),
            need: account.approvals_required,
        });
    }
    // The request became approved with the approval that reached the count.
    approval_times.sort_unstable();
    let approved_at = approval_times[account.approvals_required as usize - 1];

    // The release.
    let at = StatementRef::Release;
    let rel = open(policy, at, release, StatementKind::Release, now_secs)?;
    let Some(Binding::Release(lb)) = &rel.statement.binding else {
        return Err(binding_mismatch(at));
    };
    if lb.request_digest != req.digest
        || lb.request_id != rb.request_id
        || lb.account_id != rb.account_id
    {
        return Err(wrong_binding(
            at,
            &rel.signer,
            "request",
            format!(
                "it releases request {} of account {} (statement {}…), the request is {} of {} ({}…)",
                lb.request_id,
                lb.account_id,
                short(&lb.request_digest),
                rb.request_id,
                rb.account_id,
                short(&req.digest)
            ),
        ));
    }
    let bound: BTreeSet<&[u8]> = lb.approval_digests.iter().map(Vec::as_slice).collect();
    let presented: BTreeSet<&[u8]> = approval_digests.iter().map(<[u8; 32]>::as_slice).collect();
    if bound.len() != lb.approval_digests.len() || bound != presented {
        return Err(wrong_binding(
            at,
            &rel.signer,
            "set of approvals",
            format!(
                "it binds {}, {} and they differ",
                crate::error::count(
                    lb.approval_digests.len() as u64,
                    "approval digest",
                    "approval digests"
                ),
                crate::error::count(approvals.len() as u64, "approval was", "approvals were")
                    + " presented"
            ),
        ));
    }
    check_id(at, "release_id", &lb.release_id)?;
    check_id(at, "grant_id", &lb.grant_id)?;
    if lb.grant_id != grant.grant_id {
        return Err(ConsentError::GrantMismatch {
            field: "grant_id",
            grant: grant.grant_id.to_string(),
            evidence: lb.grant_id.clone(),
        });
    }
    need_role(
        policy,
        at,
        &rb.account_id,
        rel.person,
        &rel.signer.spiffe_id,
        Role::Operator,
    )?;
    parties.add(rel.person, at, Role::Operator)?;
    if !lb.pin_verified {
        return Err(ConsentError::PinNotVerified {
            signer: rel.signer.spiffe_id.clone(),
        });
    }
    let release_window = i64::try_from(account.release_window.as_secs()).unwrap_or(i64::MAX);
    let freshness = i64::try_from(account.release_freshness.as_secs()).unwrap_or(i64::MAX);
    if rel.issued_at < approved_at.saturating_sub(MAX_CLOCK_SKEW_SECS) {
        return Err(stale(
            at,
            &rel.signer,
            "signed before the approvals were complete".into(),
        ));
    }
    if rel.issued_at > approved_at.saturating_add(release_window) {
        return Err(stale(
            at,
            &rel.signer,
            format!(
                "signed {} s after the request was approved, past the release window of {release_window} s; file a new request",
                rel.issued_at - approved_at
            ),
        ));
    }
    if now_secs > rel.issued_at.saturating_add(freshness) {
        return Err(stale(
            at,
            &rel.signer,
            format!(
                "signed {} s ago, a release statement is good for {freshness} s; the operator must sign a new release",
                now_secs - rel.issued_at
            ),
        ));
    }

    // What the vault has done already. Read in the reverse order of the
    // checks: a release another vault replica commits between two reads is
    // then seen as the replay it is (release id used), never as this
    // request's codes used up; a release committed after the last read is
    // refused inside the vault's transaction.
    let rate = account.release_rate;
    let since = now.checked_sub(rate.per).unwrap_or(UNIX_EPOCH);
    let recent = already.releases_since(&rb.account_id, since);
    let released = already.codes_released(&req.digest);
    if already.release_id_used(&lb.release_id) {
        return Err(ConsentError::ReleaseReplayed {
            release_id: lb.release_id.clone(),
            signer: rel.signer.spiffe_id.clone(),
        });
    }
    if released >= account.codes_per_request {
        return Err(ConsentError::CodesExhausted {
            request_id: rb.request_id.clone(),
            released,
            allowed: account.codes_per_request,
        });
    }
    if recent >= rate.max {
        return Err(ConsentError::RateLimited {
            account: rb.account_id.clone(),
            released: recent,
            max: rate.max,
            per_secs: rate.per.as_secs(),
        });
    }

    Ok(Verified {
        policy_version: policy.version(),
        account_id: rb.account_id.clone(),
        request_id: rb.request_id.clone(),
        request_digest: req.digest,
        reason_digest,
        requester_person: policy.person(requester).name().to_string(),
        requester_id: rb.requester.clone(),
        filed_by: req.signer.clone(),
        approvers,
        approval_digests,
        operator: rel.signer.clone(),
        release_digest: rel.digest,
        release_id: lb.release_id.clone(),
        grant_id: lb.grant_id.clone(),
        codes_released_before: released,
        codes_per_request: account.codes_per_request,
    })
}

/// `decode_statement` guarantees the binding matches the kind; this is the
/// error for the impossible other case, so that nothing here can panic.
pub(crate) fn binding_mismatch(at: StatementRef) -> ConsentError {
    ConsentError::Malformed {
        statement: at,
        detail: "binding does not match kind".into(),
    }
}

/// One statement whose signature verified under the active policy, as
/// [`verify_statement`] gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedStatement {
    /// The decoded statement.
    pub statement: Statement,
    /// SHA-256 of its bytes.
    pub digest: [u8; 32],
    /// Who signed it.
    pub signer: Signer,
}

/// Verifies one statement on its own: canonical bytes, the expected kind, a
/// signer the policy lists, a signature by one of that person's keys under
/// `twokey-consent@<trust domain>`, the active policy version, not from the
/// future. The broker uses it to refuse a bad statement when it is handed
/// in, long before the vault's [`check_release`] sees the whole chain; it
/// checks neither roles nor bindings to other statements.
pub fn verify_statement(
    policy: &VerifiedPolicy,
    at: StatementRef,
    signed: &SignedStatement,
    expected: StatementKind,
    now: SystemTime,
) -> Result<OpenedStatement, ConsentError> {
    let o = open(policy, at, signed, expected, unix_secs(now))?;
    Ok(OpenedStatement {
        statement: o.statement,
        digest: o.digest,
        signer: o.signer,
    })
}
