//! The outbox in PostgreSQL against a real server (`TestPostgres`) and a
//! real audit service in process over mTLS: concurrent pushes from several
//! sessions are seen in sequence order with no gap that fills later; two
//! replicas push and the one holding the shipping lease ships, each event
//! once and in order, and a replica that does not ship learns when its
//! event is settled; the holder dies and the other takes over (PostgreSQL
//! stopping and starting during shipping is in `outage.rs`); an audit
//! restored from an older backup gets its tail back from the events kept
//! in PostgreSQL; and the
//! settle / keep / requeue / prune / restore-read semantics are the sled
//! outbox's, one test body run against both backends.

mod common;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use common::{Audit, PATIENCE, VAULT, id, pg, replica, seq_of, signer, until, vault_key};
use rand::Rng;
use twokey_pgstore::outbox::{PgOutbox, WaitError, spawn_leased};
use twokey_proto::audit::v1::{
    GetCheckpointRequest, SignedEvent, audit_service_client::AuditServiceClient,
};
use twokey_runtime::{
    durable::DurableDb,
    events::{EventDraft, EventSigner, verify_event},
    outbox::{Outbox, OutboxStore, RequeueError},
    time::{Clock, ManualClock, SystemClock},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_commit_in_seq_order_and_a_reader_never_sees_a_gap_that_fills_later() {
    let db = pg().await;
    let reader = PgOutbox::connect(&db.settings, signer(), Arc::new(SystemClock))
        .await
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let settings = db.settings.clone();
        writers.push(tokio::spawn(async move {
            let mut r = replica(&settings).await;
            let mut committed = 0u64;
            for i in 0..25 {
                let tx = r.client.transaction().await.unwrap();
                r.outbox
                    .push(&tx, EventDraft::new("spiffe://twokey.test/user/alice", "x"))
                    .await
                    .unwrap();
                // Hold the transaction open a random while, so commits of
                // the sessions interleave; one in five rolls back.
                let pause = rand::thread_rng().gen_range(0..8);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if i % 5 == 4 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed += 1;
                }
            }
            committed
        }));
    }
    let watcher = {
        let (reader, done) = (reader.clone(), done.clone());
        tokio::spawn(async move {
            let mut looks = 0u64;
            let mut seen = 0usize;
            loop {
                let last = done.load(std::sync::atomic::Ordering::SeqCst);
                let seqs: Vec<u64> = reader
                    .pending(1, 100_000)
                    .await
                    .unwrap()
                    .iter()
                    .map(|(s, _)| *s)
                    .collect();
                // Every event seen is preceded by all those before it.
                let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
                assert_eq!(seqs, expected, "a gap that a later commit would fill");
                assert!(seqs.len() >= seen, "events disappeared");
                seen = seqs.len();
                looks += 1;
                if last {
                    return (looks, seen);
                }
            }
        })
    };
    let mut committed = 0;
    for w in writers {
        committed += w.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (looks, seen) = watcher.await.unwrap();
    assert!(looks > 1, "the reader looked while writers were writing");
    assert_eq!(committed, 80);
    assert_eq!(seen as u64, committed);
    // Rolled-back pushes gave their numbers back: 1..=80, each signed.
    assert_eq!(reader.next_seq().await.unwrap(), committed + 1);
    for (seq, signed) in reader.pending(1, 1000).await.unwrap() {
        let event = verify_event(&signed, &vault_key().verifying_key()).unwrap();
        assert_eq!((event.seq, event.source.as_str()), (seq, VAULT));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_push_the_lease_holder_ships_each_event_once_and_the_other_takes_over() {
    let db = pg().await;
    let audit = Audit::start().await;
    let mut a = replica(&db.settings).await;
    let mut b = replica(&db.settings).await;
    let lease_a = spawn_leased(
        db.settings.clone(),
        signer(),
        Arc::new(SystemClock),
        audit.ship(),
    );
    lease_a.wait_shipping(true).await;
    let lease_b = spawn_leased(
        db.settings.clone(),
        signer(),
        Arc::new(SystemClock),
        audit.ship(),
    );
    // Both replicas write; only A ships (B keeps trying for the lease).
    for i in 0..10 {
        a.push(&format!("a.{i}")).await;
        b.push(&format!("b.{i}")).await;
    }
    audit.expect_exactly(20).await;
    assert!(lease_a.shipping());
    assert!(!lease_b.shipping(), "one shipper at a time");

    // A dies with events written and not yet shipped: its session (and
    // the lease with it) goes away; B takes over and ships the rest.
    for i in 0..20 {
        b.push(&format!("b.late.{i}")).await;
    }
    let stopped = Instant::now();
    lease_a.stop().await;
    lease_b.wait_shipping(true).await;
    eprintln!("takeover: B ships {:?} after A stopped", stopped.elapsed());
    for i in 0..10 {
        b.push(&format!("b.after.{i}")).await;
    }
    audit.expect_exactly(50).await;
    // Settled once a receipt covers them, and kept for a restore.
    let start = Instant::now();
    while b.outbox.depth().await.unwrap() > 0 {
        assert!(start.elapsed() < PATIENCE, "events never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.outbox.kept().await.unwrap(), 50, "kept for restore");

    // The holder's session is killed by the server: it stops shipping and
    // competes again; shipping goes on from whichever replica wins.
    let killed = db
        .pg
        .psql(
            "vault",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted",
        )
        .unwrap();
    assert_eq!(killed.trim(), "1");
    let lease_c = spawn_leased(
        db.settings.clone(),
        signer(),
        Arc::new(SystemClock),
        audit.ship(),
    );
    for i in 0..10 {
        a.push(&format!("a.after-kill.{i}")).await;
    }
    audit.expect_exactly(60).await;
    until("one replica ships", || {
        lease_b.shipping() != lease_c.shipping()
    })
    .await;
    lease_b.stop().await;
    lease_c.stop().await;
    audit.stop().await;
}

// ---------------------------------------------------------------------
// One body per case, run against the sled outbox and the PostgreSQL one.

fn seqs(events: &[(u64, SignedEvent)]) -> Vec<(u64, u64)> {
    events.iter().map(|(i, s)| (*i, seq_of(s))).collect()
}

async fn kept_at_their_leaf_index_and_sent_again<O, F, Fut>(outbox: &O, emit: F)
where
    O: OutboxStore,
    F: Fn() -> Fut,
    Fut: Future<Output = u64>,
{
    for i in 1..=5 {
        assert_eq!(emit().await, i);
    }
    assert_eq!(outbox.next_seq().await.unwrap(), 6);
    // Audit stored seq 1..=4 at leaves 10, 12, 13, 20; a receipt covers 1..=3.
    for (seq, leaf) in [(1, 10), (2, 12), (3, 13), (4, 20)] {
        outbox.record_leaf(seq, leaf).await.unwrap();
    }
    outbox.settle_through(3).await.unwrap();
    assert_eq!(
        (
            outbox.first_pending().await.unwrap(),
            outbox.kept().await.unwrap(),
            outbox.depth().await.unwrap()
        ),
        (Some(4), 3, 2)
    );
    // Restore from leaf 12: the kept ones, then pending with a known leaf.
    assert_eq!(
        seqs(&outbox.kept_from(12, 100).await.unwrap()),
        vec![(12, 2), (13, 3), (20, 4)]
    );
    assert_eq!(
        seqs(&outbox.kept_from(0, 2).await.unwrap()),
        vec![(10, 1), (12, 2)]
    );
    // A GAP at 2: events 2 and 3 are pending again, in order.
    outbox.requeue_from(2).await.unwrap();
    assert_eq!(outbox.first_pending().await.unwrap(), Some(2));
    let pending: Vec<u64> = outbox
        .pending(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(pending, vec![2, 3, 4, 5]);
    assert_eq!(outbox.kept().await.unwrap(), 1);
    // Nothing to put back at or above the oldest pending event.
    outbox.requeue_from(4).await.unwrap();
    assert_eq!(outbox.depth().await.unwrap(), 4);
    // An event settled without a known leaf index is only dropped.
    outbox.settle_through(2).await.unwrap();
    assert_eq!(outbox.kept().await.unwrap(), 1);
    // The accepted checkpoint is kept, and replaced.
    assert_eq!(outbox.accepted_checkpoint().await.unwrap(), None);
    outbox.set_accepted_checkpoint("note 1").await.unwrap();
    outbox.set_accepted_checkpoint("note 2").await.unwrap();
    assert_eq!(
        outbox.accepted_checkpoint().await.unwrap().as_deref(),
        Some("note 2")
    );
}

async fn past_the_retention_dropped_then_not_sent_again<O, F, Fut>(
    outbox: &O,
    clock: &ManualClock,
    start: SystemTime,
    emit: F,
) where
    O: OutboxStore,
    F: Fn() -> Fut,
    Fut: Future<Output = u64>,
{
    for seq in 1..=4 {
        assert_eq!(emit().await, seq);
        outbox.record_leaf(seq, seq - 1).await.unwrap();
        clock.advance(Duration::from_secs(3600));
    }
    outbox.settle_through(4).await.unwrap();
    // Events 1 and 2 are older than the cutoff.
    let cutoff = start + Duration::from_secs(2 * 3600);
    assert_eq!(outbox.prune_kept(cutoff).await.unwrap(), 2);
    assert_eq!(
        seqs(&outbox.kept_from(0, 10).await.unwrap()),
        vec![(2, 3), (3, 4)]
    );
    match outbox.requeue_from(1).await {
        Err(RequeueError::Unrecoverable(u)) => {
            assert_eq!((u.expected, u.kept_from), (1, 3));
            assert!(u.to_string().contains("audit_keep_days"), "{u}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        outbox.first_pending().await.unwrap(),
        None,
        "nothing put back on failure"
    );
    outbox.requeue_from(3).await.unwrap();
    assert_eq!(outbox.first_pending().await.unwrap(), Some(3));
}

fn draft() -> EventDraft {
    EventDraft::new("spiffe://twokey.test/user/alice", "x")
}

fn manual_clock() -> (Arc<ManualClock>, SystemTime) {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    (Arc::new(ManualClock::new(start)), start)
}

fn sled_outbox(dir: &std::path::Path, clock: Arc<dyn Clock>) -> Outbox {
    let db = DurableDb::open(dir).unwrap();
    Outbox::open(&db, EventSigner::new(id(VAULT), vault_key()), clock).unwrap()
}

#[tokio::test]
async fn sled_keeps_events_at_their_leaf_index_and_sends_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let o = sled_outbox(dir.path(), Arc::new(SystemClock));
    kept_at_their_leaf_index_and_sent_again(&o, || async { o.emit(draft()).await.unwrap() }).await;
}

#[tokio::test]
async fn postgres_keeps_events_at_their_leaf_index_and_sends_them_again() {
    let db = pg().await;
    let o = PgOutbox::connect(&db.settings, signer(), Arc::new(SystemClock))
        .await
        .unwrap();
    kept_at_their_leaf_index_and_sent_again(&o, || async { o.emit(draft()).await.unwrap() }).await;
}

#[tokio::test]
async fn sled_drops_kept_events_past_the_retention_and_cannot_send_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, start) = manual_clock();
    let o = sled_outbox(dir.path(), clock.clone());
    past_the_retention_dropped_then_not_sent_again(&o, &clock, start, || async {
        o.emit(draft()).await.unwrap()
    })
    .await;
}

#[tokio::test]
async fn postgres_drops_kept_events_past_the_retention_and_cannot_send_them_again() {
    let db = pg().await;
    let (clock, start) = manual_clock();
    let o = PgOutbox::connect(&db.settings, signer(), clock.clone())
        .await
        .unwrap();
    past_the_retention_dropped_then_not_sent_again(&o, &clock, start, || async {
        o.emit(draft()).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audit_restored_from_an_older_backup_gets_its_tail_back_from_postgres() {
    let db = pg().await;
    let mut audit = Audit::start().await;
    let mut r = replica(&db.settings).await;
    let lease = spawn_leased(
        db.settings.clone(),
        signer(),
        Arc::new(SystemClock),
        audit.ship(),
    );
    for i in 0..3 {
        r.push(&format!("before.{i}")).await;
    }
    audit.expect_exactly(3).await;

    // A backup of audit's data, taken with audit stopped.
    audit.halt().await;
    let backup = audit.dir.path().join("backup");
    twokey_testkit::copy_dir(&audit.config.data_dir, &backup);
    audit.resume().await;

    // Five more, acknowledged, covered by a checkpoint the source accepted
    // (kept in PostgreSQL), settled and kept.
    for i in 0..5 {
        r.push(&format!("after.{i}")).await;
    }
    audit.expect_exactly(8).await;
    let before = audit.entries().await;
    let verifier = audit.verifier();
    let start = Instant::now();
    loop {
        let accepted = r
            .outbox
            .accepted_checkpoint()
            .await
            .unwrap()
            .map(|note| verifier.open_checkpoint(&note).unwrap().size);
        if accepted == Some(8) && r.outbox.depth().await.unwrap() == 0 {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "never accepted and settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.outbox.kept().await.unwrap(), 8);

    // Audit's host is lost and the older backup restored: it asks the
    // source, which sends what it kept in PostgreSQL, at the same indices.
    audit.halt().await;
    std::fs::remove_dir_all(&audit.config.data_dir).unwrap();
    twokey_testkit::copy_dir(&backup, &audit.config.data_dir);
    audit.resume().await;
    let start = Instant::now();
    loop {
        // Unavailable ("restoring") until the sources made it whole.
        let mut carol = AuditServiceClient::new(audit.channel("carol"));
        if let Ok(cp) = carol.get_checkpoint(GetCheckpointRequest {}).await
            && cp.get_ref().tree_size >= 8
        {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "audit was never restored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    audit.expect_exactly(8).await;
    let after = audit.entries().await;
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.signed_event, b.signed_event, "entry {}", a.index);
    }
    // New events flow again.
    r.push("later").await;
    audit.expect_exactly(9).await;
    lease.stop().await;
    audit.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_does_not_ship_learns_when_its_event_is_settled() {
    let db = pg().await;
    let audit = Audit::start().await;
    let mut a = replica(&db.settings).await;
    let mut b = replica(&db.settings).await;
    // No replica ships yet: B's event is not settled, and waiting says so.
    let first = b.push("b.0").await;
    assert!(!b.outbox.is_settled(first).await.unwrap());
    match b
        .outbox
        .wait_settled(first, Duration::from_millis(300))
        .await
    {
        Err(WaitError::Timeout(seq)) => assert_eq!(seq, first),
        other => panic!("{other:?}"),
    }
    // A ships; B, which does not, sees its events settled.
    let lease_a = spawn_leased(
        db.settings.clone(),
        signer(),
        Arc::new(SystemClock),
        audit.ship(),
    );
    for i in 1..=5 {
        let seq = b.push(&format!("b.{i}")).await;
        b.outbox.wait_settled(seq, PATIENCE).await.unwrap();
        assert!(b.outbox.is_settled(seq).await.unwrap());
        assert!(a.outbox.is_settled(seq).await.unwrap());
    }
    assert!(b.outbox.is_settled(first).await.unwrap());
    // A sequence number not yet handed out is not settled.
    assert!(!b.outbox.is_settled(7).await.unwrap());
    let seq = a.push("a.0").await;
    assert_eq!(seq, 7);
    a.outbox.wait_settled(seq, PATIENCE).await.unwrap();
    audit.expect_exactly(7).await;
    lease_a.stop().await;
    audit.stop().await;
}

/// PostgreSQL restarted under a store's outbox: one opened `reopening`
/// waits for and emits events again once the server is back (its session,
/// and its LISTEN, opened again); one without it keeps failing, as every
/// vault release did before (`audit unavailable` for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reopening_outbox_waits_and_emits_again_after_postgres_restarted() {
    let db = pg().await;
    let audit = Audit::start().await;
    let reopening = PgOutbox::connect(&db.settings, signer(), Arc::new(SystemClock))
        .await
        .unwrap()
        .reopening(&db.settings);
    let plain = PgOutbox::connect(&db.settings, signer(), Arc::new(SystemClock))
        .await
        .unwrap();
    let lease = spawn_leased(
        db.settings.clone(),
        signer(),
        Arc::new(SystemClock),
        audit.ship(),
    );
    let before = reopening
        .emit(EventDraft::new("spiffe://t/user/a", "before"))
        .await
        .unwrap();
    reopening.wait_settled(before, PATIENCE).await.unwrap();

    db.pg.stop().unwrap();
    assert!(
        reopening
            .emit(EventDraft::new("spiffe://t/user/a", "down"))
            .await
            .is_err()
    );
    db.pg.start_server().unwrap();

    // Back: the reopening outbox emits, and learns its event is settled.
    let deadline = Instant::now() + PATIENCE;
    let after = loop {
        match reopening
            .emit(EventDraft::new("spiffe://t/user/a", "after"))
            .await
        {
            Ok(seq) => break seq,
            Err(e) => {
                assert!(Instant::now() < deadline, "never emitted again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(after, before + 1);
    reopening.wait_settled(after, PATIENCE).await.unwrap();
    // The other one's session stays closed.
    assert!(plain.is_settled(before).await.is_err());
    assert!(
        plain
            .emit(EventDraft::new("spiffe://t/user/a", "x"))
            .await
            .is_err()
    );
    audit.expect_exactly(after).await;
    lease.stop().await;
    audit.stop().await;
}
