//! Refusals cannot flood the log (issue 15, item 6): a certificate the
//! policy does not name is refused exactly as before, but its refusals are
//! written as one `access.denied` event per identity per minute with their
//! count; people in the policy keep one event per refusal.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use twokey_proto::{audit::v1::Event, audit::v1::Outcome, broker::v1 as pb};

const MALLORY: &str = "spiffe://twokey.local/user/mallory";
/// A valid certificate from the CA for a service the policy does not name.
const STRAY_SERVICE: &str = "spiffe://twokey.local/svc/vault";

fn not_in_policy(id: &str) -> String {
    format!("permission denied: {id} is not named in the broker policy; ask an admin to add it")
}

/// The audited call names, in the order a flood cycles through them.
const CALLS: [&str; 8] = [
    "create_request",
    "approve",
    "deny",
    "cancel",
    "verify_pin",
    "resend_pin",
    "remove_account",
    "release_code",
];

/// Makes the audited call `CALLS[i % 8]` as `user` on request `id`;
/// returns the refusal's code and message (panics if it succeeds).
async fn refused_call(h: &Harness, user: &str, id: &str, i: usize) -> (Code, String) {
    let mut c = h.client(user);
    let request_id = id.to_owned();
    match CALLS[i % CALLS.len()] {
        "create_request" => code_of(
            c.create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: "flood".into(),
                ticket: String::new(),
                on_behalf_of: String::new(),
                statement: None,
            })
            .await,
        ),
        "approve" => code_of(
            c.approve_request(pb::ApproveRequestRequest {
                request_id,
                comment: String::new(),
                statement: None,
            })
            .await,
        ),
        "deny" => code_of(
            c.deny_request(pb::DenyRequestRequest {
                request_id,
                reason: String::new(),
            })
            .await,
        ),
        "cancel" => code_of(
            c.cancel_request(pb::CancelRequestRequest {
                request_id,
                reason: String::new(),
            })
            .await,
        ),
        "verify_pin" => code_of(
            c.verify_pin(pb::VerifyPinRequest {
                request_id,
                pin: "000000".into(),
                releases: vec![],
            })
            .await,
        ),
        "resend_pin" => code_of(c.resend_pin(pb::ResendPinRequest { request_id }).await),
        "remove_account" => code_of(
            c.remove_account(pb::RemoveAccountRequest {
                account_id: PROD.into(),
                reason: "flood".into(),
                action_id: String::new(),
            })
            .await,
        ),
        "release_code" => code_of(
            c.release_code(pb::ReleaseCodeRequest {
                request_id,
                statement: None,
            })
            .await,
        ),
        other => unreachable!("{other}"),
    }
}

/// `n` refused calls by `user`, calls `CALLS[from..]` cyclically; each must
/// be refused exactly as `expected`.
async fn flood(
    h: &Harness,
    user: &str,
    id: &str,
    from: usize,
    n: usize,
    expected: &(Code, String),
) {
    for i in from..from + n {
        let got = refused_call(h, user, id, i).await;
        assert_eq!(
            &got,
            expected,
            "call {i} ({}) by {user}",
            CALLS[i % CALLS.len()]
        );
    }
}

fn denied_by<'a>(events: &'a [Event], actor: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.action == "access.denied" && e.actor == actor)
        .collect()
}

fn count_of(e: &Event) -> u64 {
    e.attributes["count"].parse().unwrap()
}

