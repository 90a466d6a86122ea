//! The durable outbox: each audit event is written in the same sled
//! transaction as the state change it records, under a per-source sequence
//! number, and stays until the audit service acknowledges it (with receipts:
//! until a checkpoint the source verified covers it).
//!
//! Then it is kept, under the leaf index audit acknowledged it at, for the
//! retention the service sets (`audit_keep_days`), so that an audit service
//! restored from an older backup gets it back: at the same index when audit
//! asks (`Restore`), or sent again from its sequence number on a GAP.
//!
//! [`OutboxStore`] is what the shipper and the receipt checker use of an
//! outbox, whatever keeps it: this sled [`Outbox`], or the PostgreSQL one
//! (`twokey_pgstore::outbox::PgOutbox`) that several replicas write.

use std::{future::Future, sync::Arc};

use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tokio::sync::Notify;
use twokey_proto::audit::v1::{Event, SignedEvent};

use crate::{
    durable::{DurableDb, StoreError},
    events::{EventDraft, EventSigner},
    time::Clock,
};

const ENTRY_PREFIX: &[u8] = b"e/";
/// Pending event's leaf index, once audit acknowledged it: `l/<seq>`.
const LEAF_PREFIX: &[u8] = b"l/";
/// Kept event, after a verified acknowledgement: `k/<leaf index>`.
const KEPT_PREFIX: &[u8] = b"k/";
const NEXT_SEQ: &[u8] = b"m/next_seq";
const CHECKPOINT: &[u8] = b"m/checkpoint";

fn entry_key(seq: u64) -> Vec<u8> {
    [ENTRY_PREFIX, &seq.to_be_bytes()].concat()
}

fn leaf_key(seq: u64) -> Vec<u8> {
    [LEAF_PREFIX, &seq.to_be_bytes()].concat()
}

fn kept_key(index: u64) -> Vec<u8> {
    [KEPT_PREFIX, &index.to_be_bytes()].concat()
}

fn number_of_key(key: &[u8], prefix: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.strip_prefix(prefix)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn seq_of_key(key: &[u8]) -> Option<u64> {
    number_of_key(key, ENTRY_PREFIX)
}

fn sync_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Sync(e.to_string())
}

/// Why events audit lost cannot be sent again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "audit expects event {expected} of this source next, but this source keeps events only from \
     {kept_from} on (older ones passed the retention, audit_keep_days): audit lost events it had \
     acknowledged, restore it from a newer backup"
)]
pub struct Unrecoverable {
    /// What audit expects.
    pub expected: u64,
    /// The oldest event still kept or pending.
    pub kept_from: u64,
}

/// A source's outbox of signed events waiting for the audit service.
#[derive(Clone, Debug)]
pub struct Outbox {
    tree: sled::Tree,
    db: DurableDb,
    signer: Arc<EventSigner>,
    clock: Arc<dyn Clock>,
    notify: Arc<Notify>,
    observer: Option<AckObserver>,
}

/// Called with each event the audit service acknowledged (for metrics).
#[derive(Clone)]
struct AckObserver(Arc<dyn Fn(&Event) + Send + Sync>);

impl std::fmt::Debug for AckObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckObserver")
    }
}

