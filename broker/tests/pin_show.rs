//! `ShowPin`: the request's requester, and no one else, sees the live PIN
//! through their own mTLS identity; each view is a `pin.viewed` event; a
//! request without a live PIN says what to do. A PIN no longer live leaves
//! the mailbox.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use twokey_proto::broker::v1 as pb;

fn viewed(h: &Harness, id: &str) -> Vec<twokey_proto::audit::v1::Event> {
    h.stored_events()
        .into_iter()
        .filter(|e| e.request_id == id && e.action == "pin.viewed")
        .collect()
}

#[tokio::test]
async fn the_requester_sees_the_live_pin_and_each_view_is_audited() {
    let mut h = Harness::start().await;
    let (id, pin) = approved_prod(&h).await;
    let before = get(&h, "alice", &id).await;
    for _ in 0..2 {
        let shown = show_pin(&h, "alice", &id).await.unwrap().into_inner();
        assert_eq!(shown.pin, pin);
        assert_eq!(shown.expires_at, before.expires_at);
        let r = shown.request.unwrap();
        assert_eq!(state_of(&r), pb::RequestState::Approved);
        assert_eq!(r.pin_length, 6);
        assert!(!format!("{:?}", show_pin(&h, "alice", &id).await).contains(&pin));
    }
    // A view changes nothing on the request.
    assert_eq!(get(&h, "alice", &id).await, before);
    // After a resend, the new PIN is the one shown.
    h.client("alice")
        .resend_pin(pb::ResendPinRequest {
            request_id: id.clone(),
        })
        .await
        .unwrap();
    let new = h.wait_for_pin("alice", &id, 2).await;
    assert_eq!(
        show_pin(&h, "alice", &id).await.unwrap().into_inner().pin,
        new
    );
    // The shown PIN is the one that verifies.
    request_of(verify(&h, "olivia", &id, &new).await);
    h.stop_broker().await;
    let events = viewed(&h, &id);
    assert_eq!(events.len(), 5);
    for e in &events {
        assert_eq!(e.actor, "spiffe://twokey.local/user/alice");
        assert_eq!(e.account_id, PROD);
        assert_eq!(e.outcome, twokey_proto::audit::v1::Outcome::Success as i32);
        assert!(!format!("{e:?}").contains(&pin) && !format!("{e:?}").contains(&new));
    }
    h.shutdown().await;
}

#[tokio::test]
async fn anyone_but_the_requester_is_denied_and_nothing_changes() {
    let mut h = Harness::start().await;
    let (id, pin) = approved_prod(&h).await;
    let before = get(&h, "alice", &id).await;
    // The operator, the approver, another requester, an admin, and an
    // identity the policy does not name.
    for who in ["olivia", "bob", "rita", "adam", "mallory"] {
        let (code, message) = code_of(show_pin(&h, who, &id).await);
        assert_eq!(code, Code::PermissionDenied, "{who}: {message}");
        assert!(!message.contains(&pin), "{message}");
        if who != "mallory" {
            assert!(
                message.contains("only the requester may see its PIN"),
                "{message}"
            );
        }
    }
    assert_eq!(get(&h, "alice", &id).await, before);
    assert_eq!(h.pins_in_mailbox("alice", &id), std::slice::from_ref(&pin));
    h.stop_broker().await;
    assert!(viewed(&h, &id).is_empty());
    let denied: Vec<_> = h
        .stored_events()
        .into_iter()
        .filter(|e| e.action == "access.denied" && e.request_id == id)
        .collect();
    assert_eq!(denied.len(), 4, "the named callers' refusals are recorded");
    for e in &denied {
        assert_eq!(e.attributes["attempted"], "show_pin");
        assert!(!format!("{e:?}").contains(&pin));
    }
    h.shutdown().await;
}

