//! Where requests live: a small async trait with two backends, sled on
//! `DurableDb` (one machine, the default) and PostgreSQL ([`postgres`],
//! shared by replicas). In sled every
//! change is one sled transaction over the request, its audit events (the
//! outbox), its queued notifications and the ids it uses up. Policy
//! proposals and open admin actions are kept beside them, each change with
//! its audit events.

use std::sync::Arc;

use futures::future::BoxFuture;
pub use postgres::PgStore;
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};
use twokey_runtime::{
    durable::DurableDb, events::EventDraft, outbox::Outbox, receipts::ReceiptHealth,
};

pub mod postgres;

use crate::{
    error::BrokerError,
    notify::{Message, NotifyQueue},
    state::RequestRecord,
};

/// A change to store: the new record, its events and its messages.
#[derive(Debug, Default, Clone)]
pub struct Writes {
    /// Audit events.
    pub events: Vec<EventDraft>,
    /// Notifications to queue.
    pub messages: Vec<Message>,
    /// Ids used up for good by the change (grant and release ids): the
    /// change is refused if one was used before.
    pub claims: Vec<Claim>,
    /// What watchers are told happened (`request.approved`); empty: nothing
    /// to tell. A store shared by replicas tells the others' watchers.
    pub action: String,
}

/// An id used once for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The id, with its kind (`grant:ID`).
    pub key: String,
    /// The refusal (permission denied) when it was used before.
    pub taken: String,
}

/// The kinds of documents kept beside the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Docs {
    /// Proposed policy versions, by zero-padded version.
    Proposals,
    /// Admin actions collecting signatures, by action id.
    AdminActions,
}

/// A change to one document: its new value (none: delete it) and the audit
/// events that go with it.
#[derive(Debug, Default)]
pub struct DocChange {
    /// The new value; none deletes the document.
    pub value: Option<Vec<u8>>,
    /// Audit events.
    pub events: Vec<EventDraft>,
}

/// A request change: gets the stored request, changes it, and answers the
/// writes that go with the change. It may run more than once (on conflict).
pub type UpdateFn<'a> = dyn FnMut(&mut RequestRecord) -> Result<Writes, BrokerError> + Send + 'a;

/// A document change: gets the current value (none when absent) and answers
/// the change. It may run more than once (on conflict).
pub type DocFn<'a> = dyn FnMut(Option<Vec<u8>>) -> Result<DocChange, BrokerError> + Send + 'a;

/// Storage for requests. Object safe (`Arc<dyn RequestStore>`): every
/// method answers a boxed future.
pub trait RequestStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new request with its writes.
    fn create<'a>(
        &'a self,
        record: &'a RequestRecord,
        writes: &'a Writes,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Changes a stored request: reads it, applies `f` (which may run more
    /// than once, on conflict), and stores the result with `f`'s events and
    /// messages atomically. `Ok(None)` if there is no such request.
    fn update<'a>(
        &'a self,
        id: &'a str,
        f: &'a mut UpdateFn<'_>,
    ) -> BoxFuture<'a, Result<Option<RequestRecord>, BrokerError>>;
    /// One request.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RequestRecord>, BrokerError>>;
    /// Every request (the broker keeps history; counts are small).
    fn all(&self) -> BoxFuture<'_, Result<Vec<RequestRecord>, BrokerError>>;
    /// Records events that go with no request change.
    fn emit(&self, events: Vec<EventDraft>) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Every document of a kind, in key order.
    fn docs(&self, kind: Docs) -> BoxFuture<'_, Result<Vec<Vec<u8>>, BrokerError>>;
    /// One document.
    fn doc<'a>(
        &'a self,
        kind: Docs,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, BrokerError>>;
    /// Changes one document with its events atomically: `f` gets the current
    /// value (it may run more than once, on conflict).
    fn update_doc<'a>(
        &'a self,
        kind: Docs,
        key: &'a str,
        f: &'a mut DocFn<'_>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Makes everything written so far durable, then wakes the shipper and
    /// the notification worker.
    fn commit(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// Requests in sled.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: DurableDb,
    requests: sled::Tree,
    claims: sled::Tree,
    proposals: sled::Tree,
    actions: sled::Tree,
    outbox: Outbox,
    queue: Arc<NotifyQueue>,
    receipts: ReceiptHealth,
}

/// What the broker does not do while audit's receipts are inconsistent.
const NO_CHANGE: &str = "no request or document changes";

fn abort(e: BrokerError) -> ConflictableTransactionError<BrokerError> {
    ConflictableTransactionError::Abort(e)
}

fn flatten(e: TransactionError<BrokerError>) -> BrokerError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => BrokerError::Store(e.to_string()),
    }
}

