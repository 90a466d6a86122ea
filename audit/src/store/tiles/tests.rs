//! Tests of the tile store: the files on disk are C2SP tiles a client can
//! check on its own, staging and commit, reopening, the entry size limit,
//! the query indexes and the migration from the sled store.

use std::path::Path;

use prost::Message;
use twokey_proto::{
    Timestamp,
    audit::v1::{Event, LogEntry, SignedEvent},
};
use twokey_runtime::durable::DurableDb;
use twokey_tlog::tile::{self, Kind, Tile, WIDTH};

use super::*;
use crate::{
    error::AuditError,
    merkle::{Hash, leaf_hash, root, subtree_root},
    store::{LogStore, SledStore, StoreProblem, Walk, migrate},
};

const VAULT: &str = "spiffe://t/svc/vault";
const BROKER: &str = "spiffe://t/svc/broker";

fn entry(index: u64, source: &str, seq: u64) -> (LogEntry, Hash) {
    let event = Event {
        source: source.into(),
        seq,
        actor: format!("spiffe://t/user/u{}", seq % 3),
        action: if seq.is_multiple_of(2) { "even" } else { "odd" }.into(),
        account_id: format!("acct{}", seq % 5),
        request_id: format!("r{}", seq / 2),
        time: Some(Timestamp {
            seconds: 1_700_000_000 + index as i64,
            nanos: 0,
        }),
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
                seconds: 1_800_000_000 + index as i64,
                nanos: 7,
            }),
        },
        leaf,
    )
}

fn root_of(store: &impl LogStore, size: u64) -> Hash {
    subtree_root(0, size, &mut |l, i| store.node(l, i)).unwrap()
}

/// The root of the tree of `size` computed from the files alone, as a
/// tile client does: entry bundles rehashed into leaves, which must equal
/// the level-0 tiles, whose full tiles must hash to the level-1 tiles, and
/// so on; then the root from the leaves.
fn root_from_files(log: &Path, size: u64) -> Hash {
    let read =
        |t: Tile| std::fs::read(log.join(t.path())).unwrap_or_else(|e| panic!("{}: {e}", t.path()));
    let mut leaves = Vec::new();
    for n in 0..size.div_ceil(WIDTH) {
        let width = (size - n * WIDTH).min(WIDTH) as u16;
        let bundle = read(Tile {
            kind: Kind::Entries,
            index: n,
            width,
        });
        let hashes = tile::parse_hash_tile(&read(Tile {
            kind: Kind::Hashes(0),
            index: n,
            width,
        }))
        .unwrap();
        let entries = tile::bundle_entries(&bundle).unwrap();
        assert_eq!(entries.len(), usize::from(width));
        for (e, h) in entries.iter().zip(&hashes) {
            assert_eq!(leaf_hash(e), *h, "bundle {n} against tile 0/{n}");
        }
        leaves.extend(hashes);
    }
    let mut below = leaves.clone();
    for level in 1..tile::levels(size) {
        let count = tile::hashes_at(level, size);
        let mut hashes = Vec::new();
        for n in 0..count.div_ceil(WIDTH) {
            let width = (count - n * WIDTH).min(WIDTH) as u16;
            hashes.extend(
                tile::parse_hash_tile(&read(Tile {
                    kind: Kind::Hashes(level),
                    index: n,
                    width,
                }))
                .unwrap(),
            );
        }
        for (i, h) in hashes.iter().enumerate() {
            assert_eq!(
                tile::subtree_of(&below[i * 256..(i + 1) * 256]).unwrap(),
                *h
            );
        }
        below = hashes;
    }
    root(&leaves)
}

