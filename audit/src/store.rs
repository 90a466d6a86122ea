//! Storage of the log behind a small trait: entries by index, each source's
//! next expected sequence number and where each (source, seq) landed, the
//! roots of every complete subtree, so roots and proofs need O(log n) reads,
//! and walks of the query indexes.
//!
//! [`TileStore`] ([`tiles`]) is the store: C2SP tiles on disk, indexes in
//! sled. [`SledStore`], below, is the store of earlier versions, kept to
//! read an old log once ([`migrate`]) and for tests. It stages
//! appends in memory (reads see them) and writes everything staged as one
//! atomic sled batch when [`LogStore::sync`] is called, then makes it durable
//! with [`DurableDb::sync`](twokey_runtime::durable::DurableDb::sync): a
//! group of concurrent appends costs one batch write and one flush +
//! `fdatasync` (group commit), not one device write per event.

use std::{
    collections::BTreeMap,
    future::Future,
    path::Path,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use prost::Message;
use twokey_proto::audit::v1::LogEntry;
use twokey_runtime::{durable::DurableDb, start::StartError};

use crate::{
    error::AuditError,
    merkle::{Hash, node_hash},
};

pub mod index;
pub mod migrate;
pub mod postgres;
pub mod tiles;

pub use index::Walk;
pub use postgres::PgLogStore;
pub use tiles::TileStore;

/// What a store found wrong with itself when opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreProblem {
    /// The entries it holds, when fewer than it should.
    pub held: Option<u64>,
    /// What is wrong.
    pub why: String,
}

/// Indices `start..size` (oldest first) or `start..=0` (newest first).
pub fn by_index(
    start: Option<u64>,
    newest_first: bool,
    size: u64,
) -> Box<dyn Iterator<Item = Result<u64, AuditError>> + Send + 'static> {
    if size == 0 {
        return Box::new(std::iter::empty());
    }
    if newest_first {
        let from = start.unwrap_or(size - 1).min(size - 1);
        Box::new((0..=from).rev().map(Ok))
    } else {
        Box::new((start.unwrap_or(0)..size).map(Ok))
    }
}

/// Where the log lives. Callers serialise [`LogStore::append`] calls.
pub trait LogStore: Send + Sync + 'static {
    /// Number of entries written (durable or not yet).
    fn size(&self) -> u64;
    /// The sequence number `source` must send next (1 when it sent none).
    fn next_seq(&self, source: &str) -> Result<u64, AuditError>;
    /// The index of the entry holding `source`'s event `seq`.
    fn index_of(&self, source: &str, seq: u64) -> Result<Option<u64>, AuditError>;
    /// The entry at `index`.
    fn entry(&self, index: u64) -> Result<Option<LogEntry>, AuditError>;
    /// Writes `entry` at index `size()` with Merkle leaf hash `leaf`, and
    /// advances its source's next sequence number, atomically.
    fn append(&self, entry: &LogEntry, leaf: &Hash) -> Result<(), AuditError>;
    /// The root of the complete subtree of leaves `[index << level, (index + 1) << level)`.
    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError>;
    /// Makes every completed write durable; concurrent callers share one sync.
    fn sync(&self) -> impl Future<Output = Result<(), AuditError>> + Send;
    /// What opening found wrong with the stored log, if anything.
    fn check(&self) -> Result<(), StoreProblem> {
        Ok(())
    }
    /// Removes what a crash left beyond the committed log; called once the
    /// store is found to extend the signed tree head.
    fn discard_uncommitted(&self) -> Result<(), AuditError> {
        Ok(())
    }
    /// Whether the store keeps the signed tree head itself, committed with
    /// the entries it covers ([`LogStore::commit_with_head`], PostgreSQL);
    /// otherwise the log keeps it in its journal and checkpoint file.
    fn keeps_head(&self) -> bool {
        false
    }
    /// Whether this replica appends to the store now, its size the
    /// committed log's (false on a PostgreSQL follower, whose size may lag
    /// the database's): only then can a source's checkpoint larger than
    /// the size mean entries were lost.
    fn appends(&self) -> bool {
        true
    }
    /// Makes every staged entry durable together with `head`, signed over
    /// them, in one atomic write (stores that [`LogStore::keeps_head`]).
    fn commit_with_head(
        &self,
        head: &crate::head::TreeHead,
    ) -> impl Future<Output = Result<(), AuditError>> + Send {
        let _ = head;
        self.sync()
    }
    /// Changes whenever staged appends were dropped without being written
    /// (a lost lease): an append staged in an older epoch is never
    /// acknowledged.
    fn epoch(&self) -> u64 {
        0
    }
    /// Whether this replica may append now (one sequencer at a time).
    fn may_append(&self) -> Result<(), AuditError> {
        Ok(())
    }
    /// Leaf indices along `walk` from `start` (inclusive), oldest or newest
    /// first; the caller checks its whole filter on each entry and skips
    /// indices at or past `size`. By default every index, in index order.
    fn walk(
        &self,
        walk: &Walk,
        start: Option<u64>,
        newest_first: bool,
        size: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<u64, AuditError>> + Send + '_>, AuditError> {
        let _ = walk;
        Ok(by_index(start, newest_first, size))
    }
}

