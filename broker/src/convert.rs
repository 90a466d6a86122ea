//! Proto ↔ domain conversion at the edge, beside `grpc` and `http`: each
//! request message checked into the domain's input ([`crate::calls`]) with
//! `TryFrom`, each domain answer made the response with `From`, and one
//! function per RPC (from the table in [`crate::rpc`]) that does both around
//! the [`Broker`] call, so `grpc` and `http` share every conversion.

use futures::{Stream, StreamExt};
use twokey_proto::{Timestamp, broker::v1 as pb};
use twokey_runtime::SpiffeId;

use crate::{
    calls::{
        AccountChanged, Accounts, AdminActionRecord, AdminActionSigned, AdminActions,
        AdminSignature, Applied, Checked, DEFAULT_PAGE, Decision, Enrolled, Enrollment, Identity,
        MAX_PAGE, NewRequest, PinAttempt, PolicyApply, PolicyProposal, PolicySignature,
        PolicyState, Proposal, ProposalView, Release, Released, Removal, Removed, RequestId,
        RequestPage, RequestQuery, Restoration, ShownPin, Target, Toggle, WatchFilter,
        account_filter, action_id, statement,
    },
    error::BrokerError,
    pin::Pin,
    policy::{Delivery, Role},
    service::{Broker, Change},
    state::{RequestRecord, State},
    vault::{PolicyVersion, Seed},
};

fn timestamp(ms: u64) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

impl From<State> for pb::RequestState {
    fn from(state: State) -> Self {
        match state {
            State::Pending => Self::Pending,
            State::Approved => Self::Approved,
            State::Verified => Self::Verified,
            State::Released => Self::Released,
            State::Denied => Self::Denied,
            State::Cancelled => Self::Cancelled,
            State::Expired => Self::Expired,
            State::Locked => Self::Locked,
        }
    }
}

/// Which requests a list asks for: those in one state, or (unspecified) all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateFilter(pub Option<State>);

impl TryFrom<i32> for StateFilter {
    type Error = BrokerError;

    /// The `state` field of a list call; a number that is no request state
    /// is refused.
    fn try_from(raw: i32) -> Result<Self, BrokerError> {
        let state = pb::RequestState::try_from(raw)
            .map_err(|_| BrokerError::invalid(format!("state {raw} is not a request state")))?;
        Ok(Self(match state {
            pb::RequestState::Unspecified => None,
            pb::RequestState::Pending => Some(State::Pending),
            pb::RequestState::Approved => Some(State::Approved),
            pb::RequestState::Verified => Some(State::Verified),
            pb::RequestState::Released => Some(State::Released),
            pb::RequestState::Denied => Some(State::Denied),
            pb::RequestState::Cancelled => Some(State::Cancelled),
            pb::RequestState::Expired => Some(State::Expired),
            pb::RequestState::Locked => Some(State::Locked),
        }))
    }
}

impl From<Role> for pb::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Requester => Self::Requester,
            Role::Approver => Self::Approver,
            Role::Operator => Self::Operator,
            Role::Admin => Self::Admin,
            Role::Intake => Self::Intake,
        }
    }
}

impl From<Delivery> for pb::Delivery {
    fn from(delivery: Delivery) -> Self {
        match delivery {
            Delivery::Operator => Self::Operator,
            Delivery::Requester => Self::Requester,
        }
    }
}

/// The API's view of a request. Never carries the PIN or its hash.
impl From<&RequestRecord> for pb::Request {
    fn from(r: &RequestRecord) -> Self {
        Self {
            request_id: r.id.clone(),
            account_id: r.account_id.clone(),
            requester: r.requester.to_string(),
            filed_by: r.filed_by.to_string(),
            reason: r.reason.clone(),
            ticket: r.ticket.clone(),
            state: pb::RequestState::from(r.state) as i32,
            approvals: r
                .approvals
                .iter()
                .map(|a| pb::Approval {
                    approver: a.approver.to_string(),
                    comment: a.comment.clone(),
                    approved_at: Some(timestamp(a.at_ms)),
                })
                .collect(),
            approvals_required: r.approvals_required,
            operator: r
                .operator
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            pin_attempts: r.pin_attempts,
            pin_max_attempts: r.pin_max_attempts,
            pin_length: r.pin_length,
            codes_released: r.codes_released,
            codes_allowed: r.codes_allowed,
            delivery: pb::Delivery::from(r.delivery) as i32,
            created_at: Some(timestamp(r.created_ms)),
            updated_at: Some(timestamp(r.updated_ms)),
            expires_at: Some(timestamp(r.expires_ms)),
            history: r
                .history
                .iter()
                .map(|h| pb::HistoryEntry {
                    at: Some(timestamp(h.at_ms)),
                    actor: h.actor.clone(),
                    action: h.action.clone(),
                    state: pb::RequestState::from(h.state) as i32,
                    comment: h.comment.clone(),
                })
                .collect(),
            consent: r.consent.as_ref().map(|c| pb::RequestConsent {
                request: Some((&c.request).into()),
                approvals: c.approvals.iter().map(Into::into).collect(),
                policy_version: c.policy_version,
            }),
        }
    }
}

