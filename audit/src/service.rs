//! The audit domain: event intake with per-source sequence checks, queries,
//! signed checkpoints and proofs. No gRPC here; `grpc` authenticates callers
//! and maps requests and errors.
//!
//! An append is accepted only from a configured source, over mTLS as that
//! source, for an event naming that source and signed by its key. Only
//! entries made durable are visible to queries, checkpoints and proofs, so
//! nothing signed can be lost by a crash.
//!
//! With a journal ([`crate::journal`], as the service runs), a group commit
//! is one journal record — the group's entries and the checkpoint signed
//! over them — and one `fdatasync`; the store writes its tiles and indexes
//! and the checkpoint file is written afterwards, in the background
//! ([`AuditLog::apply`]), and a start replays what the journal holds
//! beyond them ([`AuditLog::recover`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use ed25519_dalek::VerifyingKey;
use prost::Message;
use twokey_proto::{
    Timestamp,
    audit::v1::{Event, LogEntry, SignedEvent},
};
use twokey_runtime::{
    SpiffeId,
    events::verify_event,
    time::{Clock, to_timestamp},
};

#[cfg(test)]
mod journaled;
mod restore;
pub mod sequencer;
pub use restore::RestoreProgress;

use crate::{
    checkpoint::{Checkpoint, CheckpointSigner, split_note},
    error::AuditError,
    head::{TreeHead, TreeHeadFile},
    journal::{self, Journal, Record},
    merkle::{self, Hash, leaf_hash},
    store::{LogStore, Walk},
};

/// What became of an appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Stored durably now at `index`.
    Stored {
        /// The event's sequence number.
        seq: u64,
        /// Its leaf index.
        index: u64,
    },
    /// Stored before, at `index`.
    Duplicate {
        /// The event's sequence number.
        seq: u64,
        /// Its leaf index.
        index: u64,
        /// The sequence number expected next.
        expected: u64,
    },
    /// Refused: the source must resend from `expected`.
    Gap {
        /// The event's sequence number.
        seq: u64,
        /// The sequence number expected next.
        expected: u64,
    },
}

/// An append written but not yet durable; [`AuditLog::finish`] syncs it.
#[derive(Debug)]
#[must_use = "an append is acknowledged only after finish"]
pub struct PendingAck {
    ack: Ack,
    needs_sync_below: Option<u64>,
    /// The store's epoch when staged ([`LogStore::epoch`]).
    epoch: u64,
}

impl PendingAck {
    /// The sequence number of the event.
    pub fn seq(&self) -> u64 {
        match self.ack {
            Ack::Stored { seq, .. } | Ack::Duplicate { seq, .. } | Ack::Gap { seq, .. } => seq,
        }
    }
}

/// Which entries a query selects; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryFilter {
    /// Event time at or after this.
    pub since: Option<(i64, i32)>,
    /// Event time before this.
    pub until: Option<(i64, i32)>,
    /// Source SPIFFE ID.
    pub source: String,
    /// Actor SPIFFE ID.
    pub actor: String,
    /// Action.
    pub action: String,
    /// Account.
    pub account_id: String,
    /// Request.
    pub request_id: String,
    /// Outcome (0: any).
    pub outcome: i32,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
}

pub(crate) fn ts(t: &Timestamp) -> (i64, i32) {
    (t.seconds, t.nanos)
}

/// A query as asked: what to select, from where, and how many at most.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// What to select.
    pub filter: QueryFilter,
    /// The index to start from (a previous answer's token), if any.
    pub start: Option<u64>,
    /// Entries to answer at most (`None`: all).
    pub page_size: Option<usize>,
}

impl QueryFilter {
    /// Whether `event` is selected.
    pub fn matches(&self, event: &Event) -> bool {
        let text = |want: &str, have: &str| want.is_empty() || want == have;
        let time = event.time.as_ref().map(ts);
        self.since.is_none_or(|s| time.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| time.is_some_and(|t| t < u))
            && text(&self.source, &event.source)
            && actor_matches(&self.actor, &event.actor)
            && text(&self.action, &event.action)
            && text(&self.account_id, &event.account_id)
            && text(&self.request_id, &event.request_id)
            && (self.outcome == 0 || self.outcome == event.outcome)
    }
}

impl QueryFilter {
    /// The index a query walks: the most selective field given, in the
    /// order request id, actor, account, time range, action, source; with
    /// none of them, every entry.
    pub fn walk(&self) -> Walk {
        if !self.request_id.is_empty() {
            Walk::Request(self.request_id.clone())
        } else if !self.actor.is_empty() {
            if self.actor.contains('/') {
                Walk::Actor(self.actor.clone())
            } else {
                Walk::ActorName(self.actor.clone())
            }
        } else if !self.account_id.is_empty() {
            Walk::Account(self.account_id.clone())
        } else if self.since.is_some() || self.until.is_some() {
            Walk::Time {
                since: self.since,
                until: self.until,
            }
        } else if !self.action.is_empty() {
            Walk::Action(self.action.clone())
        } else if !self.source.is_empty() {
            Walk::Source(self.source.clone())
        } else {
            Walk::All
        }
    }
}

/// Whether `actor` is selected by `want`: empty selects all; a SPIFFE ID
/// must be equal; a bare name (as the policy names people) selects every
/// SPIFFE ID whose last segment it is.
fn actor_matches(want: &str, actor: &str) -> bool {
    if want.is_empty() || want == actor {
        return true;
    }
    !want.contains('/')
        && actor.starts_with("spiffe://")
        && actor.rsplit_once('/').is_some_and(|(_, name)| name == want)
}

/// One batch of query results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryBatch {
    /// Matching entries in the requested order.
    pub entries: Vec<LogEntry>,
    /// The index of the next matching entry, if there is one.
    pub next: Option<u64>,
}

/// A signed checkpoint and what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The signed note.
    pub note: String,
    /// Entries covered.
    pub size: u64,
    /// Their root hash.
    pub root: Hash,
}

/// A receipt for a source: a signed checkpoint and the consistency proof to
/// it from the size the source accepted before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The checkpoint.
    pub checkpoint: SignedCheckpoint,
    /// The size the proof starts from.
    pub from: u64,
    /// The consistency proof from `from` to the checkpoint's size; empty
    /// when `from` is 0, equal to it or larger.
    pub proof: Vec<Hash>,
}

/// The audit log: who may write and read it, and the store under it.
#[derive(Debug)]
pub struct AuditLog<S> {
    store: S,
    sources: BTreeMap<SpiffeId, VerifyingKey>,
    auditors: BTreeSet<SpiffeId>,
    signer: CheckpointSigner,
    clock: Arc<dyn Clock>,
    write: Mutex<()>,
    durable: AtomicU64,
    sync: tokio::sync::Mutex<()>,
    syncs: AtomicU64,
    /// The largest tree head signed; held while a checkpoint is made, so
    /// checkpoints are checked, signed and persisted one at a time.
    head: Mutex<TreeHeadFile>,
    /// The size of the largest tree head signed, for open append streams
    /// to push receipts to their idle sources (witnesses).
    signed: tokio::sync::watch::Sender<u64>,
    /// The newest cosignature of each witness (a source): the size it
    /// covers and the signature line. In memory: the sources cosign again
    /// on their next receipt, which each stream sends when it opens.
    cosignatures: Mutex<BTreeMap<String, (u64, String)>>,
    /// A restore in progress: the log holds fewer entries than a checkpoint
    /// it signed, shown by a source ([`crate::restore`]).
    restore: Mutex<Option<restore::Restore>>,
    /// The journal, when the log keeps one.
    journal: Option<Journaling>,
}

