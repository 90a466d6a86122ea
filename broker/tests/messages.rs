//! Messages a person can act on (issue 16 item 6), through the real gRPC
//! layer: the refusal names the real reason and says what to do with the
//! `twokey` command, never a gRPC method name.

mod common;

use common::*;
use tonic::Code;
use twokey_proto::broker::v1 as pb;

#[tokio::test]
async fn a_requester_who_is_also_an_intake_service_is_told_it_is_her_own_request() {
    // alice may also file on others' behalf; approving her own request is
    // refused for being hers, not for being an intake service.
    let policy = POLICY.replace("intake = [\"bpm\"]", "intake = [\"bpm\", \"alice\"]");
    let h = Harness::start_with_policy(&policy).await;
    let id = file(&h, "alice", PROD).await;
    let (code, message) = code_of(approve(&h, "alice", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert_eq!(
        message,
        format!(
            "permission denied: spiffe://twokey.local/user/alice is the requester of request {id}; nobody approves their own request — another approver must"
        )
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_requester_who_denies_her_own_request_is_told_the_cancel_command() {
    // alice is an approver too, so the approver rules are not what stops her.
    let policy = POLICY.replace(
        "approvers = [\"bob\", \"dave\"]",
        "approvers = [\"bob\", \"dave\", \"alice\"]",
    );
    let h = Harness::start_with_policy(&policy).await;
    let id = file(&h, "alice", PROD).await;
    let (code, message) = code_of(
        h.client("alice")
            .deny_request(pb::DenyRequestRequest {
                request_id: id.clone(),
                reason: "not needed".into(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert_eq!(
        message,
        format!(
            "permission denied: spiffe://twokey.local/user/alice is the requester of {id}; to withdraw it, cancel it with `twokey request cancel {id}`"
        )
    );
    h.shutdown().await;
}
