//! The audit gRPC API over real mTLS: who may append and read, what is
//! refused, idempotent duplicates, gaps recovered by the real shipper,
//! checkpoints and proofs that verify.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use prost::Message;
use tonic::Code;
use twokey_audit::merkle::{self, hashes_from_bytes};
use twokey_proto::audit::v1::{
    AppendResponse, AppendStatus, GetCheckpointRequest, GetConsistencyProofRequest,
    GetInclusionProofRequest, QueryRequest,
};
use twokey_runtime::{
    durable::DurableDb, events::EventDraft, outbox::Outbox, shipper::spawn_shipper,
    time::SystemClock,
};

fn ok(r: &Result<AppendResponse, tonic::Status>) -> &AppendResponse {
    r.as_ref().expect("an acknowledgement")
}

fn status(r: &AppendResponse) -> AppendStatus {
    AppendStatus::try_from(r.status).unwrap()
}

#[tokio::test]
async fn an_unknown_source_is_refused_with_permission_denied() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut intruder = env.client(server.addr, "intruder");
    let signer = twokey_runtime::events::EventSigner::new(
        id("spiffe://twokey.test/svc/intruder"),
        ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
    );
    let err = append_all(&mut intruder, vec![event(&signer, 1, "x")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("not a configured audit source"),
        "{err:?}"
    );
    // A user certificate is no source either.
    let mut carol = env.client(server.addr, "carol");
    let err = append_all(&mut carol, vec![event(&env.vault(), 1, "x")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(query_all(&mut carol).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_event_too_large_for_an_entry_bundle_is_refused_with_invalid_argument() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut vault = env.client(server.addr, "vault");
    let signer = env.vault();
    let big = signer.sign(
        &EventDraft::new("spiffe://twokey.test/user/alice", "request.created")
            .attr("note", "x".repeat(70_000))
            .into_event(signer.source(), 1, std::time::SystemTime::now()),
    );
    let answers = append_all(&mut vault, vec![big]).await.unwrap();
    let err = answers[0].as_ref().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("more than the 65535 a log entry holds"),
        "{err:?}"
    );
    // Nothing was stored: seq 1 is still the one expected.
    let answers = append_all(&mut vault, vec![event(&signer, 1, "ok")])
        .await
        .unwrap();
    assert_eq!(status(ok(&answers[0])), AppendStatus::Stored);
    let mut carol = env.client(server.addr, "carol");
    assert_eq!(query_all(&mut carol).await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_bad_signature_is_refused_with_invalid_argument_naming_the_seq() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut vault = env.client(server.addr, "vault");
    let wrong_key = twokey_runtime::events::EventSigner::new(
        id(VAULT),
        ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
    );
    let answers = append_all(
        &mut vault,
        vec![event(&env.vault(), 1, "ok"), event(&wrong_key, 2, "forged")],
    )
    .await
    .unwrap();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(status(ok(&answers[0])), AppendStatus::Stored);
    let err = answers[1].as_ref().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("seq 2"), "{err:?}");
    assert!(err.message().contains("signature"), "{err:?}");
    let mut carol = env.client(server.addr, "carol");
    assert_eq!(query_all(&mut carol).await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_tampered_or_undecodable_event_is_refused_with_invalid_argument() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut vault = env.client(server.addr, "vault");
    let mut tampered = event(&env.vault(), 1, "code.released");
    let last = tampered.event.len() - 1;
    tampered.event[last] ^= 1; // inside the "state" attribute
    let answers = append_all(&mut vault, vec![tampered]).await.unwrap();
    let err = answers[0].as_ref().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("seq 1"), "{err:?}");

    let mut garbage = event(&env.vault(), 2, "x");
    garbage.event = vec![0xff, 0xff, 0xff];
    let answers = append_all(&mut vault, vec![event(&env.vault(), 1, "ok"), garbage])
        .await
        .unwrap();
    assert_eq!(status(ok(&answers[0])), AppendStatus::Stored);
    let err = answers[1].as_ref().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("after seq 1"), "{err:?}");

    let mut carol = env.client(server.addr, "carol");
    let stored = query_all(&mut carol).await;
    assert_eq!(stored.len(), 1, "a refused event was stored");
    assert_eq!(stored[0].event.as_ref().unwrap().action, "ok");
    server.stop().await;
}

#[tokio::test]
async fn a_duplicate_is_acknowledged_with_the_same_leaf_index() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut vault = env.client(server.addr, "vault");
    let mut broker = env.client(server.addr, "broker");
    let v1 = event(&env.vault(), 1, "a");
    let v2 = event(&env.vault(), 2, "b");
    let b1 = event(&env.broker(), 1, "c");
    append_all(&mut vault, vec![v1.clone()]).await.unwrap();
    append_all(&mut broker, vec![b1]).await.unwrap();
    let answers = append_all(&mut vault, vec![v2, v1.clone()]).await.unwrap();
    let (second, dup) = (ok(&answers[0]), ok(&answers[1]));
    assert_eq!(
        (status(second), second.leaf_index),
        (AppendStatus::Stored, 2)
    );
    assert_eq!(
        (status(dup), dup.seq, dup.leaf_index),
        (AppendStatus::Duplicate, 1, 0)
    );
    assert_eq!(dup.expected_seq, 3);

    // The same seq with different content is a conflict, never stored.
    let other = event(&env.vault(), 1, "different");
    let answers = append_all(&mut vault, vec![other]).await.unwrap();
    assert_eq!(answers[0].as_ref().unwrap_err().code(), Code::AlreadyExists);

    let mut carol = env.client(server.addr, "carol");
    let entries = query_all(&mut carol).await;
    assert_eq!(entries.len(), 3);
    twokey_audit::verify::verify_log(&entries, &env.source_keys(), None).unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_peer_whose_id_differs_from_the_event_source_is_refused() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut broker = env.client(server.addr, "broker");
    // A correctly signed vault event, sent over the broker's connection.
    let answers = append_all(&mut broker, vec![event(&env.vault(), 1, "x")])
        .await
        .unwrap();
    let err = answers[0].as_ref().unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(BROKER) && err.message().contains(VAULT),
        "{err:?}"
    );
    let mut carol = env.client(server.addr, "carol");
    assert!(query_all(&mut carol).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_gap_is_refused_and_then_recovered_by_the_shipper() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;

    // The vault's outbox holds events 1..=3.
    let outbox_dir = tempfile::tempdir().unwrap();
    let db = DurableDb::open(outbox_dir.path()).unwrap();
    let outbox = Outbox::open(&db, env.vault(), Arc::new(SystemClock)).unwrap();
    for action in ["request.created", "request.approved", "code.released"] {
        outbox
            .emit(EventDraft::new("spiffe://twokey.test/user/alice", action))
            .await
            .unwrap();
    }
    let pending = outbox.pending(1, 10);
    assert_eq!(pending.len(), 3);

    // By hand: 1 is stored, 3 is refused as a gap expecting 2.
    let mut vault = env.client(server.addr, "vault");
    let answers = append_all(&mut vault, vec![pending[0].1.clone(), pending[2].1.clone()])
        .await
        .unwrap();
    assert_eq!(status(ok(&answers[0])), AppendStatus::Stored);
    let gap = ok(&answers[1]);
    assert_eq!(
        (status(gap), gap.seq, gap.expected_seq),
        (AppendStatus::Gap, 3, 2)
    );

    // The real shipper delivers everything, 1 as a duplicate.
    let handle = spawn_shipper(outbox.clone(), env.channel(server.addr, "vault"));
    handle.wait_acked(3, Duration::from_secs(20)).await.unwrap();
    let seq = outbox
        .emit(EventDraft::new(
            "spiffe://twokey.test/user/bob",
            "request.created",
        ))
        .await
        .unwrap();
    handle
        .wait_acked(seq, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(outbox.depth(), 0);

    let mut carol = env.client(server.addr, "carol");
    let entries = query_all(&mut carol).await;
    let seqs: Vec<u64> = entries
        .iter()
        .map(|e| e.event.as_ref().unwrap().seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    let cp = checkpoint(&mut carol).await;
    env.verify(&entries, &cp.checkpoint);
    server.stop().await;
}

#[tokio::test]
async fn non_auditors_cannot_read_the_log() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut vault = env.client(server.addr, "vault");
    append_all(&mut vault, vec![event(&env.vault(), 1, "x")])
        .await
        .unwrap();
    for who in ["mallory", "vault", "intruder"] {
        let mut c = env.client(server.addr, who);
        let codes = [
            c.query(QueryRequest::default())
                .await
                .map(|_| ())
                .unwrap_err()
                .code(),
            c.get_checkpoint(GetCheckpointRequest {})
                .await
                .map(|_| ())
                .unwrap_err()
                .code(),
            c.get_inclusion_proof(GetInclusionProofRequest {
                leaf_index: 0,
                tree_size: 0,
            })
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
            c.get_consistency_proof(GetConsistencyProofRequest {
                first_size: 0,
                second_size: 0,
            })
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        ];
        assert_eq!(codes, [Code::PermissionDenied; 4], "{who}");
    }
    server.stop().await;
}

#[tokio::test]
async fn auditors_get_checkpoints_proofs_and_pages_that_verify() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let (mut vault, mut broker) = (
        env.client(server.addr, "vault"),
        env.client(server.addr, "broker"),
    );
    let mut carol = env.client(server.addr, "carol");
    let verifier = env.verifier();

    // Both sources stream concurrently.
    let v = env.vault();
    let b = env.broker();
    let (va, ba) = tokio::join!(
        append_all(&mut vault, (1..=40).map(|s| event(&v, s, "v")).collect()),
        append_all(&mut broker, (1..=30).map(|s| event(&b, s, "b")).collect()),
    );
    assert!(
        va.unwrap()
            .iter()
            .all(|r| status(ok(r)) == AppendStatus::Stored)
    );
    assert!(
        ba.unwrap()
            .iter()
            .all(|r| status(ok(r)) == AppendStatus::Stored)
    );
    let early = checkpoint(&mut carol).await;
    assert_eq!(early.tree_size, 70);
    append_all(&mut vault, vec![event(&v, 41, "v")])
        .await
        .unwrap();
    let cp = checkpoint(&mut carol).await;
    let opened = verifier.open_checkpoint(&cp.checkpoint).unwrap();
    assert_eq!(
        (opened.size, opened.root.to_vec()),
        (71, cp.root_hash.clone())
    );

    let entries = query_all(&mut carol).await;
    let report = env.verify(&entries, &cp.checkpoint);
    assert_eq!(report.last_seq[VAULT], 41);
    assert_eq!(report.last_seq[BROKER], 30);
    env.verify(&entries, &early.checkpoint);

    // Inclusion of entry 17 in the tree of the latest checkpoint.
    let proof = carol
        .get_inclusion_proof(GetInclusionProofRequest {
            leaf_index: 17,
            tree_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let leaf = merkle::leaf_hash(&entries[17].signed_event.as_ref().unwrap().encode_to_vec());
    merkle::verify_inclusion(
        17,
        proof.tree_size,
        &leaf,
        &hashes_from_bytes(&proof.hashes).unwrap(),
        &opened.root,
    )
    .unwrap();
    // The early checkpoint's tree is a prefix of the latest.
    let proof = carol
        .get_consistency_proof(GetConsistencyProofRequest {
            first_size: 70,
            second_size: 71,
        })
        .await
        .unwrap()
        .into_inner();
    let early_root: merkle::Hash = early.root_hash.as_slice().try_into().unwrap();
    merkle::verify_consistency(
        70,
        71,
        &hashes_from_bytes(&proof.hashes).unwrap(),
        &early_root,
        &opened.root,
    )
    .unwrap();

    // Bad ranges.
    let inclusion = |leaf_index, tree_size| GetInclusionProofRequest {
        leaf_index,
        tree_size,
    };
    let consistency = |first_size, second_size| GetConsistencyProofRequest {
        first_size,
        second_size,
    };
    assert_eq!(
        code_of(carol.get_inclusion_proof(inclusion(71, 0)).await),
        Code::OutOfRange
    );
    assert_eq!(
        code_of(carol.get_consistency_proof(consistency(5, 80)).await),
        Code::OutOfRange
    );
    assert_eq!(
        code_of(carol.get_consistency_proof(consistency(9, 5)).await),
        Code::InvalidArgument
    );
    let bad_token = QueryRequest {
        page_token: "x".into(),
        ..QueryRequest::default()
    };
    assert_eq!(code_of(carol.query(bad_token).await), Code::InvalidArgument);

    // Newest-first pages of broker events, 12 at a time.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let mut stream = carol
            .query(QueryRequest {
                source: BROKER.into(),
                newest_first: true,
                page_size: 12,
                page_token: token.clone(),
                ..QueryRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        token.clear();
        while let Some(batch) = stream.message().await.unwrap() {
            seen.extend(batch.entries.iter().map(|e| e.event.as_ref().unwrap().seq));
            if !batch.next_page_token.is_empty() {
                token = batch.next_page_token;
            }
        }
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, (1..=30).rev().collect::<Vec<u64>>());
    server.stop().await;
}

#[tokio::test]
async fn health_reports_the_audit_service_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let mut health = HealthClient::new(env.channel(server.addr, "mallory"));
    let answer = health
        .check(HealthCheckRequest {
            service: "twokey.audit.v1.AuditService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status(), ServingStatus::Serving);
    server.stop().await;
}