fn decode(bytes: &[u8]) -> Result<RequestRecord, BrokerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| BrokerError::Store(format!("stored request does not decode: {e}")))
}

fn encode(record: &RequestRecord) -> Result<Vec<u8>, BrokerError> {
    serde_json::to_vec(record).map_err(|e| BrokerError::Store(e.to_string()))
}

impl SledStore {
    /// Opens the `requests` tree.
    pub fn open(
        db: &DurableDb,
        outbox: Outbox,
        queue: Arc<NotifyQueue>,
    ) -> Result<Self, BrokerError> {
        Ok(Self {
            db: db.clone(),
            requests: db.tree("requests")?,
            claims: db.tree("consent_ids")?,
            proposals: db.tree("policy_proposals")?,
            actions: db.tree("admin_actions")?,
            outbox,
            queue,
            receipts: ReceiptHealth::unchecked(),
        })
    }

    /// Refuses every state change (not events alone: refusals are still
    /// recorded) while `receipts` reports audit's checkpoints inconsistent.
    pub fn with_receipts(mut self, receipts: ReceiptHealth) -> Self {
        self.receipts = receipts;
        self
    }

    fn receipts_consistent(&self) -> Result<(), BrokerError> {
        self.receipts.check(NO_CHANGE).map_err(|message| {
            tracing::warn!("refused: {message}");
            BrokerError::AuditInconsistent(message)
        })
    }

    fn write(
        &self,
        id: &str,
        f: &mut dyn FnMut(
            Option<RequestRecord>,
        ) -> Result<Option<(RequestRecord, Writes)>, BrokerError>,
    ) -> Result<(), BrokerError> {
        self.receipts_consistent()?;
        // sled wants an `Fn`; the transaction runs on this thread only.
        let f = std::cell::RefCell::new(f);
        (
            &self.requests,
            self.outbox.tree(),
            self.queue.tree(),
            &self.claims,
        )
            .transaction(|(r, o, q, c)| {
                let current = match r.get(id.as_bytes())? {
                    Some(bytes) => Some(decode(&bytes).map_err(abort)?),
                    None => None,
                };
                let Some((record, writes)) = (f.borrow_mut())(current).map_err(abort)? else {
                    return Ok(());
                };
                for claim in &writes.claims {
                    if c.insert(claim.key.as_bytes(), &[][..])?.is_some() {
                        return Err(abort(crate::consent::refused(
                            twokey_runtime::error::ErrorKind::PermissionDenied,
                            claim.taken.clone(),
                        )));
                    }
                }
                r.insert(id.as_bytes(), encode(&record).map_err(abort)?)?;
                for event in &writes.events {
                    self.outbox.push::<BrokerError>(o, event.clone())?;
                }
                self.queue.enqueue(q, &writes.messages)?;
                Ok(())
            })
            .map_err(flatten)
    }
}

impl SledStore {
    fn tree(&self, kind: Docs) -> &sled::Tree {
        match kind {
            Docs::Proposals => &self.proposals,
            Docs::AdminActions => &self.actions,
        }
    }
}

impl SledStore {
    fn create_now(&self, record: &RequestRecord, writes: &Writes) -> Result<(), BrokerError> {
        self.write(&record.id, &mut |current| {
            if current.is_some() {
                return Err(BrokerError::Store(format!(
                    "request id {} is taken",
                    record.id
                )));
            }
            Ok(Some((record.clone(), writes.clone())))
        })
    }

    fn update_now(
        &self,
        id: &str,
        f: &mut UpdateFn<'_>,
    ) -> Result<Option<RequestRecord>, BrokerError> {
        let mut out = None;
        self.write(id, &mut |current| {
            out = None;
            let Some(mut record) = current else {
                return Ok(None);
            };
            let writes = f(&mut record)?;
            out = Some(record.clone());
            Ok(Some((record, writes)))
        })?;
        Ok(out)
    }