/// How many bytes a request takes in a response.
fn wire_size(record: &RequestRecord) -> usize {
    prost::Message::encoded_len(&pb::Request::from(record))
}

/// The responses that carry only the request.
macro_rules! request_responses {
    ($($resp:ident),* $(,)?) => {$(
        impl From<RequestRecord> for pb::$resp {
            fn from(record: RequestRecord) -> Self {
                Self {
                    request: Some((&record).into()),
                }
            }
        }
    )*};
}

request_responses!(
    CreateRequestResponse,
    GetRequestResponse,
    ApproveRequestResponse,
    DenyRequestResponse,
    CancelRequestResponse,
    VerifyPinResponse,
    ResendPinResponse,
);

/// The requests that name only a request.
macro_rules! request_ids {
    ($($req:ident),* $(,)?) => {$(
        impl TryFrom<pb::$req> for RequestId {
            type Error = BrokerError;

            fn try_from(message: pb::$req) -> Result<Self, BrokerError> {
                message.request_id.try_into()
            }
        }
    )*};
}

request_ids!(GetRequestRequest, ResendPinRequest, ShowPinRequest);

impl TryFrom<pb::ReleaseCodeRequest> for Release {
    type Error = BrokerError;

    fn try_from(message: pb::ReleaseCodeRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            request: message.request_id.try_into()?,
            statement: statement(message.statement),
        })
    }
}

impl TryFrom<pb::ApproveRequestRequest> for Decision {
    type Error = BrokerError;

    fn try_from(message: pb::ApproveRequestRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            request: message.request_id.try_into()?,
            note: message.comment,
            statement: statement(message.statement),
        })
    }
}

/// The decisions: a request and its comment or reason.
macro_rules! decisions {
    ($($req:ident => $note:ident),* $(,)?) => {$(
        impl TryFrom<pb::$req> for Decision {
            type Error = BrokerError;

            fn try_from(message: pb::$req) -> Result<Self, BrokerError> {
                Ok(Self {
                    request: message.request_id.try_into()?,
                    note: message.$note,
                    statement: None,
                })
            }
        }
    )*};
}

decisions!(
    DenyRequestRequest => reason,
    CancelRequestRequest => reason,
);

impl TryFrom<pb::CreateRequestRequest> for NewRequest {
    type Error = BrokerError;

    fn try_from(message: pb::CreateRequestRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            account: message.account_id.try_into()?,
            on_behalf_of: (!message.on_behalf_of.is_empty()).then_some(message.on_behalf_of),
            reason: message.reason,
            ticket: message.ticket,
            statement: statement(message.statement),
        })
    }
}

impl TryFrom<pb::ListRequestsRequest> for RequestQuery {
    type Error = BrokerError;

    fn try_from(message: pb::ListRequestsRequest) -> Result<Self, BrokerError> {
        let StateFilter(state) = message.state.try_into()?;
        Ok(Self {
            state,
            account: account_filter(message.account_id)?,
            mine: message.mine,
            page_size: match message.page_size {
                0 => DEFAULT_PAGE,
                n => (n as usize).min(MAX_PAGE),
            },
            page_token: message.page_token,
            size_of: wire_size,
        })
    }
}

impl TryFrom<pb::WatchRequestsRequest> for WatchFilter {
    type Error = BrokerError;

    fn try_from(message: pb::WatchRequestsRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            account: account_filter(message.account_id)?,
        })
    }
}

impl TryFrom<pb::VerifyPinRequest> for PinAttempt {
    type Error = BrokerError;

    fn try_from(message: pb::VerifyPinRequest) -> Result<Self, BrokerError> {
        let pin = Pin::from_text(message.pin.trim());
        drop(message.pin);
        Ok(Self {
            request: message.request_id.try_into()?,
            pin,
            releases: message.releases,
        })
    }
}

impl TryFrom<pb::EnrollAccountRequest> for Enrollment {
    type Error = BrokerError;

