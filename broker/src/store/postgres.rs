//! Requests in PostgreSQL, shared by every broker replica. Each change is
//! one transaction under READ COMMITTED that first locks what it changes:
//! a request's row (`SELECT … FOR UPDATE`) or a document's key
//! (`pg_advisory_xact_lock`). Replicas changing the same request therefore
//! take turns, each reading the other's committed result, so two approvals
//! count once each and PIN attempts add up whichever replica takes them. The
//! ids a change uses up (grant and release ids) are rows under a primary
//! key, so a reused id is refused by the database on any replica. The
//! record, the claims, the documents and the audit events
//! ([`PgOutbox::push`]) commit together; with PostgreSQL's default
//! `synchronous_commit = on`, committed means durable, so the store's
//! [`RequestStore::commit`] has nothing left to make durable in PostgreSQL.
//!
//! A change with an action for watchers also sends `pg_notify` on
//! [`CHANGES`] in its transaction (delivered at commit); every replica
//! listens ([`PgStore::follow_changes`]) and tells its own `WatchRequests`
//! callers of the other replicas' changes, with the request as it is when
//! read. A notification sent while a replica's listening session is down
//! is not seen by that replica's watchers.
//!
//! A change's messages are queued in PostgreSQL in its transaction
//! ([`PgQueue::enqueue`]); any replica's worker delivers them
//! ([`crate::notify::pg`]).

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::MutexGuard;
use tokio_postgres::{Client, Transaction};
use twokey_pgstore::{Migration, PgError, PgSettings, outbox::PgOutbox, sessions::Sessions};
use twokey_runtime::{error::ErrorKind, events::EventDraft, receipts::ReceiptHealth};

use super::{Claim, DocFn, Docs, NO_CHANGE, RequestStore, UpdateFn, Writes, decode, encode};
use crate::{
    error::BrokerError,
    notify::{NotifyQueue, pg::PgQueue},
    state::RequestRecord,
};

/// The migration component of the broker's tables.
pub const COMPONENT: &str = "broker";

/// The broker's tables, in order (forward only).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "broker: requests, used ids, documents",
        sql: "
CREATE TABLE broker_requests (
    id         text   PRIMARY KEY,
    created_ms bigint NOT NULL,
    record     bytea  NOT NULL
);
CREATE TABLE broker_claims (
    key text PRIMARY KEY
);
CREATE TABLE broker_docs (
    kind  text  NOT NULL,
    key   text  NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (kind, key)
);
",
    },
    Migration {
        version: 2,
        name: "broker: the notification queue",
        sql: crate::notify::pg::MIGRATION,
    },
];

/// The NOTIFY channel of request changes (payload: replica, action and
/// request id, tab-separated).
pub const CHANGES: &str = "twokey_broker_changes";

/// How long a replica waits before it listens again after its listening
/// session ended.
/// The event (and notification) of a policy version applied.
const POLICY_APPLIED: &str = "policy.applied";

const LISTEN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Sessions one replica's store keeps open.
pub const SESSIONS: usize = 4;

/// Brings the broker's tables and the outbox's to this binary's version
/// (what a replica does at start, before it serves).
pub async fn migrate(settings: &PgSettings) -> Result<(), PgError> {
    let mut client = twokey_pgstore::connect(settings).await?;
    twokey_pgstore::outbox::migrate(&mut client).await?;
    twokey_pgstore::migrate(&mut client, COMPONENT, MIGRATIONS).await?;
    Ok(())
}

/// A PostgreSQL failure as the broker answers it: a database that cannot
/// be reached is UNAVAILABLE with what to do; anything else is a store
/// failure (also UNAVAILABLE: the change was not made).
fn pg(e: impl Into<PgError>) -> BrokerError {
    let e = e.into();
    if e.is_unavailable() {
        BrokerError::Store(format!(
            "the broker's database is unavailable ({e}); nothing was changed unless the \
             request shows it: retry, through another replica if this one stays down"
        ))
    } else {
        BrokerError::Store(format!("the broker's database refused a change: {e}"))
    }
}

fn kind_name(kind: Docs) -> &'static str {
    match kind {
        Docs::Proposals => "proposals",
        Docs::AdminActions => "admin_actions",
    }
}

fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Requests in PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    sessions: Arc<Sessions>,
    /// Set once the schema is migrated ([`PgStore::ready`]).
    outbox: Arc<std::sync::OnceLock<PgOutbox>>,
    queue: Arc<PgQueue>,
    receipts: ReceiptHealth,
    /// This replica's id in change notifications, to skip its own.
    replica: String,
    /// Whether [`PgStore::follow_changes`] is listening now.
    listening: Arc<tokio::sync::watch::Sender<bool>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("settings", self.sessions.settings())
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

/// The client of a session in hand (always there once `get` answered).
fn client<'g>(
    guard: &'g mut MutexGuard<'_, Option<Client>>,
) -> Result<&'g mut Client, BrokerError> {
    guard
        .as_mut()
        .ok_or_else(|| BrokerError::Store("no PostgreSQL session".into()))
}

impl PgStore {
    /// A store on the (migrated) database of `settings`: events go to
    /// `outbox`, messages to the queue in PostgreSQL, delivered with the
    /// notifiers of `sled` ([`PgStore::queue`]). Sessions open when first
    /// needed.
    pub fn new(settings: PgSettings, outbox: PgOutbox, sled: &NotifyQueue) -> Self {
        let store = Self::starting(settings, sled);
        store.ready(outbox);
        store
    }