const ENTRY: u8 = b'e';
const NODE: u8 = b'n';
const SEQ_INDEX: u8 = b'q';
const NEXT_SEQ: u8 = b's';
const SIZE: &[u8] = b"m/size";

fn entry_key(index: u64) -> Vec<u8> {
    let mut k = vec![ENTRY];
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn node_key(level: u32, index: u64) -> Vec<u8> {
    let mut k = vec![NODE, level as u8];
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The key of where `source`'s event `seq` landed (both stores).
fn seq_index_key(source: &str, seq: u64) -> Vec<u8> {
    let mut k = vec![SEQ_INDEX];
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The key of the sequence number `source` must send next (both stores).
fn next_seq_key(source: &str) -> Vec<u8> {
    let mut k = vec![NEXT_SEQ];
    k.extend_from_slice(source.as_bytes());
    k
}

fn read_u64(bytes: &[u8], what: &str) -> Result<u64, AuditError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| AuditError::Store(format!("stored {what} is not 8 bytes")))
}

/// Writes staged since the last sync, by key; reads look here first.
type Staged = BTreeMap<Vec<u8>, Vec<u8>>;

/// The log in a sled tree, synced durably.
#[derive(Debug)]
pub struct SledStore {
    db: DurableDb,
    tree: sled::Tree,
    size: AtomicU64,
    /// Staged writes; held by an append while it runs and by a sync while it
    /// moves them into the tree, so a reader finds a key in one or the other.
    staged: Mutex<Staged>,
}

impl SledStore {
    /// Opens (creating if needed) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StartError> {
        let db = DurableDb::open(dir)?;
        Self::with_db(db).map_err(|e| {
            StartError::refused(format!(
                "cannot open the audit log in {}: {e}",
                dir.display()
            ))
        })
    }

    /// The log in an already open database.
    pub fn with_db(db: DurableDb) -> Result<Self, AuditError> {
        let tree = db.tree("audit_log")?;
        let size = match tree.get(SIZE)? {
            Some(v) => read_u64(&v, "log size")?,
            None => 0,
        };
        Ok(Self {
            db,
            tree,
            size: AtomicU64::new(size),
            staged: Mutex::new(Staged::new()),
        })
    }

    fn staged(&self) -> MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value of `key`: staged, else in the tree. A sync moves staged
    /// keys into the tree under the lock, so a key staged before this call
    /// is found in one of the two.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, AuditError> {
        if let Some(v) = self.staged().get(key) {
            return Ok(Some(v.clone()));
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Tree node `level`/`index` while the caller holds the staged writes.
    fn node_in(&self, staged: &Staged, level: u32, index: u64) -> Result<Hash, AuditError> {
        let key = node_key(level, index);
        let v =
            match staged.get(&key) {
                Some(v) => v.clone(),
                None => self.tree.get(&key)?.map(|v| v.to_vec()).ok_or_else(|| {
                    AuditError::Store(format!("missing tree node {level}/{index}"))
                })?,
            };
        Hash::try_from(v.as_slice())
            .map_err(|_| AuditError::Store(format!("tree node {level}/{index} is not 32 bytes")))
    }

    /// The raw sled tree (tests that tamper with stored bytes).
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The key under which entry `index` is stored.
    pub fn entry_key(index: u64) -> Vec<u8> {
        entry_key(index)
    }
}

impl LogStore for SledStore {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn next_seq(&self, source: &str) -> Result<u64, AuditError> {
        match self.get(&next_seq_key(source))? {
            Some(v) => read_u64(&v, "sequence number"),
            None => Ok(1),
        }
    }

    fn index_of(&self, source: &str, seq: u64) -> Result<Option<u64>, AuditError> {
        self.get(&seq_index_key(source, seq))?
            .map(|v| read_u64(&v, "leaf index"))
            .transpose()
    }

    fn entry(&self, index: u64) -> Result<Option<LogEntry>, AuditError> {
        let Some(bytes) = self.get(&entry_key(index))? else {
            return Ok(None);
        };
        let entry = LogEntry::decode(bytes.as_ref()).map_err(|e| AuditError::Corrupt {
            index,
            why: e.to_string(),
        })?;
        Ok(Some(entry))
    }

    fn append(&self, entry: &LogEntry, leaf: &Hash) -> Result<(), AuditError> {
        let mut staged = self.staged();
        let index = self.size();
        if entry.index != index {
            return Err(AuditError::Store(format!(
                "entry index {} is not the next index {index}",
                entry.index
            )));
        }
        let event = entry
            .event
            .as_ref()
            .ok_or_else(|| AuditError::Store("entry without an event".into()))?;
        let mut writes = vec![
            (entry_key(index), entry.encode_to_vec()),
            (
                seq_index_key(&event.source, event.seq),
                index.to_be_bytes().to_vec(),
            ),
            (
                next_seq_key(&event.source),
                (event.seq + 1).to_be_bytes().to_vec(),
            ),
            (SIZE.to_vec(), (index + 1).to_be_bytes().to_vec()),
        ];
        // The leaf, and every complete subtree this leaf completes.
        let (mut level, mut i, mut hash) = (0u32, index, *leaf);
        writes.push((node_key(level, i), hash.to_vec()));
        while i & 1 == 1 {
            let left = self.node_in(&staged, level, i - 1)?;
            hash = node_hash(&left, &hash);
            level += 1;
            i >>= 1;
            writes.push((node_key(level, i), hash.to_vec()));
        }
        staged.extend(writes);
        self.size.store(index + 1, Ordering::SeqCst);
        Ok(())
    }

    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        self.node_in(&self.staged(), level, index)
    }

    async fn sync(&self) -> Result<(), AuditError> {
        {
            // One atomic batch for everything staged; the lock keeps readers
            // and appends out until the keys are in the tree. If sled refuses
            // the batch, the writes stay staged for the next sync.
            let mut staged = self.staged();
            if !staged.is_empty() {
                let mut batch = sled::Batch::default();
                for (k, v) in staged.iter() {
                    batch.insert(k.as_slice(), v.as_slice());
                }
                self.tree.apply_batch(batch)?;
                staged.clear();
            }
        }
        Ok(self.db.sync().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{leaf_hash, root, subtree_root};
    use twokey_proto::audit::v1::{Event, SignedEvent};

    fn entry(index: u64, seq: u64) -> (LogEntry, Hash) {
        let event = Event {
            source: "spiffe://t/svc/vault".into(),
            seq,
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
                received_at: None,
            },
            leaf,
        )
    }

    #[tokio::test]
    async fn stored_nodes_give_the_same_roots_as_rehashing_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut leaves = Vec::new();
        {
            let store = SledStore::open(dir.path()).unwrap();
            for i in 0..37 {
                let (e, leaf) = entry(i, i + 1);
                store.append(&e, &leaf).unwrap();
                leaves.push(leaf);
                let got = subtree_root(0, i + 1, &mut |l, n| store.node(l, n)).unwrap();
                assert_eq!(got, root(&leaves), "size {}", i + 1);
            }
            store.sync().await.unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.size(), 37);
        assert_eq!(store.next_seq("spiffe://t/svc/vault").unwrap(), 38);
        assert_eq!(store.next_seq("spiffe://t/svc/broker").unwrap(), 1);
        assert_eq!(store.index_of("spiffe://t/svc/vault", 5).unwrap(), Some(4));
        assert_eq!(store.entry(4).unwrap().unwrap(), entry(4, 5).0);
        let got = subtree_root(0, 37, &mut |l, n| store.node(l, n)).unwrap();
        assert_eq!(got, root(&leaves));
    }

    #[tokio::test]
    async fn appends_are_staged_until_sync_then_written_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        for i in 0..5 {
            let (e, leaf) = entry(i, i + 1);
            store.append(&e, &leaf).unwrap();
        }
        // Readers see staged entries; the tree does not hold them yet.
        assert_eq!(store.entry(3).unwrap().unwrap(), entry(3, 4).0);
        assert_eq!(store.next_seq("spiffe://t/svc/vault").unwrap(), 6);
        assert!(store.tree().get(entry_key(3)).unwrap().is_none());
        store.sync().await.unwrap();
        assert!(store.tree().get(entry_key(3)).unwrap().is_some());
        assert_eq!(store.entry(3).unwrap().unwrap(), entry(3, 4).0);
        // An append after the sync is staged again, and an unsynced append
        // is not there after a reopen: it was never acknowledged.
        let (e, leaf) = entry(5, 6);
        store.append(&e, &leaf).unwrap();
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.size(), 5);
        assert!(store.entry(5).unwrap().is_none());
    }

    #[test]
    fn an_entry_out_of_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (e, leaf) = entry(1, 1);
        assert!(store.append(&e, &leaf).is_err());
        assert_eq!(store.size(), 0);
    }
}
