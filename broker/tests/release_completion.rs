//! A release runs to completion whatever its caller does: a client that
//! hangs up mid-call, against a slow vault, still leaves the request with
//! its quota, vault call and outcome recorded; the quota comes back only
//! when the vault surely released nothing; the vault call carries the
//! release deadline, and a vault later than it keeps the quota spent.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use twokey_proto::broker::v1 as pb;

/// A vault this slow answers well after the client gave up.
const SLOW: Duration = Duration::from_millis(800);

/// The request once its history ends with `action` (the release finished).
async fn after(h: &Harness, id: &str, action: &str) -> pb::Request {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(h, "olivia", id).await;
        if r.history.last().is_some_and(|e| e.action == action) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the release never recorded {action}: {:?}",
            r.history.iter().map(|e| &e.action).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts olivia's release of `id` and hangs up once the vault has it.
async fn release_and_hang_up(h: &Harness, id: &str) {
    let mut client = h.client("olivia");
    let id = id.to_owned();
    let call = tokio::spawn(async move {
        client
            .release_code(pb::ReleaseCodeRequest {
                request_id: id,
                statement: None,
            })
            .await
    });
    tokio::time::timeout(Duration::from_secs(5), h.vault.release_started.notified())
        .await
        .expect("the release reached the vault");
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
}

#[tokio::test]
async fn a_release_whose_client_hangs_up_still_gets_its_code_and_records_it() {
    let (h, id) = Harness::with_verified_prod().await;
    *h.vault.release_delay.lock().unwrap() = SLOW;
    release_and_hang_up(&h, &id).await;
    let r = after(&h, &id, "code.released").await;
    assert_eq!(state_of(&r), pb::RequestState::Released);
    assert_eq!((r.codes_released, r.codes_allowed), (1, 1));
    assert_eq!(h.vault.grants.lock().unwrap().len(), 1, "one vault call");
    // The quota stays spent: no second code.
    let (code, message) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert_eq!(h.vault.grants.lock().unwrap().len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn a_release_whose_client_hangs_up_while_audit_is_down_gives_its_quota_back() {
    let (h, id) = Harness::with_verified_prod().await;
    *h.vault.release_delay.lock().unwrap() = SLOW;
    h.vault
        .audit_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    release_and_hang_up(&h, &id).await;
    let r = after(&h, &id, "code.release_failed").await;
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    assert_eq!(r.codes_released, 0, "the vault surely released nothing");
    assert!(
        r.history
            .last()
            .unwrap()
            .comment
            .contains("audit unavailable"),
        "{:?}",
        r.history.last()
    );
    // Audit back: the request still has its code.
    h.vault
        .audit_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    *h.vault.release_delay.lock().unwrap() = Duration::ZERO;
    let released = release(&h, "olivia", &id).await.unwrap().into_inner();
    assert_eq!(released.code.unwrap().code, FAKE_CODE);
    assert_eq!(
        state_of(&released.request.unwrap()),
        pb::RequestState::Released
    );
    h.shutdown().await;
}

/// A `grpc-timeout` value as a duration.
fn timeout_of(value: &str) -> Duration {
    let (n, unit) = value.split_at(value.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("grpc-timeout {value:?}"),
    }
}

#[tokio::test]
async fn a_vault_later_than_the_release_deadline_keeps_the_quota_spent() {
    let (h, id) = Harness::with_verified_prod().await;
    *h.vault.release_delay.lock().unwrap() = Duration::from_secs(5);
    let (code, message) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(
        message.contains("vault: did not answer in time"),
        "{message}"
    );
    let timeouts = h.vault.release_timeouts.lock().unwrap().clone();
    let [Some(sent)] = timeouts.as_slice() else {
        panic!("one GenerateCode with a deadline: {timeouts:?}");
    };
    // The harness's release_deadline_ms, not the built-in default.
    assert_ne!(
        twokey_broker::grpc::RELEASE_DEADLINE,
        Duration::from_millis(3400)
    );
    assert_eq!(timeout_of(sent), Duration::from_millis(3400), "{sent}");
    // The vault may have released a code: it counts.
    let r = after(&h, &id, "code.release_failed").await;
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    assert_eq!(r.codes_released, 1);
    let (code, message) = code_of(release(&h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    h.shutdown().await;
}