    /// A store whose database is not migrated yet: every call answers
    /// UNAVAILABLE until [`PgStore::ready`].
    pub fn starting(settings: PgSettings, sled: &NotifyQueue) -> Self {
        let queue = Arc::new(PgQueue::new(settings.clone(), sled));
        Self {
            sessions: Arc::new(Sessions::new(settings, SESSIONS)),
            outbox: Arc::default(),
            queue,
            receipts: ReceiptHealth::unchecked(),
            replica: uuid::Uuid::new_v4().to_string(),
            listening: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Waits until [`PgStore::follow_changes`] listens (a replica reports
    /// SERVING only then, so its watchers miss no change made after).
    pub async fn wait_listening(&self) {
        let mut rx = self.listening.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Listens for the changes other replicas commit and hands each to
    /// `publish` with the request as stored now; reconnects when the
    /// listening session ends. Runs until the task is aborted.
    /// A version applied through another replica calls `policy_applied`.
    pub fn follow_changes(
        &self,
        publish: impl Fn(RequestRecord, String) + Send + Sync + 'static,
        policy_applied: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                match twokey_pgstore::connect::connect_listening(store.sessions.settings()).await {
                    Ok((client, mut notifications)) => {
                        match client.batch_execute(&format!("LISTEN {CHANGES}")).await {
                            Ok(()) => {
                                store.listening.send_replace(true);
                                while let Some(n) = notifications.recv().await {
                                    store.tell(&n, &publish, &policy_applied).await;
                                }
                                store.listening.send_replace(false);
                                tracing::warn!(
                                    "the session listening for other replicas' changes ended; \
                                     listening again"
                                );
                            }
                            Err(e) => tracing::warn!(
                                "cannot listen for other replicas' changes: {}",
                                PgError::from(e)
                            ),
                        }
                    }
                    Err(e) => tracing::warn!("cannot listen for other replicas' changes: {e}"),
                }
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        })
    }

    async fn tell(
        &self,
        n: &tokio_postgres::Notification,
        publish: &(impl Fn(RequestRecord, String) + Send + Sync),
        policy_applied: &(impl Fn() + Send + Sync),
    ) {
        let mut parts = n.payload().splitn(3, '\t');
        let (Some(replica), Some(action), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        if replica == self.replica {
            return;
        }
        if action == POLICY_APPLIED {
            policy_applied();
            return;
        }
        match self.get_now(id).await {
            Ok(Some(record)) => publish(record, action.to_owned()),
            Ok(None) => {}
            Err(e) => tracing::warn!(request_id = id, "cannot read a changed request: {e}"),
        }
    }

    async fn notify_change(
        &self,
        tx: &Transaction<'_>,
        id: &str,
        action: &str,
    ) -> Result<(), BrokerError> {
        if action.is_empty() {
            return Ok(());
        }
        let payload = format!("{}\t{action}\t{id}", self.replica);
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES, &payload])
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// The schema is migrated: calls go to the database, events to `outbox`.
    pub fn ready(&self, outbox: PgOutbox) {
        self.queue.ready(outbox.clone());
        let _ = self.outbox.set(outbox);
    }

    /// The notification queue in PostgreSQL (run its worker on each
    /// replica).
    pub fn queue(&self) -> &Arc<PgQueue> {
        &self.queue
    }

    fn outbox(&self) -> Result<&PgOutbox, BrokerError> {
        self.outbox.get().ok_or_else(|| {
            BrokerError::Store(
                "the broker is migrating its database or waiting for it to answer; retry in a \
                 moment, or through another replica"
                    .into(),
            )
        })
    }

    /// A session, once the store is ready.
    async fn session(&self) -> Result<MutexGuard<'_, Option<Client>>, BrokerError> {
        self.outbox()?;
        self.sessions.get().await.map_err(pg)
    }

    /// Refuses every state change (not events alone) while `receipts`
    /// reports audit's checkpoints inconsistent.
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

    async fn claim(tx: &Transaction<'_>, claims: &[Claim]) -> Result<(), BrokerError> {
        for claim in claims {
            let n = tx
                .execute(
                    "INSERT INTO broker_claims (key) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&claim.key],
                )
                .await
                .map_err(pg)?;
            if n == 0 {
                return Err(crate::consent::refused(
                    ErrorKind::PermissionDenied,
                    claim.taken.clone(),
                ));
            }
        }
        Ok(())
    }

    async fn push(&self, tx: &Transaction<'_>, events: &[EventDraft]) -> Result<(), BrokerError> {
        let outbox = self.outbox()?;
        for event in events {
            outbox.push(tx, event.clone()).await.map_err(pg)?;
        }
        // The other replicas load the signed policy again at once.
        if events.iter().any(|e| e.action == POLICY_APPLIED) {
            self.notify_change(tx, "", POLICY_APPLIED).await?;
        }
        Ok(())
    }

    async fn create_tx(&self, record: &RequestRecord, writes: &Writes) -> Result<(), BrokerError> {
        self.receipts_consistent()?;
        let mut guard = self.session().await?;
        let tx = client(&mut guard)?.transaction().await.map_err(pg)?;
        let n = tx
            .execute(
                "INSERT INTO broker_requests (id, created_ms, record) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO NOTHING",
                &[&record.id, &to_db(record.created_ms), &encode(record)?],
            )
            .await
            .map_err(pg)?;
        if n == 0 {
            return Err(BrokerError::Store(format!(
                "request id {} is taken",
                record.id
            )));
        }
        Self::claim(&tx, &writes.claims).await?;
        self.push(&tx, &writes.events).await?;
        self.queue.enqueue(&tx, &writes.messages).await?;
        self.notify_change(&tx, &record.id, &writes.action).await?;
        tx.commit().await.map_err(pg)
    }

    async fn update_tx(
        &self,
        id: &str,
        f: &mut UpdateFn<'_>,
    ) -> Result<Option<RequestRecord>, BrokerError> {
        self.receipts_consistent()?;
        let mut guard = self.session().await?;
        let tx = client(&mut guard)?.transaction().await.map_err(pg)?;
        // The row lock orders the replicas' changes of this request: each
        // reads the record as the one before it committed it.
        let Some(row) = tx
            .query_opt(
                "SELECT record FROM broker_requests WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(None);
        };
        let mut record = decode(row.get::<_, &[u8]>(0))?;
        let writes = f(&mut record)?;
        Self::claim(&tx, &writes.claims).await?;
        tx.execute(
            "UPDATE broker_requests SET record = $2 WHERE id = $1",
            &[&id, &encode(&record)?],
        )
        .await
        .map_err(pg)?;
        self.push(&tx, &writes.events).await?;
        self.queue.enqueue(&tx, &writes.messages).await?;
        self.notify_change(&tx, id, &writes.action).await?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(record))
    }

