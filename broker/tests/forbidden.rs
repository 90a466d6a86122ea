//! Every forbidden action, each its own test, through the real gRPC layer
//! over mTLS, asserting the exact status code.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use twokey_proto::broker::v1 as pb;

#[tokio::test]
async fn requester_cannot_approve_own_request() {
    // alice is made an approver too, so only separation of duties stops her.
    let policy = POLICY.replace(
        "approvers = [\"bob\", \"dave\"]",
        "approvers = [\"bob\", \"dave\", \"alice\"]",
    );
    let h = Harness::start_with_policy(&policy).await;
    let id = file(&h, "alice", PROD).await;
    let (code, message) = code_of(approve(&h, "alice", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("own request"), "{message}");
    h.shutdown().await;
}

#[tokio::test]
async fn a_requester_without_the_approver_role_is_told_it_is_her_own_request() {
    // alice is only a requester: the refusal names the real reason, not a
    // role she never had ("is an intake service").
    let h = Harness::start().await;
    let id = file(&h, "alice", PROD).await;
    let (code, message) = code_of(approve(&h, "alice", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("is the requester of request") && message.contains("own request"),
        "{message}"
    );
    assert!(!message.contains("intake"), "{message}");
    h.shutdown().await;
}

#[tokio::test]
async fn approver_cannot_approve_twice() {
    let h = Harness::start().await;
    let id = file(&h, "alice", AUDIT).await;
    approve(&h, "bob", &id).await.unwrap();
    let (code, message) = code_of(approve(&h, "bob", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("already approved"), "{message}");
    assert!(
        message.contains("2 approvals from different people"),
        "{message}"
    );
    assert_eq!(
        state_of(&get(&h, "alice", &id).await),
        pb::RequestState::Pending
    );
    h.shutdown().await;
}

#[tokio::test]
async fn operator_cannot_be_the_requester() {
    let h = Harness::start().await;
    // rita is both a requester and an operator.
    let id = file(&h, "rita", PROD).await;
    approve(&h, "bob", &id).await.unwrap();
    let pin = h.wait_for_pin("rita", &id, 1).await;
    let (code, message) = code_of(verify(&h, "rita", &id, &pin).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("requester"), "{message}");
    h.shutdown().await;
}

#[tokio::test]
async fn operator_cannot_be_an_approver_of_the_request() {
    let h = Harness::start().await;
    // bob is both an approver and an operator.
    let (id, pin) = approved_prod(&h).await;
    let (code, message) = code_of(verify(&h, "bob", &id, &pin).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("approved"), "{message}");
    h.shutdown().await;
}

#[tokio::test]
async fn intake_service_cannot_approve() {
    let h = Harness::start().await;
    let r = request_of(
        h.client("bpm")
            .create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: "ticket OPS-7".into(),
                ticket: "OPS-7".into(),
                on_behalf_of: "alice".into(),
                statement: None,
            })
            .await,
    );
    assert_eq!(r.requester, "spiffe://twokey.local/user/alice");
    assert_eq!(r.filed_by, "spiffe://twokey.local/svc/bpm");
    let (code, message) = code_of(approve(&h, "bpm", &r.request_id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("intake"), "{message}");
    h.shutdown().await;
}

#[tokio::test]
async fn release_before_the_pin_check_fails_precondition() {
    let h = Harness::start().await;
    let (id, _pin) = approved_prod(&h).await;
    let (code, message) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("APPROVED"), "{message}");
    assert!(
        h.vault.grants.lock().unwrap().is_empty(),
        "a grant went to the vault"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn release_after_the_window_fails_precondition() {
    let (h, id) = Harness::with_verified_prod().await;
    h.advance(Duration::from_secs(15 * 60 + 1));
    let (code, message) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("expired"), "{message}");
    assert_eq!(
        state_of(&get(&h, "olivia", &id).await),
        pb::RequestState::Expired
    );
    assert!(h.vault.grants.lock().unwrap().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn a_second_release_past_the_quota_fails_precondition() {
    let (h, id) = Harness::with_verified_prod().await;
    let first = release(&h, "olivia", &id).await.unwrap().into_inner();
    assert_eq!(first.code.unwrap().code, FAKE_CODE);
    assert_eq!(
        state_of(&first.request.unwrap()),
        pb::RequestState::Released
    );
    let (code, message) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert_eq!(h.vault.grants.lock().unwrap().len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn wrong_pins_lock_the_request_and_then_even_the_right_pin_fails() {
    let h = Harness::start().await;
    let (id, pin) = approved_prod(&h).await;
    let wrong = if pin == "000000" { "111111" } else { "000000" };
    for attempt in 1..3 {
        let (code, message) = code_of(verify(&h, "olivia", &id, wrong).await);
        assert_eq!(code, Code::InvalidArgument, "{message}");
        let left = match 3 - attempt {
            1 => "1 try left".to_owned(),
            n => format!("{n} tries left"),
        };
        assert!(message.contains(&left), "{message}");
    }
    let (code, message) = code_of(verify(&h, "olivia", &id, wrong).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("LOCKED"), "{message}");
    let r = get(&h, "olivia", &id).await;
    assert_eq!(state_of(&r), pb::RequestState::Locked);
    assert_eq!(r.pin_attempts, 3);
    let (code, _) = code_of(verify(&h, "olivia", &id, &pin).await);
    assert_eq!(code, Code::FailedPrecondition);
    let (code, _) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition);
    h.shutdown().await;
}

#[tokio::test]
async fn a_pin_that_cannot_be_one_is_refused_without_spending_an_attempt() {
    let h = Harness::start().await;
    let (id, pin) = approved_prod(&h).await;
    let before = get(&h, "olivia", &id).await;
    let short = &pin[..pin.len() - 1];
    let long = format!("{pin}0");
    for typo in ["abc", "12a456", short, long.as_str()] {
        let (code, message) = code_of(verify(&h, "olivia", &id, typo).await);
        assert_eq!(code, Code::InvalidArgument, "{typo}: {message}");
        assert!(message.contains("no attempt was counted"), "{message}");
        let without_id = message.replace(id.as_str(), "");
        assert!(!without_id.contains(typo), "the typo is echoed: {message}");
    }
    let r = get(&h, "olivia", &id).await;
    assert_eq!(r.pin_attempts, 0, "a typo spent an attempt");
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    assert_eq!(r, before, "a typo changed the request");
    let r = request_of(verify(&h, "olivia", &id, &pin).await);
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    h.shutdown().await;
}

#[tokio::test]
async fn the_old_pin_fails_after_a_resend() {
    let h = Harness::start().await;
    let (id, old) = approved_prod(&h).await;
    h.client("alice")
        .resend_pin(pb::ResendPinRequest {
            request_id: id.clone(),
        })
        .await
        .unwrap();
    let new = h.wait_for_pin("alice", &id, 2).await;
    if new != old {
        let (code, message) = code_of(verify(&h, "olivia", &id, &old).await);
        assert_eq!(code, Code::InvalidArgument, "{message}");
    }
    let r = request_of(verify(&h, "olivia", &id, &new).await);
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    h.shutdown().await;
}

#[tokio::test]
async fn only_the_requester_may_resend_and_only_three_times() {
    let h = Harness::start().await;
    let (id, _) = approved_prod(&h).await;
    let (code, _) = code_of(
        h.client("olivia")
            .resend_pin(pb::ResendPinRequest {
                request_id: id.clone(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    for _ in 0..3 {
        h.client("alice")
            .resend_pin(pb::ResendPinRequest {
                request_id: id.clone(),
            })
            .await
            .unwrap();
    }
    let (code, message) = code_of(
        h.client("alice")
            .resend_pin(pb::ResendPinRequest {
                request_id: id.clone(),
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    h.shutdown().await;
}

#[tokio::test]
async fn an_expired_request_cannot_be_approved() {
    let h = Harness::start().await;
    let id = file(&h, "alice", PROD).await;
    h.advance(Duration::from_secs(3601));
    let (code, message) = code_of(approve(&h, "bob", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("expired"), "{message}");
    let r = get(&h, "alice", &id).await;
    assert_eq!(state_of(&r), pb::RequestState::Expired);
    assert_eq!(r.history.last().unwrap().action, "request.expired");
    h.shutdown().await;
}

#[tokio::test]
async fn an_unknown_account_is_not_found() {
    let h = Harness::start().await;
    let (code, message) = code_of(
        h.client("alice")
            .create_request(pb::CreateRequestRequest {
                account_id: "aws-nope".into(),
                reason: "x".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::NotFound, "{message}");
    assert!(
        message.contains("aws-prod-root"),
        "the message lists the known accounts: {message}"
    );
    let (code, _) = code_of(approve(&h, "bob", "00000000-0000-0000-0000-000000000000").await);
    assert_eq!(code, Code::NotFound);
    h.shutdown().await;
}

#[tokio::test]
async fn a_caller_with_no_role_is_denied() {
    let h = Harness::start().await;
    let (code, message) = code_of(
        h.client("carol")
            .create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: "x".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("spiffe://twokey.local/user/carol is not a requester for aws-prod-root"),
        "{message}"
    );
    let id = file(&h, "alice", PROD).await;
    let (code, message) = code_of(approve(&h, "carol", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("not an approver for aws-prod-root"),
        "{message}"
    );
    // Not in the policy at all.
    let (code, message) = code_of(approve(&h, "mallory", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("not named in the broker policy"),
        "{message}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_caller_without_a_certificate_is_unauthenticated() {
    let h = Harness::start().await;
    let (code, message) = code_of(h.anonymous_client().who_am_i(pb::WhoAmIRequest {}).await);
    assert_eq!(code, Code::Unauthenticated, "{message}");
    let (code, _) = code_of(
        h.anonymous_client()
            .create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: "x".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::Unauthenticated);
    h.shutdown().await;
}

#[tokio::test]
async fn only_the_verifying_operator_releases_with_operator_delivery() {
    let (h, id) = Harness::with_verified_prod().await;
    let (code, _) = code_of(release(&h, "alice", &id).await);
    assert_eq!(code, Code::PermissionDenied);
    let (code, message) = code_of(release(&h, "rita", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    release(&h, "olivia", &id).await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn cancel_and_deny_are_final() {
    let h = Harness::start().await;
    let id = file(&h, "alice", PROD).await;
    let (code, _) = code_of(
        h.client("bob")
            .cancel_request(pb::CancelRequestRequest {
                request_id: id.clone(),
                reason: String::new(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "only the requester cancels");
    let r = request_of(
        h.client("alice")
            .cancel_request(pb::CancelRequestRequest {
                request_id: id.clone(),
                reason: "not needed".into(),
            })
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Cancelled);
    let (code, _) = code_of(approve(&h, "bob", &id).await);
    assert_eq!(code, Code::FailedPrecondition);

    let id = file(&h, "alice", PROD).await;
    let (code, _) = code_of(
        h.client("bob")
            .deny_request(pb::DenyRequestRequest {
                request_id: id.clone(),
                reason: String::new(),
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "a denial needs a reason");
    let r = request_of(
        h.client("bob")
            .deny_request(pb::DenyRequestRequest {
                request_id: id.clone(),
                reason: "no change window".into(),
            })
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Denied);
    let (code, _) = code_of(approve(&h, "dave", &id).await);
    assert_eq!(code, Code::FailedPrecondition);
    h.shutdown().await;
}
