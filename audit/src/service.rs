//! The audit domain: event intake with per-source sequence checks, queries,
//! signed checkpoints and proofs. No gRPC here; `grpc` authenticates callers
//! and maps requests and errors.
//!
//! An append is accepted only from a configured source, over mTLS as that
//! source, for an event naming that source and signed by its key. Only
//! entries made durable are visible to queries, checkpoints and proofs, so
//! nothing signed can be lost by a crash.

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

use crate::{
    checkpoint::{Checkpoint, CheckpointSigner},
    error::AuditError,
    merkle::{self, Hash, leaf_hash},
    store::LogStore,
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
            && text(&self.actor, &event.actor)
            && text(&self.action, &event.action)
            && text(&self.account_id, &event.account_id)
            && text(&self.request_id, &event.request_id)
            && (self.outcome == 0 || self.outcome == event.outcome)
    }
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
        }
    }

    /// Makes whatever the store holds durable and visible (after a restart).
    pub async fn recover(&self) -> Result<(), AuditError> {
        let size = self.store.size();
        self.store.sync().await?;
        self.durable.fetch_max(size, Ordering::SeqCst);
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

    /// Checks and writes an event without waiting for the disk; appends of
    /// one stream can be pipelined and share one sync. The answer must not
    /// be sent before [`AuditLog::finish`] returns.
    pub fn begin_append(
        &self,
        peer: &SpiffeId,
        signed: SignedEvent,
    ) -> Result<PendingAck, AuditError> {
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
        let event = verify_event(&signed, key).map_err(|_| AuditError::BadSignature {
            source_id: claimed.source.clone(),
            seq: claimed.seq,
        })?;
        let seq = event.seq;
        if seq == 0 {
            return Err(AuditError::InvalidEvent(
                "event seq 0: sequence numbers start at 1".into(),
            ));
        }
        // The Merkle leaf: the SignedEvent re-encoded canonically (decoding
        // dropped anything unknown; the signed bytes are kept as they are).
        let leaf_data = signed.encode_to_vec();

        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let expected = self.store.next_seq(peer.as_str())?;
        if seq > expected {
            return Ok(PendingAck {
                ack: Ack::Gap { seq, expected },
                needs_sync_below: None,
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
            });
        }
        let index = self.store.size();
        let entry = LogEntry {
            index,
            signed_event: Some(signed),
            event: Some(event),
            received_at: Some(to_timestamp(self.clock.now())),
        };
        self.store.append(&entry, &leaf_hash(&leaf_data))?;
        Ok(PendingAck {
            ack: Ack::Stored { seq, index },
            needs_sync_below: Some(index + 1),
        })
    }

    /// Waits until a pending append is durable and returns its answer.
    pub async fn finish(&self, pending: PendingAck) -> Result<Ack, AuditError> {
        if let Some(size) = pending.needs_sync_below {
            self.make_durable(size).await?;
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
        let covered = self.store.size();
        self.store.sync().await?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.durable.fetch_max(covered, Ordering::SeqCst);
        Ok(())
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
    /// a previous batch's `next`) in the filter's order.
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
        let indices: Box<dyn Iterator<Item = u64>> = if filter.newest_first {
            let from = start.unwrap_or(size - 1);
            if from >= size {
                return Err(AuditError::OutOfRange(format!(
                    "page token {from} is beyond the log of {size} entries"
                )));
            }
            Box::new((0..=from).rev())
        } else {
            let from = start.unwrap_or(0);
            if from > size {
                return Err(AuditError::OutOfRange(format!(
                    "page token {from} is beyond the log of {size} entries"
                )));
            }
            Box::new(from..size)
        };
        for index in indices {
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

    /// A checkpoint over every durable entry, signed now.
    pub fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        let size = self.size();
        let root = self.mth(0, size)?;
        let note = self.signer.sign(&Checkpoint {
            origin: self.signer.name().to_owned(),
            size,
            root,
        })?;
        Ok(SignedCheckpoint { note, size, root })
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
    use crate::{checkpoint::NoteVerifier, store::SledStore};
    use ed25519_dalek::SigningKey;
    use std::time::{Duration, SystemTime};
    use twokey_proto::audit::v1::Outcome;
    use twokey_runtime::{
        events::{EventDraft, EventSigner},
        time::ManualClock,
    };

    const VAULT: &str = "spiffe://t/svc/vault";
    const BROKER: &str = "spiffe://t/svc/broker";

    struct Fixture {
        _dir: tempfile::TempDir,
        log: AuditLog<SledStore>,
        vault: EventSigner,
        broker: EventSigner,
        start: SystemTime,
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn fixture() -> Fixture {
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
            SledStore::open(dir.path()).unwrap(),
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

    fn event(signer: &EventSigner, seq: u64, action: &str, at: SystemTime) -> SignedEvent {
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
        let tree = f.log.store().tree();
        let key = SledStore::entry_key(2);
        let original = tree.get(&key).unwrap().unwrap().to_vec();
        // Every byte except the trailing received_at, which no signature covers.
        let received = LogEntry {
            received_at: f.log.entry(2).unwrap().unwrap().received_at,
            ..LogEntry::default()
        }
        .encode_to_vec()
        .len();
        for pos in 0..original.len() - received {
            let mut tampered = original.clone();
            tampered[pos] ^= 0x01;
            tree.insert(&key, tampered).unwrap();
            let entries: Result<Vec<LogEntry>, _> =
                (0..5).map(|i| f.log.entry(i).map(Option::unwrap)).collect();
            match entries {
                Err(AuditError::Corrupt { index: 2, .. }) => {}
                Err(e) => panic!("unexpected error {e}"),
                Ok(entries) => assert!(
                    crate::verify::verify_log(&entries, &sources, Some((&cp.note, &verifier)))
                        .is_err(),
                    "flipped byte {pos} went unnoticed"
                ),
            }
        }
        tree.insert(&key, original).unwrap();
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
}