#[tokio::test]
async fn tiles_on_disk_give_the_roots_of_the_log_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut leaves = Vec::new();
    let store = TileStore::open(dir.path()).unwrap();
    // Syncs at sizes that cross tile boundaries at level 0 and level 1.
    let syncs = [1, 5, 255, 256, 257, 600, 65_536 + 3];
    let mut i = 0;
    for &at in &syncs {
        while i < at {
            let (e, leaf) = entry(i, VAULT, i + 1);
            store.append(&e, &leaf).unwrap();
            leaves.push(leaf);
            i += 1;
        }
        store.sync().await.unwrap();
        assert_eq!(root_of(&store, at), root(&leaves), "size {at}");
        assert_eq!(
            root_from_files(store.log_dir(), at),
            root(&leaves),
            "files at {at}"
        );
    }
    // Old partial tiles are gone once their tile is full; the checkpointed
    // partials of the tile still partial stay.
    let log = store.log_dir().to_owned();
    assert!(!log.join("tile/0/000.p").exists());
    assert!(!log.join("tile/entries/000.p").exists());
    assert!(log.join("tile/1/000").exists());
    assert!(log.join("tile/2/000.p/1").exists());
    assert!(log.join("tile/0/256.p/3").exists());
    assert!(log.join("tile/entries/256.p/3").exists());
    // Some roots on the way, from the stored tiles.
    for size in [1, 2, 256, 257, 511, 65_536, 65_539] {
        assert_eq!(root_of(&store, size), root(&leaves[..size as usize]));
    }
    drop(store);

    let store = TileStore::open(dir.path()).unwrap();
    let size = *syncs.last().unwrap();
    assert_eq!(store.check(), Ok(()));
    assert_eq!(store.size(), size);
    assert_eq!(store.next_seq(VAULT).unwrap(), size + 1);
    assert_eq!(store.next_seq(BROKER).unwrap(), 1);
    assert_eq!(store.index_of(VAULT, 300).unwrap(), Some(299));
    assert_eq!(store.entry(299).unwrap().unwrap(), entry(299, VAULT, 300).0);
    assert_eq!(
        store.entry(size - 1).unwrap().unwrap(),
        entry(size - 1, VAULT, size).0
    );
    assert_eq!(store.entry(size).unwrap(), None);
    assert_eq!(root_of(&store, size), root(&leaves));
    assert_eq!(store.verify_all().unwrap(), root(&leaves));
    // It goes on from there.
    let (e, leaf) = entry(size, BROKER, 1);
    store.append(&e, &leaf).unwrap();
    leaves.push(leaf);
    store.sync().await.unwrap();
    assert_eq!(root_from_files(store.log_dir(), size + 1), root(&leaves));
}

#[tokio::test]
async fn appends_are_staged_until_sync_and_what_was_not_committed_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = TileStore::open(dir.path()).unwrap();
    for i in 0..5 {
        let (e, leaf) = entry(i, VAULT, i + 1);
        store.append(&e, &leaf).unwrap();
    }
    // Readers see staged entries; nothing is on disk yet.
    assert_eq!(store.entry(3).unwrap().unwrap(), entry(3, VAULT, 4).0);
    assert_eq!(store.next_seq(VAULT).unwrap(), 6);
    assert!(!store.log_dir().join("tile/entries/000.p/5").exists());
    store.sync().await.unwrap();
    assert!(store.log_dir().join("tile/entries/000.p/5").exists());
    // An append after the sync is not there after a reopen: it was never
    // acknowledged.
    let (e, leaf) = entry(5, VAULT, 6);
    store.append(&e, &leaf).unwrap();
    drop(store);
    let store = TileStore::open(dir.path()).unwrap();
    assert_eq!(store.size(), 5);
    assert!(store.entry(5).unwrap().is_none());
    assert_eq!(store.next_seq(VAULT).unwrap(), 6);

    // Tiles written by a sync that never committed (a crash between the
    // tiles and the index) are removed once the store is accepted.
    let log = store.log_dir().to_owned();
    std::fs::write(log.join("tile/entries/000.p/9"), b"stale").unwrap();
    std::fs::create_dir_all(log.join("tile/0")).unwrap();
    std::fs::write(log.join("tile/0/000"), b"stale").unwrap();
    store.discard_uncommitted().unwrap();
    assert!(!log.join("tile/entries/000.p/9").exists());
    assert!(!log.join("tile/0/000").exists());
    assert!(log.join("tile/entries/000.p/5").exists());
}