    fn try_from(message: pb::EnrollAccountRequest) -> Result<Self, BrokerError> {
        use pb::enroll_account_request::Seed as Given;
        Ok(Self {
            account: message.account_id.try_into()?,
            seed: message.seed.map(|seed| match seed {
                Given::OtpauthUri(uri) => Seed::OtpauthUri(uri),
                Given::Base32Secret(secret) => Seed::Base32Secret(secret),
            }),
            algorithm: message.algorithm,
            digits: message.digits,
            period: message.period,
            issuer: message.issuer,
            label: message.label,
            replace: message.replace,
            action_id: action_id(message.action_id),
            min_seconds_left: message.min_seconds_left,
        })
    }
}

impl TryFrom<pb::RemoveAccountRequest> for Removal {
    type Error = BrokerError;

    fn try_from(message: pb::RemoveAccountRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            account: message.account_id.try_into()?,
            reason: message.reason,
            action_id: action_id(message.action_id),
        })
    }
}

impl TryFrom<pb::SetAccountEnabledRequest> for Toggle {
    type Error = BrokerError;

    fn try_from(message: pb::SetAccountEnabledRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            account: message.account_id.try_into()?,
            enabled: message.enabled,
            action_id: action_id(message.action_id),
        })
    }
}

impl TryFrom<pb::RestoreAccountRequest> for Restoration {
    type Error = BrokerError;

    fn try_from(message: pb::RestoreAccountRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            account: message.account_id.try_into()?,
            action_id: action_id(message.action_id),
        })
    }
}

impl TryFrom<pb::SignAdminActionRequest> for AdminSignature {
    type Error = BrokerError;

    fn try_from(message: pb::SignAdminActionRequest) -> Result<Self, BrokerError> {
        statement(message.statement).map(Self).ok_or_else(|| {
            BrokerError::invalid(
                "statement is required: your ADMIN_ACTION statement, signed with your SSH key",
            )
        })
    }
}

impl TryFrom<pb::ProposePolicyRequest> for PolicyProposal {
    type Error = BrokerError;

    fn try_from(message: pb::ProposePolicyRequest) -> Result<Self, BrokerError> {
        if message.document.trim().is_empty() {
            return Err(BrokerError::invalid(
                "document is required: the TOML text of the new policy version",
            ));
        }
        Ok(Self {
            document: message.document,
        })
    }
}

impl TryFrom<pb::SignPolicyRequest> for PolicySignature {
    type Error = BrokerError;

    fn try_from(message: pb::SignPolicyRequest) -> Result<Self, BrokerError> {
        if message.version == 0 {
            return Err(BrokerError::invalid("version is required"));
        }
        if message.signature.is_empty() {
            return Err(BrokerError::invalid(
                "signature is required: a detached sshsig signature over the proposal's document",
            ));
        }
        Ok(Self {
            version: message.version,
            signature: message.signature,
        })
    }
}

impl TryFrom<pb::ApplyPolicyRequest> for PolicyApply {
    type Error = BrokerError;

    fn try_from(message: pb::ApplyPolicyRequest) -> Result<Self, BrokerError> {
        if message.version == 0 {
            return Err(BrokerError::invalid("version is required"));
        }
        Ok(Self {
            version: message.version,
        })
    }
}

impl From<&Proposal> for pb::PolicyDocument {
    fn from(p: &Proposal) -> Self {
        Self {
            version: p.version,
            document: p.document.clone(),
            signatures: p.signatures.clone(),
            signed_by: p.signed_by.clone(),
            digest: p.digest().to_vec(),
            proposed_by: p.proposed_by.clone(),
            at: Some(timestamp(p.at_ms)),
        }
    }
}

/// An applied version as the broker API shows it.
fn applied_document(v: PolicyVersion) -> pb::PolicyDocument {
    pb::PolicyDocument {
        version: v.version,
        document: v.document,
        signatures: v.signatures,
        signed_by: v.signed_by,
        digest: v.digest,
        proposed_by: String::new(),
        at: v.applied_at,
    }
}

impl From<&AdminActionRecord> for pb::AdminActionProposal {
    fn from(a: &AdminActionRecord) -> Self {
        Self {
            action_id: a.action_id.clone(),
            account_id: a.account_id.clone(),
            action: a.action,
            signed_by: a.signed_by.clone(),
            needed: a.needed,
            statements: a.statements.iter().map(Into::into).collect(),
            created_at: Some(timestamp(a.created_ms)),
        }
    }
}