/// How long the applier waits after a journal record before it applies
/// what the journal holds, so one apply covers many group commits.
pub const APPLY_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A log's journal and what goes with it.
#[derive(Debug)]
struct Journaling {
    journal: Arc<Mutex<Journal>>,
    /// Entries staged since the last record, in index order.
    pending: Mutex<Vec<journal::Entry>>,
    /// What the journal held beyond the store when opened, and its newest
    /// checkpoint, until [`AuditLog::recover`] replays it.
    replay: Mutex<Option<(Vec<Record>, Option<String>)>>,
    /// One apply at a time.
    apply: tokio::sync::Mutex<()>,
    /// Wakes the applier after a record.
    wake: Arc<tokio::sync::Notify>,
    /// Entries the tiles, sled and the checkpoint file hold durably.
    applied: AtomicU64,
    /// Applies run so far.
    applies: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The witness name of a source: its SPIFFE ID without the scheme (a
/// schema-less URL, as C2SP tlog-cosignature recommends).
pub fn witness_name(source: &SpiffeId) -> &str {
    source
        .as_str()
        .strip_prefix("spiffe://")
        .unwrap_or(source.as_str())
}

impl<S: LogStore> AuditLog<S> {
    /// A log over `store`; call [`AuditLog::recover`] before serving.
    pub fn new(
        store: S,
        sources: BTreeMap<SpiffeId, VerifyingKey>,
        auditors: BTreeSet<SpiffeId>,
        signer: CheckpointSigner,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            sources,
            auditors,
            signer,
            clock,
            write: Mutex::new(()),
            durable: AtomicU64::new(0),
            sync: tokio::sync::Mutex::new(()),
            syncs: AtomicU64::new(0),
            head: Mutex::new(TreeHeadFile::in_memory()),
            signed: tokio::sync::watch::Sender::new(0),
            cosignatures: Mutex::new(BTreeMap::new()),
            restore: Mutex::new(None),
            journal: None,
        }
    }

    /// The log keeps `opened` as its journal: each group commit is one
    /// record and one sync there, and [`AuditLog::recover`] replays what it
    /// held beyond the store. Run [`AuditLog::spawn_applier`] once serving.
    pub fn with_journal(mut self, opened: journal::Opened) -> Self {
        let applied = opened.journal.applied();
        self.journal = Some(Journaling {
            journal: Arc::new(Mutex::new(opened.journal)),
            pending: Mutex::new(Vec::new()),
            replay: Mutex::new(Some((opened.replay, opened.newest_checkpoint))),
            apply: tokio::sync::Mutex::new(()),
            wake: Arc::new(tokio::sync::Notify::new()),
            applied: AtomicU64::new(applied),
            applies: AtomicU64::new(0),
        });
        self
    }

    /// Entries the tiles, sled and checkpoint file hold durably (with a
    /// journal; without one, every durable entry).
    pub fn applied_size(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or_else(|| self.size(), |j| j.applied.load(Ordering::SeqCst))
    }

    /// How many applies of the journal ran.
    pub fn apply_count(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(0, |j| j.applies.load(Ordering::Relaxed))
    }

    /// Watches the size of the largest tree head signed.
    pub fn signed_size(&self) -> tokio::sync::watch::Receiver<u64> {
        self.signed.subscribe()
    }

    /// Keeps the cosignature `cosigned` of source `peer` as a witness: a
    /// signed note holding the checkpoint text it cosigned and its
    /// `cosignature/v1` line by the source's event key under
    /// [`witness_name`]. The checkpoint must be one of this log (origin,
    /// and its root at its size, no larger than the largest signed head)
    /// and the cosignature must verify; it replaces the witness's previous
    /// one if it covers at least as many entries.
    pub fn add_cosignature(&self, peer: &SpiffeId, cosigned: &str) -> Result<(), AuditError> {
        let key = self
            .sources
            .get(peer)
            .ok_or_else(|| AuditError::UnknownSource(peer.to_string()))?;
        let name = witness_name(peer);
        let invalid = |why: String| {
            AuditError::InvalidArgument(format!("cosignature of witness {name}: {why}"))
        };
        let verifier = twokey_tlog::cosignature::CosignatureVerifier::new(name, *key)
            .map_err(|e| invalid(e.to_string()))?;
        verifier
            .verify(cosigned)
            .map_err(|e| invalid(e.to_string()))?;
        let (text, _) = split_note(cosigned).map_err(|e| invalid(e.to_string()))?;
        let checkpoint = Checkpoint::parse_body(text).map_err(|e| invalid(e.to_string()))?;
        if checkpoint.origin != self.signer.name() {
            return Err(invalid(format!(
                "origin {:?} is another log",
                checkpoint.origin
            )));
        }
        let signed = self.head().size();
        if checkpoint.size > signed || checkpoint.size == 0 {
            return Err(invalid(format!(
                "{} entries: this log signed no checkpoint of that size",
                checkpoint.size
            )));
        }
        if self.mth(0, checkpoint.size)? != checkpoint.root {
            return Err(invalid(format!(
                "the root of {} entries is not this log's",
                checkpoint.size
            )));
        }
        let line = cosigned[text.len() + 1..]
            .lines()
            .find(|l| {
                l.strip_prefix("\u{2014} ")
                    .is_some_and(|r| r.starts_with(&format!("{name} ")))
            })
            .map(str::to_owned)
            .ok_or_else(|| invalid("no line".into()))?;
        let mut all = self.cosignatures.lock().unwrap_or_else(|e| e.into_inner());
        if all
            .get(name)
            .is_none_or(|(size, _)| *size <= checkpoint.size)
        {
            all.insert(name.to_owned(), (checkpoint.size, line));
        }
        Ok(())
    }

    /// The latest checkpoint (see [`AuditLog::checkpoint`]) with the
    /// cosignature lines of the witnesses whose newest cosignature covers
    /// exactly its size appended: still a signed note that Go's
    /// `sumdb/note` opens with the log's key alone.
    pub fn cosigned_checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        let mut checkpoint = self.checkpoint()?;
        let all = self.cosignatures.lock().unwrap_or_else(|e| e.into_inner());
        for (size, line) in all.values() {
            if *size == checkpoint.size {
                checkpoint.note.push_str(line);
                checkpoint.note.push('\n');
            }
        }
        Ok(checkpoint)
    }

