//! Whole flows through the gRPC layer over mTLS: M-of-N approvals, release
//! with a checked grant, vault errors, intake, watching, accounts, and a
//! broker restart in the middle of a flow.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use tonic::Code;
use twokey_proto::broker::v1 as pb;

#[tokio::test]
async fn two_approvals_are_needed_when_the_policy_says_two() {
    let h = Harness::start().await;
    let id = file(&h, "alice", AUDIT).await;
    let r = request_of(approve(&h, "bob", &id).await);
    assert_eq!(state_of(&r), pb::RequestState::Pending);
    assert_eq!((r.approvals.len(), r.approvals_required), (1, 2));
    assert!(
        h.pins_in_mailbox("alice", &id).is_empty(),
        "no PIN before the threshold"
    );
    let r = request_of(approve(&h, "dave", &id).await);
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    let approvers: Vec<&str> = r.approvals.iter().map(|a| a.approver.as_str()).collect();
    assert_eq!(
        approvers,
        [
            "spiffe://twokey.local/user/bob",
            "spiffe://twokey.local/user/dave"
        ]
    );
    let pin = h.wait_for_pin("alice", &id, 1).await;
    assert_eq!(pin.len(), 10);
    // Approvers heard of the new request, the operators of the approval, the
    // channel of both; none of them got the PIN.
    h.wait_for_message("dave", &id, "request.created").await;
    h.wait_for_message("channel", &id, "request.created").await;
    h.wait_for_message("olivia", &id, "request.approved").await;
    let m = h.wait_for_message("channel", &id, "request.approved").await;
    assert!(m.get("pin").is_none());
    for who in ["bob", "dave", "olivia", "channel"] {
        assert!(
            h.messages(who, &id, "pin").is_empty(),
            "{who} got a PIN message"
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn the_full_flow_releases_a_code_under_a_checked_single_use_grant() {
    let (h, id) = Harness::with_verified_prod().await;
    let out = release(&h, "olivia", &id).await.unwrap().into_inner();
    assert_eq!(out.code.unwrap().code, FAKE_CODE);
    let r = out.request.unwrap();
    assert_eq!(state_of(&r), pb::RequestState::Released);
    assert_eq!(r.codes_released, 1);
    assert_eq!(r.operator, "spiffe://twokey.local/user/olivia");
    let grants = h.vault.grants.lock().unwrap().clone();
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!(g.request_id, id);
    assert_eq!(g.account_id, PROD);
    assert_eq!(g.requester, "spiffe://twokey.local/user/alice");
    assert_eq!(g.approvers, ["spiffe://twokey.local/user/bob"]);
    assert_eq!(g.operator, "spiffe://twokey.local/user/olivia");
    let actions: Vec<&str> = r.history.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "request.created",
            "request.approved",
            "pin.verified",
            "grant.issued",
            "code.released"
        ]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn vault_unavailable_reaches_the_caller_as_unavailable_and_refunds_the_quota() {
    let (h, id) = Harness::with_verified_prod().await;
    h.vault
        .audit_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, message) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("audit unavailable"), "{message}");
    let r = get(&h, "olivia", &id).await;
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    assert_eq!(r.codes_released, 0);
    assert_eq!(r.history.last().unwrap().action, "code.release_failed");
    h.vault
        .audit_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let out = release(&h, "olivia", &id).await.unwrap().into_inner();
    assert_eq!(out.code.unwrap().code, FAKE_CODE);
    h.shutdown().await;
}

#[tokio::test]
async fn with_requester_delivery_the_requester_releases() {
    let policy = POLICY.replacen("delivery = \"operator\"", "delivery = \"requester\"", 1);
    let h = Harness::start_with_policy(&policy).await;
    let id = verified_prod(&h).await;
    let (code, _) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::PermissionDenied);
    let out = release(&h, "alice", &id).await.unwrap().into_inner();
    assert_eq!(out.code.unwrap().code, FAKE_CODE);
    h.shutdown().await;
}