impl Outbox {
    /// Opens the outbox tree of `db`.
    pub fn open(
        db: &DurableDb,
        signer: EventSigner,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.tree("outbox")?,
            db: db.clone(),
            signer: Arc::new(signer),
            clock,
            notify: Arc::new(Notify::new()),
            observer: None,
        })
    }

    /// Calls `observer` with each event once the audit service has
    /// acknowledged it (a service counts its metrics from its own events).
    pub fn with_ack_observer(mut self, observer: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.observer = Some(AckObserver(Arc::new(observer)));
        self
    }

    /// Tells the observer (if any) that `event` was acknowledged.
    pub fn observe_acked(&self, event: &Event) {
        if let Some(o) = &self.observer {
            (o.0)(event);
        }
    }

    /// The tree to include in a transaction together with the state change.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The signer (source identity and key).
    pub fn signer(&self) -> &EventSigner {
        &self.signer
    }

    /// Adds an event inside a transaction over this outbox's tree; returns
    /// its sequence number. Call [`Outbox::committed`] after the transaction
    /// has been synced.
    pub fn push<E>(
        &self,
        tx: &TransactionalTree,
        draft: EventDraft,
    ) -> Result<u64, ConflictableTransactionError<E>> {
        let seq = match tx.get(NEXT_SEQ)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])).max(1),
            None => 1,
        };
        let event = draft.into_event(self.signer.source(), seq, self.clock.now());
        let signed = self.signer.sign(&event);
        tx.insert(entry_key(seq), signed.encode_to_vec())?;
        tx.insert(NEXT_SEQ, &(seq + 1).to_be_bytes())?;
        Ok(seq)
    }

    /// Records an event that goes with no other state change: writes it,
    /// syncs it to disk and wakes the shipper.
    pub async fn emit(&self, draft: EventDraft) -> Result<u64, StoreError> {
        let seq = self
            .tree
            .transaction(|tx| self.push::<()>(tx, draft.clone()))
            .map_err(|e| StoreError::Sync(format!("outbox write failed: {e:?}")))?;
        self.db.sync().await?;
        self.committed();
        Ok(seq)
    }

    /// Tells the shipper that new events are durable.
    pub fn committed(&self) {
        self.notify.notify_one();
    }

    /// Waits until [`Outbox::committed`] is called.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Up to `limit` events with sequence numbers from `from`, in order.
    pub fn pending(&self, from: u64, limit: usize) -> Vec<(u64, SignedEvent)> {
        self.tree
            .range(entry_key(from)..entry_key(u64::MAX))
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((seq_of_key(&k)?, SignedEvent::decode(v.as_ref()).ok()?)))
            .take(limit)
            .collect()
    }

    /// The lowest sequence number still waiting, if any.
    pub fn first_pending(&self) -> Option<u64> {
        self.tree
            .scan_prefix(ENTRY_PREFIX)
            .filter_map(Result::ok)
            .find_map(|(k, _)| seq_of_key(&k))
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.tree
            .get(NEXT_SEQ)
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(1)
    }

    /// Notes that audit acknowledged event `seq` at leaf `index` (kept
    /// with the event until [`Outbox::settle_through`]).
    pub fn record_leaf(&self, seq: u64, index: u64) -> Result<(), StoreError> {
        if self.tree.contains_key(entry_key(seq)).map_err(sync_error)? {
            self.tree
                .insert(leaf_key(seq), &index.to_be_bytes())
                .map_err(sync_error)?;
        }
        Ok(())
    }

    /// Settles every event up to and including `seq` (acknowledged, and
    /// covered by a verified checkpoint when receipts are checked): each
    /// leaves the pending events and is kept under its leaf index, in one
    /// atomic batch; one whose leaf index is unknown (its acknowledgement
    /// was lost) is only dropped.
    pub fn settle_through(&self, seq: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut any = false;
        for item in self.tree.range(entry_key(0)..=entry_key(seq)) {
            let (k, v) = item.map_err(sync_error)?;
            let Some(s) = seq_of_key(&k) else { continue };
            if let Some(index) = self.tree.get(leaf_key(s)).map_err(sync_error)? {
                if let Ok(index) = <[u8; 8]>::try_from(index.as_ref()) {
                    batch.insert(kept_key(u64::from_be_bytes(index)), v);
                }
                batch.remove(leaf_key(s));
            }
            batch.remove(k);
            any = true;
        }
        if any {
            self.tree.apply_batch(batch).map_err(sync_error)?;
        }
        Ok(())
    }

    /// Events audit acknowledged at leaf indices from `from` on, in leaf
    /// order, at most `limit`: the kept ones, then pending ones whose
    /// acknowledgement is known.
    pub fn kept_from(&self, from: u64, limit: usize) -> Vec<(u64, SignedEvent)> {
        let mut out: Vec<(u64, SignedEvent)> = self
            .tree
            .range(kept_key(from)..kept_key(u64::MAX))
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                Some((
                    number_of_key(&k, KEPT_PREFIX)?,
                    SignedEvent::decode(v.as_ref()).ok()?,
                ))
            })
            .take(limit)
            .collect();
        if out.len() < limit {
            let mut pending: Vec<(u64, SignedEvent)> = self
                .tree
                .scan_prefix(LEAF_PREFIX)
                .filter_map(Result::ok)
                .filter_map(|(k, v)| {
                    let seq = number_of_key(&k, LEAF_PREFIX)?;
                    let index = u64::from_be_bytes(v.as_ref().try_into().ok()?);
                    let event = self.tree.get(entry_key(seq)).ok()??;
                    (index >= from).then_some((index, SignedEvent::decode(event.as_ref()).ok()?))
                })
                .collect();
            pending.sort_by_key(|(i, _)| *i);
            let after = out.last().map(|(i, _)| *i);
            out.extend(
                pending
                    .into_iter()
                    .filter(|(i, _)| after.is_none_or(|a| *i > a))
                    .take(limit - out.len()),
            );
        }
        out
    }

    /// Puts kept events from sequence number `seq` on back among the
    /// pending ones, to be sent again (audit answered GAP: it lost them).
    /// Fails when the oldest of them is no longer kept.
    pub fn requeue_from(&self, seq: u64) -> Result<(), RequeueError> {
        let oldest_pending = self.first_pending().unwrap_or_else(|| self.next_seq());
        if seq >= oldest_pending {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut lowest = oldest_pending;
        // Kept events are in leaf order, which is this source's seq order:
        // walk back from the newest until below `seq`.
        for item in self.tree.scan_prefix(KEPT_PREFIX).rev() {
            let (k, v) = item.map_err(sync_error)?;
            let Ok(signed) = SignedEvent::decode(v.as_ref()) else {
                continue;
            };
            let Ok(event) = Event::decode(signed.event.as_slice()) else {
                continue;
            };
            if event.seq < seq {
                break;
            }
            if event.seq < oldest_pending {
                batch.insert(entry_key(event.seq), v);
                lowest = lowest.min(event.seq);
            }
            batch.remove(k);
        }
        if lowest > seq {
            return Err(RequeueError::Unrecoverable(Unrecoverable {
                expected: seq,
                kept_from: lowest,
            }));
        }
        self.tree.apply_batch(batch).map_err(sync_error)?;
        Ok(())
    }

    /// Drops kept events from before `cutoff` (the retention); returns how
    /// many. Kept events are in leaf order, so this stops at the first
    /// newer one.
    pub fn prune_kept(&self, cutoff: std::time::SystemTime) -> Result<usize, StoreError> {
        let cutoff = crate::time::to_timestamp(cutoff);
        let mut batch = sled::Batch::default();
        let mut dropped = 0;
        for item in self.tree.scan_prefix(KEPT_PREFIX) {
            let (k, v) = item.map_err(sync_error)?;
            let time = SignedEvent::decode(v.as_ref())
                .ok()
                .and_then(|s| Event::decode(s.event.as_slice()).ok())
                .and_then(|e| e.time);
            match time {
                Some(t) if (t.seconds, t.nanos) >= (cutoff.seconds, cutoff.nanos) => break,
                _ => {
                    batch.remove(k);
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            self.tree.apply_batch(batch).map_err(sync_error)?;
        }
        Ok(dropped)
    }

    /// Number of events kept after their acknowledgement.
    pub fn kept(&self) -> usize {
        self.tree.scan_prefix(KEPT_PREFIX).count()
    }

    /// The last audit checkpoint (signed note) this source accepted, if any.
    pub fn accepted_checkpoint(&self) -> Option<String> {
        let raw = self.tree.get(CHECKPOINT).ok().flatten()?;
        String::from_utf8(raw.to_vec()).ok()
    }

    /// Keeps `note` as the last audit checkpoint this source accepted (made
    /// durable with the next sync of the database).
    pub fn set_accepted_checkpoint(&self, note: &str) -> Result<(), StoreError> {
        self.tree
            .insert(CHECKPOINT, note.as_bytes())
            .map_err(|e| StoreError::Sync(e.to_string()))?;
        Ok(())
    }

    /// Number of events waiting.
    pub fn depth(&self) -> usize {
        self.tree.scan_prefix(ENTRY_PREFIX).count()
    }
}

/// Why kept events could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    /// The oldest of them is gone.
    #[error(transparent)]
    Unrecoverable(Unrecoverable),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The outbox's database failed.
    #[error(transparent)]
    Outbox(OutboxError),
}

/// Why an [`OutboxStore`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The outbox's database cannot be reached (shipping pauses, and
    /// resumes when it answers again); the message says so.
    #[error("{0}")]
    Unavailable(String),
    /// The outbox's database refused or failed a statement.
    #[error("{0}")]
    Failed(String),
}

