//! Storage of the log behind a small trait: entries by index, each source's
//! next expected sequence number and where each (source, seq) landed, and the
//! roots of every complete subtree, so roots and proofs need O(log n) reads
//! and nothing is rehashed at startup. The sled implementation writes each
//! append as one atomic batch and makes it durable with
//! [`DurableDb::sync`](twokey_runtime::durable::DurableDb::sync), which
//! concurrent appends share (group commit).

use std::{
    future::Future,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prost::Message;
use twokey_proto::audit::v1::LogEntry;
use twokey_runtime::durable::DurableDb;

use crate::{
    error::AuditError,
    merkle::{Hash, node_hash},
};

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

fn seq_index_key(source: &str, seq: u64) -> Vec<u8> {
    let mut k = vec![SEQ_INDEX];
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

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

/// The log in a sled tree, synced durably.
#[derive(Debug)]
pub struct SledStore {
    db: DurableDb,
    tree: sled::Tree,
    size: AtomicU64,
    write: Mutex<()>,
}

impl SledStore {
    /// Opens (creating if needed) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        let open_err = |why: String| AuditError::Open {
            path: dir.to_owned(),
            why,
        };
        let db = DurableDb::open(dir).map_err(|e| open_err(e.to_string()))?;
        Self::with_db(db).map_err(|e| open_err(e.to_string()))
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
            write: Mutex::new(()),
        })
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
        match self.tree.get(next_seq_key(source))? {
            Some(v) => read_u64(&v, "sequence number"),
            None => Ok(1),
        }
    }

    fn index_of(&self, source: &str, seq: u64) -> Result<Option<u64>, AuditError> {
        self.tree
            .get(seq_index_key(source, seq))?
            .map(|v| read_u64(&v, "leaf index"))
            .transpose()
    }

    fn entry(&self, index: u64) -> Result<Option<LogEntry>, AuditError> {
        let Some(bytes) = self.tree.get(entry_key(index))? else {
            return Ok(None);
        };
        let entry = LogEntry::decode(bytes.as_ref()).map_err(|e| AuditError::Corrupt {
            index,
            why: e.to_string(),
        })?;
        Ok(Some(entry))
    }

    fn append(&self, entry: &LogEntry, leaf: &Hash) -> Result<(), AuditError> {
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
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
        let mut batch = sled::Batch::default();
        batch.insert(entry_key(index), entry.encode_to_vec());
        batch.insert(
            seq_index_key(&event.source, event.seq),
            &index.to_be_bytes(),
        );
        batch.insert(next_seq_key(&event.source), &(event.seq + 1).to_be_bytes());
        batch.insert(SIZE, &(index + 1).to_be_bytes());
        // The leaf, and every complete subtree this leaf completes.
        let (mut level, mut i, mut hash) = (0u32, index, *leaf);
        batch.insert(node_key(level, i), &hash);
        while i & 1 == 1 {
            let left = self.node(level, i - 1)?;
            hash = node_hash(&left, &hash);
            level += 1;
            i >>= 1;
            batch.insert(node_key(level, i), &hash);
        }
        self.tree.apply_batch(batch)?;
        self.size.store(index + 1, Ordering::SeqCst);
        Ok(())
    }

    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        let v = self
            .tree
            .get(node_key(level, index))?
            .ok_or_else(|| AuditError::Store(format!("missing tree node {level}/{index}")))?;
        Hash::try_from(v.as_ref())
            .map_err(|_| AuditError::Store(format!("tree node {level}/{index} is not 32 bytes")))
    }

    async fn sync(&self) -> Result<(), AuditError> {
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

    #[test]
    fn an_entry_out_of_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (e, leaf) = entry(1, 1);
        assert!(store.append(&e, &leaf).is_err());
        assert_eq!(store.size(), 0);
    }
}