#[tokio::test]
async fn a_strangers_two_thousand_refusals_are_one_event_with_their_count() {
    let mut h = Harness::start().await;
    let id = file(&h, "alice", PROD).await;
    let expected = (Code::PermissionDenied, not_in_policy(MALLORY));
    flood(&h, "mallory", &id, 0, 2000, &expected).await;
    assert_eq!(
        *h.refusal_events.borrow(),
        0,
        "nothing is written while the minute lasts"
    );
    // Shutdown writes what is still counted.
    h.stop_broker().await;
    assert_eq!(*h.refusal_events.borrow(), 1);

    let events = h.stored_events();
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["request.created", "access.denied"],
        "2,000 refusals cost one event"
    );
    let denied = &events[1];
    assert_eq!(denied.actor, MALLORY);
    assert_eq!(denied.outcome, Outcome::Denied as i32);
    assert_eq!(count_of(denied), 2000);
    assert_eq!(denied.attributes["first_attempted"], "create_request");
    assert_eq!(denied.attributes["last_attempted"], "release_code");
    let start = twokey_runtime::time::rfc3339(h.now());
    assert_eq!(denied.attributes["first_at"], start);
    assert_eq!(denied.attributes["last_at"], start);
    assert!(
        denied.attributes["reason"].contains("not named in the broker policy"),
        "{denied:?}"
    );
    assert_eq!(
        (denied.account_id.as_str(), denied.request_id.as_str()),
        ("", ""),
        "a window spans many targets"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_flood_across_minutes_is_one_event_per_identity_per_window() {
    let mut h = Harness::start().await;
    let id = file(&h, "alice", PROD).await;
    let mallory = (Code::PermissionDenied, not_in_policy(MALLORY));
    let stray = (Code::PermissionDenied, not_in_policy(STRAY_SERVICE));

    // Window 1: written by the periodic tick once its minute is over.
    flood(&h, "mallory", &id, 0, 500, &mallory).await;
    h.advance(Duration::from_secs(30));
    assert_eq!(*h.refusal_events.borrow(), 0);
    h.advance(Duration::from_secs(31));
    h.wait_for_refusal_events(1).await;

    // Window 2 opens with the next refusal and lasts its own minute, across
    // time moving; a second stranger has a window of its own.
    flood(&h, "mallory", &id, 0, 300, &mallory).await;
    flood(&h, "vault", &id, 0, 10, &stray).await;
    h.advance(Duration::from_secs(30));
    flood(&h, "mallory", &id, 300, 200, &mallory).await;
    h.advance(Duration::from_secs(31));
    // The minute is over: this refusal (or the tick) has window 2 written.
    flood(&h, "mallory", &id, 500, 1, &mallory).await;
    h.wait_for_refusal_events(3).await;
    h.stop_broker().await;

    let events = h.stored_events();
    let by_mallory = denied_by(&events, MALLORY);
    let counts: Vec<u64> = by_mallory.iter().map(|e| count_of(e)).collect();
    assert_eq!(counts[0], 500, "{counts:?}");
    // The late refusal closed window 2, or opened window 3 if the tick came
    // first; either way every refusal is counted once.
    assert!(
        counts[1..] == [501] || counts[1..] == [500, 1],
        "{counts:?}"
    );
    assert_eq!(counts.iter().sum::<u64>(), 1001);
    assert_eq!(
        by_mallory[1].attributes["first_at"],
        twokey_runtime::time::rfc3339(h.now() - Duration::from_secs(61))
    );
    let by_stray = denied_by(&events, STRAY_SERVICE);
    assert_eq!(by_stray.len(), 1);
    assert_eq!(count_of(by_stray[0]), 10);
    assert_eq!(
        events.len(),
        1 + by_mallory.len() + by_stray.len(),
        "nothing else was written"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn people_in_the_policy_keep_one_event_per_refusal() {
    let mut h = Harness::start().await;
    let id = file(&h, "alice", PROD).await;
    // alice is a requester, not an approver; bpm is intake only.
    let mut refusals = Vec::new();
    for user in ["alice", "bpm"] {
        let (code, message) = code_of(approve(&h, user, &id).await);
        assert_eq!(code, Code::PermissionDenied, "{message}");
        refusals.push((user, (code, message)));
    }
    for (user, expected) in &refusals {
        for _ in 0..25 {
            assert_eq!(&code_of(approve(&h, user, &id).await), expected);
        }
    }
    flood(
        &h,
        "mallory",
        &id,
        0,
        25,
        &(Code::PermissionDenied, not_in_policy(MALLORY)),
    )
    .await;
    h.stop_broker().await;
    assert_eq!(*h.refusal_events.borrow(), 1, "only mallory's is counted");

    let events = h.stored_events();
    for (user, (_, message)) in &refusals {
        let actor = format!(
            "spiffe://twokey.local/{}/{user}",
            if *user == "bpm" { "svc" } else { "user" }
        );
        let denied = denied_by(&events, &actor);
        assert_eq!(denied.len(), 26, "one event per refusal of {user}");
        for e in denied {
            assert_eq!(e.attributes["attempted"], "approve");
            assert_eq!(
                message,
                &format!("permission denied: {}", e.attributes["reason"])
            );
            assert!(!e.attributes.contains_key("count"));
            assert_eq!(
                (e.account_id.as_str(), e.request_id.as_str()),
                (PROD, id.as_str())
            );
            assert_eq!(e.outcome, Outcome::Denied as i32);
        }
    }
    let by_mallory = denied_by(&events, MALLORY);
    assert_eq!(by_mallory.len(), 1);
    assert_eq!(count_of(by_mallory[0]), 25);
    h.shutdown().await;
}

#[tokio::test]
async fn callers_without_a_certificate_are_still_unauthenticated_and_cost_nothing() {
    let mut h = Harness::start().await;
    for _ in 0..20 {
        let (code, _) = code_of(
            h.anonymous_client()
                .release_code(pb::ReleaseCodeRequest {
                    request_id: "x".into(),
                    statement: None,
                })
                .await,
        );
        assert_eq!(code, Code::Unauthenticated);
    }
    h.stop_broker().await;
    assert_eq!(h.stored_events().len(), 0);
    assert_eq!(*h.refusal_events.borrow(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn counts_survive_a_restart_as_one_event_each_side() {
    let mut h = Harness::start().await;
    let expected = (Code::PermissionDenied, not_in_policy(MALLORY));
    flood(&h, "mallory", "r", 0, 40, &expected).await;
    h.restart_broker().await;
    flood(&h, "mallory", "r", 0, 60, &expected).await;
    h.stop_broker().await;
    let events = h.stored_events();
    let counts: Vec<u64> = denied_by(&events, MALLORY)
        .iter()
        .map(|e| count_of(e))
        .collect();
    assert_eq!(counts, [40, 60]);
    assert_eq!(events.len(), 2);
    h.shutdown().await;
}
