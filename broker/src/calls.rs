//! The broker API's own vocabulary: validated ids, each call's input and
//! what each call answers. `convert` builds the inputs from the wire (with
//! `TryFrom`) and the responses from the answers; the domain ([`crate::service`])
//! takes and returns only these.

use twokey_consent::statement::SignedStatement;
use twokey_runtime::SpiffeId;

use crate::{
    error::BrokerError,
    pin::Pin,
    policy::{Role, valid_account_id},
    state::{RequestRecord, State},
    vault::{Account, Code, EnrollResponse, PolicyVersion, Seed},
};

pub use crate::service::admin::{AdminActionRecord, Proposal};

/// A statement field as sent: an empty (default) message is none.
pub fn statement(given: Option<SignedStatement>) -> Option<SignedStatement> {
    given.filter(|s| !(s.statement.is_empty() && s.signature.is_empty()))
}

/// An optional action id: empty text is none.
pub fn action_id(id: String) -> Option<String> {
    (!id.is_empty()).then_some(id)
}

/// Requests in a page when the caller names no page size.
pub const DEFAULT_PAGE: usize = 100;
/// Most requests in one page.
pub const MAX_PAGE: usize = 1000;

/// An id checked once, from text: a newtype with `as_str`, and `TryFrom<String>`
/// refusing empty text with `required` and text `valid` does not accept with
/// `malformed(text)`.
macro_rules! checked_id {
    (
        $(#[$doc:meta])* $name:ident,
        required: $required:expr,
        valid: $valid:expr,
        malformed: $malformed:expr $(,)?
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = BrokerError;

            fn try_from(id: String) -> Result<Self, BrokerError> {
                if id.is_empty() {
                    return Err(BrokerError::invalid($required));
                }
                if !($valid)(id.as_str()) {
                    return Err(BrokerError::invalid(($malformed)(id.as_str())));
                }
                Ok(Self(id))
            }
        }
    };
}

checked_id!(
    /// An account id of the policy's form: 1 to 64 characters of a-z, 0-9,
    /// '.', '_', '-' (whether the policy names it is the domain's question).
    AccountId,
    required: "account_id is required",
    valid: valid_account_id,
    malformed: |id: &str| format!(
        "account_id must be 1 to 64 characters of a-z, 0-9, '.', '_', '-' ({} given)",
        id.chars().count()
    ),
);

checked_id!(
    /// A request id of the form the broker gives (a UUID).
    RequestId,
    required: "request_id is required; list requests with `twokey request list`",
    valid: |id: &str| id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
    malformed: |id: &str| format!(
        "request_id {:?} is malformed; request ids are UUIDs",
        id.chars().take(70).collect::<String>()
    ),
);

/// An optional account id: empty text is none.
pub fn account_filter(id: String) -> Result<Option<AccountId>, BrokerError> {
    if id.is_empty() {
        Ok(None)
    } else {
        AccountId::try_from(id).map(Some)
    }
}

/// What a call names, as sent (before any check): recorded on the call's
/// span, and on the `access.denied` event of a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The call names neither a request nor an account.
    Nothing,
    /// An account (filing a request, listing, enrolling, removing).
    Account(String),
    /// A stored request (its account is looked up).
    Request(String),
}

impl Target {
    /// The request id and the account id named (empty when not).
    pub fn ids(&self) -> (&str, &str) {
        match self {
            Self::Nothing => ("", ""),
            Self::Account(a) => ("", a),
            Self::Request(r) => (r, ""),
        }
    }
}

/// A call's input as the edge decoded it: what it names, and the validated
/// input or why it is invalid. The domain looks at the input only once the
/// caller is known, so an unknown caller is refused as such (and recorded)
/// whatever it sent.
#[derive(Debug)]
pub struct Checked<T> {
    /// What the call names, as sent.
    pub target: Target,
    /// The validated input, or why the message is invalid.
    pub input: Result<T, BrokerError>,
}

/// A request to file.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// The account the code is for.
    pub account: AccountId,
    /// The requester an intake files for (a policy name or SPIFFE ID), if any.
    pub on_behalf_of: Option<String>,
    /// Why the code is needed.
    pub reason: String,
    /// The change ticket.
    pub ticket: String,
    /// The request statement, signed by the caller.
    pub statement: Option<SignedStatement>,
}

/// Which requests a list asks for.
#[derive(Debug, Clone)]
pub struct RequestQuery {
    /// Only requests in this state (none: all).
    pub state: Option<State>,
    /// Only requests for this account.
    pub account: Option<AccountId>,
    /// Only requests the caller filed or is the requester of.
    pub mine: bool,
    /// Most requests in the page.
    pub page_size: usize,
    /// Where the page starts: a previous page's `next_page_token`, or empty.
    pub page_token: String,
    /// How many bytes a request takes in the answer: a page also ends before
    /// it outgrows the message limit.
    pub size_of: fn(&RequestRecord) -> usize,
}

/// Which changes a watcher asks for.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    /// Only changes of requests for this account.
    pub account: Option<AccountId>,
}

/// One page of requests, newest first.
#[derive(Debug, Clone)]
pub struct RequestPage {
    /// The requests.
    pub requests: Vec<RequestRecord>,
    /// Where the next page starts; empty after the last page.
    pub next_page_token: String,
}

