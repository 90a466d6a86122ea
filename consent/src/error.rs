//! Why evidence or a policy was refused: every error names the statement, the
//! person and what to do, and says its [`ErrorKind`] so that the services can
//! map it to a gRPC status.

use std::fmt;

/// The class of a refusal, for the services to map to a gRPC status
/// (`twokey_runtime::error::ErrorKind` has a variant of the same name for
/// each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bytes that do not decode, or fields missing or out of range.
    InvalidArgument,
    /// The evidence is well formed but the state or the time does not allow
    /// the action: too few approvals, stale, bound to another request or
    /// policy version, codes or rate used up.
    FailedPrecondition,
    /// No authority: a signature that does not verify, an unknown key or
    /// person, a missing role, the same person twice, a replay.
    PermissionDenied,
}

/// Which statement of the evidence an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementRef {
    /// The request statement.
    Request,
    /// The approval statement at this index (from 0) of those presented.
    Approval(usize),
    /// The operator's release statement.
    Release,
    /// The admin action statement at this index (from 0).
    AdminAction(usize),
}

impl fmt::Display for StatementRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Request => f.write_str("the request statement"),
            Self::Approval(i) => write!(f, "approval statement #{}", i + 1),
            Self::Release => f.write_str("the release statement"),
            Self::AdminAction(i) => write!(f, "admin statement #{}", i + 1),
        }
    }
}

/// A role a person holds on an account, from the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// May ask for a code.
    Requester,
    /// May file a request on a requester's behalf (a BPM, a ticket system).
    Intake,
    /// May approve a request.
    Approver,
    /// Verifies the PIN and signs the release.
    Operator,
    /// Takes part in M-of-N admin actions.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Requester => "requester",
            Self::Intake => "intake",
            Self::Approver => "approver",
            Self::Operator => "operator",
            Self::Admin => "admin",
        })
    }
}

