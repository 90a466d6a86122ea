//! The PostgreSQL store and log against a real server
//! (`twokey_testkit::postgres`): the backend-independent store and log
//! bodies run on the tile store and on PostgreSQL; the lease, the head
//! committed with its entries, rollback refusals and a server restart.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ed25519_dalek::SigningKey;
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::{
    SpiffeId,
    error::{ErrorKind, ServiceError},
    events::{EventDraft, EventSigner},
    time::ManualClock,
};
use twokey_testkit::postgres::TestPostgres;

use super::*;
use crate::{
    checkpoint::CheckpointSigner,
    merkle::{self, root, subtree_root},
    service::{Ack, AuditLog, QueryFilter},
    store::TileStore,
    verify::verify_log,
};

const VAULT: &str = "spiffe://t/svc/vault";
const BROKER: &str = "spiffe://t/svc/broker";

struct Db {
    pg: TestPostgres,
    settings: PgSettings,
    _dir: tempfile::TempDir,
}

fn db() -> Db {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    pg.create_database("audit", "audit_role", "audit-pw")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("audit_role.pw");
    std::fs::write(&file, "audit-pw\n").unwrap();
    let settings = PgSettings {
        url: pg.url("audit", "audit_role"),
        password_file: Some(file),
        ca_file: None,
    };
    Db {
        pg,
        settings,
        _dir: dir,
    }
}

fn raw_entry(index: u64, seq: u64) -> (LogEntry, Hash) {
    let event = Event {
        source: VAULT.into(),
        seq,
        account_id: format!("acct{}", index % 3),
        ..Event::default()
    };
    let signed = SignedEvent {
        event: event.encode_to_vec(),
        signature: vec![index as u8; 64],
    };
    let leaf = leaf_hash(&signed.encode_to_vec());
    (
        LogEntry {
            index,
            signed_event: Some(signed),
            event: Some(event),
            received_at: Some(Timestamp {
                seconds: 1_700_000_000 + index as i64,
                nanos: 7,
            }),
        },
        leaf,
    )
}

fn head_over(store: &PgLogStore, size: u64) -> TreeHead {
    TreeHead {
        size,
        root: subtree_root(0, size, &mut |l, n| store.node(l, n)).unwrap(),
        note: format!("test head of {size}\n"),
    }
}

async fn sequencer(settings: &PgSettings) -> PgLogStore {
    let store = PgLogStore::open(settings.clone()).await.unwrap();
    assert!(store.try_lease().await.unwrap());
    let size = store.load_head().await.unwrap().0;
    store.become_sequencer(size);
    store
}

#[tokio::test]
async fn stored_nodes_give_the_roots_of_rehashing_and_a_group_is_written_with_its_head() {
    let db = db();
    let store = sequencer(&db.settings).await;
    let mut leaves = Vec::new();
    for i in 0..37 {
        let (e, leaf) = raw_entry(i, i + 1);
        store.append(&e, &leaf).unwrap();
        leaves.push(leaf);
        let got = subtree_root(0, i + 1, &mut |l, n| store.node(l, n)).unwrap();
        assert_eq!(got, root(&leaves), "size {}", i + 1);
        if i == 20 {
            // A group covering the first 21 while more are staged after.
            store.commit_group(&head_over(&store, 21)).await.unwrap();
        }
    }
    // Staged entries are read from memory, not yet in the database.
    assert_eq!(store.entry(30).unwrap().unwrap(), raw_entry(30, 31).0);
    assert_eq!(
        db.pg
            .psql("audit", "SELECT count(*) FROM audit_entries")
            .unwrap(),
        "21"
    );
    assert_eq!(
        db.pg.psql("audit", "SELECT size FROM audit_head").unwrap(),
        "21"
    );
    store.commit_group(&head_over(&store, 37)).await.unwrap();
    assert_eq!(
        db.pg
            .psql("audit", "SELECT size, note FROM audit_head")
            .unwrap(),
        "37|test head of 37"
    );
    // An append never committed is not there for the next reader.
    let (e, leaf) = raw_entry(37, 38);
    store.append(&e, &leaf).unwrap();
    drop(store);

    let store = PgLogStore::open(db.settings.clone()).await.unwrap();
    assert_eq!(store.size(), 37);
    assert_eq!(store.next_seq(VAULT).unwrap(), 38);
    assert_eq!(store.next_seq(BROKER).unwrap(), 1);
    assert_eq!(store.index_of(VAULT, 5).unwrap(), Some(4));
    assert_eq!(store.index_of(VAULT, 38).unwrap(), None);
    assert_eq!(store.entry(4).unwrap().unwrap(), raw_entry(4, 5).0);
    assert_eq!(store.entry(37).unwrap(), None);
    let got = subtree_root(0, 37, &mut |l, n| store.node(l, n)).unwrap();
    assert_eq!(got, root(&leaves));
    // Every acknowledgement is a commit flushed to disk.
    assert_eq!(
        db.pg.psql("audit", "SHOW synchronous_commit").unwrap(),
        "on"
    );
}