#[tokio::test]
async fn an_intake_service_files_on_a_requesters_behalf_only() {
    let h = Harness::start().await;
    let create = |on_behalf_of: &str| pb::CreateRequestRequest {
        account_id: PROD.into(),
        reason: "from the BPM".into(),
        ticket: "BPM-9".into(),
        on_behalf_of: on_behalf_of.into(),
        statement: None,
    };
    let (code, _) = code_of(h.client("bpm").create_request(create("")).await);
    assert_eq!(
        code,
        Code::InvalidArgument,
        "intake must name the requester"
    );
    let (code, _) = code_of(h.client("bpm").create_request(create("carol")).await);
    assert_eq!(code, Code::PermissionDenied, "carol is not a requester");
    let (code, _) = code_of(h.client("alice").create_request(create("rita")).await);
    assert_eq!(
        code,
        Code::PermissionDenied,
        "a requester is not an intake service"
    );
    let r = request_of(
        h.client("bpm")
            .create_request(create("spiffe://twokey.local/user/alice"))
            .await,
    );
    approve(&h, "bob", &r.request_id).await.unwrap();
    // The PIN goes to the requester, not to the intake service.
    h.wait_for_pin("alice", &r.request_id, 1).await;
    assert!(h.pins_in_mailbox("bpm", &r.request_id).is_empty());
    h.shutdown().await;
}