    fn get_now(&self, id: &str) -> Result<Option<RequestRecord>, BrokerError> {
        self.requests
            .get(id.as_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    fn all_now(&self) -> Result<Vec<RequestRecord>, BrokerError> {
        self.requests.iter().map(|kv| decode(&kv?.1)).collect()
    }

    fn emit_now(&self, events: Vec<EventDraft>) -> Result<(), BrokerError> {
        self.outbox
            .tree()
            .transaction(|o| {
                for event in &events {
                    self.outbox.push::<BrokerError>(o, event.clone())?;
                }
                Ok(())
            })
            .map_err(flatten)
    }

    fn docs_now(&self, kind: Docs) -> Result<Vec<Vec<u8>>, BrokerError> {
        self.tree(kind)
            .iter()
            .map(|kv| Ok(kv?.1.to_vec()))
            .collect()
    }

    fn doc_now(&self, kind: Docs, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        Ok(self.tree(kind).get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    fn update_doc_now(&self, kind: Docs, key: &str, f: &mut DocFn<'_>) -> Result<(), BrokerError> {
        self.receipts_consistent()?;
        let f = std::cell::RefCell::new(f);
        (self.tree(kind), self.outbox.tree())
            .transaction(|(d, o)| {
                let current = d.get(key.as_bytes())?.map(|v| v.to_vec());
                let change = (f.borrow_mut())(current).map_err(abort)?;
                match change.value {
                    Some(value) => d.insert(key.as_bytes(), value)?,
                    None => d.remove(key.as_bytes())?,
                };
                for event in &change.events {
                    self.outbox.push::<BrokerError>(o, event.clone())?;
                }
                Ok(())
            })
            .map_err(flatten)
    }
}

/// sled's calls are short and local: each future does its work when first
/// polled, as the synchronous store did.
impl RequestStore for SledStore {
    fn create<'a>(
        &'a self,
        record: &'a RequestRecord,
        writes: &'a Writes,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.create_now(record, writes) })
    }

    fn update<'a>(
        &'a self,
        id: &'a str,
        f: &'a mut UpdateFn<'_>,
    ) -> BoxFuture<'a, Result<Option<RequestRecord>, BrokerError>> {
        Box::pin(async move { self.update_now(id, f) })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RequestRecord>, BrokerError>> {
        Box::pin(async move { self.get_now(id) })
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<RequestRecord>, BrokerError>> {
        Box::pin(async move { self.all_now() })
    }

    fn emit(&self, events: Vec<EventDraft>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { self.emit_now(events) })
    }

    fn docs(&self, kind: Docs) -> BoxFuture<'_, Result<Vec<Vec<u8>>, BrokerError>> {
        Box::pin(async move { self.docs_now(kind) })
    }

    fn doc<'a>(
        &'a self,
        kind: Docs,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, BrokerError>> {
        Box::pin(async move { self.doc_now(kind, key) })
    }

    fn update_doc<'a>(
        &'a self,
        kind: Docs,
        key: &'a str,
        f: &'a mut DocFn<'_>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.update_doc_now(kind, key, f) })
    }

    fn commit(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.db.sync().await?;
            self.outbox.committed();
            self.queue.wake();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use twokey_runtime::{
        SpiffeId,
        error::{ErrorKind, ServiceError},
        events::EventSigner,
        keys::SecretKey,
        receipts::{Head, Inconsistency},
        time::ManualClock,
    };

    use super::*;
    use crate::pin::PinKey;

    #[tokio::test]
    async fn no_state_changes_while_audit_receipts_are_inconsistent() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path()).unwrap();
        let clock = ManualClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let signer = EventSigner::new(
            SpiffeId::parse("spiffe://t/svc/broker").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[4; 32]),
        );
        let outbox = Outbox::open(&db, signer, Arc::new(clock.clone())).unwrap();
        let queue = NotifyQueue::open(
            &db,
            outbox.clone(),
            Vec::new(),
            &PinKey::new(SecretKey::from_bytes([3; 32])),
            Arc::new(clock),
        )
        .unwrap();
        let (flag, health) = ReceiptHealth::manual();
        let store = SledStore::open(&db, outbox.clone(), Arc::new(queue))
            .unwrap()
            .with_receipts(health);
        let change = |store: &SledStore| {
            store.update_doc_now(Docs::Proposals, "0001", &mut |_| {
                Ok(DocChange {
                    value: Some(b"v".to_vec()),
                    events: vec![EventDraft::new("spiffe://t/user/adam", "policy.proposed")],
                })
            })
        };
        flag.send_replace(Some(Inconsistency {
            served: Head {
                size: 2,
                root: [1; 32],
            },
            accepted: Head {
                size: 9,
                root: [2; 32],
            },
            why: "a smaller tree".into(),
        }));
        let err = change(&store).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "audit served a checkpoint inconsistent with one it signed before: 2/{} vs 9/{}; \
                 no request or document changes until",
                hex::encode([1u8; 32]),
                hex::encode([2u8; 32])
            )),
            "{message}"
        );
        assert!(store.doc_now(Docs::Proposals, "0001").unwrap().is_none());
        // Events alone (refusals) are still recorded.
        store
            .emit_now(vec![EventDraft::new(
                "spiffe://t/user/eve",
                "access.denied",
            )])
            .unwrap();
        assert_eq!(outbox.depth(), 1);
        // Cleared: changes go through again.
        flag.send_replace(None);
        change(&store).unwrap();
        assert_eq!(
            store.doc_now(Docs::Proposals, "0001").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
}