    /// The largest signed tree head is `head` (loaded from the data
    /// directory) instead of one kept in memory; [`AuditLog::recover`]
    /// checks the store against it.
    pub fn with_tree_head(mut self, head: TreeHeadFile) -> Self {
        self.head = Mutex::new(head);
        self
    }

    fn head(&self) -> std::sync::MutexGuard<'_, TreeHeadFile> {
        self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The largest tree head signed so far, if any.
    pub fn tree_head(&self) -> Option<TreeHead> {
        self.head().head().cloned()
    }

    /// Makes whatever the store holds durable and visible (after a restart),
    /// once it is checked against the largest tree head this log signed:
    /// the store must hold at least the signed size, with the signed root
    /// at that size, and its right edge must be whole (what the store
    /// checks when it opens: the newest entries against their leaf hashes,
    /// the last tiles against the level above). This costs the same at any
    /// size; rehashing every entry is `TileStore::verify_all`, offline.
    /// Otherwise it refuses with [`AuditError::TreeHead`] naming both and
    /// what to do.
    ///
    /// A tree-head file that is missing while the store holds entries is
    /// taken for the first start after the upgrade that added the file: the
    /// file is written from the store as it is (and a log line says so).
    /// An attacker who deletes the file gets the same treatment; only
    /// witnesses that remember the log's checkpoints close that gap.
    ///
    /// With a journal, the entries it holds beyond the store are staged
    /// again first (each checked: the entries the store holds too must be
    /// the same, the others must follow on in each source's sequence), and
    /// its newest checkpoint, checked against this log's key, counts as
    /// signed; the store and the checkpoint file are then written from them.
    pub async fn recover(&self) -> Result<(), AuditError> {
        let before = self.store.size();
        if let Err(e) = self.replay() {
            // A store cut back under its signed head says more than the
            // journal that no longer follows on from it.
            self.check_stored_log(before)?;
            return Err(e);
        }
        let size = self.store.size();
        self.check_stored_log(size)?;
        self.store.discard_uncommitted()?;
        self.store.sync().await?;
        self.durable.fetch_max(size, Ordering::SeqCst);
        if let Some(j) = &self.journal {
            let head = self.head().head().cloned();
            if let Some(head) = head {
                self.persist_head(&head).await?;
            }
            lock(&j.journal).set_applied(size);
            j.applied.fetch_max(size, Ordering::SeqCst);
        }
        let missing = self.head().was_missing();
        if missing && size > 0 {
            let location = self.head().location();
            tracing::warn!(
                entries = size,
                file = %location,
                "no tree-head file: taking this for the first start since the upgrade that added it, \
                 and writing it from the stored log as it is; if the file was there before, \
                 restore it from a backup and restart"
            );
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Stages the entries the journal holds beyond the store (see
    /// [`AuditLog::recover`]); nothing when the store found itself damaged
    /// at open, which [`AuditLog::check_stored_log`] then reports.
    fn replay(&self) -> Result<(), AuditError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let Some((records, newest)) = lock(&j.replay).take() else {
            return Ok(());
        };
        if self.store.check().is_err() {
            return Ok(());
        }
        let replayed = journal::replay_into(&self.store, &records)?;
        if let Some(note) = newest {
            let verifier = self.signer.verifier();
            let cp = verifier.open_checkpoint(&note).map_err(|e| {
                AuditError::HeadFile(format!(
                    "the newest checkpoint in the journal is not signed by this log's key \
                     {verifier}: {e}. The journal was altered, or the checkpoint key or origin \
                     changed; restore the data directory from a backup"
                ))
            })?;
            self.head().record_journaled(TreeHead {
                size: cp.size,
                root: cp.root,
                note,
            });
        }
        if replayed > 0 {
            tracing::info!(
                entries = replayed,
                size = self.store.size(),
                "entries replayed from the journal"
            );
        }
        Ok(())
    }

    /// Writes `head` to the checkpoint file if the file holds a smaller one.
    async fn persist_head(&self, head: &TreeHead) -> Result<(), AuditError> {
        let path = {
            let file = self.head();
            if head.size <= file.persisted_size() {
                return Ok(());
            }
            file.path().map(std::path::Path::to_path_buf)
        };
        if let Some(path) = path {
            let note = head.note.clone();
            let at = path.clone();
            tokio::task::spawn_blocking(move || {
                twokey_runtime::durable::fail_stop(&at, || {
                    crate::head::write_atomically(&at, note.as_bytes())
                })
            })
            .await
            .map_err(|e| AuditError::Store(format!("the checkpoint file task failed: {e}")))?
            .map_err(|e| {
                AuditError::Store(format!(
                    "cannot write the tree head of {} entries to {}: {e}; free space or fix the \
                     permissions of the data directory",
                    head.size,
                    path.display()
                ))
            })?;
        }
        self.head().persisted(head.size);
        Ok(())
    }

    /// Writes what the journal holds to the store (tiles, sled indexes,
    /// each synced) and the checkpoint file, then lets the journal reuse
    /// the segments they now hold. Runs in the background
    /// ([`AuditLog::spawn_applier`]), when the journal is full, and at
    /// shutdown; a no-op without a journal or with nothing new.
    pub async fn apply(&self) -> Result<(), AuditError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let _one = j.apply.lock().await;
        // Everything up to the largest signed head is journaled and staged
        // in the store, so the store's sync below covers it.
        let Some(head) = self.head().head().cloned() else {
            return Ok(());
        };
        if head.size <= j.applied.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.store.sync().await?;
        self.persist_head(&head).await?;
        lock(&j.journal).set_applied(head.size);
        j.applied.fetch_max(head.size, Ordering::SeqCst);
        j.applies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Starts the task that applies the journal [`APPLY_EVERY`] after a
    /// record (see [`AuditLog::apply`]); it ends when the log is dropped.
    pub fn spawn_applier(self: &Arc<Self>) {
        let Some(j) = &self.journal else {
            return;
        };
        let wake = j.wake.clone();
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                tokio::time::sleep(APPLY_EVERY).await;
                let Some(log) = log.upgrade() else {
                    return;
                };
                if let Err(e) = log.apply().await {
                    tracing::error!("cannot apply the journal to the store: {e}");
                }
            }
        });
    }

    /// Checks the `size` stored entries against the signed tree head: the
    /// store's own findings at open, the size, and the root at the signed
    /// size (from O(log n) stored hashes).
    fn check_stored_log(&self, size: u64) -> Result<(), AuditError> {
        let head = self.head();
        let location = head.location();
        let dir = head
            .data_dir()
            .map(std::path::Path::to_path_buf)
            .or_else(|| {
                head.path()
                    .and_then(|p| p.parent())
                    .map(|p| p.to_path_buf())
            })
            .map_or_else(|| "the store".to_owned(), |d| d.display().to_string());
        let signed = head.head().cloned();
        drop(head);
        let refuse = |found: String| {
            let Some(h) = &signed else {
                return AuditError::TreeHead(format!(
                    "{found}. Restore the data directory {dir} from a backup"
                ));
            };
            AuditError::TreeHead(format!(
                "{found}, but this log signed a tree head of {size} entries with root {root} \
                 (kept in {location}). Restore the data directory {dir} from a backup holding \
                 at least {size} entries, keeping {location} as it is; only if you knowingly \
                 accept losing signed entries for good, move {location} away and start again \
                 (the log then signs what its store holds, and checkpoints auditors kept will \
                 no longer verify)",
                size = h.size,
                root = h.root_hex(),
            ))
        };
        let shorter = |held: u64| {
            refuse(format!(
                "the store in {dir} holds {held} entries: entries were lost or the data \
                 directory was rolled back"
            ))
        };
        if let Err(problem) = self.store.check() {
            return Err(match (problem.held, &signed) {
                (Some(held), Some(h)) if held < h.size => shorter(held),
                (Some(held), _) => refuse(format!(
                    "{}: the store in {dir} holds {held} of its {size} entries",
                    problem.why
                )),
                (None, _) => refuse(problem.why),
            });
        }
        let Some(h) = &signed else {
            return Ok(());
        };
        if size < h.size {
            return Err(shorter(size));
        }
        let root = self.mth(0, h.size).map_err(|e| {
            refuse(format!(
                "the hashes stored in {dir} cannot be read ({e}): they were altered or deleted"
            ))
        })?;
        if root != h.root {
            return Err(refuse(format!(
                "the entries stored in {dir} have root {} at {} entries: stored entries \
                 were altered or replaced (a fork)",
                hex::encode(root),
                h.size
            )));
        }
        Ok(())
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The checkpoint signer.
    pub fn signer(&self) -> &CheckpointSigner {
        &self.signer
    }

    /// Whether `id` is a configured source.
    pub fn is_source(&self, id: &SpiffeId) -> bool {
        self.sources.contains_key(id)
    }

    /// Whether `id` is a configured auditor.
    pub fn is_auditor(&self, id: &SpiffeId) -> bool {
        self.auditors.contains(id)
    }

    /// Number of durable entries: what readers see.
    pub fn size(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    /// Appends `signed` from `peer` and waits until it is durable.
    pub async fn append(&self, peer: &SpiffeId, signed: SignedEvent) -> Result<Ack, AuditError> {
        let pending = self.begin_append(peer, signed)?;
        self.finish(pending).await
    }

    /// The event `signed` holds, if `peer` is a configured source, the event
    /// names it, its key signed it and its sequence number is not 0.
    fn verify_from(&self, peer: &SpiffeId, signed: &SignedEvent) -> Result<Event, AuditError> {
        let key = self
            .sources
            .get(peer)
            .ok_or_else(|| AuditError::UnknownSource(peer.to_string()))?;
        let claimed = Event::decode(signed.event.as_slice())
            .map_err(|e| AuditError::InvalidEvent(format!("event bytes do not decode: {e}")))?;
        if claimed.source != peer.as_str() {
            return Err(AuditError::PeerMismatch {
                peer: peer.to_string(),
                source_id: claimed.source,
            });
        }
        let event = verify_event(signed, key).map_err(|_| AuditError::BadSignature {
            source_id: claimed.source.clone(),
            seq: claimed.seq,
        })?;
        if event.seq == 0 {
            return Err(AuditError::InvalidEvent(
                "event seq 0: sequence numbers start at 1".into(),
            ));
        }
        Ok(event)
    }

    /// Checks and writes an event without waiting for the disk; appends of
    /// one stream can be pipelined and share one sync. The answer must not
    /// be sent before [`AuditLog::finish`] returns.
    pub fn begin_append(
        &self,
        peer: &SpiffeId,
        signed: SignedEvent,
    ) -> Result<PendingAck, AuditError> {
        let event = self.verify_from(peer, &signed)?;
        let seq = event.seq;
        // The Merkle leaf: the SignedEvent re-encoded canonically (decoding
        // dropped anything unknown; the signed bytes are kept as they are).
        let leaf_data = signed.encode_to_vec();

        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        self.refuse_while_restoring()?;
        self.store.may_append()?;
        let epoch = self.store.epoch();
        let expected = self.store.next_seq(peer.as_str())?;
        if seq > expected {
            return Ok(PendingAck {
                ack: Ack::Gap { seq, expected },
                needs_sync_below: None,
                epoch,
            });
        }
        if seq < expected {
            let index = self
                .store
                .index_of(peer.as_str(), seq)?
                .ok_or_else(|| AuditError::Store(format!("no index for {peer} seq {seq}")))?;
            let stored = self
                .store
                .entry(index)?
                .and_then(|e| e.signed_event)
                .ok_or_else(|| AuditError::Store(format!("entry {index} is missing")))?;
            if stored.encode_to_vec() != leaf_data {
                return Err(AuditError::Conflict {
                    source_id: peer.to_string(),
                    seq,
                    index,
                });
            }
            return Ok(PendingAck {
                ack: Ack::Duplicate {
                    seq,
                    index,
                    expected,
                },
                needs_sync_below: Some(index + 1),
                epoch,
            });
        }
        let index = self.store.size();
        let entry = LogEntry {
            index,
            signed_event: Some(signed),
            event: Some(event),
            received_at: Some(to_timestamp(self.clock.now())),
        };
        self.stage(&entry, leaf_data)?;
        Ok(PendingAck {
            ack: Ack::Stored { seq, index },
            needs_sync_below: Some(index + 1),
            epoch,
        })
    }

    /// Writes `entry` (leaf data `data`) to the store and, with a journal,
    /// keeps it for the next record. Caller holds the write lock.
    fn stage(&self, entry: &LogEntry, data: Vec<u8>) -> Result<(), AuditError> {
        self.store.append(entry, &leaf_hash(&data))?;
        if let Some(j) = &self.journal {
            let received_at = entry.received_at.as_ref().map(|t| (t.seconds, t.nanos));
            lock(&j.pending).push(journal::Entry { data, received_at });
        }
        Ok(())
    }

    /// Waits until a pending append is durable and returns its answer.
    pub async fn finish(&self, pending: PendingAck) -> Result<Ack, AuditError> {
        if let Some(size) = pending.needs_sync_below {
            self.make_durable(size).await?;
            if self.store.epoch() != pending.epoch || self.durable.load(Ordering::SeqCst) < size {
                // The lease was lost with this append staged: it may be
                // in the database or not; the source sends it again and
                // the sequencer answers it.
                return Err(AuditError::NotSequencer(
                    "this audit replica lost the sequencer lease before the event was \
                     committed: send it again (to the next audit address)"
                        .into(),
                ));
            }
        }
        Ok(pending.ack)
    }

    /// Group commit: one sync at a time, each covering every entry written
    /// before it started; whoever waited for it and is covered returns
    /// without syncing again.
    async fn make_durable(&self, size: u64) -> Result<(), AuditError> {
        if self.durable.load(Ordering::SeqCst) >= size {
            return Ok(());
        }
        let _one_at_a_time = self.sync.lock().await;
        if self.durable.load(Ordering::SeqCst) >= size {
            return Ok(());
        }
        let covered = match &self.journal {
            _ if self.store.keeps_head() => self.head_group().await?,
            Some(j) => self.journal_group(j).await?,
            None => {
                let covered = self.store.size();
                self.store.sync().await?;
                covered
            }
        };
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.durable.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    /// One group commit with a journal: the entries staged since the last
    /// record and a checkpoint signed over them (checked against the
    /// largest signed head first) in one record, one `fdatasync`; then the
    /// checkpoint is the largest signed head. Returns the size covered.
    /// On failure the entries stay staged for the next group.
    async fn journal_group(&self, j: &Journaling) -> Result<u64, AuditError> {
        let (first, entries) = {
            let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let entries = std::mem::take(&mut *lock(&j.pending));
            (self.store.size() - entries.len() as u64, entries)
        };
        let covered = first + entries.len() as u64;
        if entries.is_empty() {
            return Ok(covered);
        }
        let put_back = |entries: Vec<journal::Entry>| {
            let mut pending = lock(&j.pending);
            let later = std::mem::replace(&mut *pending, entries);
            pending.extend(later);
        };
        let head = match self.sign_checked(&self.head(), covered) {
            Ok(head) => head,
            Err(e) => {
                put_back(entries);
                return Err(e);
            }
        };
        let records = Arc::new(Record::group(first, entries, Some(head.note.clone())));
        let written = loop {
            let (journal, r) = (j.journal.clone(), records.clone());
            let done = tokio::task::spawn_blocking(move || lock(&journal).append(&r))
                .await
                .unwrap_or_else(|e| {
                    Err(AuditError::Store(format!("the journal task failed: {e}")))
                });
            match done {
                Ok(true) => break Ok(()),
                // Every segment holds records not yet applied.
                Ok(false) => {
                    if let Err(e) = self.apply().await {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = written {
            let records = Arc::try_unwrap(records).unwrap_or_else(|a| (*a).clone());
            put_back(records.into_iter().flat_map(|r| r.entries).collect());
            return Err(e);
        }
        let size = head.size;
        self.head().record_journaled(head);
        self.note_signed(size);
        j.wake.notify_one();
        Ok(covered)
    }

    /// One group commit in a store that keeps the signed tree head: a
    /// checkpoint over everything staged, checked against the largest
    /// signed head, committed with the entries in one transaction. Returns
    /// the size covered.
    async fn head_group(&self) -> Result<u64, AuditError> {
        let head = {
            let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let covered = self.store.size();
            if covered <= self.durable.load(Ordering::SeqCst) {
                return Ok(covered);
            }
            self.sign_checked(&self.head(), covered)?
        };
        self.store.commit_with_head(&head).await?;
        let size = head.size;
        self.head().record_journaled(head);
        self.note_signed(size);
        Ok(size)
    }

    /// How many syncs appends have waited for so far.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// The entry at `index`, if durable.
    pub fn entry(&self, index: u64) -> Result<Option<LogEntry>, AuditError> {
        if index >= self.size() {
            return Ok(None);
        }
        self.store.entry(index)
    }

    /// Up to `limit` entries matching `filter`, from `start` (an index from
    /// a previous batch's `next`) in the filter's order: by leaf index, or,
    /// when a time range is the only field an index serves, by event time
    /// (then leaf index). The most selective index the filter names is
    /// walked from `start` ([`QueryFilter::walk`]); the log is never
    /// scanned unless the filter names no indexed field.
    pub fn query_batch(
        &self,
        filter: &QueryFilter,
        start: Option<u64>,
        limit: usize,
    ) -> Result<QueryBatch, AuditError> {
        let size = self.size();
        let mut batch = QueryBatch::default();
        if size == 0 {
            return Ok(batch);
        }
        if let Some(from) = start {
            let beyond = if filter.newest_first {
                from >= size
            } else {
                from > size
            };
            if beyond {
                return Err(AuditError::OutOfRange(format!(
                    "page token {from} is beyond the log of {size} entries"
                )));
            }
            if from == size {
                return Ok(batch);
            }
        }
        let walk = filter.walk();
        for index in self.store.walk(&walk, start, filter.newest_first, size)? {
            let index = index?;
            if index >= size {
                continue;
            }
            let entry = self
                .store
                .entry(index)?
                .ok_or_else(|| AuditError::Store(format!("entry {index} is missing")))?;
            if !entry.event.as_ref().is_some_and(|e| filter.matches(e)) {
                continue;
            }
            if batch.entries.len() >= limit {
                batch.next = Some(index);
                break;
            }
            batch.entries.push(entry);
        }
        Ok(batch)
    }

    fn mth(&self, start: u64, end: u64) -> Result<Hash, AuditError> {
        merkle::subtree_root(start, end, &mut |level, index| {
            self.store.node(level, index)
        })
    }

    /// A checkpoint over every durable entry, signed now. It must extend
    /// the largest tree head signed before (same root at that size), or
    /// nothing is signed: an INTERNAL error, logged at ERROR. A checkpoint
    /// larger than that head is persisted as the new head before it is
    /// returned.
    pub fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        self.refuse_while_restoring()?;
        let mut head = self.head();
        let size = self.size();
        let signed = self.sign_checked(&head, size)?;
        let root = signed.root;
        let note = signed.note.clone();
        head.record(signed)?;
        drop(head);
        self.note_signed(size);
        Ok(SignedCheckpoint { note, size, root })
    }

    /// Tells open append streams that a head of `size` entries is signed.
    fn note_signed(&self, size: u64) {
        self.signed.send_if_modified(|s| {
            let grew = size > *s;
            *s = (*s).max(size);
            grew
        });
    }

    /// A checkpoint of the first `size` entries, signed, if they extend
    /// `head` (same root at its size); see [`AuditLog::checkpoint`].
    fn sign_checked(&self, head: &TreeHeadFile, size: u64) -> Result<TreeHead, AuditError> {
        let root = self.mth(0, size)?;
        if let Some(signed) = head.head() {
            let found = if size < signed.size {
                Some(format!("the store serves {size} entries"))
            } else {
                let at = if size == signed.size {
                    root
                } else {
                    self.mth(0, signed.size)?
                };
                (at != signed.root).then(|| {
                    format!(
                        "the store has root {} at {} entries",
                        hex::encode(at),
                        signed.size
                    )
                })
            };
            if let Some(found) = found {
                let message = format!(
                    "{found}, but this log signed a tree head of {} entries with root {} (kept \
                     in {}); no smaller or different tree is signed. Stop the audit service and \
                     restore its data directory from a backup holding at least {} entries",
                    signed.size,
                    signed.root_hex(),
                    head.location(),
                    signed.size
                );
                tracing::error!(
                    signed_size = signed.size,
                    signed_root = %signed.root_hex(),
                    store_size = size,
                    "refusing to sign a checkpoint: {message}"
                );
                return Err(AuditError::TreeHead(message));
            }
        }
        let note = self.signer.sign(&Checkpoint {
            origin: self.signer.name().to_owned(),
            size,
            root,
        })?;
        Ok(TreeHead { size, root, note })
    }

    /// A checkpoint over every durable entry (see [`AuditLog::checkpoint`])
    /// with the consistency proof to it from a tree of `from` entries, for a
    /// source that accepted a checkpoint of that size before. When `from`
    /// is larger than the checkpoint there is no proof to give: the source
    /// sees the smaller tree and refuses it.
    pub fn receipt(&self, from: u64) -> Result<Receipt, AuditError> {
        let checkpoint = self.checkpoint()?;
        let proof = if from == 0 || from >= checkpoint.size {
            Vec::new()
        } else {
            merkle::consistency_proof_with(from, checkpoint.size, &mut |s, e| self.mth(s, e))?
        };
        Ok(Receipt {
            checkpoint,
            from,
            proof,
        })
    }

    fn tree_size(&self, requested: u64) -> Result<u64, AuditError> {
        let size = self.size();
        match requested {
            0 => Ok(size),
            n if n > size => Err(AuditError::OutOfRange(format!(
                "tree size {n} is larger than the log ({size} entries)"
            ))),
            n => Ok(n),
        }
    }

    /// Proof that entry `index` is in the tree of `tree_size` entries (0: now).
    pub fn inclusion_proof(
        &self,
        index: u64,
        tree_size: u64,
    ) -> Result<(u64, Vec<Hash>), AuditError> {
        let size = self.tree_size(tree_size)?;
        if index >= size {
            return Err(AuditError::OutOfRange(format!(
                "leaf index {index} is not in a tree of {size} entries"
            )));
        }
        let proof = merkle::inclusion_proof_with(index, size, &mut |s, e| self.mth(s, e))?;
        Ok((size, proof))
    }

    /// Proof that the tree of `first` entries is a prefix of the tree of
    /// `second` entries (0: now).
    pub fn consistency_proof(
        &self,
        first: u64,
        second: u64,
    ) -> Result<(u64, Vec<Hash>), AuditError> {
        let second = self.tree_size(second)?;
        if first > second {
            return Err(AuditError::InvalidArgument(format!(
                "first size {first} is larger than second size {second}"
            )));
        }
        let proof = merkle::consistency_proof_with(first, second, &mut |s, e| self.mth(s, e))?;
        Ok((second, proof))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{checkpoint::NoteVerifier, store::TileStore};
    use ed25519_dalek::SigningKey;
    use std::time::{Duration, SystemTime};
    use twokey_proto::audit::v1::Outcome;
    use twokey_runtime::error::ServiceError;
    use twokey_runtime::{
        events::{EventDraft, EventSigner},
        time::ManualClock,
    };

    pub(super) const VAULT: &str = "spiffe://t/svc/vault";
    pub(super) const BROKER: &str = "spiffe://t/svc/broker";

    pub(super) struct Fixture {
        pub(super) _dir: tempfile::TempDir,
        pub(super) log: AuditLog<TileStore>,
        pub(super) vault: EventSigner,
        pub(super) broker: EventSigner,
        pub(super) start: SystemTime,
    }

    pub(super) fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    pub(super) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vault = EventSigner::new(id(VAULT), SigningKey::from_bytes(&[1; 32]));
        let broker = EventSigner::new(id(BROKER), SigningKey::from_bytes(&[2; 32]));
        let sources = [
            (id(VAULT), vault.verifying_key()),
            (id(BROKER), broker.verifying_key()),
        ]
        .into();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let log = AuditLog::new(
            TileStore::open(dir.path()).unwrap(),
            sources,
            [id("spiffe://t/user/carol")].into(),
            CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap(),
            Arc::new(ManualClock::new(start)),
        );
        Fixture {
            _dir: dir,
            log,
            vault,
            broker,
            start,
        }
    }

    pub(super) fn event(
        signer: &EventSigner,
        seq: u64,
        action: &str,
        at: SystemTime,
    ) -> SignedEvent {
        signer.sign(
            &EventDraft::new("spiffe://t/user/alice", action)
                .account("aws-prod")
                .request(format!("r{seq}"))
                .into_event(signer.source(), seq, at),
        )
    }

    #[tokio::test]
    async fn sequence_numbers_are_stored_deduplicated_and_gaps_refused() {
        let f = fixture();
        let v = id(VAULT);
        let e1 = event(&f.vault, 1, "a", f.start);
        assert_eq!(
            f.log.append(&v, e1.clone()).await.unwrap(),
            Ack::Stored { seq: 1, index: 0 }
        );
        assert_eq!(
            f.log.append(&v, e1).await.unwrap(),
            Ack::Duplicate {
                seq: 1,
                index: 0,
                expected: 2
            }
        );
        assert_eq!(
            f.log
                .append(&v, event(&f.vault, 3, "a", f.start))
                .await
                .unwrap(),
            Ack::Gap {
                seq: 3,
                expected: 2
            }
        );
        let other_1 = event(&f.vault, 1, "different", f.start);
        assert!(matches!(
            f.log.append(&v, other_1).await,
            Err(AuditError::Conflict {
                seq: 1,
                index: 0,
                ..
            })
        ));
        assert_eq!(f.log.size(), 1);
    }

    #[tokio::test]
    async fn events_from_the_wrong_peer_or_key_are_refused() {
        let f = fixture();
        let e = event(&f.broker, 1, "a", f.start);
        assert!(matches!(
            f.log.append(&id(VAULT), e.clone()).await,
            Err(AuditError::PeerMismatch { .. })
        ));
        assert!(matches!(
            f.log.append(&id("spiffe://t/svc/other"), e.clone()).await,
            Err(AuditError::UnknownSource(_))
        ));
        let mut forged = e.clone();
        forged.signature = f
            .vault
            .sign(&Event::decode(e.event.as_slice()).unwrap())
            .signature;
        assert!(matches!(
            f.log.append(&id(BROKER), forged).await,
            Err(AuditError::BadSignature { seq: 1, .. })
        ));
        let mut garbage = e;
        garbage.event = vec![0xff; 3];
        assert!(matches!(
            f.log.append(&id(BROKER), garbage).await,
            Err(AuditError::InvalidEvent(_))
        ));
        assert_eq!(f.log.size(), 0);
    }

    #[test]
    fn an_actor_is_selected_by_spiffe_id_or_by_name() {
        let bob = "spiffe://t/user/bob";
        let m = |want: &str, actor: &str| actor_matches(want, actor);
        assert!(m("", bob) && m(bob, bob) && m("bob", bob));
        assert!(m("bob", "spiffe://t/svc/bob"));
        assert!(!m("bo", bob) && !m("ob", bob) && !m("user/bob", bob));
        assert!(!m("spiffe://t/user/bo", bob));
        assert!(!m("bob", "urn:x/bob"), "a name matches SPIFFE IDs only");
        assert!(!m("alice", bob));
    }

    #[tokio::test]
    async fn queries_filter_order_and_paginate() {
        let f = fixture();
        for seq in 1..=6 {
            let at = f.start + Duration::from_secs(seq * 10);
            let action = if seq % 2 == 0 { "even" } else { "odd" };
            f.log
                .append(&id(VAULT), event(&f.vault, seq, action, at))
                .await
                .unwrap();
            f.log
                .append(&id(BROKER), event(&f.broker, seq, action, at))
                .await
                .unwrap();
        }
        let seqs = |b: &QueryBatch| -> Vec<u64> {
            b.entries
                .iter()
                .map(|e| e.event.as_ref().unwrap().seq)
                .collect()
        };
        let filter = QueryFilter {
            source: VAULT.into(),
            action: "even".into(),
            ..QueryFilter::default()
        };
        let page = f.log.query_batch(&filter, None, 2).unwrap();
        assert_eq!(seqs(&page), [2, 4]);
        let next = page.next.expect("a third match exists");
        let page = f.log.query_batch(&filter, Some(next), 2).unwrap();
        assert_eq!((seqs(&page), page.next), (vec![6], None));

        let newest = QueryFilter {
            newest_first: true,
            source: BROKER.into(),
            ..QueryFilter::default()
        };
        assert_eq!(
            seqs(&f.log.query_batch(&newest, None, 3).unwrap()),
            [6, 5, 4]
        );

        let window = QueryFilter {
            since: Some(ts(&to_timestamp(f.start + Duration::from_secs(20)))),
            until: Some(ts(&to_timestamp(f.start + Duration::from_secs(40)))),
            source: VAULT.into(),
            ..QueryFilter::default()
        };
        assert_eq!(
            seqs(&f.log.query_batch(&window, None, 100).unwrap()),
            [2, 3]
        );
        let denied = QueryFilter {
            outcome: Outcome::Denied as i32,
            ..QueryFilter::default()
        };
        assert!(
            f.log
                .query_batch(&denied, None, 100)
                .unwrap()
                .entries
                .is_empty()
        );
        let by_request = QueryFilter {
            request_id: "r5".into(),
            ..QueryFilter::default()
        };
        assert_eq!(
            f.log
                .query_batch(&by_request, None, 100)
                .unwrap()
                .entries
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn checkpoints_and_proofs_verify_against_the_entries() {
        let f = fixture();
        let mut leaves = Vec::new();
        let mut notes = Vec::new();
        for seq in 1..=11 {
            f.log
                .append(&id(VAULT), event(&f.vault, seq, "x", f.start))
                .await
                .unwrap();
            let e = f.log.entry(seq - 1).unwrap().unwrap();
            leaves.push(leaf_hash(&e.signed_event.unwrap().encode_to_vec()));
            notes.push(f.log.checkpoint().unwrap());
        }
        let verifier = NoteVerifier::parse(&f.log.signer().verifier().to_string()).unwrap();
        for (i, cp) in notes.iter().enumerate() {
            let opened = verifier.open_checkpoint(&cp.note).unwrap();
            assert_eq!(opened.size, i as u64 + 1);
            assert_eq!(opened.root, merkle::root(&leaves[..=i]));
        }
        let last = notes.last().unwrap();
        for index in 0..11 {
            let (size, proof) = f.log.inclusion_proof(index, 0).unwrap();
            assert_eq!(size, 11);
            merkle::verify_inclusion(index, size, &leaves[index as usize], &proof, &last.root)
                .unwrap();
        }
        for first in 0..=11u64 {
            let (second, proof) = f.log.consistency_proof(first, 0).unwrap();
            let first_root = merkle::root(&leaves[..first as usize]);
            merkle::verify_consistency(first, second, &proof, &first_root, &last.root).unwrap();
        }
        assert!(matches!(
            f.log.inclusion_proof(11, 0),
            Err(AuditError::OutOfRange(_))
        ));
        assert!(matches!(
            f.log.inclusion_proof(0, 12),
            Err(AuditError::OutOfRange(_))
        ));
        assert!(matches!(
            f.log.consistency_proof(5, 4),
            Err(AuditError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn a_flipped_byte_in_the_store_is_detected_against_an_earlier_checkpoint() {
        let f = fixture();
        for seq in 1..=5 {
            f.log
                .append(&id(VAULT), event(&f.vault, seq, "x", f.start))
                .await
                .unwrap();
        }
        let cp = f.log.checkpoint().unwrap();
        let sources: BTreeMap<String, VerifyingKey> = [
            (VAULT.to_owned(), f.vault.verifying_key()),
            (BROKER.to_owned(), f.broker.verifying_key()),
        ]
        .into();
        let verifier = f.log.signer().verifier();
        // Every byte of the entry bundle and of the level-0 hash tile, read
        // by a store opened afresh on the same database.
        let log_dir = f.log.store().log_dir().to_owned();
        for file in ["tile/entries/000.p/5", "tile/0/000.p/5"] {
            let path = log_dir.join(file);
            let original = std::fs::read(&path).unwrap();
            for pos in 0..original.len() {
                let mut tampered = original.clone();
                tampered[pos] ^= 0x01;
                std::fs::write(&path, tampered).unwrap();
                let store = TileStore::with_db(f.log.store().db().clone()).unwrap();
                if store.check().is_err() {
                    continue;
                }
                let entries: Result<Vec<LogEntry>, _> =
                    (0..5).map(|i| store.entry(i).map(Option::unwrap)).collect();
                match entries {
                    Err(AuditError::Corrupt { .. }) => {}
                    Err(e) => panic!("unexpected error {e}"),
                    Ok(entries) => assert!(
                        crate::verify::verify_log(&entries, &sources, Some((&cp.note, &verifier)))
                            .is_err(),
                        "flipped byte {pos} of {file} went unnoticed"
                    ),
                }
            }
            std::fs::write(&path, original).unwrap();
        }
        let store = TileStore::with_db(f.log.store().db().clone()).unwrap();
        assert_eq!(store.check(), Ok(()));
        let entries: Vec<LogEntry> = (0..5).map(|i| f.log.entry(i).unwrap().unwrap()).collect();
        crate::verify::verify_log(&entries, &sources, Some((&cp.note, &verifier))).unwrap();
        // A dropped tail entry is detected too.
        assert!(matches!(
            crate::verify::verify_log(&entries[..4], &sources, Some((&cp.note, &verifier))),
            Err(crate::verify::VerifyError::Truncated { have: 4, signed: 5 })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_from_several_sources_share_one_sync() {
        let f = fixture();
        let log = Arc::new(f.log);
        let mut pending = Vec::new();
        for seq in 1..=50 {
            pending.push(
                log.begin_append(&id(VAULT), event(&f.vault, seq, "v", f.start))
                    .unwrap(),
            );
            pending.push(
                log.begin_append(&id(BROKER), event(&f.broker, seq, "b", f.start))
                    .unwrap(),
            );
        }
        // Nothing is visible before it is durable.
        assert_eq!(log.size(), 0);
        assert_eq!(log.checkpoint().unwrap().size, 0);
        let joins: Vec<_> = pending
            .into_iter()
            .map(|p| {
                let log = log.clone();
                tokio::spawn(async move { log.finish(p).await })
            })
            .collect();
        for j in joins {
            assert!(matches!(j.await.unwrap().unwrap(), Ack::Stored { .. }));
        }
        assert_eq!(log.sync_count(), 1, "100 appends should share one sync");
        assert_eq!(log.size(), 100);
    }

    /// A log over the sled store and tree-head file in `dir`, with the
    /// fixture's keys, recovered as `serve` does.
    async fn log_at(dir: &std::path::Path) -> Result<AuditLog<TileStore>, AuditError> {
        let signer = CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap();
        let head = TreeHeadFile::load(dir, &signer.verifier())?;
        let vault = EventSigner::new(id(VAULT), SigningKey::from_bytes(&[1; 32]));
        let log = AuditLog::new(
            TileStore::open(dir).unwrap(),
            [(id(VAULT), vault.verifying_key())].into(),
            [id("spiffe://t/user/carol")].into(),
            signer,
            Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH)),
        )
        .with_tree_head(head);
        log.recover().await?;
        Ok(log)
    }

    async fn append_vault(
        log: &AuditLog<TileStore>,
        seqs: std::ops::RangeInclusive<u64>,
        action: &str,
    ) {
        let vault = EventSigner::new(id(VAULT), SigningKey::from_bytes(&[1; 32]));
        for seq in seqs {
            log.append(
                &id(VAULT),
                event(&vault, seq, action, SystemTime::UNIX_EPOCH),
            )
            .await
            .unwrap();
        }
    }

    fn head_on_disk(dir: &std::path::Path) -> Checkpoint {
        let note = std::fs::read_to_string(dir.join(crate::head::FILE_NAME)).unwrap();
        let body = format!("{}\n", note.split_once("\n\n").unwrap().0);
        Checkpoint::parse_body(&body).unwrap()
    }

    #[tokio::test]
    async fn a_checkpoint_is_on_disk_before_it_is_returned_and_written_only_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_at(dir.path()).await.unwrap();
        // An empty log has no head to keep.
        assert_eq!(log.checkpoint().unwrap().size, 0);
        assert!(!dir.path().join(crate::head::FILE_NAME).exists());
        append_vault(&log, 1..=3, "a").await;
        let cp = log.checkpoint().unwrap();
        let on_disk = head_on_disk(dir.path());
        assert_eq!((on_disk.size, on_disk.root), (3, cp.root));
        let written = std::fs::metadata(dir.path().join(crate::head::FILE_NAME))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(log.checkpoint().unwrap().size, 3);
        let again = std::fs::metadata(dir.path().join(crate::head::FILE_NAME))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(
            written, again,
            "a checkpoint of a persisted size rewrote the file"
        );
        append_vault(&log, 4..=4, "a").await;
        let cp = log.checkpoint().unwrap();
        assert_eq!(head_on_disk(dir.path()).size, 4);
        assert_eq!(log.tree_head().unwrap().note, cp.note);
    }

    #[tokio::test]
    async fn a_store_shorter_than_or_forked_from_the_signed_head_is_refused() {
        // The head of a longer log, put next to a shorter store.
        let long = tempfile::tempdir().unwrap();
        let log = log_at(long.path()).await.unwrap();
        append_vault(&log, 1..=5, "a").await;
        let signed = log.checkpoint().unwrap();
        drop(log);
        let short = tempfile::tempdir().unwrap();
        let log = log_at(short.path()).await.unwrap();
        append_vault(&log, 1..=3, "a").await;
        drop(log);
        let head = long.path().join(crate::head::FILE_NAME);
        std::fs::copy(&head, short.path().join(crate::head::FILE_NAME)).unwrap();
        let err = log_at(short.path()).await.unwrap_err();
        assert_eq!(err.kind(), twokey_runtime::error::ErrorKind::Internal);
        let err = err.to_string();
        let root = hex::encode(signed.root);
        for part in [
            "holds 3 entries: entries were lost or the data directory was rolled back",
            &format!("signed a tree head of 5 entries with root {root}"),
            "from a backup holding at least 5 entries",
            "move ",
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }

        // Same size, other entries: a fork.
        let fork = tempfile::tempdir().unwrap();
        let log = log_at(fork.path()).await.unwrap();
        append_vault(&log, 1..=5, "b").await;
        drop(log);
        std::fs::copy(&head, fork.path().join(crate::head::FILE_NAME)).unwrap();
        let err = log_at(fork.path()).await.unwrap_err().to_string();
        assert!(
            err.contains("at 5 entries: stored entries were altered or replaced (a fork)"),
            "{err}"
        );
        assert!(err.contains(&root), "{err}");

        // The same store and head start fine, and extend the head.
        let log = log_at(long.path()).await.unwrap();
        assert_eq!(log.size(), 5);
        append_vault(&log, 6..=6, "a").await;
        assert_eq!(log.checkpoint().unwrap().size, 6);
    }

    #[tokio::test]
    async fn a_missing_head_file_is_written_from_the_store_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_at(dir.path()).await.unwrap();
        append_vault(&log, 1..=4, "a").await;
        let cp = log.checkpoint().unwrap();
        drop(log);
        std::fs::remove_file(dir.path().join(crate::head::FILE_NAME)).unwrap();
        let log = log_at(dir.path()).await.unwrap();
        let on_disk = head_on_disk(dir.path());
        assert_eq!((on_disk.size, on_disk.root), (4, cp.root));
        assert_eq!(log.tree_head().unwrap().size, 4);
    }

    #[tokio::test]
    async fn at_run_time_no_checkpoint_is_signed_below_or_beside_the_signed_head() {
        let long = tempfile::tempdir().unwrap();
        let log = log_at(long.path()).await.unwrap();
        append_vault(&log, 1..=5, "a").await;
        let signed = log.checkpoint().unwrap();
        drop(log);
        let signer = CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap();
        let head = TreeHeadFile::load(long.path(), &signer.verifier()).unwrap();

        // A store that yields fewer entries than the head, met while serving
        // (recover, which would refuse, is skipped on purpose).
        let f = fixture();
        append_vault(&f.log, 1..=3, "a").await;
        let log = f.log.with_tree_head(head);
        let err = log.checkpoint().unwrap_err();
        assert_eq!(err.kind(), twokey_runtime::error::ErrorKind::Internal);
        let err = err.to_string();
        assert!(err.contains("the store serves 3 entries"), "{err}");
        assert!(
            err.contains(&format!(
                "tree head of 5 entries with root {}",
                hex::encode(signed.root)
            )),
            "{err}"
        );
        assert_eq!(log.tree_head().unwrap().size, 5);
        assert_eq!(
            std::fs::read_to_string(long.path().join(crate::head::FILE_NAME)).unwrap(),
            signed.note,
            "the persisted head must not shrink"
        );

        // Same size, other root.
        let head = TreeHeadFile::load(long.path(), &signer.verifier()).unwrap();
        let f = fixture();
        append_vault(&f.log, 1..=5, "b").await;
        let log = f.log.with_tree_head(head);
        let err = log.checkpoint().unwrap_err().to_string();
        assert!(err.contains("the store has root"), "{err}");
    }
}
