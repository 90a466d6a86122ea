//! Receipts over real mTLS, with the real shipper: a source accepts the
//! checkpoints a consistent audit service attaches to its acknowledgements
//! and keeps the last one across restarts; an audit service serving a
//! forked or a shorter log is flagged (no acknowledgement counts), and the
//! flag clears once a checkpoint consistent with the last accepted one is
//! served again. An audit service restored from an older backup gets its
//! lost tail back from both sources' kept events, at the same indices, and
//! ends with a log that verifies against every checkpoint it signed.

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

type Shipper = (ShipperHandle, tokio::task::JoinHandle<()>);

/// A shipper of `outbox` connecting as `name` (`vault` or `broker`).
fn shipper_as(
    env: &Env,
    name: &str,
    outbox: &Outbox,
    addr: SocketAddr,
    options: ShipperOptions,
) -> Shipper {
    spawn_shipper_with(outbox.clone(), env.channel(addr, name), options)
}

/// Checking receipts against audit's key (and cosigning).
fn with_receipts(env: &Env) -> ShipperOptions {
    ShipperOptions {
        audit_key: Some(env.verifier()),
        ..Default::default()
    }
}

/// The vault's shipper, checking receipts.
fn shipper(env: &Env, outbox: &Outbox, addr: SocketAddr) -> Shipper {
    shipper_as(env, "vault", outbox, addr, with_receipts(env))
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
    // The source may see the fork while its 5 entries are still being
    // written (a group commit signs a checkpoint of each group): what
    // matters is that it is flagged, here at its full size.
    let found = wait_health(handle.receipts(), |h| {
        h.as_ref().is_some_and(|i| i.served.size == 5)
    })
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
    let (bh, bt) = broker_shipper(&env, &broker, server.addr);
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
    go_sumdb_note_opens(&env, &note);
    vt.abort();
    bt.abort();
    server.stop().await;
}

/// The broker's shipper, checking receipts.
fn broker_shipper(env: &Env, outbox: &Outbox, addr: SocketAddr) -> Shipper {
    shipper_as(env, "broker", outbox, addr, with_receipts(env))
}

/// Emits `n` events on each outbox, interleaved, each acknowledged.
async fn emit_both(n: usize, sources: [(&Outbox, &ShipperHandle); 2]) {
    for _ in 0..n {
        for (outbox, handle) in sources {
            emit_acked(1, outbox, handle).await;
        }
    }
}