    async fn get_now(&self, id: &str) -> Result<Option<RequestRecord>, BrokerError> {
        let mut guard = self.session().await?;
        let row = client(&mut guard)?
            .query_opt("SELECT record FROM broker_requests WHERE id = $1", &[&id])
            .await
            .map_err(pg)?;
        row.map(|r| decode(r.get::<_, &[u8]>(0))).transpose()
    }

    async fn all_now(&self) -> Result<Vec<RequestRecord>, BrokerError> {
        let mut guard = self.session().await?;
        let rows = client(&mut guard)?
            .query("SELECT record FROM broker_requests ORDER BY id", &[])
            .await
            .map_err(pg)?;
        rows.iter().map(|r| decode(r.get::<_, &[u8]>(0))).collect()
    }

    async fn emit_tx(&self, events: &[EventDraft]) -> Result<(), BrokerError> {
        let mut guard = self.session().await?;
        let tx = client(&mut guard)?.transaction().await.map_err(pg)?;
        self.push(&tx, events).await?;
        tx.commit().await.map_err(pg)
    }

    async fn docs_now(&self, kind: Docs) -> Result<Vec<Vec<u8>>, BrokerError> {
        let mut guard = self.session().await?;
        let rows = client(&mut guard)?
            .query(
                "SELECT value FROM broker_docs WHERE kind = $1 ORDER BY key",
                &[&kind_name(kind)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn doc_now(&self, kind: Docs, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let mut guard = self.session().await?;
        let row = client(&mut guard)?
            .query_opt(
                "SELECT value FROM broker_docs WHERE kind = $1 AND key = $2",
                &[&kind_name(kind), &key],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn update_doc_tx(
        &self,
        kind: Docs,
        key: &str,
        f: &mut DocFn<'_>,
    ) -> Result<(), BrokerError> {
        self.receipts_consistent()?;
        let kind = kind_name(kind);
        let mut guard = self.session().await?;
        let tx = client(&mut guard)?.transaction().await.map_err(pg)?;
        // A lock on the key, whether or not the document exists yet.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('twokey-broker-doc:' || $1 || ':' || $2))",
            &[&kind, &key],
        )
        .await
        .map_err(pg)?;
        let current: Option<Vec<u8>> = tx
            .query_opt(
                "SELECT value FROM broker_docs WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0));
        let change = f(current)?;
        match &change.value {
            Some(value) => tx
                .execute(
                    "INSERT INTO broker_docs (kind, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&kind, &key, value],
                )
                .await
                .map_err(pg)?,
            None => tx
                .execute(
                    "DELETE FROM broker_docs WHERE kind = $1 AND key = $2",
                    &[&kind, &key],
                )
                .await
                .map_err(pg)?,
        };
        self.push(&tx, &change.events).await?;
        tx.commit().await.map_err(pg)
    }
}

impl RequestStore for PgStore {
    fn create<'a>(
        &'a self,
        record: &'a RequestRecord,
        writes: &'a Writes,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.create_tx(record, writes))
    }

    fn update<'a>(
        &'a self,
        id: &'a str,
        f: &'a mut UpdateFn<'_>,
    ) -> BoxFuture<'a, Result<Option<RequestRecord>, BrokerError>> {
        Box::pin(self.update_tx(id, f))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RequestRecord>, BrokerError>> {
        Box::pin(self.get_now(id))
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<RequestRecord>, BrokerError>> {
        Box::pin(self.all_now())
    }

    fn emit(&self, events: Vec<EventDraft>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { self.emit_tx(&events).await })
    }

    fn docs(&self, kind: Docs) -> BoxFuture<'_, Result<Vec<Vec<u8>>, BrokerError>> {
        Box::pin(self.docs_now(kind))
    }

    fn doc<'a>(
        &'a self,
        kind: Docs,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, BrokerError>> {
        Box::pin(self.doc_now(kind, key))
    }

    fn update_doc<'a>(
        &'a self,
        kind: Docs,
        key: &'a str,
        f: &'a mut DocFn<'_>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.update_doc_tx(kind, key, f))
    }

    /// Every change, with its messages, committed in PostgreSQL before it
    /// answered: this wakes this replica's worker (the others are woken by
    /// the NOTIFY of the queue).
    fn commit(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.queue.wake();
            Ok(())
        })
    }
}