#[test]
fn an_entry_larger_than_a_bundle_holds_is_refused_as_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let store = TileStore::open(dir.path()).unwrap();
    let (mut e, _) = entry(0, VAULT, 1);
    e.signed_event.as_mut().unwrap().signature = vec![0; tile::MAX_ENTRY_BYTES];
    let leaf = leaf_hash(&e.signed_event.as_ref().unwrap().encode_to_vec());
    let err = store.append(&e, &leaf).unwrap_err();
    assert!(matches!(err, AuditError::InvalidEvent(_)), "{err:?}");
    assert_eq!(
        twokey_runtime::error::ServiceError::kind(&err),
        twokey_runtime::error::ErrorKind::InvalidArgument
    );
    assert!(
        err.to_string()
            .contains("more than the 65535 a log entry holds"),
        "{err}"
    );
    assert_eq!(store.size(), 0);
}

#[test]
fn an_entry_out_of_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = TileStore::open(dir.path()).unwrap();
    let (e, leaf) = entry(1, VAULT, 1);
    assert!(store.append(&e, &leaf).is_err());
    assert_eq!(store.size(), 0);
}

#[tokio::test]
async fn a_missing_or_altered_right_edge_is_found_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = TileStore::open(dir.path()).unwrap();
        for i in 0..300 {
            let (e, leaf) = entry(i, VAULT, i + 1);
            store.append(&e, &leaf).unwrap();
            if i == 269 {
                store.sync().await.unwrap();
            }
        }
        store.sync().await.unwrap();
    }
    let log = dir.path().join(LOG_DIR);
    // The newest entry altered.
    let bundle = log.join("tile/entries/001.p/44");
    let original = std::fs::read(&bundle).unwrap();
    let mut altered = original.clone();
    *altered.last_mut().unwrap() ^= 1;
    std::fs::write(&bundle, &altered).unwrap();
    let problem = TileStore::open(dir.path()).unwrap().check().unwrap_err();
    assert!(problem.why.contains("entry 299 stored in"), "{problem:?}");
    assert!(problem.why.contains("it was altered"), "{problem:?}");
    std::fs::write(&bundle, &original).unwrap();
    // An entry of the last full bundle altered.
    let full = log.join("tile/entries/000");
    let original_full = std::fs::read(&full).unwrap();
    let mut altered = original_full.clone();
    altered[100] ^= 1;
    std::fs::write(&full, &altered).unwrap();
    let problem = TileStore::open(dir.path()).unwrap().check().unwrap_err();
    assert!(
        problem.why.contains("does not hash to its leaf hash"),
        "{problem:?}"
    );
    std::fs::write(&full, &original_full).unwrap();
    // The level-0 full tile altered: it no longer hashes to level 1.
    let tile0 = log.join("tile/0/000");
    let original_tile = std::fs::read(&tile0).unwrap();
    let mut altered = original_tile.clone();
    altered[0] ^= 1;
    std::fs::write(&tile0, &altered).unwrap();
    assert!(TileStore::open(dir.path()).unwrap().check().is_err());
    std::fs::write(&tile0, &original_tile).unwrap();
    // The newest partial tiles deleted: the bundles still hold 270.
    std::fs::remove_file(&bundle).unwrap();
    let problem = TileStore::open(dir.path()).unwrap().check().unwrap_err();
    assert_eq!(problem.held, Some(270), "{problem:?}");
    assert!(problem.why.contains("tile/entries/001.p/44"), "{problem:?}");
    std::fs::write(&bundle, &original).unwrap();
    assert_eq!(
        TileStore::open(dir.path()).unwrap().check(),
        Ok::<(), StoreProblem>(())
    );
}