impl From<AccountChanged> for pb::SetAccountEnabledResponse {
    fn from(AccountChanged(account): AccountChanged) -> Self {
        Self {
            account: Some(account),
        }
    }
}

impl From<AccountChanged> for pb::RestoreAccountResponse {
    fn from(AccountChanged(account): AccountChanged) -> Self {
        Self {
            account: Some(account),
        }
    }
}

impl From<AdminActionSigned> for pb::SignAdminActionResponse {
    fn from(AdminActionSigned(action): AdminActionSigned) -> Self {
        Self {
            action: Some((&action).into()),
        }
    }
}

impl From<AdminActions> for pb::ListAdminActionsResponse {
    fn from(AdminActions(actions): AdminActions) -> Self {
        Self {
            actions: actions.iter().map(Into::into).collect(),
        }
    }
}

impl From<ProposalView> for pb::ProposePolicyResponse {
    fn from(ProposalView(p): ProposalView) -> Self {
        Self {
            proposal: Some((&p).into()),
        }
    }
}

impl From<ProposalView> for pb::SignPolicyResponse {
    fn from(ProposalView(p): ProposalView) -> Self {
        Self {
            proposal: Some((&p).into()),
        }
    }
}

impl From<Applied> for pb::ApplyPolicyResponse {
    fn from(Applied(v): Applied) -> Self {
        Self {
            policy: Some(applied_document(v)),
        }
    }
}

impl From<PolicyState> for pb::GetPolicyResponse {
    fn from(p: PolicyState) -> Self {
        Self {
            applied: p.applied.into_iter().map(applied_document).collect(),
            proposals: p.proposals.iter().map(Into::into).collect(),
        }
    }
}

impl From<Identity> for pb::WhoAmIResponse {
    fn from(who: Identity) -> Self {
        Self {
            identity: who.id.to_string(),
            name: who.name,
            accounts: who
                .accounts
                .into_iter()
                .map(|(account_id, roles)| pb::AccountRoles {
                    account_id,
                    roles: roles
                        .into_iter()
                        .map(|r| pb::Role::from(r) as i32)
                        .collect(),
                })
                .collect(),
            groups: who.groups,
            policy_version: who.policy_version,
        }
    }
}

impl From<RequestPage> for pb::ListRequestsResponse {
    fn from(page: RequestPage) -> Self {
        Self {
            requests: page.requests.iter().map(pb::Request::from).collect(),
            next_page_token: page.next_page_token,
        }
    }
}

impl From<Change> for pb::WatchRequestsResponse {
    fn from(change: Change) -> Self {
        Self {
            request: Some(change.request.as_ref().into()),
            action: change.action,
        }
    }
}

impl From<Released> for pb::ReleaseCodeResponse {
    fn from(released: Released) -> Self {
        Self {
            code: Some(released.code),
            request: Some((&released.request).into()),
        }
    }
}

impl From<ShownPin> for pb::ShowPinResponse {
    fn from(shown: ShownPin) -> Self {
        Self {
            pin: shown.pin.expose().to_owned(),
            expires_at: Some(timestamp(shown.expires_ms)),
            request: Some((&shown.request).into()),
        }
    }
}

impl From<Enrolled> for pb::EnrollAccountResponse {
    fn from(Enrolled(answer): Enrolled) -> Self {
        Self {
            account: answer.account,
            current: answer.current,
            next: answer.next,
            warnings: answer.warnings,
        }
    }
}

impl From<Accounts> for pb::ListAccountsResponse {
    fn from(Accounts(accounts): Accounts) -> Self {
        Self { accounts }
    }
}

impl From<Removed> for pb::RemoveAccountResponse {
    fn from(Removed(account_id): Removed) -> Self {
        Self { account_id }
    }
}

/// What a request message names, as sent (before any check).
pub trait Named {
    /// The request or account the message names.
    fn target(&self) -> Target;
}

macro_rules! target {
    ($m:ident, request) => {
        Target::Request($m.request_id.clone())
    };
    ($m:ident, account) => {
        Target::Account($m.account_id.clone())
    };
    ($m:ident, neither) => {
        Target::Nothing
    };
    ($m:ident, input) => {
        Target::Nothing
    };
}

/// A message as the domain takes it: what it names, and its input checked.
fn checked<M: Named, T: TryFrom<M, Error = BrokerError>>(message: M) -> Checked<T> {
    Checked {
        target: message.target(),
        input: T::try_from(message),
    }
}

