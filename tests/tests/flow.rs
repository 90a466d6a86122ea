//! End to end: the three real binaries as separate processes over mTLS on
//! loopback. A full flow releases the right code and leaves a contiguous,
//! verifiable log from both sources; audit down means no code, and once
//! audit is back the outboxes drain without a gap and releases work again.

use tonic::Code;
use twokey_audit::{checkpoint::NoteVerifier, verify::verify_log};
use twokey_e2e::{SECRET, System, bin_dir, totp};
use twokey_proto::{
    audit::v1::GetCheckpointRequest,
    broker::v1::{GetRequestRequest, RequestState},
};

/// Enrolls the account, files a request, approves it and verifies the PIN;
/// returns the request id and the PIN.
async fn verified_request(sys: &System) -> (String, String) {
    sys.enroll().await;
    let (request, pin) = sys
        .verified_request_with_pin("rotate the root access keys")
        .await;
    (request.request_id, pin)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_flow_releases_the_right_code_and_leaves_a_verifiable_log() {
    let sys = System::start();
    let (id, pin) = verified_request(&sys).await;
    let code = sys
        .release_as_operator(&id)
        .await
        .expect("operator releases");
    assert_eq!(
        code.code,
        totp(code.step),
        "the vault's code is not the TOTP"
    );
    assert_eq!(
        code.valid_until.unwrap().seconds as u64,
        (code.step + 1) * 30
    );

    // The checkpoint first: the broker's last events may still be shipping,
    // and a checkpoint read before the log covers a prefix of it.
    let checkpoint = sys
        .audit("carol")
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    // The broker ships its events after it answers: wait for its last one.
    let log = sys
        .log_until(std::time::Duration::from_secs(10), |log| {
            log.iter().filter_map(|e| e.event.as_ref()).any(|e| {
                e.action == "code.released"
                    && e.source.ends_with("/svc/broker")
                    && e.request_id == id
            })
        })
        .await;
    let verifier = NoteVerifier::parse(&sys.local.verifier_key).unwrap();
    let report = verify_log(
        &log,
        &sys.sources(),
        Some((&checkpoint.checkpoint, &verifier)),
    )
    .unwrap_or_else(|e| panic!("the log does not verify: {e}"));
    assert_eq!(
        report.last_seq.len(),
        2,
        "events from both sources: {:?}",
        report.last_seq
    );

    let events: Vec<_> = log.iter().map(|e| e.event.clone().unwrap()).collect();
    let of_request: Vec<&str> = events
        .iter()
        .filter(|e| e.request_id == id)
        .map(|e| e.action.as_str())
        .collect();
    for action in [
        "request.created",
        "request.approved",
        "pin.verified",
        "code.released",
    ] {
        assert!(
            of_request.contains(&action),
            "{action} missing from {of_request:?}"
        );
    }
    let vault_release = events
        .iter()
        .find(|e| e.action == "code.released" && e.source.ends_with("/svc/vault"))
        .expect("the vault's code.released event");
    assert_eq!(vault_release.request_id, id);
    assert_eq!(vault_release.trace_id.len(), 32);
    // One trace across processes: the broker's release events and the
    // vault's share the trace id of the ReleaseCode call.
    let broker_release = events
        .iter()
        .find(|e| e.action == "code.released" && e.source.ends_with("/svc/broker"))
        .expect("the broker's code.released event");
    assert_eq!(broker_release.trace_id, vault_release.trace_id);

    // No seed, PIN or code anywhere in the log.
    for entry in &log {
        let text = format!("{entry:?}");
        for secret in [SECRET, &SECRET[..16], pin.as_str(), code.code.as_str()] {
            assert!(!text.contains(secret), "a secret in {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_down_means_no_code_and_the_log_heals_when_it_is_back() {
    let mut sys = System::start();
    let (id, _) = verified_request(&sys).await;

    sys.local.kill("audit");
    let err = sys
        .release_as_operator(&id)
        .await
        .expect_err("a code without audit");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("audit unavailable"),
        "{}",
        err.message()
    );
    // Other calls still answer, and the failed release used up nothing.
    let request = sys
        .broker("alice")
        .get_request(GetRequestRequest {
            request_id: id.clone(),
        })
        .await
        .expect("the broker still answers")
        .into_inner()
        .request
        .unwrap();
    assert_eq!(request.state(), RequestState::Verified);
    assert_eq!(request.codes_released, 0);

    sys.local
        .restart(&bin_dir(), "audit")
        .expect("audit restarts");
    let code = sys
        .release_as_operator(&id)
        .await
        .expect("releases work again");
    assert_eq!(code.code, totp(code.step));

    // Both outboxes drained into one contiguous log that verifies.
    let log = sys.log().await;
    let report = verify_log(&log, &sys.sources(), None)
        .unwrap_or_else(|e| panic!("the log does not verify after the outage: {e}"));
    assert_eq!(report.last_seq.len(), 2);
    // The refused release is in the log as released-then-withheld, with the
    // same grant; exactly one code left the vault.
    let vault_events: Vec<_> = log
        .iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.source.ends_with("/svc/vault") && e.request_id == id)
        .collect();
    let count = |action: &str| vault_events.iter().filter(|e| e.action == action).count();
    assert_eq!(count("code.released"), 2, "{vault_events:?}");
    assert_eq!(count("code.withheld"), 1, "{vault_events:?}");
    let withheld = vault_events
        .iter()
        .find(|e| e.action == "code.withheld")
        .unwrap();
    assert!(vault_events.iter().any(|e| e.action == "code.released"
        && e.attributes.get("grant_id") == withheld.attributes.get("grant_id")));
}
