//! The reconciler's own durable state, in its own sled database
//! (`DATA_DIR/reconcile`, apart from the log's store): log files read,
//! findings written (by key, so none is written twice), releases whose
//! window is still open, EventBridge events accepted and not yet reconciled,
//! the next sequence number and the signed findings not yet acknowledged by
//! the log (an outbox: appended again after a crash, which the log answers as
//! a duplicate). One pass writes all of it in one atomic batch, then syncs.

use std::{
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use twokey_reconcile::{cloudtrail::Seen, matching::Release};
use twokey_runtime::durable::{DurableDb, StoreError};

const SEEN: &[u8] = b"seen/";
const FINDING: &[u8] = b"find/";
const PENDING: &[u8] = b"pend/";
const INBOX: &[u8] = b"inbx/";
const OUTBOX: &[u8] = b"outb/";
const NEXT_SEQ: &[u8] = b"meta/next_seq";
const RELEASE_CURSOR: &[u8] = b"meta/release_cursor";

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    [prefix, rest].concat()
}

fn u64_of(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Keys (after their prefix, or whole for the inbox) and values.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The reconciler's state (see the module docs).
#[derive(Debug, Clone)]
pub struct ReconcileState {
    db: DurableDb,
    tree: sled::Tree,
}

/// What one pass changes, written at once by [`ReconcileState::commit`].
#[derive(Debug, Default)]
pub struct Changes {
    batch: sled::Batch,
}

impl Changes {
    /// A file read, at its size.
    pub fn seen(&mut self, path: &Path, size: u64) {
        self.batch.insert(
            key(SEEN, path.as_os_str().as_encoded_bytes()),
            &size.to_be_bytes(),
        );
    }

    /// A finding written, as event `seq` (its signed bytes go to the outbox).
    pub fn finding(&mut self, finding_key: &str, seq: u64, signed: &[u8]) {
        self.batch
            .insert(key(FINDING, finding_key.as_bytes()), &seq.to_be_bytes());
        self.batch.insert(key(OUTBOX, &seq.to_be_bytes()), signed);
        self.batch.insert(NEXT_SEQ, &(seq + 1).to_be_bytes());
    }

    /// An EventBridge event reconciled.
    pub fn inbox_done(&mut self, inbox_key: &[u8]) {
        self.batch.remove(inbox_key);
    }

    /// The releases still pending are exactly `pending` (each named by
    /// `index:request_id` in its id), replacing `before`.
    pub fn pending(&mut self, before: &[Release], pending: &[Release]) {
        for r in before {
            self.batch.remove(key(PENDING, r.id.as_bytes()));
        }
        for r in pending {
            let value = format!("{}\n{}", r.account, r.at.unix_timestamp_nanos());
            self.batch
                .insert(key(PENDING, r.id.as_bytes()), value.as_bytes());
        }
    }

    /// Releases before leaf index `cursor` were all taken in.
    pub fn release_cursor(&mut self, cursor: u64) {
        self.batch.insert(RELEASE_CURSOR, &cursor.to_be_bytes());
    }
}

impl ReconcileState {
    /// Opens (creating) the state under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = DurableDb::open(dir)?;
        let tree = db.tree("reconcile")?;
        Ok(Self { db, tree })
    }

    fn err(&self, e: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.db.path().to_owned(),
            source: e,
        }
    }

    fn scan(&self, prefix: &[u8]) -> Result<Pairs, StoreError> {
        self.tree
            .scan_prefix(prefix)
            .map(|kv| {
                kv.map(|(k, v)| (k[prefix.len()..].to_vec(), v.to_vec()))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }

    /// The files read so far.
    pub fn seen(&self) -> Result<Seen, StoreError> {
        Ok(self
            .scan(SEEN)?
            .into_iter()
            .map(|(path, size)| {
                // Written from the OsStr bytes of this (Unix) platform.
                let path = PathBuf::from(std::ffi::OsStr::from_bytes(&path));
                (path, u64_of(&size))
            })
            .collect())
    }

    /// Whether a finding with this key was written.
    pub fn has_finding(&self, finding_key: &str) -> Result<bool, StoreError> {
        self.tree
            .contains_key(key(FINDING, finding_key.as_bytes()))
            .map_err(|e| self.err(e))
    }

    /// The releases whose window is still open.
    pub fn pending(&self) -> Result<Vec<Release>, StoreError> {
        let mut out = Vec::new();
        for (id, value) in self.scan(PENDING)? {
            let id = String::from_utf8_lossy(&id).into_owned();
            let value = String::from_utf8_lossy(&value);
            let Some((account, nanos)) = value.split_once('\n') else {
                continue;
            };
            let Some(at) = nanos
                .parse::<i128>()
                .ok()
                .and_then(|n| time::OffsetDateTime::from_unix_timestamp_nanos(n).ok())
            else {
                continue;
            };
            out.push(Release {
                account: account.to_owned(),
                at,
                id,
            });
        }
        Ok(out)
    }

    /// The leaf index from which `code.released` events are still to be read.
    pub fn release_cursor(&self) -> Result<u64, StoreError> {
        Ok(self
            .tree
            .get(RELEASE_CURSOR)
            .map_err(|e| self.err(e))?
            .map_or(0, |v| u64_of(&v)))
    }

    /// The sequence number of the next finding (1 for the first).
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self
            .tree
            .get(NEXT_SEQ)
            .map_err(|e| self.err(e))?
            .map_or(1, |v| u64_of(&v).max(1)))
    }

    /// Raises the next sequence number to at least `seq` (the log expects
    /// `seq`: this state was lost or restored from an older copy).
    pub fn raise_next_seq(&self, seq: u64) -> Result<(), StoreError> {
        if seq > self.next_seq()? {
            self.tree
                .insert(NEXT_SEQ, &seq.to_be_bytes())
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Keeps an accepted EventBridge event under `event_id` until a pass
    /// reconciles it; durable when this returns.
    pub async fn put_inbox(&self, event_id: &str, body: &[u8]) -> Result<(), StoreError> {
        self.tree
            .insert(key(INBOX, event_id.as_bytes()), body)
            .map_err(|e| self.err(e))?;
        self.db.sync().await
    }

    /// The accepted EventBridge events: each with the key to hand to
    /// [`Changes::inbox_done`].
    pub fn inbox(&self) -> Result<Pairs, StoreError> {
        Ok(self
            .scan(INBOX)?
            .into_iter()
            .map(|(k, v)| (key(INBOX, &k), v))
            .collect())
    }

    /// The signed findings not yet acknowledged by the log, by sequence number.
    pub fn outbox(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .scan(OUTBOX)?
            .into_iter()
            .map(|(k, v)| (u64_of(&k), v))
            .collect())
    }

    /// Drops an acknowledged finding from the outbox (no sync needed: a
    /// finding appended again is a duplicate the log answers as such).
    pub fn outbox_done(&self, seq: u64) -> Result<(), StoreError> {
        self.tree
            .remove(key(OUTBOX, &seq.to_be_bytes()))
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Writes a pass's changes atomically and makes them durable.
    pub async fn commit(&self, changes: Changes) -> Result<(), StoreError> {
        self.tree
            .apply_batch(changes.batch)
            .map_err(|e| self.err(e))?;
        self.db.sync().await
    }
}
