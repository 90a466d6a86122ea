//! Who gets what message when a request changes: the PIN to the requester
//! alone, and to them alone the word that it is no longer live; news to the
//! people who must act next and to the channel.

use twokey_runtime::SpiffeId;

use super::{Message, PIN_VOID, Recipient};
use crate::{
    pin::Pin,
    policy::{Policy, Role},
    state::{RequestRecord, State},
};

/// Whether `action` ends the life of the request's PIN, if it ever had one:
/// verified, or the request locked, closed or expired after approval.
fn ends_pin(record: &RequestRecord, action: &str) -> bool {
    matches!(
        action,
        "pin.verified"
            | "request.locked"
            | "request.denied"
            | "request.cancelled"
            | "request.expired"
    ) && record.history.iter().any(|h| h.state == State::Approved)
}

fn person(policy: &Policy, id: &SpiffeId) -> Recipient {
    Recipient::Person {
        name: policy
            .name_of(id)
            .map_or_else(|| id.name().to_owned(), ToOwned::to_owned),
        identity: id.to_string(),
        slack: policy.slack_member(id).map(ToOwned::to_owned),
    }
}

/// The messages a change sends: the PIN to the requester alone; news to the
/// people who must act next and to the channel.
pub fn messages_for(
    policy: &Policy,
    record: &RequestRecord,
    action: &str,
    pin: Option<&Pin>,
    now_ms: u64,
) -> Vec<Message> {
    let account = policy.account(&record.account_id);
    let make = |kind: &str, to: Recipient, text: String, pin: Option<Pin>| Message {
        id: uuid::Uuid::new_v4().to_string(),
        kind: kind.to_owned(),
        request_id: record.id.clone(),
        account_id: record.account_id.clone(),
        to,
        text,
        pin,
        at_ms: now_ms,
    };
    let who = |id: &SpiffeId| {
        policy
            .name_of(id)
            .map_or_else(|| id.to_string(), ToOwned::to_owned)
    };
    let subject = format!(
        "request {} for {} by {}",
        record.id,
        record.account_id,
        who(&record.requester)
    );
    let mut out = Vec::new();
    if let Some(pin) = pin {
        out.push(make(
            "pin",
            person(policy, &record.requester),
            format!(
                "A PIN was issued for your {subject}. Read it out only to the operator on the call."
            ),
            Some(pin.clone()),
        ));
    }
    if ends_pin(record, action) {
        out.push(make(
            PIN_VOID,
            person(policy, &record.requester),
            format!("The PIN of your {subject} is no longer needed."),
            None,
        ));
    }
    let role_members = |role: Role| -> Vec<SpiffeId> {
        account
            .map(|a| match role {
                Role::Approver => a.approvers.iter().cloned().collect(),
                Role::Operator => a.operators.iter().cloned().collect(),
                _ => Vec::new(),
            })
            .unwrap_or_default()
    };
    let (people, channel, text): (Vec<SpiffeId>, bool, String) = match action {
        "request.created" => (
            role_members(Role::Approver)
                .into_iter()
                .filter(|id| id != &record.requester)
                .collect(),
            true,
            format!("New {subject}: {}", record.reason),
        ),
        "request.approved" if record.state == State::Approved => (
            role_members(Role::Operator)
                .into_iter()
                .filter(|id| {
                    id != &record.requester && !record.approvals.iter().any(|a| &a.approver == id)
                })
                .chain([record.requester.clone()])
                .collect(),
            true,
            format!("Approved: {subject}; waiting for the operator to check the PIN"),
        ),
        "request.denied" => (
            vec![record.requester.clone()],
            true,
            format!("Denied: {subject}"),
        ),
        "request.cancelled" => (
            vec![record.requester.clone()],
            false,
            format!("Cancelled: {subject}"),
        ),
        "request.expired" => (
            vec![record.requester.clone()],
            false,
            format!("Expired: {subject}"),
        ),
        "request.locked" => (
            vec![record.requester.clone()],
            false,
            format!("Locked after too many wrong PINs: {subject}"),
        ),
        "code.released" => (
            vec![record.requester.clone()],
            true,
            format!(
                "Code released ({}/{}): {subject}",
                record.codes_released, record.codes_allowed
            ),
        ),
        _ => (Vec::new(), false, String::new()),
    };
    for id in people {
        out.push(make(action, person(policy, &id), text.clone(), None));
    }
    if channel {
        out.push(make(action, Recipient::Channel, text, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::UNIX_EPOCH};

    use super::*;

    const POLICY: &str = r#"
[identities]
alice = "spiffe://t.local/user/alice"
bob = "spiffe://t.local/user/bob"
olivia = "spiffe://t.local/user/olivia"
[accounts.acct]
requesters = ["alice"]
approvers = ["bob"]
operators = ["olivia"]
approvals_required = 1
"#;

    fn voids(policy: &Policy, record: &RequestRecord, action: &str) -> Vec<Message> {
        messages_for(policy, record, action, None, 1)
            .into_iter()
            .filter(|m| m.kind == PIN_VOID)
            .collect()
    }

    #[test]
    fn the_end_of_a_pin_goes_to_the_requester_alone_and_only_after_one_was_issued() {
        let policy = Policy::parse(POLICY, Path::new("policy.toml")).unwrap();
        let account = policy.account("acct").unwrap();
        let alice = policy.resolve("alice").unwrap();
        let (mut record, _) =
            RequestRecord::create("r1".into(), account, &alice, None, "why", "", UNIX_EPOCH)
                .unwrap();
        // Cancelled while pending: no PIN was ever issued.
        let mut pending = record.clone();
        pending.cancel(&alice, "", UNIX_EPOCH).unwrap();
        assert!(voids(&policy, &pending, "request.cancelled").is_empty());
        let key = crate::pin::PinKey::new(twokey_runtime::keys::SecretKey::from_bytes([1; 32]));
        let bob = policy.resolve("bob").unwrap();
        record
            .approve(account, &bob, "ok", &key, UNIX_EPOCH)
            .unwrap();
        for action in [
            "pin.verified",
            "request.locked",
            "request.denied",
            "request.cancelled",
            "request.expired",
        ] {
            let out = voids(&policy, &record, action);
            assert_eq!(out.len(), 1, "{action}");
            assert!(out[0].pin.is_none());
            assert_eq!(
                out[0].to,
                Recipient::Person {
                    name: "alice".into(),
                    identity: alice.to_string(),
                    slack: None,
                },
                "{action}"
            );
        }
        for action in [
            "request.approved",
            "pin.resent",
            "pin.failed",
            "code.released",
        ] {
            assert!(voids(&policy, &record, action).is_empty(), "{action}");
        }
    }
}