#[tokio::test]
async fn one_sequencer_at_a_time_and_the_next_takes_over_when_its_session_dies() {
    let db = db();
    let a = sequencer(&db.settings).await;
    let b = PgLogStore::open(db.settings.clone()).await.unwrap();
    assert!(!b.try_lease().await.unwrap(), "a holds the lease");
    assert!(!b.is_sequencer());
    let (e, leaf) = raw_entry(0, 1);
    match b.append(&e, &leaf) {
        Err(AuditError::NotSequencer(m)) => assert_eq!(m, NOT_SEQUENCER),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.may_append().unwrap_err().kind(), ErrorKind::Unavailable);
    a.append(&e, &leaf).unwrap();
    a.commit_group(&head_over(&a, 1)).await.unwrap();

    // a's sessions are terminated by the server: its lease is gone, its
    // next commit fails and drops what it staged; b takes over.
    let (e1, leaf1) = raw_entry(1, 2);
    a.append(&e1, &leaf1).unwrap();
    db.pg
        .psql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'audit' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let epoch = a.epoch();
    assert!(!a.lease_alive().await);
    assert!(a.commit_group(&head_over(&a, 2)).await.is_err());
    assert!(!a.is_sequencer());
    assert_ne!(
        a.epoch(),
        epoch,
        "staged appends are dropped with the lease"
    );
    assert_eq!(a.size(), 1);
    assert!(b.try_lease().await.unwrap());
    assert_eq!(b.load_head().await.unwrap().0, 1);
    b.become_sequencer(1);
    b.append(&e1, &leaf1).unwrap();
    b.commit_group(&head_over(&b, 2)).await.unwrap();
    assert!(!a.try_lease().await.unwrap(), "b holds it now");
    assert_eq!(
        db.pg.psql("audit", "SELECT size FROM audit_head").unwrap(),
        "2"
    );
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

struct Sources {
    vault: EventSigner,
    broker: EventSigner,
}

fn sources() -> Sources {
    Sources {
        vault: EventSigner::new(id(VAULT), SigningKey::from_bytes(&[1; 32])),
        broker: EventSigner::new(id(BROKER), SigningKey::from_bytes(&[2; 32])),
    }
}

const START: u64 = 1_700_000_000;

fn log_over<S: LogStore>(store: S, s: &Sources) -> AuditLog<S> {
    AuditLog::new(
        store,
        [
            (id(VAULT), s.vault.verifying_key()),
            (id(BROKER), s.broker.verifying_key()),
        ]
        .into(),
        [id("spiffe://t/user/carol")].into(),
        CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap(),
        Arc::new(ManualClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(START),
        )),
    )
}

fn event(
    signer: &EventSigner,
    seq: u64,
    account: &str,
    action: &str,
) -> twokey_proto::audit::v1::SignedEvent {
    // Event times run backwards against seq, so a time walk's order is
    // not the index order.
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(START + 1000 - seq);
    signer.sign(
        &EventDraft::new("spiffe://t/user/alice", action)
            .account(account)
            .request(format!("r{}", seq % 4))
            .outcome(Outcome::Success)
            .into_event(signer.source(), seq, at),
    )
}

