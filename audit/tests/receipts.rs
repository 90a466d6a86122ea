//! Receipts over real mTLS, with the real shipper: a source accepts the
//! checkpoints a consistent audit service attaches to its acknowledgements
//! and keeps the last one across restarts; an audit service serving a
//! forked or a shorter log is flagged (no acknowledgement counts), and the
//! flag clears once a checkpoint consistent with the last accepted one is
//! served again.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use twokey_audit::{AuditConfig, checkpoint::NoteVerifier};
use twokey_runtime::{
    durable::DurableDb,
    events::EventDraft,
    outbox::Outbox,
    receipts::{Inconsistency, ReceiptHealth},
    shipper::{ShipperHandle, ShipperOptions, spawn_shipper_with},
    time::SystemClock,
};

fn vault_outbox(env: &Env) -> Outbox {
    let db = DurableDb::open(&env.path().join("vault-db")).unwrap();
    Outbox::open(&db, env.vault(), std::sync::Arc::new(SystemClock)).unwrap()
}

fn shipper(
    env: &Env,
    outbox: &Outbox,
    addr: SocketAddr,
) -> (ShipperHandle, tokio::task::JoinHandle<()>) {
    spawn_shipper_with(
        outbox.clone(),
        env.channel(addr, "vault"),
        ShipperOptions {
            audit_key: Some(env.verifier()),
        },
    )
}

async fn emit(outbox: &Outbox) -> u64 {
    outbox
        .emit(EventDraft::new(
            "spiffe://twokey.test/user/alice",
            "request.created",
        ))
        .await
        .unwrap()
}

fn accepted_size(outbox: &Outbox, verifier: &NoteVerifier) -> u64 {
    let note = outbox.accepted_checkpoint().expect("a checkpoint kept");
    verifier.open_checkpoint(&note).unwrap().size
}

/// Waits until the health says what `want` accepts.
async fn wait_health(
    health: &ReceiptHealth,
    want: impl Fn(&Option<Inconsistency>) -> bool,
) -> Option<Inconsistency> {
    for _ in 0..200 {
        let now = health.inconsistency();
        if want(&now) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("receipt health stayed {:?}", health.inconsistency());
}

/// An audit service on `addr` over its own data directory `dir`, holding
/// `n` events of the broker: another history than the vault saw.
async fn other_log(env: &Env, dir: &str, n: u64, addr: SocketAddr) -> TestServer {
    let config = AuditConfig {
        data_dir: env.path().join(dir),
        ..env.config.clone()
    };
    let server = TestServer::start_at(config, addr).await;
    let mut broker = env.client(server.addr, "broker");
    let events = (1..=n).map(|s| event(&env.broker(), s, "x")).collect();
    append_all(&mut broker, events).await.unwrap();
    server
}

#[tokio::test]
async fn a_source_accepts_consistent_receipts_one_per_group() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let outbox = vault_outbox(&env);
    for _ in 0..40 {
        emit(&outbox).await;
    }
    let (handle, task) = shipper(&env, &outbox, server.addr);
    handle
        .wait_acked(40, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(accepted_size(&outbox, &env.verifier()), 40);
    assert_eq!(outbox.depth(), 0);
    for _ in 0..3 {
        let seq = emit(&outbox).await;
        handle
            .wait_acked(seq, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(accepted_size(&outbox, &env.verifier()), seq);
    }
    assert_eq!(handle.receipts().inconsistency(), None);
    assert!(handle.receipts().check("nothing").is_ok());
    task.abort();
    server.stop().await;
}

#[tokio::test]
async fn a_forked_or_shorter_log_is_flagged_until_a_consistent_checkpoint_is_served() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let addr = server.addr;
    let outbox = vault_outbox(&env);
    let (handle, task) = shipper(&env, &outbox, addr);
    for _ in 0..3 {
        emit(&outbox).await;
    }
    handle.wait_acked(3, Duration::from_secs(20)).await.unwrap();
    let good = env
        .verifier()
        .open_checkpoint(&outbox.accepted_checkpoint().unwrap())
        .unwrap();
    assert_eq!(good.size, 3);
    // The checkpoint accepted survives a restart of the source.
    task.abort();
    let _ = task.await;
    let (handle, task) = shipper(&env, &outbox, addr);
    server.stop().await;

    // A fork: 5 entries of another history, signed by the same key.
    let fork = other_log(&env, "fork", 5, addr).await;
    let seq = emit(&outbox).await;
    let found = wait_health(handle.receipts(), Option::is_some)
        .await
        .unwrap();
    assert_eq!((found.served.size, found.accepted.size), (5, 3));
    assert_eq!(found.accepted.root, good.root);
    let message = handle.receipts().check("no code is released").unwrap_err();
    let expected = format!(
        "audit served a checkpoint inconsistent with one it signed before: 5/{} vs 3/{}; \
         no code is released until audit serves a checkpoint consistent with 3/{}",
        hex::encode(found.served.root),
        hex::encode(good.root),
        hex::encode(good.root),
    );
    assert!(message.starts_with(&expected), "{message}");
    // Nothing counts as acknowledged under a forked log.
    assert!(
        handle
            .wait_acked(seq, Duration::from_millis(300))
            .await
            .is_err()
    );
    fork.stop().await;

    // A shorter log (a restored older backup, say).
    let short = other_log(&env, "short", 1, addr).await;
    let found = wait_health(handle.receipts(), |h| {
        h.as_ref().is_some_and(|i| i.served.size == 1)
    })
    .await
    .unwrap();
    assert_eq!(found.accepted.size, 3);
    assert!(found.why.contains("smaller"), "{found:?}");
    short.stop().await;

    // The log the source saw, back: consistent again, and the event that
    // waited is acknowledged under a checkpoint that extends the good one.
    let back = TestServer::start_at(env.config.clone(), addr).await;
    handle
        .wait_acked(seq, Duration::from_secs(20))
        .await
        .unwrap();
    wait_health(handle.receipts(), Option::is_none).await;
    assert_eq!(accepted_size(&outbox, &env.verifier()), 4);
    task.abort();
    back.stop().await;
}

#[tokio::test]
async fn every_acknowledgement_is_covered_by_a_receipt_whose_proofs_chain() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let verifier = env.verifier();
    let mut vault = env.client(server.addr, "vault");
    let mut known = None;
    for round in 0..3u64 {
        let events = (1..=50)
            .map(|i| event(&env.vault(), round * 50 + i, "x"))
            .collect();
        let answers = append_all(&mut vault, events).await.unwrap();
        assert_eq!(answers.len(), 50);
        let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
        assert!(
            !answers.last().unwrap().checkpoint.is_empty(),
            "the last acknowledgement of a stream has a receipt"
        );
        // The first stream starts from known_size 0, so its first receipt
        // has no proof; later ones chain from the one before on the stream.
        let mut uncovered = Vec::new();
        let mut prev: Option<twokey_audit::checkpoint::Checkpoint> = None;
        for a in &answers {
            uncovered.push(a.leaf_index);
            if a.checkpoint.is_empty() {
                continue;
            }
            let cp = verifier.open_checkpoint(&a.checkpoint).unwrap();
            assert!(uncovered.iter().all(|&i| i < cp.size));
            uncovered.clear();
            if let Some(p) = &prev {
                let proof = twokey_audit::merkle::hashes_from_bytes(&a.consistency_proof).unwrap();
                twokey_audit::merkle::verify_consistency(
                    p.size, cp.size, &proof, &p.root, &cp.root,
                )
                .unwrap();
            }
            prev = Some(cp);
        }
        known = prev.or(known);
    }
    assert_eq!(known.unwrap().size, 150);
    server.stop().await;
}