/// A decision on a request (approval, denial or cancellation) with its
/// comment or reason.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The request decided on.
    pub request: RequestId,
    /// The approver's comment, or the reason for denying or cancelling.
    pub note: String,
    /// The approval statement (approvals only).
    pub statement: Option<SignedStatement>,
}

/// A release of one code.
#[derive(Debug, Clone)]
pub struct Release {
    /// The request.
    pub request: RequestId,
    /// The operator's release statement.
    pub statement: Option<SignedStatement>,
}

/// The operator's try of a PIN.
#[derive(Debug)]
pub struct PinAttempt {
    /// The request.
    pub request: RequestId,
    /// The PIN as typed (trimmed).
    pub pin: Pin,
    /// Release statements for the requester's own releases.
    pub releases: Vec<SignedStatement>,
}

/// A seed to enroll in the vault (the seed itself is checked by the vault).
#[derive(Debug)]
pub struct Enrollment {
    /// The account.
    pub account: AccountId,
    /// The seed; none given is refused once the caller is known to be an admin.
    pub seed: Option<Seed>,
    /// With a Base32 secret: the hash function (the proto's `Algorithm` number).
    pub algorithm: i32,
    /// With a Base32 secret: digits per code.
    pub digits: u32,
    /// With a Base32 secret: step length in seconds.
    pub period: u32,
    /// With a Base32 secret: issuer shown in listings.
    pub issuer: String,
    /// With a Base32 secret: label shown in listings.
    pub label: String,
    /// Replace an enrolled account with the same id.
    pub replace: bool,
    /// With replace: the admin action M admins signed.
    pub action_id: Option<String>,
    /// Fewest seconds a released code must have left in its step (0: the
    /// vault's default; the vault refuses one not below the period).
    pub min_seconds_left: u32,
}

/// An account to remove from the vault.
#[derive(Debug, Clone)]
pub struct Removal {
    /// The account.
    pub account: AccountId,
    /// Why (required once the caller is known to be an admin).
    pub reason: String,
    /// The admin action M admins signed.
    pub action_id: Option<String>,
}

/// An account to disable or enable.
#[derive(Debug, Clone)]
pub struct Toggle {
    /// The account.
    pub account: AccountId,
    /// True to enable, false to disable.
    pub enabled: bool,
    /// The admin action M admins signed.
    pub action_id: Option<String>,
}

/// An account whose replaced or removed seed to restore.
#[derive(Debug, Clone)]
pub struct Restoration {
    /// The account.
    pub account: AccountId,
    /// The admin action M admins signed.
    pub action_id: Option<String>,
}

/// An admin's statement for an admin action.
#[derive(Debug, Clone)]
pub struct AdminSignature(pub SignedStatement);

/// A policy document to propose.
#[derive(Debug, Clone)]
pub struct PolicyProposal {
    /// The TOML text.
    pub document: String,
}

/// A detached signature over a proposed version.
#[derive(Debug, Clone)]
pub struct PolicySignature {
    /// The proposed version.
    pub version: u64,
    /// The sshsig signature, armored or raw.
    pub signature: Vec<u8>,
}

/// A proposed version to apply.
#[derive(Debug, Clone)]
pub struct PolicyApply {
    /// The proposed version.
    pub version: u64,
}

/// Who the caller is to the broker.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The caller's SPIFFE ID.
    pub id: SpiffeId,
    /// Its name in the policy (empty when not named).
    pub name: String,
    /// The accounts it has roles on, with those roles.
    pub accounts: Vec<(String, Vec<Role>)>,
    /// The policy groups it is in.
    pub groups: Vec<String>,
    /// The signed policy version in force (0: none).
    pub policy_version: u64,
}

/// A released code and the request after the release.
#[derive(Debug)]
pub struct Released {
    /// The code, as the vault computed it.
    pub code: Code,
    /// The request.
    pub request: RequestRecord,
}

/// A live PIN shown to its requester, and the request.
#[derive(Debug)]
pub struct ShownPin {
    /// The PIN (its `Debug` is redacted).
    pub pin: Pin,
    /// When it stops working unless verified, Unix ms.
    pub expires_ms: u64,
    /// The request, APPROVED.
    pub request: RequestRecord,
}

/// The vault's answer to an enrollment.
#[derive(Debug)]
pub struct Enrolled(pub EnrollResponse);

/// Enrolled accounts the caller has a role on.
#[derive(Debug)]
pub struct Accounts(pub Vec<Account>);

/// The account the vault removed.
#[derive(Debug)]
pub struct Removed(pub String);

/// An account after a change (disabled, enabled or restored).
#[derive(Debug)]
pub struct AccountChanged(pub Account);

/// The open admin actions.
#[derive(Debug)]
pub struct AdminActions(pub Vec<AdminActionRecord>);

/// One admin action after a signature.
#[derive(Debug)]
pub struct AdminActionSigned(pub AdminActionRecord);

/// A proposal after a change.
#[derive(Debug)]
pub struct ProposalView(pub Proposal);

/// The version the vault applied.
#[derive(Debug)]
pub struct Applied(pub PolicyVersion);

/// The policy: the versions the vault applied (newest first) and the open
/// proposals (lowest version first).
#[derive(Debug)]
pub struct PolicyState {
    /// Applied versions, the active one first.
    pub applied: Vec<PolicyVersion>,
    /// Open proposals.
    pub proposals: Vec<Proposal>,
}