/// Why release or admin-action evidence was refused. Nothing is released or
/// done on any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsentError {
    /// A statement needed is not there (for example a grant with no consent
    /// evidence at all).
    #[error(
        "{statement} is missing: {}",
        match statement {
            StatementRef::AdminAction(_) => "an admin action needs the signed statements of M admins; have each sign it with `twokey` and send them together",
            _ => "a code needs the signed consent of the people the policy names; have them sign with `twokey` and send the statements with the grant",
        }
    )]
    Missing {
        /// The statement that is missing.
        statement: StatementRef,
    },
    /// Bytes that do not decode as a canonical statement or an sshsig
    /// signature, or a field out of range.
    #[error("{statement} is malformed: {detail}; have the signer sign it again with twokey")]
    Malformed {
        /// The statement.
        statement: StatementRef,
        /// What is wrong.
        detail: String,
    },
    /// A statement of another kind where this one is needed.
    #[error("{statement} says {found}, where {expected} is needed; send the right statement")]
    WrongKind {
        /// The statement.
        statement: StatementRef,
        /// The kind needed there.
        expected: &'static str,
        /// The kind it says.
        found: &'static str,
    },
    /// A SPIFFE ID (of a signer, or the requester a request names) that no
    /// person in the active policy has.
    #[error(
        "{statement}: {id} is not a person in policy version {policy_version}; an admin must add them to the policy first"
    )]
    UnknownIdentity {
        /// The statement.
        statement: StatementRef,
        /// The SPIFFE ID.
        id: String,
        /// The active policy version.
        policy_version: u64,
    },
    /// Signed with a key the policy does not list for the person the
    /// statement names as signer.
    #[error(
        "{statement} claims to be signed by {signer} but its key {fingerprint} is {}; sign with your own key as listed in the policy",
        match owner { Some(o) => format!("person {o}'s"), None => "in no person's entry of the policy".to_string() }
    )]
    UnknownKey {
        /// The statement.
        statement: StatementRef,
        /// The SPIFFE ID the statement names as signer.
        signer: String,
        /// SHA-256 fingerprint of the key that made the signature.
        fingerprint: String,
        /// The person the policy lists this key for, if any.
        owner: Option<String>,
    },
    /// Signed under another namespace than this deployment's consent
    /// namespace.
    #[error(
        "{statement} by {signer} is signed under namespace {found:?}, not {expected:?}; sign again with `-n {expected}`"
    )]
    WrongNamespace {
        /// The statement.
        statement: StatementRef,
        /// The SPIFFE ID the statement names as signer.
        signer: String,
        /// The namespace needed.
        expected: String,
        /// The namespace in the signature.
        found: String,
    },
    /// The signature does not verify over the statement's bytes (tampered
    /// bytes, a signature of something else, a security key that did not
    /// confirm presence).
    #[error(
        "{statement} by {signer}: the signature does not verify ({detail}); sign the statement again"
    )]
    BadSignature {
        /// The statement.
        statement: StatementRef,
        /// The SPIFFE ID the statement names as signer.
        signer: String,
        /// Why.
        detail: String,
    },
    /// Bound to another policy version than the active one.
    #[error(
        "{statement} by {signer} was made under policy version {bound}, the active one is {active}; sign again under the active policy"
    )]
    PolicyVersion {
        /// The statement.
        statement: StatementRef,
        /// The signer's SPIFFE ID.
        signer: String,
        /// The version the statement names.
        bound: u64,
        /// The active version.
        active: u64,
    },
    /// An account the active policy does not list.
    #[error(
        "{statement} is for account {account:?}, which policy version {policy_version} does not list"
    )]
    UnknownAccount {
        /// The statement.
        statement: StatementRef,
        /// The account.
        account: String,
        /// The active policy version.
        policy_version: u64,
    },
    /// The person does not hold the role the statement needs on the account.
    #[error(
        "{statement}: person {person} ({id}) is not {role} of {} in the policy; ask an admin, or have someone who is sign",
        if account.is_empty() { "the vault (the policy's [admins])".to_string() } else { format!("account {account}") }
    )]
    MissingRole {
        /// The statement.
        statement: StatementRef,
        /// The person's name in the policy.
        person: String,
        /// The SPIFFE ID concerned.
        id: String,
        /// The role needed.
        role: Role,
        /// The account.
        account: String,
    },
    /// One person in two roles of the same request (requester, intake,
    /// approvers, operator must be distinct people, not just distinct keys
    /// or certificates).
    #[error(
        "person {person} is {first_role} in {first} and {second_role} in {second}; one person cannot hold two roles of one request: someone else must sign {second}"
    )]
    NotDistinct {
        /// The person.
        person: String,
        /// The earlier statement.
        first: StatementRef,
        /// The role there.
        first_role: Role,
        /// The later statement.
        second: StatementRef,
        /// The role there.
        second_role: Role,
    },
    /// The same person approved twice.
    #[error(
        "person {person} approved twice ({first} and {second}); each approver counts once: another approver must sign"
    )]
    DuplicateApproval {
        /// The person.
        person: String,
        /// The first approval.
        first: StatementRef,
        /// The second one.
        second: StatementRef,
    },
    /// Fewer distinct approvals than the account needs.
    #[error(
        "account {account} needs {} from distinct approvers, {}; wait for more approvals",
        count(u64::from(*need), "approval", "approvals"),
        presented(*have)
    )]
    TooFewApprovals {
        /// The account.
        account: String,
        /// Approvals presented.
        have: usize,
        /// Approvals needed.
        need: u32,
    },
    /// Bound to another request, account, set of approvals or action than
    /// the rest of the evidence.
    #[error(
        "{statement} by {signer} is bound to another {field} ({detail}); sign a statement for this one"
    )]
    WrongBinding {
        /// The statement.
        statement: StatementRef,
        /// The signer's SPIFFE ID.
        signer: String,
        /// Which binding differs.
        field: &'static str,
        /// How.
        detail: String,
    },
    /// Outside its time window.
    #[error("{statement} by {signer} is out of its time window: {detail}")]
    Stale {
        /// The statement.
        statement: StatementRef,
        /// The signer's SPIFFE ID.
        signer: String,
        /// What window and by how much.
        detail: String,
    },
    /// Issued further in the future than clock skew allows.
    #[error(
        "{statement} by {signer} is issued in the future; check the signer's clock and sign again"
    )]
    FromTheFuture {
        /// The statement.
        statement: StatementRef,
        /// The signer's SPIFFE ID.
        signer: String,
    },
    /// The release does not say the PIN was verified.
    #[error(
        "the release statement by {signer} does not say the PIN was verified; verify the requester's PIN first"
    )]
    PinNotVerified {
        /// The operator's SPIFFE ID.
        signer: String,
    },
    /// The broker's grant names something else than the evidence.
    #[error(
        "the grant's {field} is {grant:?} but the evidence says {evidence:?}; the grant does not carry this consent"
    )]
    GrantMismatch {
        /// Which field.
        field: &'static str,
        /// The grant's value.
        grant: String,
        /// The evidence's value.
        evidence: String,
    },
    /// The release id was used before.
    #[error(
        "release {release_id} by {signer} was used already; the operator must sign a new release"
    )]
    ReleaseReplayed {
        /// The release id.
        release_id: String,
        /// The operator's SPIFFE ID.
        signer: String,
    },
    /// The request has released all the codes it may.
    #[error(
        "request {request_id} has released {released} of its {allowed} codes; file a new request"
    )]
    CodesExhausted {
        /// The request id.
        request_id: String,
        /// Codes released so far.
        released: u32,
        /// Codes per request.
        allowed: u32,
    },
    /// The account's release rate limit is reached.
    #[error(
        "account {account} has released {released} codes in the last {per_secs} s, its limit is {max}; wait and try again"
    )]
    RateLimited {
        /// The account.
        account: String,
        /// Codes released in the window.
        released: u32,
        /// The limit.
        max: u32,
        /// The window in seconds.
        per_secs: u64,
    },
    /// Fewer distinct admins than the threshold consented.
    #[error(
        "{action} of {} needs {need} distinct admins, {} signed ({}); collect more admin signatures",
        if account.is_empty() { "the vault".to_string() } else { format!("account {account}") }, have.len(), if have.is_empty() { "nobody".to_string() } else { have.join(", ") }
    )]
    TooFewAdmins {
        /// The account (empty: the vault itself).
        account: String,
        /// The action.
        action: &'static str,
        /// The persons whose statements verified.
        have: Vec<String>,
        /// The threshold M.
        need: u32,
    },
    /// The admin action id was used before.
    #[error("admin action {action_id} was carried out already; the admins must sign a new action")]
    AdminActionReplayed {
        /// The action id.
        action_id: String,
    },
}