/// One domain call: calls that name nothing take no input.
macro_rules! domain_call {
    ($broker:ident, $f:ident, $caller:ident, $message:ident, neither) => {{
        let _ = $message;
        $broker.$f($caller).await
    }};
    ($broker:ident, $f:ident, $caller:ident, $message:ident, $ids:ident) => {
        $broker.$f($caller, checked($message)).await
    };
}

/// From the RPC table: what each message names, and one function per unary
/// RPC that checks the message, calls the same-named [`Broker`] function and
/// makes its answer the response.
macro_rules! edge {
    (
        unary: [$(($name:ident, $f:ident, $req:ident, $resp:ident, $ids:ident)),* $(,)?],
        streaming: [$(($sname:ident, $sf:ident, $sreq:ident, $sresp:ident, $sids:ident)),* $(,)?] $(,)?
    ) => {
        $(impl Named for pb::$req {
            fn target(&self) -> Target {
                target!(self, $ids)
            }
        })*
        $(impl Named for pb::$sreq {
            fn target(&self) -> Target {
                target!(self, $sids)
            }
        })*
        $(
            #[doc = concat!("`", stringify!($name), "`: the message checked, [`Broker::", stringify!($f), "`], the answer as the response.")]
            pub async fn $f(
                broker: &Broker,
                caller: &SpiffeId,
                message: pb::$req,
            ) -> Result<pb::$resp, BrokerError> {
                domain_call!(broker, $f, caller, message, $ids).map(pb::$resp::from)
            }
        )*
    };
}

crate::rpc::broker_rpcs!(edge);

/// `WatchRequests`: the message checked, [`Broker::watch_requests`], each
/// change as a response.
pub fn watch_requests(
    broker: &Broker,
    caller: &SpiffeId,
    message: pb::WatchRequestsRequest,
) -> Result<impl Stream<Item = pb::WatchRequestsResponse> + Send + 'static, BrokerError> {
    Ok(broker
        .watch_requests(caller, checked(message))?
        .map(pb::WatchRequestsResponse::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_and_unknown_numbers_are_refused() {
        for raw in 1..=8 {
            let StateFilter(Some(state)) = StateFilter::try_from(raw).unwrap() else {
                panic!("{raw} is a state");
            };
            assert_eq!(pb::RequestState::from(state) as i32, raw);
        }
        assert_eq!(StateFilter::try_from(0).unwrap(), StateFilter(None));
        assert!(StateFilter::try_from(99).is_err());
    }

    fn refusal<T: std::fmt::Debug>(input: Result<T, BrokerError>) -> String {
        match input {
            Err(BrokerError::InvalidArgument(why)) => why,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn a_malformed_message_keeps_what_it_names_and_says_what_is_wrong() {
        let call: Checked<NewRequest> = checked(pb::CreateRequestRequest {
            account_id: "Not An Id".into(),
            ..Default::default()
        });
        assert_eq!(call.target, Target::Account("Not An Id".into()));
        assert_eq!(
            refusal(call.input),
            "account_id must be 1 to 64 characters of a-z, 0-9, '.', '_', '-' (9 given)"
        );
        let call: Checked<RequestId> = checked(pb::GetRequestRequest::default());
        assert_eq!(call.target, Target::Request(String::new()));
        assert_eq!(
            refusal(call.input),
            "request_id is required; list requests with `twokey request list`"
        );
        let call: Checked<Decision> = checked(pb::DenyRequestRequest {
            request_id: "a/b".into(),
            reason: "no".into(),
        });
        assert_eq!(
            refusal(call.input),
            "request_id \"a/b\" is malformed; request ids are UUIDs"
        );
        // The state is checked before the account, as it always was.
        let query = RequestQuery::try_from(pb::ListRequestsRequest {
            state: 99,
            account_id: "Not An Id".into(),
            ..Default::default()
        });
        assert_eq!(refusal(query), "state 99 is not a request state");
    }

    #[test]
    fn pages_default_and_are_capped_and_an_empty_account_is_no_filter() {
        let query = RequestQuery::try_from(pb::ListRequestsRequest::default()).unwrap();
        assert_eq!(
            (query.page_size, query.account, query.state),
            (DEFAULT_PAGE, None, None)
        );
        let query = RequestQuery::try_from(pb::ListRequestsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(query.page_size, MAX_PAGE);
        let call: Checked<WatchFilter> = checked(pb::WatchRequestsRequest {
            account_id: "aws-prod".into(),
        });
        assert_eq!(
            call.input.unwrap().account.as_ref().map(|a| a.as_str()),
            Some("aws-prod")
        );
    }
}
