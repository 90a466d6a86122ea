//! Tests of the log with its journal, as the service runs it: a group
//! commit is acknowledged from the journal alone, a crash before the store
//! is written loses nothing acknowledged, replay is idempotent, and a
//! journal that disagrees with the store is refused.

use std::{path::Path, sync::Arc, time::SystemTime};

use ed25519_dalek::SigningKey;
use twokey_runtime::{events::EventSigner, time::ManualClock};

use super::tests::{VAULT, event, id};
use super::*;
use crate::{journal::Journal, store::TileStore};

fn signer() -> CheckpointSigner {
    CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap()
}

fn vault() -> EventSigner {
    EventSigner::new(id(VAULT), SigningKey::from_bytes(&[1; 32]))
}

/// A log over `dir` opened as `serve` opens it: store, checkpoint file,
/// journal, recovered.
async fn open(dir: &Path) -> Result<AuditLog<TileStore>, AuditError> {
    let store = TileStore::open(dir).unwrap();
    let head = TreeHeadFile::load(dir, &signer().verifier())?;
    let journal = Journal::open(dir, store.size())?;
    let log = AuditLog::new(
        store,
        [(id(VAULT), vault().verifying_key())].into(),
        [id("spiffe://t/user/carol")].into(),
        signer(),
        Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH)),
    )
    .with_tree_head(head)
    .with_journal(journal);
    log.recover().await?;
    Ok(log)
}

/// Appends `seqs` of the vault, `together` at a time sharing one group.
async fn append(log: &AuditLog<TileStore>, seqs: std::ops::RangeInclusive<u64>, together: usize) {
    let v = vault();
    let seqs: Vec<u64> = seqs.collect();
    for chunk in seqs.chunks(together) {
        let pending: Vec<_> = chunk
            .iter()
            .map(|s| {
                log.begin_append(&id(VAULT), event(&v, *s, "a", SystemTime::UNIX_EPOCH))
                    .unwrap()
            })
            .collect();
        for p in pending {
            assert!(matches!(log.finish(p).await.unwrap(), Ack::Stored { .. }));
        }
    }
}

fn file_size(dir: &Path) -> Option<u64> {
    let note = std::fs::read_to_string(dir.join(crate::head::FILE_NAME)).ok()?;
    let body = format!("{}\n", note.split_once("\n\n").unwrap().0);
    Some(Checkpoint::parse_body(&body).unwrap().size)
}

#[tokio::test]
async fn a_group_is_acknowledged_from_the_journal_and_survives_a_crash_before_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await.unwrap();
    append(&log, 1..=40, 10).await;
    assert_eq!(log.size(), 40);
    assert_eq!(log.sync_count(), 4, "one journal record per group");
    // Nothing but the journal holds the entries yet; the head signed over
    // each group is kept in memory and in the journal.
    assert_eq!(log.applied_size(), 0);
    assert_eq!(file_size(dir.path()), None);
    let cp = log.checkpoint().unwrap();
    assert_eq!(cp.size, 40);
    assert_eq!(log.tree_head().unwrap().note, cp.note);
    // A crash: the store's staged writes are lost with the process.
    drop(log);
    let log = open(dir.path()).await.unwrap();
    assert_eq!(log.size(), 40);
    assert_eq!(log.checkpoint().unwrap(), cp);
    assert_eq!(
        log.applied_size(),
        40,
        "recovery writes the store and the file"
    );
    assert_eq!(file_size(dir.path()), Some(40));
    let e = log.entry(39).unwrap().unwrap();
    assert_eq!(e.event.unwrap().seq, 40);
    assert_eq!(
        e.received_at,
        Some(twokey_proto::Timestamp {
            seconds: 0,
            nanos: 0
        })
    );
    assert_eq!(log.store().next_seq(VAULT).unwrap(), 41);
    // The source goes on where it was.
    append(&log, 41..=45, 5).await;
    assert_eq!(log.size(), 45);
}