/// What a log does on any store: appends (stored, duplicate, gap), reads,
/// queries walked by each index with paging, checkpoints and proofs.
/// Returns what the log held, for comparing the stores.
async fn log_body<S: LogStore>(log: &AuditLog<S>, s: &Sources) -> Vec<String> {
    let (v, b) = (id(VAULT), id(BROKER));
    let mut acks = Vec::new();
    for seq in 1..=30 {
        let account = if seq % 3 == 0 { "aws-prod" } else { "aws-dev" };
        acks.push(
            log.append(&v, event(&s.vault, seq, account, "release"))
                .await
                .unwrap(),
        );
        if seq % 2 == 0 {
            let ack = log
                .append(&b, event(&s.broker, seq / 2, account, "approve"))
                .await
                .unwrap();
            acks.push(ack);
        }
    }
    assert_eq!(log.size(), 45);
    assert_eq!(
        log.append(&v, event(&s.vault, 3, "aws-prod", "release"))
            .await
            .unwrap(),
        Ack::Duplicate {
            seq: 3,
            index: 3,
            expected: 31
        }
    );
    assert_eq!(
        log.append(&v, event(&s.vault, 33, "aws-prod", "release"))
            .await
            .unwrap(),
        Ack::Gap {
            seq: 33,
            expected: 31
        }
    );
    let mut seen = Vec::new();
    let filters = [
        QueryFilter::default(),
        QueryFilter {
            account_id: "aws-prod".into(),
            ..QueryFilter::default()
        },
        QueryFilter {
            request_id: "r1".into(),
            newest_first: true,
            ..QueryFilter::default()
        },
        QueryFilter {
            actor: "alice".into(),
            action: "approve".into(),
            ..QueryFilter::default()
        },
        QueryFilter {
            source: BROKER.into(),
            newest_first: true,
            ..QueryFilter::default()
        },
        QueryFilter {
            since: Some(((START + 980) as i64, 0)),
            until: Some(((START + 995) as i64, 0)),
            ..QueryFilter::default()
        },
        QueryFilter {
            since: Some(((START + 980) as i64, 0)),
            newest_first: true,
            ..QueryFilter::default()
        },
    ];
    for filter in filters {
        let mut all = Vec::new();
        let mut start = None;
        loop {
            let batch = log.query_batch(&filter, start, 4).unwrap();
            all.extend(batch.entries.iter().map(|e| e.index));
            match batch.next {
                Some(n) => start = Some(n),
                None => break,
            }
        }
        assert!(!all.is_empty(), "{filter:?}");
        let unpaged: Vec<u64> = log
            .query_batch(&filter, None, 1000)
            .unwrap()
            .entries
            .iter()
            .map(|e| e.index)
            .collect();
        assert_eq!(all, unpaged, "paging changes nothing: {filter:?}");
        seen.push(format!("{filter:?}: {all:?}"));
    }
    let checkpoint = log.checkpoint().unwrap();
    assert_eq!(checkpoint.size, 45);
    let entries: Vec<LogEntry> = (0..45).map(|i| log.entry(i).unwrap().unwrap()).collect();
    let keys: BTreeMap<String, _> = [
        (VAULT.to_owned(), s.vault.verifying_key()),
        (BROKER.to_owned(), s.broker.verifying_key()),
    ]
    .into();
    let verifier = log.signer().verifier();
    verify_log(&entries, &keys, Some((&checkpoint.note, &verifier))).unwrap();
    let leaves: Vec<Hash> = entries
        .iter()
        .map(|e| crate::verify::entry_leaf_hash(e).unwrap())
        .collect();
    let (size, proof) = log.inclusion_proof(17, 0).unwrap();
    assert!(merkle::verify_inclusion(17, size, &leaves[17], &proof, &checkpoint.root).is_ok());
    let (_, proof) = log.consistency_proof(20, 45).unwrap();
    assert!(
        merkle::verify_consistency(20, 45, &proof, &root(&leaves[..20]), &checkpoint.root).is_ok()
    );
    seen.push(format!("{:?}", checkpoint.note));
    seen.push(format!("{acks:?}"));
    seen
}

