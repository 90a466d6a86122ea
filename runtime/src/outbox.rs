//! The durable outbox: each audit event is written in the same sled
//! transaction as the state change it records, under a per-source sequence
//! number, and stays until the audit service acknowledges it.

use std::sync::Arc;

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
const NEXT_SEQ: &[u8] = b"m/next_seq";
const CHECKPOINT: &[u8] = b"m/checkpoint";

fn entry_key(seq: u64) -> Vec<u8> {
    [ENTRY_PREFIX, &seq.to_be_bytes()].concat()
}

fn seq_of_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.strip_prefix(ENTRY_PREFIX)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
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

    /// Drops every event up to and including `seq` (acknowledged).
    pub fn remove_through(&self, seq: u64) -> Result<(), StoreError> {
        for item in self.tree.range(entry_key(0)..=entry_key(seq)) {
            let (k, _) = item.map_err(|e| StoreError::Sync(e.to_string()))?;
            self.tree
                .remove(k)
                .map_err(|e| StoreError::Sync(e.to_string()))?;
        }
        Ok(())
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
            outbox.remove_through(1).unwrap();
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
}
