//! Where requests live: a small trait, so sled can later be joined by a
//! replicated backend, and its sled implementation on `DurableDb`. Every
//! change is one sled transaction over the request, its audit events (the
//! outbox), its queued notifications and the ids it uses up. Policy
//! proposals and open admin actions are kept beside them, each change with
//! its audit events.

use std::sync::Arc;

use futures::future::BoxFuture;
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};
use twokey_runtime::{durable::DurableDb, events::EventDraft, outbox::Outbox};

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

/// Storage for requests.
pub trait RequestStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new request with its writes.
    fn create(&self, record: &RequestRecord, writes: &Writes) -> Result<(), BrokerError>;
    /// Changes a stored request: reads it, applies `f` (which may run more
    /// than once, on conflict), and stores the result with `f`'s events and
    /// messages atomically. `Ok(None)` if there is no such request.
    fn update(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut RequestRecord) -> Result<Writes, BrokerError>,
    ) -> Result<Option<RequestRecord>, BrokerError>;
    /// One request.
    fn get(&self, id: &str) -> Result<Option<RequestRecord>, BrokerError>;
    /// Every request (the broker keeps history; counts are small).
    fn all(&self) -> Result<Vec<RequestRecord>, BrokerError>;
    /// Records events that go with no request change.
    fn emit(&self, events: Vec<EventDraft>) -> Result<(), BrokerError>;
    /// Every document of a kind, in key order.
    fn docs(&self, kind: Docs) -> Result<Vec<Vec<u8>>, BrokerError>;
    /// One document.
    fn doc(&self, kind: Docs, key: &str) -> Result<Option<Vec<u8>>, BrokerError>;
    /// Changes one document with its events atomically: `f` gets the current
    /// value (it may run more than once, on conflict).
    fn update_doc(
        &self,
        kind: Docs,
        key: &str,
        f: &mut dyn FnMut(Option<Vec<u8>>) -> Result<DocChange, BrokerError>,
    ) -> Result<(), BrokerError>;
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
}

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
        })
    }

    fn write(
        &self,
        id: &str,
        f: &mut dyn FnMut(
            Option<RequestRecord>,
        ) -> Result<Option<(RequestRecord, Writes)>, BrokerError>,
    ) -> Result<(), BrokerError> {
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

impl RequestStore for SledStore {
    fn create(&self, record: &RequestRecord, writes: &Writes) -> Result<(), BrokerError> {
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

    fn update(
        &self,
        id: &str,
        f: &mut dyn FnMut(&mut RequestRecord) -> Result<Writes, BrokerError>,
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

    fn get(&self, id: &str) -> Result<Option<RequestRecord>, BrokerError> {
        self.requests
            .get(id.as_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    fn all(&self) -> Result<Vec<RequestRecord>, BrokerError> {
        self.requests.iter().map(|kv| decode(&kv?.1)).collect()
    }

    fn emit(&self, events: Vec<EventDraft>) -> Result<(), BrokerError> {
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

    fn docs(&self, kind: Docs) -> Result<Vec<Vec<u8>>, BrokerError> {
        self.tree(kind)
            .iter()
            .map(|kv| Ok(kv?.1.to_vec()))
            .collect()
    }

    fn doc(&self, kind: Docs, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        Ok(self.tree(kind).get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    fn update_doc(
        &self,
        kind: Docs,
        key: &str,
        f: &mut dyn FnMut(Option<Vec<u8>>) -> Result<DocChange, BrokerError>,
    ) -> Result<(), BrokerError> {
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

    fn commit(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.db.sync().await?;
            self.outbox.committed();
            self.queue.wake();
            Ok(())
        })
    }
}