fn walk_all(store: &TileStore, w: &Walk, start: Option<u64>, rev: bool) -> Vec<u64> {
    store
        .walk(w, start, rev, store.size())
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn query_indexes_walk_each_field_in_order_from_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = TileStore::open(dir.path()).unwrap();
    // Vault and broker interleaved: vault at even indices.
    for i in 0..40u64 {
        let (source, seq) = if i.is_multiple_of(2) {
            (VAULT, i / 2 + 1)
        } else {
            (BROKER, i / 2 + 1)
        };
        let (e, leaf) = entry(i, source, seq);
        store.append(&e, &leaf).unwrap();
    }
    // Before the sync the source index is walked from the staged keys (a
    // journal acknowledges entries before the store syncs them), the query
    // keys from memory until a batch of them is written.
    assert_eq!(
        walk_all(&store, &Walk::Source(VAULT.into()), None, false),
        (0..40).step_by(2).collect::<Vec<u64>>()
    );
    assert_eq!(
        walk_all(&store, &Walk::Source(VAULT.into()), Some(7), true),
        [6, 4, 2, 0]
    );
    assert_eq!(
        walk_all(&store, &Walk::Action("odd".into()), None, false).len(),
        20
    );
    store.sync().await.unwrap();
    let vault = Walk::Source(VAULT.into());
    assert_eq!(walk_all(&store, &vault, None, false).len(), 20);
    assert_eq!(walk_all(&store, &vault, Some(7), false)[..3], [8, 10, 12]);
    assert_eq!(walk_all(&store, &vault, Some(8), false)[..2], [8, 10]);
    assert_eq!(walk_all(&store, &vault, Some(7), true), [6, 4, 2, 0]);
    assert_eq!(walk_all(&store, &vault, Some(39), false), Vec::<u64>::new());
    // Request r3: seqs 6 and 7 of each source.
    let r3 = walk_all(&store, &Walk::Request("r3".into()), None, false);
    assert_eq!(r3, [10, 11, 12, 13]);
    assert_eq!(
        walk_all(&store, &Walk::Request("r3".into()), Some(12), true),
        [12, 11, 10]
    );
    let u1: Vec<u64> = walk_all(&store, &Walk::ActorName("u1".into()), None, false);
    assert_eq!(
        u1,
        walk_all(
            &store,
            &Walk::Actor("spiffe://t/user/u1".into()),
            None,
            false
        )
    );
    assert!(u1.iter().all(|i| {
        store
            .entry(*i)
            .unwrap()
            .unwrap()
            .event
            .unwrap()
            .actor
            .ends_with("/u1")
    }));
    let time = Walk::Time {
        since: Some((1_700_000_010, 0)),
        until: Some((1_700_000_013, 0)),
    };
    assert_eq!(walk_all(&store, &time, None, false), [10, 11, 12]);
    assert_eq!(walk_all(&store, &time, Some(11), false), [11, 12]);
    assert_eq!(walk_all(&store, &time, Some(11), true), [11, 10]);
    // After a reopen the keys not written to sled are derived again.
    drop(store);
    let store = TileStore::open(dir.path()).unwrap();
    assert_eq!(walk_all(&store, &time, Some(11), true), [11, 10]);
    assert_eq!(
        walk_all(&store, &Walk::Request("r3".into()), None, false),
        [10, 11, 12, 13]
    );
    // Received times come back as they were.
    assert_eq!(
        store.entry(17).unwrap().unwrap().received_at,
        entry(17, BROKER, 9).0.received_at
    );
}

#[tokio::test]
async fn query_keys_are_written_to_sled_in_batches_and_walk_the_same_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let n = QUERY_BATCH + 100;
    let want: Vec<u64>;
    {
        let store = TileStore::open(dir.path()).unwrap();
        for i in 0..n {
            let (e, leaf) = entry(i, VAULT, i + 1);
            store.append(&e, &leaf).unwrap();
            if (i + 1) % 50 == 0 {
                store.sync().await.unwrap();
            }
        }
        store.sync().await.unwrap();
        // The first batch is in sled, the rest in memory.
        assert_eq!(
            store.inner.indexed.load(Ordering::SeqCst),
            QUERY_BATCH + 50 - QUERY_BATCH % 50
        );
        assert!(!store.inner.query.is_empty());
        assert!(!store.state().pending_query.is_empty());
        want = walk_all(&store, &Walk::Account("acct1".into()), None, false);
        assert_eq!(want.len() as u64, n.div_ceil(5));
        assert_eq!(
            walk_all(&store, &Walk::Account("acct1".into()), Some(n - 300), true),
            want.iter()
                .rev()
                .copied()
                .filter(|i| *i <= n - 300)
                .collect::<Vec<_>>()
        );
    }
    let store = TileStore::open(dir.path()).unwrap();
    assert_eq!(
        walk_all(&store, &Walk::Account("acct1".into()), None, false),
        want
    );
}