#[tokio::test]
async fn apply_writes_the_store_and_checkpoint_file_and_replay_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await.unwrap();
    append(&log, 1..=30, 7).await;
    log.apply().await.unwrap();
    assert_eq!(log.applied_size(), 30);
    assert_eq!(file_size(dir.path()), Some(30));
    assert_eq!(log.apply_count(), 1);
    log.apply().await.unwrap();
    assert_eq!(log.apply_count(), 1, "nothing new: no apply");
    // More after the apply, then a crash.
    append(&log, 31..=50, 4).await;
    let cp = log.checkpoint().unwrap();
    drop(log);
    // Replayed once, twice: the same log.
    for _ in 0..2 {
        let log = open(dir.path()).await.unwrap();
        assert_eq!(log.size(), 50);
        assert_eq!(log.checkpoint().unwrap(), cp);
        assert_eq!(log.store().next_seq(VAULT).unwrap(), 51);
        let root = log.store().verify_all().unwrap();
        assert_eq!(root, cp.root);
    }
}

#[tokio::test]
async fn a_store_that_holds_part_of_a_record_takes_the_rest_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await.unwrap();
    append(&log, 1..=20, 20).await;
    // The store synced in the middle of the next group (as an apply does
    // while appends go on): entries 20..25 are in it, the record holds
    // 20..30.
    let v = vault();
    let pending: Vec<_> = (21..=30)
        .map(|s| {
            let p = log
                .begin_append(&id(VAULT), event(&v, s, "a", SystemTime::UNIX_EPOCH))
                .unwrap();
            if s == 25 {
                log.store().sync_blocking().unwrap();
            }
            p
        })
        .collect();
    for p in pending {
        log.finish(p).await.unwrap();
    }
    let cp = log.checkpoint().unwrap();
    drop(log);
    let log = open(dir.path()).await.unwrap();
    assert_eq!(log.checkpoint().unwrap(), cp);
    assert_eq!(log.store().verify_all().unwrap(), cp.root);
}

#[tokio::test]
async fn a_journal_that_disagrees_with_the_store_is_refused() {
    // The journal of one log beside the store of another, both holding
    // entries 0..10 of the vault, with different events.
    let a = tempfile::tempdir().unwrap();
    let log = open(a.path()).await.unwrap();
    append(&log, 1..=10, 10).await;
    log.apply().await.unwrap();
    append(&log, 11..=12, 2).await;
    drop(log);
    let b = tempfile::tempdir().unwrap();
    let log = open(b.path()).await.unwrap();
    let v = vault();
    for s in 1..=10 {
        log.append(&id(VAULT), event(&v, s, "other", SystemTime::UNIX_EPOCH))
            .await
            .unwrap();
    }
    log.apply().await.unwrap();
    drop(log);
    std::fs::remove_dir_all(b.path().join(crate::journal::DIR)).unwrap();
    std::fs::remove_file(b.path().join(crate::head::FILE_NAME)).unwrap();
    copy_dir(
        &a.path().join(crate::journal::DIR),
        &b.path().join(crate::journal::DIR),
    );
    // Opened at 10 the journal hands back its record 10..12 (the first
    // two groups' are applied); the record's entries follow on in seq, but
    // its checkpoint signs another root at 12.
    let err = open(b.path()).await.unwrap_err().to_string();
    assert!(
        err.contains("does not extend its signed tree head"),
        "{err}"
    );
    // A journal whose record overlaps the store with other entries.
    let c = tempfile::tempdir().unwrap();
    let log = open(c.path()).await.unwrap();
    append(&log, 1..=10, 10).await;
    drop(log);
    let d = tempfile::tempdir().unwrap();
    let log = open(d.path()).await.unwrap();
    for s in 1..=5 {
        log.append(&id(VAULT), event(&v, s, "other", SystemTime::UNIX_EPOCH))
            .await
            .unwrap();
    }
    log.apply().await.unwrap();
    drop(log);
    std::fs::remove_dir_all(d.path().join(crate::journal::DIR)).unwrap();
    copy_dir(
        &c.path().join(crate::journal::DIR),
        &d.path().join(crate::journal::DIR),
    );
    let err = open(d.path()).await.unwrap_err().to_string();
    assert!(
        err.contains("journal entry 0: it differs from the entry stored there"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