#[tokio::test]
async fn both_sources_cosign_the_latest_checkpoint_as_witnesses() {
    use twokey_audit::cosignature::CosignatureVerifier;
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let vault = vault_outbox(&env);
    let db = DurableDb::open(&env.path().join("broker-db")).unwrap();
    let broker = Outbox::open(&db, env.broker(), std::sync::Arc::new(SystemClock)).unwrap();
    let (vh, vt) = shipper(&env, &vault, server.addr);
    let (bh, bt) = spawn_shipper_with(
        broker.clone(),
        env.channel(server.addr, "broker"),
        ShipperOptions {
            audit_key: Some(env.verifier()),
        },
    );
    for _ in 0..3 {
        let b = emit(&broker).await;
        bh.wait_acked(b, Duration::from_secs(20)).await.unwrap();
        let v = emit(&vault).await;
        vh.wait_acked(v, Duration::from_secs(20)).await.unwrap();
    }
    let witnesses = [
        CosignatureVerifier::new("twokey.test/svc/vault", env.vault_key.verifying_key()).unwrap(),
        CosignatureVerifier::new("twokey.test/svc/broker", env.broker_key.verifying_key()).unwrap(),
    ];
    let mut carol = env.client(server.addr, "carol");
    let mut note = String::new();
    for _ in 0..200 {
        note = checkpoint(&mut carol).await.checkpoint;
        if witnesses.iter().all(|w| w.verify(&note).is_ok()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The broker sent nothing after the last vault event: it cosigned the
    // latest checkpoint because audit pushed it to its idle stream.
    for w in &witnesses {
        w.verify(&note).unwrap_or_else(|e| panic!("{e}: {note}"));
    }
    let cp = env.verifier().open_checkpoint(&note).unwrap();
    assert_eq!(cp.size, 6);
    assert_eq!(
        note.lines().filter(|l| l.starts_with('\u{2014}')).count(),
        3
    );
    vt.abort();
    bt.abort();
    server.stop().await;
}