/// What the shipper and the receipt checker use of a source's outbox,
/// whichever store keeps it. The calls that reach the store are async:
/// a database may be across the network. Sequence numbers are this
/// source's, consecutive from 1; leaf indices are audit's.
pub trait OutboxStore: Clone + Send + Sync + 'static {
    /// The signer (source identity and key).
    fn signer(&self) -> &EventSigner;

    /// Tells the observer (if any) that `event` was acknowledged.
    fn observe_acked(&self, event: &Event);

    /// Returns when new events may be waiting (at once after a commit
    /// where the store can say so, else after a short poll).
    fn notified(&self) -> impl Future<Output = ()> + Send;

    /// The sequence number the next event will get.
    fn next_seq(&self) -> impl Future<Output = Result<u64, OutboxError>> + Send;

    /// The lowest sequence number still waiting, if any.
    fn first_pending(&self) -> impl Future<Output = Result<Option<u64>, OutboxError>> + Send;

    /// Up to `limit` waiting events with sequence numbers from `from`, in order.
    fn pending(
        &self,
        from: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, SignedEvent)>, OutboxError>> + Send;

    /// Number of events waiting.
    fn depth(&self) -> impl Future<Output = Result<usize, OutboxError>> + Send;

    /// Notes that audit acknowledged event `seq` at leaf `index`.
    fn record_leaf(
        &self,
        seq: u64,
        index: u64,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Settles every event up to and including `seq`, atomically: each one
    /// with a known leaf index is kept under it, the others dropped.
    fn settle_through(&self, seq: u64) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Events audit acknowledged at leaf indices from `from` on, in leaf
    /// order, at most `limit`: the kept ones, then pending ones whose leaf
    /// index is known.
    fn kept_from(
        &self,
        from: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, SignedEvent)>, OutboxError>> + Send;

    /// Puts kept events from sequence number `seq` on back among the
    /// pending ones; fails, changing nothing, when the oldest is gone.
    fn requeue_from(&self, seq: u64) -> impl Future<Output = Result<(), RequeueError>> + Send;

    /// Drops kept events from before `cutoff` (oldest first, stopping at
    /// the first newer one); returns how many.
    fn prune_kept(
        &self,
        cutoff: std::time::SystemTime,
    ) -> impl Future<Output = Result<usize, OutboxError>> + Send;

    /// Number of events kept after their acknowledgement.
    fn kept(&self) -> impl Future<Output = Result<usize, OutboxError>> + Send;

    /// The last audit checkpoint (signed note) this source accepted, if any.
    fn accepted_checkpoint(
        &self,
    ) -> impl Future<Output = Result<Option<String>, OutboxError>> + Send;

    /// Keeps `note` as the last audit checkpoint this source accepted.
    fn set_accepted_checkpoint(
        &self,
        note: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;
}

/// The sled outbox, through its own (synchronous) methods.
impl OutboxStore for Outbox {
    fn signer(&self) -> &EventSigner {
        Outbox::signer(self)
    }

    fn observe_acked(&self, event: &Event) {
        Outbox::observe_acked(self, event)
    }

    async fn notified(&self) {
        Outbox::notified(self).await
    }

    async fn next_seq(&self) -> Result<u64, OutboxError> {
        Ok(Outbox::next_seq(self))
    }

    async fn first_pending(&self) -> Result<Option<u64>, OutboxError> {
        Ok(Outbox::first_pending(self))
    }

    async fn pending(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SignedEvent)>, OutboxError> {
        Ok(Outbox::pending(self, from, limit))
    }

    async fn depth(&self) -> Result<usize, OutboxError> {
        Ok(Outbox::depth(self))
    }

    async fn record_leaf(&self, seq: u64, index: u64) -> Result<(), OutboxError> {
        Ok(Outbox::record_leaf(self, seq, index)?)
    }

    async fn settle_through(&self, seq: u64) -> Result<(), OutboxError> {
        Ok(Outbox::settle_through(self, seq)?)
    }

    async fn kept_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SignedEvent)>, OutboxError> {
        Ok(Outbox::kept_from(self, from, limit))
    }

    async fn requeue_from(&self, seq: u64) -> Result<(), RequeueError> {
        Outbox::requeue_from(self, seq)
    }

    async fn prune_kept(&self, cutoff: std::time::SystemTime) -> Result<usize, OutboxError> {
        Ok(Outbox::prune_kept(self, cutoff)?)
    }

    async fn kept(&self) -> Result<usize, OutboxError> {
        Ok(Outbox::kept(self))
    }

    async fn accepted_checkpoint(&self) -> Result<Option<String>, OutboxError> {
        Ok(Outbox::accepted_checkpoint(self))
    }

    async fn set_accepted_checkpoint(&self, note: &str) -> Result<(), OutboxError> {
        Ok(Outbox::set_accepted_checkpoint(self, note)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SpiffeId, events::verify_event, time::SystemClock};

    #[tokio::test]
    async fn events_get_consecutive_sequence_numbers_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let source = SpiffeId::parse("spiffe://t/svc/vault").unwrap();
        {
            let db = DurableDb::open(dir.path()).unwrap();
            let outbox = Outbox::open(
                &db,
                EventSigner::new(source.clone(), key.clone()),
                Arc::new(SystemClock),
            )
            .unwrap();
            for i in 1..=3 {
                assert_eq!(outbox.emit(EventDraft::new("a", "x")).await.unwrap(), i);
            }
            outbox.settle_through(1).unwrap();
        }
        let db = DurableDb::open(dir.path()).unwrap();
        let outbox = Outbox::open(
            &db,
            EventSigner::new(source, key.clone()),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert_eq!(outbox.first_pending(), Some(2));
        assert_eq!(outbox.next_seq(), 4);
        let pending = outbox.pending(0, 10);
        assert_eq!(pending.len(), 2);
        let event = verify_event(&pending[0].1, &key.verifying_key()).unwrap();
        assert_eq!(event.seq, 2);
        assert_eq!(event.source, "spiffe://t/svc/vault");
    }

    fn outbox_at(dir: &std::path::Path, clock: Arc<dyn Clock>) -> Outbox {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let source = SpiffeId::parse("spiffe://t/svc/vault").unwrap();
        let db = DurableDb::open(dir).unwrap();
        Outbox::open(&db, EventSigner::new(source, key), clock).unwrap()
    }

    fn seqs(events: &[(u64, SignedEvent)]) -> Vec<(u64, u64)> {
        events
            .iter()
            .map(|(i, s)| (*i, Event::decode(s.event.as_slice()).unwrap().seq))
            .collect()
    }

    #[tokio::test]
    async fn acknowledged_events_are_kept_at_their_leaf_index_and_can_be_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = outbox_at(dir.path(), Arc::new(SystemClock));
        for _ in 1..=5 {
            outbox.emit(EventDraft::new("a", "x")).await.unwrap();
        }
        // Audit stored seq 1..=4 at leaves 10, 12, 13, 20; a receipt covers 1..=3.
        for (seq, leaf) in [(1, 10), (2, 12), (3, 13), (4, 20)] {
            outbox.record_leaf(seq, leaf).unwrap();
        }
        outbox.settle_through(3).unwrap();
        assert_eq!((outbox.first_pending(), outbox.kept()), (Some(4), 3));
        // Restore from leaf 12: the kept ones, then pending with a known leaf.
        assert_eq!(
            seqs(&outbox.kept_from(12, 100)),
            vec![(12, 2), (13, 3), (20, 4)]
        );
        assert_eq!(seqs(&outbox.kept_from(0, 2)), vec![(10, 1), (12, 2)]);
        // A GAP at 2: events 2 and 3 are pending again, in order.
        outbox.requeue_from(2).unwrap();
        assert_eq!(outbox.first_pending(), Some(2));
        let pending: Vec<u64> = outbox.pending(0, 10).iter().map(|(s, _)| *s).collect();
        assert_eq!(pending, vec![2, 3, 4, 5]);
        assert_eq!(outbox.kept(), 1);
    }

    #[tokio::test]
    async fn kept_events_past_the_retention_are_dropped_and_then_cannot_be_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let start =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let clock = Arc::new(crate::time::ManualClock::new(start));
        let outbox = outbox_at(dir.path(), clock.clone());
        for seq in 1..=4 {
            outbox.emit(EventDraft::new("a", "x")).await.unwrap();
            outbox.record_leaf(seq, seq - 1).unwrap();
            clock.advance(std::time::Duration::from_secs(3600));
        }
        outbox.settle_through(4).unwrap();
        // Events 1 and 2 are older than the cutoff.
        let cutoff = start + std::time::Duration::from_secs(2 * 3600);
        assert_eq!(outbox.prune_kept(cutoff).unwrap(), 2);
        assert_eq!(seqs(&outbox.kept_from(0, 10)), vec![(2, 3), (3, 4)]);
        match outbox.requeue_from(1) {
            Err(RequeueError::Unrecoverable(u)) => {
                assert_eq!((u.expected, u.kept_from), (1, 3));
                assert!(u.to_string().contains("audit_keep_days"), "{u}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(outbox.first_pending(), None, "nothing put back on failure");
        outbox.requeue_from(3).unwrap();
        assert_eq!(outbox.first_pending(), Some(3));
    }
}
