//! End to end: the three real binaries as separate processes over mTLS on
//! loopback. A full flow releases the right code and leaves a contiguous,
//! verifiable log from both sources; audit down means no code, and once
//! audit is back the outboxes drain without a gap and releases work again.

use tonic::Code;
use twokey::local::ACCOUNT;
use twokey_audit::{checkpoint::NoteVerifier, verify::verify_log};
use twokey_e2e::{System, bin_dir};
use twokey_proto::{
    audit::v1::GetCheckpointRequest,
    broker::v1::{
        ApproveRequestRequest, CreateRequestRequest, EnrollAccountRequest, GetRequestRequest,
        ReleaseCodeRequest, RequestState, VerifyPinRequest, enroll_account_request::Seed,
    },
};

const SECRET: &str = "KRUGS4ZANFZSA5DIMUQHG5LQMVZCA43FMNZGK5BAONSWKZBAORXSAZDPEBWW65DIMVZA";

/// An independent TOTP computation for step `step` (SHA1, 6 digits, 30 s).
fn totp(step: u64) -> String {
    let seed = data_encoding::BASE32_NOPAD
        .decode(SECRET.as_bytes())
        .unwrap();
    totp_rs::Builder::new()
        .with_secret(seed)
        .build_noncompliant()
        .generate(step * 30)
        .to_string()
}

/// Enrolls the account, files a request, approves it and verifies the PIN;
/// returns the request id and the PIN.
async fn verified_request(sys: &System) -> (String, String) {
    sys.broker("adam")
        .enroll_account(EnrollAccountRequest {
            account_id: ACCOUNT.into(),
            seed: Some(Seed::Base32Secret(SECRET.into())),
            ..Default::default()
        })
        .await
        .expect("admin enrolls");
    let request = sys
        .broker("alice")
        .create_request(CreateRequestRequest {
            account_id: ACCOUNT.into(),
            reason: "rotate the root access keys".into(),
            ticket: "OPS-42".into(),
            on_behalf_of: String::new(),
        })
        .await
        .expect("requester files")
        .into_inner()
        .request
        .unwrap();
    let approved = sys
        .broker("bob")
        .approve_request(ApproveRequestRequest {
            request_id: request.request_id.clone(),
            comment: "ticket checked".into(),
        })
        .await
        .expect("approver approves")
        .into_inner()
        .request
        .unwrap();
    assert_eq!(approved.state(), RequestState::Approved);
    // The PIN is delivered asynchronously by the notifier queue.
    let pin = sys
        .local
        .wait_for_pin("alice", &request.request_id, 0)
        .expect("a PIN in alice's mailbox");
    let verified = sys
        .broker("olivia")
        .verify_pin(VerifyPinRequest {
            request_id: request.request_id.clone(),
            pin: pin.clone(),
        })
        .await
        .expect("operator verifies the PIN")
        .into_inner()
        .request
        .unwrap();
    assert_eq!(verified.state(), RequestState::Verified);
    (request.request_id, pin)
}

async fn release(sys: &System, id: &str) -> Result<twokey_proto::types::v1::Code, tonic::Status> {
    sys.broker("olivia")
        .release_code(ReleaseCodeRequest {
            request_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().code.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_flow_releases_the_right_code_and_leaves_a_verifiable_log() {
    let sys = System::start();
    let (id, pin) = verified_request(&sys).await;
    let code = release(&sys, &id).await.expect("operator releases");
    assert_eq!(
        code.code,
        totp(code.step),
        "the vault's code is not the TOTP"
    );
    assert_eq!(
        code.valid_until.unwrap().seconds as u64,
        (code.step + 1) * 30
    );

    // The vault's code.released is in the log before the code left the
    // vault; the broker's events are shipped from its outbox a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sys.log().await.iter().any(|e| {
        e.event
            .as_ref()
            .is_some_and(|e| e.action == "code.released" && e.source.ends_with("/svc/broker"))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker's code.released event never reached audit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Checkpoint first: the log read after it may only be longer.
    let checkpoint = sys
        .audit("carol")
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let log = sys.log().await;
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
    let err = release(&sys, &id).await.expect_err("a code without audit");
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
    let code = release(&sys, &id).await.expect("releases work again");
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