/// Emits `n` events on `outbox`, each acknowledged.
async fn emit_acked(n: usize, outbox: &Outbox, handle: &ShipperHandle) {
    for _ in 0..n {
        let seq = emit(outbox).await;
        handle
            .wait_acked(seq, Duration::from_secs(20))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn an_audit_restored_from_an_older_backup_gets_its_tail_back_from_the_sources() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let addr = server.addr;
    let vault = vault_outbox(&env);
    let db = DurableDb::open(&env.path().join("broker-db")).unwrap();
    let broker = Outbox::open(&db, env.broker(), std::sync::Arc::new(SystemClock)).unwrap();
    let (vh, vt) = shipper(&env, &vault, addr);
    let (bh, bt) = broker_shipper(&env, &broker, addr);
    emit_both(2, [(&vault, &vh), (&broker, &bh)]).await;
    let mut carol = env.client(addr, "carol");
    let first = checkpoint(&mut carol).await;

    // A backup of the data directory, taken with audit stopped.
    server.stop().await;
    let backup = env.path().join("backup");
    twokey_testkit::copy_dir(&env.config.data_dir, &backup);
    let server = TestServer::start_at(env.config.clone(), addr).await;

    // More events; a checkpoint of all of them, which both sources accept.
    emit_both(5, [(&vault, &vh), (&broker, &bh)]).await;
    let last = checkpoint(&mut carol).await;
    assert_eq!(last.tree_size, 14);
    for _ in 0..200 {
        if accepted_size(&vault, &env.verifier()) == 14
            && accepted_size(&broker, &env.verifier()) == 14
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted_size(&broker, &env.verifier()), 14);
    let before = query_all(&mut carol).await;

    // The audit host is lost; the backup is restored (tree-head file too).
    server.stop().await;
    std::fs::remove_dir_all(&env.config.data_dir).unwrap();
    twokey_testkit::copy_dir(&backup, &env.config.data_dir);
    let server = TestServer::start_at(env.config.clone(), addr).await;

    // The sources see a shorter log and send what they kept; audit signs
    // nothing smaller meanwhile and ends with the very same log.
    let mut restored = None;
    for _ in 0..400 {
        match carol
            .get_checkpoint(twokey_proto::audit::v1::GetCheckpointRequest {})
            .await
        {
            Ok(r) if r.get_ref().tree_size >= 14 => {
                restored = Some(r.into_inner());
                break;
            }
            // Before a source says hello, the restored log can only serve
            // the checkpoint it signed before the backup: never a new one.
            Ok(r) => assert_eq!(
                (r.get_ref().tree_size, &r.get_ref().root_hash),
                (first.tree_size, &first.root_hash)
            ),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(status.message().contains("restoring"), "{status:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restored = restored.expect("audit was restored from the sources");
    assert_eq!(restored.root_hash, last.root_hash);
    let after = query_all(&mut carol).await;
    for note in [&first.checkpoint, &last.checkpoint, &restored.checkpoint] {
        env.verify(&after, note);
    }
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.signed_event, b.signed_event, "entry {}", a.index);
    }
    // Both sources are healthy again and new events flow.
    wait_health(vh.receipts(), Option::is_none).await;
    wait_health(bh.receipts(), Option::is_none).await;
    emit_both(1, [(&vault, &vh), (&broker, &bh)]).await;
    assert_eq!(query_all(&mut carol).await.len(), 16);
    vt.abort();
    bt.abort();
    server.stop().await;
}

/// A vault source without receipts (no checkpoint key) shipping to `addr`.
fn plain_shipper(env: &Env, outbox: &Outbox, addr: SocketAddr, stall_alarm: Duration) -> Shipper {
    let options = ShipperOptions {
        stall_alarm,
        ..Default::default()
    };
    shipper_as(env, "vault", outbox, addr, options)
}

/// Three vault events before a backup and three after, all acknowledged;
/// then audit comes back on the backup. Returns the server.
async fn restored_after_three_more(
    env: &Env,
    outbox: &Outbox,
    handle: &ShipperHandle,
    server: TestServer,
) -> TestServer {
    let addr = server.addr;
    emit_acked(3, outbox, handle).await;
    server.stop().await;
    let backup = env.path().join("backup");
    twokey_testkit::copy_dir(&env.config.data_dir, &backup);
    let server = TestServer::start_at(env.config.clone(), addr).await;
    emit_acked(3, outbox, handle).await;
    server.stop().await;
    std::fs::remove_dir_all(&env.config.data_dir).unwrap();
    twokey_testkit::copy_dir(&backup, &env.config.data_dir);
    TestServer::start_at(env.config.clone(), addr).await
}

#[tokio::test]
async fn on_a_gap_a_source_sends_again_the_events_it_kept() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let outbox = vault_outbox(&env);
    let (handle, task) = plain_shipper(&env, &outbox, server.addr, Duration::from_secs(60));
    let server = restored_after_three_more(&env, &outbox, &handle, server).await;
    // Audit lost events 4..=6; the next event meets a GAP and the kept ones
    // go again first.
    let seq = emit(&outbox).await;
    assert_eq!(seq, 7);
    let mut carol = env.client(server.addr, "carol");
    let mut seqs = Vec::new();
    for _ in 0..200 {
        seqs = query_all(&mut carol)
            .await
            .iter()
            .map(|e| e.event.as_ref().unwrap().seq)
            .collect();
        if seqs.len() == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    assert_eq!(handle.stalled(), None);
    task.abort();
    server.stop().await;
}

#[tokio::test]
async fn a_source_that_no_longer_keeps_what_audit_lost_says_so() {
    let env = Env::new();
    let server = TestServer::start(env.config.clone()).await;
    let outbox = vault_outbox(&env);
    let (handle, task) = plain_shipper(&env, &outbox, server.addr, Duration::from_millis(300));
    let server = restored_after_three_more(&env, &outbox, &handle, server).await;
    // The retention dropped every kept event.
    outbox
        .prune_kept(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    emit(&outbox).await;
    let mut why = None;
    for _ in 0..200 {
        why = handle.stalled();
        if why.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let why = why.expect("the shipper says it is stalled");
    assert!(
        why.contains("audit expects event 4 of this source next")
            && why.contains("keeps events only from 7 on")
            && why.contains("restore it from a newer backup"),
        "{why}"
    );
    // Nothing was appended out of order.
    let mut carol = env.client(server.addr, "carol");
    assert_eq!(query_all(&mut carol).await.len(), 3);
    task.abort();
    server.stop().await;
}

/// Go's `golang.org/x/mod/sumdb/note` (vendored unchanged in
/// `tests/go/notecheck`) opens the cosigned checkpoint with the log's key:
/// the log's signature verifies, the two witness lines are kept as
/// signatures of unknown keys, and a changed note does not open. Skipped,
/// with a message, where Go is not installed.
fn go_sumdb_note_opens(env: &Env, note: &str) {
    use std::process::Command;
    let Some(bin) = common::go_build("notecheck", &env.path()) else {
        return;
    };
    let key = env.verifier().to_string();
    let open = |text: &str| {
        let file = env.path().join("note.txt");
        std::fs::write(&file, text).unwrap();
        Command::new(&bin).arg(&file).arg(&key).output().unwrap()
    };
    let out = open(note);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Go's sumdb/note refused the checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = &note[..note.find("\n\n").unwrap() + 1];
    assert!(stdout.starts_with(body), "{stdout}");
    assert!(
        stdout.contains(&format!("signed-by {} ", env.config.origin)),
        "{stdout}"
    );
    assert!(stdout.contains("unverified 2"), "{stdout}");
    // The size line changed: Go refuses it.
    let size_line = format!("\n{}\n", body.lines().nth(1).unwrap());
    let tampered = note.replacen(&size_line, "\n999999\n", 1);
    assert_ne!(tampered, note);
    let out = open(&tampered);
    assert!(!out.status.success(), "Go opened a changed note");
}