/// A log written by the sled store of earlier versions, `n` entries.
async fn legacy_log(dir: &Path, n: u64) -> Vec<Hash> {
    let store = SledStore::open(dir).unwrap();
    let mut leaves = Vec::new();
    for i in 0..n {
        let (source, seq) = if i.is_multiple_of(3) {
            (BROKER, i / 3 + 1)
        } else {
            (VAULT, i - i / 3)
        };
        let (e, leaf) = entry(i, source, seq);
        store.append(&e, &leaf).unwrap();
        leaves.push(leaf);
    }
    store.sync().await.unwrap();
    leaves
}

fn legacy_exists(db: &DurableDb) -> bool {
    db.db()
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == migrate::LEGACY_TREE.as_bytes())
}

#[tokio::test]
async fn a_sled_log_moves_into_tiles_root_for_root_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2 * migrate::CHUNK + 300;
    let leaves = legacy_log(dir.path(), n).await;
    let old: Vec<LogEntry> = {
        let old = SledStore::open(dir.path()).unwrap();
        (0..n).map(|i| old.entry(i).unwrap().unwrap()).collect()
    };
    let signed = (n - 10, root(&leaves[..(n - 10) as usize]));

    let store = TileStore::open(dir.path()).unwrap();
    migrate::migrate(store.db(), &store, Some(signed)).unwrap();
    assert!(!legacy_exists(store.db()));
    assert_eq!(store.size(), n);
    assert_eq!(root_of(&store, n), root(&leaves));
    assert_eq!(root_from_files(store.log_dir(), n), root(&leaves));
    for i in [0, 1, 4095, 4096, n - 1] {
        assert_eq!(
            store.entry(i).unwrap().unwrap(),
            old[i as usize],
            "entry {i}"
        );
    }
    assert_eq!(
        store.next_seq(VAULT).unwrap(),
        old.iter()
            .filter(|e| e.event.as_ref().unwrap().source == VAULT)
            .count() as u64
            + 1
    );
    // Queries answer from the new indexes what a scan of the old log finds.
    let want: Vec<u64> = old
        .iter()
        .filter(|e| e.event.as_ref().unwrap().account_id == "acct2")
        .map(|e| e.index)
        .collect();
    assert_eq!(
        walk_all(&store, &Walk::Account("acct2".into()), None, false),
        want
    );
    drop(store);
    // A second start has nothing to move.
    let store = TileStore::open(dir.path()).unwrap();
    migrate::migrate(store.db(), &store, Some(signed)).unwrap();
    assert_eq!(store.size(), n);
}

#[tokio::test]
async fn a_migration_cut_short_resumes_and_an_altered_old_log_is_not_moved() {
    let dir = tempfile::tempdir().unwrap();
    let n = 700;
    let leaves = legacy_log(dir.path(), n).await;
    {
        // A crash after the first 300 entries were committed.
        let db = DurableDb::open(dir.path()).unwrap();
        let old = SledStore::with_db(db.clone()).unwrap();
        let store = TileStore::with_db(db).unwrap();
        for i in 0..300 {
            store
                .append(&old.entry(i).unwrap().unwrap(), &leaves[i as usize])
                .unwrap();
        }
        store.sync_blocking().unwrap();
    }
    let store = TileStore::open(dir.path()).unwrap();
    assert_eq!(store.size(), 300);
    migrate::migrate(store.db(), &store, None).unwrap();
    assert_eq!(store.size(), n);
    assert_eq!(root_from_files(store.log_dir(), n), root(&leaves));
    drop(store);

    // An old log whose entry no longer hashes to its stored leaf, or whose
    // root is not the signed one, stays where it is.
    let dir = tempfile::tempdir().unwrap();
    let leaves = legacy_log(dir.path(), 20).await;
    {
        let old = SledStore::open(dir.path()).unwrap();
        let mut e = old.entry(7).unwrap().unwrap();
        e.signed_event.as_mut().unwrap().signature[0] ^= 1;
        old.tree()
            .insert(SledStore::entry_key(7), e.encode_to_vec())
            .unwrap();
        old.tree().flush().unwrap();
    }
    let store = TileStore::open(dir.path()).unwrap();
    let err = migrate::migrate(store.db(), &store, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("entry 7 does not hash to the leaf hash stored for it"),
        "{err}"
    );
    assert!(err.contains("Restore the data directory"), "{err}");
    assert!(legacy_exists(store.db()));
    drop(store);
    let dir = tempfile::tempdir().unwrap();
    let _ = legacy_log(dir.path(), 20).await;
    let store = TileStore::open(dir.path()).unwrap();
    let err = migrate::migrate(store.db(), &store, Some((20, leaves[0])))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not the root of the signed tree head"),
        "{err}"
    );
    assert!(legacy_exists(store.db()));
}