impl ConsentError {
    /// The class of the refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Malformed { .. } | Self::WrongKind { .. } => ErrorKind::InvalidArgument,
            Self::Missing { .. }
            | Self::UnknownIdentity { .. }
            | Self::UnknownKey { .. }
            | Self::WrongNamespace { .. }
            | Self::BadSignature { .. }
            | Self::MissingRole { .. }
            | Self::NotDistinct { .. }
            | Self::DuplicateApproval { .. }
            | Self::GrantMismatch { .. }
            | Self::ReleaseReplayed { .. }
            | Self::AdminActionReplayed { .. } => ErrorKind::PermissionDenied,
            Self::PolicyVersion { .. }
            | Self::UnknownAccount { .. }
            | Self::TooFewApprovals { .. }
            | Self::WrongBinding { .. }
            | Self::Stale { .. }
            | Self::FromTheFuture { .. }
            | Self::PinNotVerified { .. }
            | Self::CodesExhausted { .. }
            | Self::RateLimited { .. }
            | Self::TooFewAdmins { .. } => ErrorKind::FailedPrecondition,
        }
    }
}

/// Why a policy document or update was refused. The active policy stays in
/// force on any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not TOML, or not the policy's schema.
    #[error("the policy does not parse: {0}; fix the document and have the admins sign it again")]
    Parse(String),
    /// Parses, but breaks a rule (a role names an unknown person, a
    /// threshold above the number of admins, ...).
    #[error("the policy is invalid: {0}")]
    Invalid(String),
    /// One key listed for two people: a person is the unit of distinctness,
    /// so two entries sharing a key would count one person twice.
    #[error(
        "key {fingerprint} is listed for both {first} and {second}; a key belongs to one person: give each person their own key, or merge the entries"
    )]
    SharedKey {
        /// SHA-256 fingerprint of the key.
        fingerprint: String,
        /// One person.
        first: String,
        /// The other.
        second: String,
    },
    /// One SPIFFE ID listed for two people.
    #[error(
        "SPIFFE ID {id} is listed for both {first} and {second}; an identity belongs to one person"
    )]
    SharedIdentity {
        /// The SPIFFE ID.
        id: String,
        /// One person.
        first: String,
        /// The other.
        second: String,
    },
    /// A signature that does not decode.
    #[error("policy signature #{index} is malformed: {detail}")]
    MalformedSignature {
        /// Index (from 1) among the signatures presented.
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// A signature under another namespace.
    #[error(
        "policy signature #{index} is under namespace {found:?}, not {expected:?}; sign with `-n {expected}`"
    )]
    WrongNamespace {
        /// Index (from 1).
        index: usize,
        /// The namespace needed.
        expected: String,
        /// The namespace in the signature.
        found: String,
    },
    /// A signature by a key that is not one of the admins who may sign this
    /// update (the previous version's admins, or the pinned ones).
    #[error(
        "policy signature #{index} is by key {fingerprint}, which is not an admin key of {authority}; only those admins may sign the next version"
    )]
    UnknownSigner {
        /// Index (from 1).
        index: usize,
        /// SHA-256 fingerprint of the key.
        fingerprint: String,
        /// "policy version N" or "the pinned admin set".
        authority: String,
    },
    /// A signature that does not verify over the document.
    #[error(
        "policy signature #{index} by {person} does not verify over this document ({detail}); sign this exact file"
    )]
    BadSignature {
        /// Index (from 1).
        index: usize,
        /// The admin the key belongs to.
        person: String,
        /// Why.
        detail: String,
    },
    /// Fewer distinct admins than the threshold signed.
    #[error(
        "the policy needs {need} distinct admin signatures, it has {} ({}); collect more with `twokey policy sign`",
        signed_by.len(), if signed_by.is_empty() { "none".to_string() } else { signed_by.join(", ") }
    )]
    TooFewSignatures {
        /// The admins whose signatures verified (each once).
        signed_by: Vec<String>,
        /// The threshold.
        need: u32,
    },
    /// The version is not above the active one: a rollback or a replay.
    #[error(
        "policy version {proposed} is not above the active version {active}; a new policy needs a higher version number"
    )]
    NotNewer {
        /// The version proposed.
        proposed: u64,
        /// The active version (0 when none).
        active: u64,
    },
    /// The document is for another trust domain.
    #[error("the policy is for trust domain {found:?}, this deployment is {expected:?}")]
    TrustDomain {
        /// This deployment's trust domain.
        expected: String,
        /// The document's.
        found: String,
    },
}