/// The FAILED_PRECONDITION of ShowPin for alice on `id`, checked to say
/// `says`; the request and the events are unchanged by it.
async fn no_live_pin(h: &Harness, id: &str, says: &str) {
    let before = get(h, "alice", id).await;
    let (code, message) = code_of(show_pin(h, "alice", id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains(says), "{message}");
    assert_eq!(get(h, "alice", id).await, before);
}

#[tokio::test]
async fn a_request_without_a_live_pin_is_a_failed_precondition_saying_what_to_do() {
    let mut h = Harness::start().await;
    let pending = file(&h, "alice", PROD).await;
    no_live_pin(&h, &pending, "still needs approvals").await;

    let verified = verified_prod(&h).await;
    no_live_pin(&h, &verified, "already verified").await;

    let (locked, pin) = approved_prod(&h).await;
    let wrong = if pin == "000000" { "111111" } else { "000000" };
    for _ in 0..3 {
        let _ = verify(&h, "olivia", &locked, wrong).await;
    }
    no_live_pin(&h, &locked, "it is LOCKED; file a new request").await;

    let (cancelled, _) = approved_prod(&h).await;
    h.client("alice")
        .cancel_request(pb::CancelRequestRequest {
            request_id: cancelled.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    no_live_pin(&h, &cancelled, "it is CANCELLED; file a new request").await;

    let (denied, _) = approved_prod(&h).await;
    h.client("dave")
        .deny_request(pb::DenyRequestRequest {
            request_id: denied.clone(),
            reason: "not now".into(),
        })
        .await
        .unwrap();
    no_live_pin(&h, &denied, "it is DENIED; file a new request").await;

    // Its time runs out: the view expires it (stored) and says so.
    let (expired, _) = approved_prod(&h).await;
    h.advance(Duration::from_secs(16 * 60));
    let (code, message) = code_of(show_pin(&h, "alice", &expired).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("expired at"), "{message}");
    assert!(message.contains("file a new request"), "{message}");
    assert_eq!(
        state_of(&get(&h, "alice", &expired).await),
        pb::RequestState::Expired
    );
    no_live_pin(&h, &expired, "file a new request").await;

    let (code, _) = code_of(show_pin(&h, "alice", "00000000-0000-0000-0000-000000000000").await);
    assert_eq!(code, Code::NotFound);
    let (code, _) = code_of(show_pin(&h, "alice", "../x").await);
    assert_eq!(code, Code::InvalidArgument);

    h.stop_broker().await;
    let events = h.stored_events();
    assert!(
        !events.iter().any(|e| e.action == "pin.viewed"),
        "a refused view was recorded as a view"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_pin_leaves_the_mailbox_once_it_is_no_longer_live() {
    let h = Harness::start().await;
    // Verified.
    let (verified, pin) = approved_prod(&h).await;
    request_of(verify(&h, "olivia", &verified, &pin).await);
    h.wait_for_pins_gone("alice", &verified).await;
    // The line stays (a PIN was issued); its digits go.
    let lines = h.messages("alice", &verified, "pin");
    assert_eq!(lines.len(), 1);
    assert!(lines[0].get("pin").is_none(), "{}", lines[0]);
    // Locked.
    let (locked, pin) = approved_prod(&h).await;
    let wrong = if pin == "000000" { "111111" } else { "000000" };
    for _ in 0..3 {
        let _ = verify(&h, "olivia", &locked, wrong).await;
    }
    h.wait_for_pins_gone("alice", &locked).await;
    // Cancelled, with a resent PIN: both go.
    let (cancelled, _) = approved_prod(&h).await;
    h.client("alice")
        .resend_pin(pb::ResendPinRequest {
            request_id: cancelled.clone(),
        })
        .await
        .unwrap();
    h.wait_for_pin("alice", &cancelled, 2).await;
    h.client("alice")
        .cancel_request(pb::CancelRequestRequest {
            request_id: cancelled.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    h.wait_for_pins_gone("alice", &cancelled).await;
    // Expired, by the sweeper or by anyone looking.
    let (expired, _) = approved_prod(&h).await;
    let (live, live_pin) = approved_prod(&h).await;
    h.advance(Duration::from_secs(16 * 60));
    let r = get(&h, "olivia", &expired).await;
    assert_eq!(state_of(&r), pb::RequestState::Expired);
    h.wait_for_pins_gone("alice", &expired).await;
    // Another request's PIN is untouched until its own end.
    assert_eq!(h.pins_in_mailbox("alice", &live), [live_pin]);
    h.shutdown().await;
}