#[tokio::test]
async fn the_log_answers_the_same_on_tiles_and_on_postgres() {
    let s = sources();
    let dir = tempfile::tempdir().unwrap();
    let tiles = log_over(TileStore::open(dir.path()).unwrap(), &s);
    tiles.recover().await.unwrap();
    let on_tiles = log_body(&tiles, &s).await;

    let db = db();
    let log = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(log.store().try_lease().await.unwrap());
    log.take_over().await.unwrap();
    let on_pg = log_body(&log, &s).await;
    assert_eq!(on_tiles, on_pg);
    // The head in the database is the checkpoint served, committed with
    // the entries it covers.
    let note = log.checkpoint().unwrap().note;
    assert_eq!(log.store().load_head().await.unwrap(), (45, Some(note)));
}

#[tokio::test]
async fn a_follower_serves_reads_refuses_appends_and_takes_over_when_the_holder_dies() {
    let s = sources();
    let db = db();
    let a = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(a.store().try_lease().await.unwrap());
    a.take_over().await.unwrap();
    let b = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(!b.store().try_lease().await.unwrap());
    let v = id(VAULT);
    for seq in 1..=5 {
        a.append(&v, event(&s.vault, seq, "aws-prod", "release"))
            .await
            .unwrap();
    }
    let refused = b
        .append(&v, event(&s.vault, 6, "aws-prod", "release"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unavailable);
    assert_eq!(refused.to_string(), NOT_SEQUENCER);
    b.follow().await.unwrap();
    assert_eq!(b.size(), 5);
    assert_eq!(b.checkpoint().unwrap(), a.checkpoint().unwrap());
    assert_eq!(b.entry(4).unwrap(), a.entry(4).unwrap());
    assert_eq!(
        b.inclusion_proof(2, 5).unwrap(),
        a.inclusion_proof(2, 5).unwrap()
    );

    // The holder's sessions end; the follower takes over, and the source
    // goes on from the seq it sent last.
    db.pg
        .psql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'audit' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let failed = a
        .append(&v, event(&s.vault, 6, "aws-prod", "release"))
        .await
        .unwrap_err();
    assert_eq!(failed.kind(), ErrorKind::Unavailable, "{failed}");
    assert!(b.store().try_lease().await.unwrap());
    b.take_over().await.unwrap();
    assert_eq!(
        b.append(&v, event(&s.vault, 6, "aws-prod", "release"))
            .await
            .unwrap(),
        Ack::Stored { seq: 6, index: 5 }
    );
    assert_eq!(b.checkpoint().unwrap().size, 6);
}

#[tokio::test]
async fn a_new_sequencer_refuses_a_tree_that_does_not_extend_the_signed_head() {
    let s = sources();
    let db = db();
    let a = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(a.store().try_lease().await.unwrap());
    a.take_over().await.unwrap();
    let v = id(VAULT);
    for seq in 1..=4 {
        a.append(&v, event(&s.vault, seq, "aws-prod", "release"))
            .await
            .unwrap();
    }
    let b = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    b.follow().await.unwrap();
    a.store().give_up_lease().await;

    // A stored hash altered: the tree's root is not the signed root.
    db.pg
        .psql(
            "audit",
            "UPDATE audit_nodes SET hash = sha256(hash) WHERE level = 2 AND idx = 0",
        )
        .unwrap();
    let c = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(c.store().try_lease().await.unwrap());
    let e = c.take_over().await.unwrap_err();
    assert!(matches!(e, AuditError::TreeHead(_)), "{e}");
    assert!(e.to_string().contains("a fork"), "{e}");
    assert!(!c.store().is_sequencer());
    c.store().give_up_lease().await;

    // The database rolled back to an older head and tree: a replica that
    // saw the larger head refuses it.
    db.pg
        .psql(
            "audit",
            "DELETE FROM audit_entries WHERE idx >= 2; DELETE FROM audit_nodes WHERE idx * (1::bigint << level) >= 2 OR (level = 2); \
             UPDATE audit_head SET size = 2",
        )
        .unwrap();
    assert!(b.store().try_lease().await.unwrap());
    let e = b.take_over().await.unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    assert!(!b.store().is_sequencer());
}

#[tokio::test]
async fn postgres_restarted_during_appends_answers_unavailable_then_recovers_with_nothing_lost() {
    let s = sources();
    let db = db();
    let log = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(log.store().try_lease().await.unwrap());
    log.take_over().await.unwrap();
    let v = id(VAULT);
    let mut acked = Vec::new();
    for seq in 1..=3 {
        acked.push(
            log.append(&v, event(&s.vault, seq, "aws-prod", "release"))
                .await
                .unwrap(),
        );
    }
    db.pg.stop().unwrap();
    let e = log
        .append(&v, event(&s.vault, 4, "aws-prod", "release"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string().contains("PostgreSQL is unavailable") || e.to_string() == NOT_SEQUENCER,
        "{e}"
    );
    assert!(log.store().try_lease().await.is_err());
    db.pg.start_server().unwrap();
    log.store().give_up_lease().await;
    assert!(log.store().try_lease().await.unwrap());
    log.take_over().await.unwrap();
    assert_eq!(log.size(), 3);
    for seq in 4..=6 {
        acked.push(
            log.append(&v, event(&s.vault, seq, "aws-prod", "release"))
                .await
                .unwrap(),
        );
    }
    let entries: Vec<LogEntry> = (0..6).map(|i| log.entry(i).unwrap().unwrap()).collect();
    let checkpoint = log.checkpoint().unwrap();
    verify_log(
        &entries,
        &[(VAULT.to_owned(), s.vault.verifying_key())].into(),
        Some((&checkpoint.note, &log.signer().verifier())),
    )
    .unwrap();
    for (i, ack) in acked.iter().enumerate() {
        assert_eq!(
            *ack,
            Ack::Stored {
                seq: i as u64 + 1,
                index: i as u64
            }
        );
    }
}

/// A source's hello to a follower whose size lags the database (the
/// source reached it while the sequencer died, before it took over): the
/// larger checkpoint the source holds is not taken as entries lost — no
/// restore starts, appends are not refused for one — and once the
/// follower takes over with the database's size, the same hello is no
/// restore either.
#[tokio::test]
async fn a_follower_behind_the_database_does_not_start_a_restore_at_a_hello() {
    let s = sources();
    let db = db();
    let a = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(a.store().try_lease().await.unwrap());
    a.take_over().await.unwrap();
    let b = log_over(PgLogStore::open(db.settings.clone()).await.unwrap(), &s);
    assert!(!b.store().try_lease().await.unwrap());
    let v = id(VAULT);
    for seq in 1..=3 {
        a.append(&v, event(&s.vault, seq, "aws-prod", "release"))
            .await
            .unwrap();
    }
    b.follow().await.unwrap();
    for seq in 4..=6 {
        a.append(&v, event(&s.vault, seq, "aws-prod", "release"))
            .await
            .unwrap();
    }
    // B has followed to 3; the source holds the checkpoint of 6.
    assert_eq!(b.size(), 3);
    let note = a.checkpoint().unwrap().note;
    assert_eq!(b.hello(&v, &note), None);

    // The sequencer's sessions end; B takes over at 6 and appends on.
    db.pg
        .psql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'audit' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if b.store().try_lease().await.unwrap_or(false) && b.take_over().await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "B never took over");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(b.size(), 6);
    assert_eq!(b.hello(&v, &note), None);
    b.append(&v, event(&s.vault, 7, "aws-prod", "release"))
        .await
        .unwrap();
    assert_eq!(b.size(), 7);
}