impl PolicyError {
    /// The class of the refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Parse(_)
            | Self::Invalid(_)
            | Self::SharedKey { .. }
            | Self::SharedIdentity { .. }
            | Self::MalformedSignature { .. }
            | Self::TrustDomain { .. } => ErrorKind::InvalidArgument,
            Self::WrongNamespace { .. }
            | Self::UnknownSigner { .. }
            | Self::BadSignature { .. } => ErrorKind::PermissionDenied,
            Self::TooFewSignatures { .. } | Self::NotNewer { .. } => ErrorKind::FailedPrecondition,
        }
    }
}

/// `1 approval`, `2 approvals`: a count with its noun in agreement.
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `1 was presented`, `0 were presented`.
fn presented(n: usize) -> String {
    format!("{n} {} presented", if n == 1 { "was" } else { "were" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_nouns() {
        let e = |need, have| {
            ConsentError::TooFewApprovals {
                account: "aws".into(),
                have,
                need,
            }
            .to_string()
        };
        assert_eq!(
            e(1, 0),
            "account aws needs 1 approval from distinct approvers, 0 were presented; wait for more approvals"
        );
        assert_eq!(
            e(2, 1),
            "account aws needs 2 approvals from distinct approvers, 1 was presented; wait for more approvals"
        );
    }

    #[test]
    fn vault_wide_admin_refusals_name_the_vault_and_admin_statements() {
        let lacks = ConsentError::MissingRole {
            statement: StatementRef::AdminAction(0),
            person: "eve".into(),
            id: "spiffe://t/user/eve".into(),
            role: Role::Admin,
            account: String::new(),
        };
        assert_eq!(
            lacks.to_string(),
            "admin statement #1: person eve (spiffe://t/user/eve) is not admin of the vault (the policy's [admins]) in the policy; ask an admin, or have someone who is sign"
        );
        let of_account = ConsentError::MissingRole {
            statement: StatementRef::AdminAction(0),
            person: "eve".into(),
            id: "spiffe://t/user/eve".into(),
            role: Role::Admin,
            account: "aws".into(),
        };
        assert!(
            of_account
                .to_string()
                .contains("is not admin of account aws in")
        );
        let missing = ConsentError::Missing {
            statement: StatementRef::AdminAction(0),
        };
        assert_eq!(
            missing.to_string(),
            "admin statement #1 is missing: an admin action needs the signed statements of M admins; have each sign it with `twokey` and send them together"
        );
        let missing = ConsentError::Missing {
            statement: StatementRef::Release,
        };
        assert!(
            missing
                .to_string()
                .contains("a code needs the signed consent")
        );
    }
}