async fn next(s: &mut tonic::Streaming<pb::WatchRequestsResponse>) -> pb::WatchRequestsResponse {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("no change arrived")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn watchers_see_the_changes_they_may_see() {
    let h = Harness::start().await;
    let mut olivia = h
        .client("olivia")
        .watch_requests(pb::WatchRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut rita = h
        .client("rita")
        .watch_requests(pb::WatchRequestsRequest {
            account_id: PROD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (id, _) = approved_prod(&h).await;
    let first = next(&mut olivia).await;
    assert_eq!(
        (first.action.as_str(), first.request.unwrap().request_id),
        ("request.created", id.clone())
    );
    let second = next(&mut olivia).await;
    assert_eq!(second.action, "request.approved");
    assert_eq!(
        state_of(&second.request.unwrap()),
        pb::RequestState::Approved
    );
    // rita is an operator of PROD too, so she sees alice's request.
    assert_eq!(next(&mut rita).await.action, "request.created");
    let (code, _) = code_of(
        h.client("alice")
            .watch_requests(pb::WatchRequestsRequest {
                account_id: "nope".into(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    drop((olivia, rita));
    h.shutdown().await;
}

#[tokio::test]
async fn who_am_i_list_and_get_respect_roles() {
    let h = Harness::start().await;
    let me = h
        .client("bob")
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.identity, "spiffe://twokey.local/user/bob");
    assert_eq!(me.name, "bob");
    assert_eq!(me.groups, ["approvers", "operators"]);
    let prod = me.accounts.iter().find(|a| a.account_id == PROD).unwrap();
    assert_eq!(
        prod.roles,
        [pb::Role::Approver as i32, pb::Role::Operator as i32]
    );

    let a = file(&h, "alice", PROD).await;
    h.advance(Duration::from_secs(1));
    let b = file(&h, "rita", AUDIT).await;
    // Newest first, a page at a time.
    let page = h
        .client("olivia")
        .list_requests(pb::ListRequestsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.requests[0].request_id, b);
    let page = h
        .client("olivia")
        .list_requests(pb::ListRequestsRequest {
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.requests[0].request_id, a);
    assert!(page.next_page_token.is_empty());
    // A requester sees only their own requests.
    let mine = h
        .client("alice")
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.requests.len(), 1);
    let (code, _) = code_of(
        h.client("alice")
            .get_request(pb::GetRequestRequest {
                request_id: b.clone(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    // Expired requests show as such on every read, even before a sweep.
    h.advance(Duration::from_secs(3601));
    let expired = h
        .client("olivia")
        .list_requests(pb::ListRequestsRequest {
            state: pb::RequestState::Expired as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expired.requests.len(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn a_page_of_long_requests_stays_under_the_message_limit() {
    // 300 requests with the longest reason: ~300 KB, more than one gRPC
    // message may carry. Found by the end-to-end crash soak, where a page
    // of 1000 requests answered OUT_OF_RANGE "encoded message length too large".
    let h = Harness::start().await;
    let mut alice = h.client("alice");
    for _ in 0..300 {
        alice
            .create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: "r".repeat(1000),
                ticket: "OPS-1".into(),
                on_behalf_of: String::new(),
                statement: None,
            })
            .await
            .unwrap();
    }
    let mut olivia = h.client("olivia");
    let (mut seen, mut pages, mut token) = (std::collections::BTreeSet::new(), 0, String::new());
    loop {
        let page = olivia
            .list_requests(pb::ListRequestsRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("a page within the limit")
            .into_inner();
        pages += 1;
        assert!(!page.requests.is_empty());
        seen.extend(page.requests.into_iter().map(|r| r.request_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen.len(), 300);
    assert!(pages > 1, "one page carried every request");
    h.shutdown().await;
}

#[tokio::test]
async fn the_minimum_seconds_left_reach_the_vault_with_the_enrollment() {
    let h = Harness::start().await;
    h.client("adam")
        .enroll_account(pb::EnrollAccountRequest {
            account_id: PROD.into(),
            seed: Some(pb::enroll_account_request::Seed::Base32Secret(
                "JBSWY3DPEHPK3PXP".into(),
            )),
            min_seconds_left: 17,
            ..Default::default()
        })
        .await
        .expect("the admin enrolls");
    assert_eq!(*h.vault.min_seconds_left.lock().unwrap(), [17]);
    h.shutdown().await;
}

#[tokio::test]
async fn admins_enroll_list_and_remove_accounts_through_the_vault() {
    let h = Harness::start().await;
    let enroll = |account: &str| pb::EnrollAccountRequest {
        account_id: account.into(),
        seed: Some(pb::enroll_account_request::Seed::Base32Secret(
            "JBSWY3DPEHPK3PXP".into(),
        )),
        ..Default::default()
    };
    let (code, _) = code_of(h.client("bob").enroll_account(enroll(PROD)).await);
    assert_eq!(code, Code::PermissionDenied);
    let (code, _) = code_of(h.client("adam").enroll_account(enroll("aws-other")).await);
    assert_eq!(code, Code::NotFound);
    let out = h
        .client("adam")
        .enroll_account(enroll(PROD))
        .await
        .unwrap()
        .into_inner();
    // The vault saw the admin as the actor.
    assert_eq!(
        out.account.unwrap().issuer,
        "spiffe://twokey.local/user/adam"
    );
    assert_eq!(out.current.unwrap().code, FAKE_CODE);
    // Unset, the broker asks the vault for its default.
    assert_eq!(*h.vault.min_seconds_left.lock().unwrap(), [0]);

    let listed = h
        .client("alice")
        .list_accounts(pb::ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .accounts
        .iter()
        .map(|a| a.account_id.as_str())
        .collect();
    assert_eq!(ids, [PROD, AUDIT], "only accounts alice has a role on");

    let (code, _) = code_of(
        h.client("olivia")
            .remove_account(pb::RemoveAccountRequest {
                account_id: PROD.into(),
                reason: "gone".into(),
                action_id: String::new(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    let removed = h
        .client("adam")
        .remove_account(pb::RemoveAccountRequest {
            account_id: PROD.into(),
            reason: "account closed".into(),
            action_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.account_id, PROD);
    let grants = h.vault.grants.lock().unwrap().clone();
    assert_eq!(grants.len(), 1);
    assert_eq!(
        grants[0].purpose,
        twokey_proto::vault::v1::GrantPurpose::Remove as i32
    );
    assert_eq!(grants[0].operator, "spiffe://twokey.local/user/adam");
    h.shutdown().await;
}

#[tokio::test]
async fn a_restart_keeps_state_pin_attempts_and_quotas() {
    let mut h = Harness::start().await;
    let id = file(&h, "alice", AUDIT).await;
    approve(&h, "bob", &id).await.unwrap();

    h.restart_broker().await;
    let r = get(&h, "alice", &id).await;
    assert_eq!(state_of(&r), pb::RequestState::Pending);
    assert_eq!(r.approvals.len(), 1);
    let (code, _) = code_of(approve(&h, "bob", &id).await);
    assert_eq!(
        code,
        Code::PermissionDenied,
        "bob's approval survived the restart"
    );
    approve(&h, "dave", &id).await.unwrap();
    let pin = h.wait_for_pin("alice", &id, 1).await;
    let wrong = if pin == "0000000000" {
        "1111111111"
    } else {
        "0000000000"
    };
    for _ in 0..4 {
        let (code, _) = code_of(verify(&h, "olivia", &id, wrong).await);
        assert_eq!(code, Code::InvalidArgument);
    }

    h.restart_broker().await;
    assert_eq!(get(&h, "olivia", &id).await.pin_attempts, 4);
    // The fifth wrong PIN would lock it; the right one still works after the restart.
    verify(&h, "olivia", &id, &pin).await.unwrap();
    release(&h, "olivia", &id).await.unwrap();

    h.restart_broker().await;
    let r = get(&h, "olivia", &id).await;
    assert_eq!(
        (r.codes_released, state_of(&r)),
        (1, pb::RequestState::Verified)
    );
    release(&h, "olivia", &id).await.unwrap();
    let (code, _) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition);

    h.restart_broker().await;
    let r = get(&h, "olivia", &id).await;
    assert_eq!(
        (r.codes_released, state_of(&r)),
        (2, pb::RequestState::Released)
    );
    let (code, _) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(
        code,
        Code::FailedPrecondition,
        "the quota survived the restart"
    );
    assert_eq!(h.vault.grants.lock().unwrap().len(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn wrong_pins_count_toward_the_lock_across_a_restart() {
    let mut h = Harness::start().await;
    let (id, pin) = approved_prod(&h).await;
    let wrong = if pin == "000000" { "111111" } else { "000000" };
    for _ in 0..2 {
        code_of(verify(&h, "olivia", &id, wrong).await);
    }
    h.restart_broker().await;
    let (code, message) = code_of(verify(&h, "olivia", &id, wrong).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert_eq!(
        state_of(&get(&h, "olivia", &id).await),
        pb::RequestState::Locked
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_sweeper_expires_requests_nobody_reads() {
    let mut h = Harness::start().await;
    h.stop_broker().await;
    h.config.sweep_interval = Duration::from_millis(20);
    h.start_broker().await;
    let mut olivia = h
        .client("olivia")
        .watch_requests(pb::WatchRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let id = file(&h, "alice", PROD).await;
    assert_eq!(next(&mut olivia).await.action, "request.created");
    h.advance(Duration::from_secs(3601));
    let change = next(&mut olivia).await;
    assert_eq!(change.action, "request.expired");
    let r = change.request.unwrap();
    assert_eq!(
        (r.request_id.as_str(), state_of(&r)),
        (id.as_str(), pb::RequestState::Expired)
    );
    assert_eq!(r.history.last().unwrap().actor, "broker");
    drop(olivia);
    h.shutdown().await;
}

#[tokio::test]
async fn every_state_change_is_a_signed_audit_event_in_the_outbox() {
    let mut h = Harness::start().await;
    let id = verified_prod(&h).await;
    // A refused attempt is evidence too.
    let (code, _) = code_of(release(&h, "alice", &id).await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    release(&h, "olivia", &id).await.unwrap();
    h.stop_broker().await;

    // Every stored event verifies, in sequence with no gap (the harness checks).
    let events = h.stored_events();
    let actions: Vec<&str> = events
        .iter()
        .filter(|e| e.request_id == id)
        .map(|e| e.action.as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "request.created",
            "request.approved",
            "pin.issued",
            "pin.verified",
            "access.denied",
            "grant.issued",
            "code.released"
        ]
    );
    for e in &events {
        assert_eq!(
            e.source, "spiffe://twokey.local/svc/broker",
            "the source is the broker's certificate identity"
        );
        assert!(
            !format!("{e:?}").contains(FAKE_CODE),
            "a code reached the audit log"
        );
    }
    let denied = events.iter().find(|e| e.action == "access.denied").unwrap();
    assert_eq!(denied.actor, "spiffe://twokey.local/user/alice");
    assert_eq!(denied.account_id, PROD);
    assert_eq!(denied.attributes["attempted"], "release_code");
    assert_eq!(
        denied.outcome,
        twokey_proto::audit::v1::Outcome::Denied as i32
    );
    let created = &events[0];
    assert_eq!(created.actor, "spiffe://twokey.local/user/alice");
    assert_eq!(created.account_id, PROD);
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_open_watch_streams() {
    let mut h = Harness::start().await;
    let mut olivia = h
        .client("olivia")
        .watch_requests(pb::WatchRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    file(&h, "alice", PROD).await;
    assert_eq!(next(&mut olivia).await.action, "request.created");
    tokio::time::timeout(Duration::from_secs(20), h.stop_broker())
        .await
        .expect("the broker waited for a watcher to hang up");
    let end = tokio::time::timeout(Duration::from_secs(10), olivia.next())
        .await
        .expect("the stream did not end");
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
    h.shutdown().await;
}