#[tokio::test]
async fn a_lost_index_is_rebuilt_from_the_tiles_only_at_the_signed_root() {
    let dir = tempfile::tempdir().unwrap();
    let store = TileStore::open(dir.path()).unwrap();
    let mut leaves = Vec::new();
    let (mut vault, mut broker) = (0, 0);
    for i in 0..600u64 {
        let (source, seq) = if i % 3 == 0 {
            broker += 1;
            (BROKER, broker)
        } else {
            vault += 1;
            (VAULT, vault)
        };
        let (e, leaf) = entry(i, source, seq);
        store.append(&e, &leaf).unwrap();
        leaves.push(leaf);
        if i == 299 {
            store.sync().await.unwrap();
        }
    }
    store.sync().await.unwrap();
    let signed = root(&leaves);
    let walks = [
        Walk::Account("acct1".into()),
        Walk::ActorName("u2".into()),
        Walk::Request("r7".into()),
        Walk::Source(BROKER.into()),
        Walk::Time {
            since: Some((1_700_000_100, 0)),
            until: Some((1_700_000_400, 0)),
        },
    ];
    let before: Vec<Vec<u64>> = walks
        .iter()
        .map(|w| walk_all(&store, w, None, true))
        .collect();
    drop(store);
    // sled's files are lost; the tiles (and the checkpoint) are not.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let e = e.unwrap();
        if e.file_name() != LOG_DIR {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(p).unwrap();
            } else {
                std::fs::remove_file(p).unwrap();
            }
        }
    }

    let store = TileStore::open(dir.path()).unwrap();
    assert_eq!(store.size(), 0);
    // Another root: refused, nothing committed, the store still empty.
    let mut other = signed;
    other[0] ^= 1;
    let err = store.rebuild(600, other).unwrap_err().to_string();
    assert!(err.contains("not the checkpoint's"), "{err}");
    assert_eq!(store.size(), 0);
    // More entries than the tiles hold: refused.
    assert!(store.rebuild(601, signed).is_err());
    assert_eq!(store.size(), 0);
    drop(store);
    let store = TileStore::open(dir.path()).unwrap();
    assert_eq!(store.size(), 0);
    assert_eq!(store.index_of(VAULT, 1).unwrap(), None);

    // The checkpoint may lag behind: signed at 250, whose partial tiles
    // went when tile 0 filled; the tiles are read to all 600 they hold.
    assert_eq!(store.rebuild(250, root(&leaves[..250])).unwrap(), 600);
    let check = |store: &TileStore| {
        assert_eq!(store.check(), Ok(()));
        assert_eq!(store.size(), 600);
        assert_eq!(root_of(store, 600), signed);
        assert_eq!(store.next_seq(BROKER).unwrap(), 201);
        assert_eq!(store.next_seq(VAULT).unwrap(), 401);
        assert_eq!(store.index_of(BROKER, 2).unwrap(), Some(3));
        assert_eq!(store.index_of(VAULT, 400).unwrap(), Some(599));
        let got: Vec<Vec<u64>> = walks
            .iter()
            .map(|w| walk_all(store, w, None, true))
            .collect();
        assert_eq!(got, before);
        // The received time was in sled alone.
        let mut lost = entry(4, VAULT, 3).0;
        lost.received_at = None;
        assert_eq!(store.entry(4).unwrap().unwrap(), lost);
    };
    check(&store);
    // Only an empty index is rebuilt.
    assert!(store.rebuild(600, signed).is_err());
    drop(store);
    let store = TileStore::open(dir.path()).unwrap();
    check(&store);
    // It goes on from there.
    let (e, leaf) = entry(600, BROKER, 201);
    store.append(&e, &leaf).unwrap();
    store.sync().await.unwrap();
    leaves.push(leaf);
    assert_eq!(root_from_files(store.log_dir(), 601), root(&leaves));
}
