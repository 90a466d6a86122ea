//! Where requests live: a small trait, so sled can later be joined by a
//! replicated backend, and its sled implementation on `DurableDb`. Every
//! change is one sled transaction over the request, its audit events (the
//! outbox) and its queued notifications.

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
    /// Makes everything written so far durable, then wakes the shipper and
    /// the notification worker.
    fn commit(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// Requests in sled.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: DurableDb,
    requests: sled::Tree,
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
        (&self.requests, self.outbox.tree(), self.queue.tree())
            .transaction(|(r, o, q)| {
                let current = match r.get(id.as_bytes())? {
                    Some(bytes) => Some(decode(&bytes).map_err(abort)?),
                    None => None,
                };
                let Some((record, writes)) = (f.borrow_mut())(current).map_err(abort)? else {
                    return Ok(());
                };
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

    fn commit(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.db.sync().await?;
            self.outbox.committed();
            self.queue.wake();
            Ok(())
        })
    }
}
