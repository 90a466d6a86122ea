//! Proto ↔ domain conversion at the edge, beside `grpc` and `http`: the
//! request record, its state and roles as the API shows them, and the API's
//! inputs checked into domain types with `TryFrom`.

use twokey_proto::{Timestamp, broker::v1 as pb};

use crate::{
    error::BrokerError,
    policy::{Delivery, Role},
    state::{RequestRecord, State},
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
        }
    }
}

/// The API's view of a request, wrapped as responses carry it.
pub fn request(record: &RequestRecord) -> Option<pb::Request> {
    Some(record.into())
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
}
