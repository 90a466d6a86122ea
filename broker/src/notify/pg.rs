//! The delivery queue in PostgreSQL, shared by the broker's replicas
//! (issue 18). A change's entries are inserted in the change's own
//! transaction ([`PgQueue::enqueue`], PINs sealed exactly as in sled), so a
//! replica that dies after the commit loses nothing. Any replica's worker
//! delivers them: one transaction per pass claims the due entries, PINs
//! first, with `SELECT … FOR UPDATE SKIP LOCKED` (so two workers never
//! hold the same entry), sends them, then deletes the delivered ones,
//! schedules the failed ones' retries and pushes the `notification.failed`
//! events of those given up through the [`PgOutbox`], and commits. A
//! worker that dies mid-pass holds its locks no longer: its entries are
//! claimed again by another (delivered at least once). The worker is woken
//! by the NOTIFY each enqueue sends at commit (`pin` when it holds a PIN,
//! which cuts a pass short as in sled), and polls besides.

use std::sync::{Arc, OnceLock, atomic::Ordering::SeqCst};

use tokio::sync::Mutex;
use tokio_postgres::{Client, Transaction};
use twokey_pgstore::{PgError, PgSettings, outbox::PgOutbox};

use super::{
    Message, NotifyQueue,
    queue::{DELIVERY_BATCH, Deliveries, Entry, Signals, work},
};
use crate::error::BrokerError;

/// The NOTIFY channel of queued entries (payload `pin` when one holds a
/// PIN, else empty).
pub const QUEUED: &str = "twokey_broker_queued";

/// The queue's table (the broker's migration 2).
pub const MIGRATION: &str = "
CREATE TABLE broker_notify_queue (
    id      text      PRIMARY KEY,
    seq     bigserial NOT NULL,
    pin     boolean   NOT NULL,
    next_ms bigint    NOT NULL,
    entry   text      NOT NULL
);
CREATE INDEX broker_notify_queue_order ON broker_notify_queue (pin DESC, seq);
";

/// `next_ms` of an entry that is never due again (one that does not decode).
const NEVER: i64 = i64::MAX;

fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn store_error(e: impl Into<PgError>) -> BrokerError {
    BrokerError::Store(format!("notification queue in PostgreSQL: {}", e.into()))
}

/// The delivery queue in PostgreSQL, and this replica's worker.
pub struct PgQueue {
    settings: PgSettings,
    deliveries: Arc<Deliveries>,
    signals: Arc<Signals>,
    /// Set once the schema is migrated.
    outbox: OnceLock<PgOutbox>,
    /// The worker's session, which also listens for [`QUEUED`].
    session: Mutex<Option<Client>>,
}

impl std::fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgQueue")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PgQueue {
    /// The queue on the database of `settings`, delivering with the
    /// notifiers, PIN seal, clock and delivery counter of `sled` (this
    /// replica's sled queue). Its worker delivers once [`PgQueue::ready`].
    pub fn new(settings: PgSettings, sled: &NotifyQueue) -> Self {
        Self {
            settings,
            deliveries: sled.shared(),
            signals: Arc::default(),
            outbox: OnceLock::new(),
            session: Mutex::new(None),
        }
    }

    /// The schema is migrated: `notification.failed` events go to `outbox`.
    pub fn ready(&self, outbox: PgOutbox) {
        let _ = self.outbox.set(outbox);
        self.wake();
    }

    /// Inserts the entries of `messages` in `tx`, the transaction of the
    /// change that made them, and notifies the workers at its commit.
    pub async fn enqueue(
        &self,
        tx: &Transaction<'_>,
        messages: &[Message],
    ) -> Result<(), BrokerError> {
        let entries = self
            .deliveries
            .entries(&self.signals, messages, || uuid::Uuid::new_v4().to_string());
        if entries.is_empty() {
            return Ok(());
        }
        let mut pin = false;
        for entry in &entries {
            pin |= entry.sealed_pin.is_some();
            let json =
                serde_json::to_string(entry).map_err(|e| BrokerError::Store(e.to_string()))?;
            tx.execute(
                "INSERT INTO broker_notify_queue (id, pin, next_ms, entry) VALUES ($1, $2, 0, $3)",
                &[&entry.id, &entry.sealed_pin.is_some(), &json],
            )
            .await
            .map_err(store_error)?;
        }
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&QUEUED, &if pin { "pin" } else { "" }],
        )
        .await
        .map_err(store_error)?;
        Ok(())
    }

    /// Tells this replica's worker that entries were committed.
    pub fn wake(&self) {
        self.signals.wake.notify_one();
    }

    /// The number of messages delivered so far, as a watch.
    pub fn deliveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.deliveries.deliveries()
    }

    /// Entries in the queue (of every replica).
    pub async fn depth(&self) -> Result<usize, BrokerError> {
        let client = twokey_pgstore::connect(&self.settings)
            .await
            .map_err(store_error)?;
        let row = client
            .query_one("SELECT count(*) FROM broker_notify_queue", &[])
            .await
            .map_err(store_error)?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// One pass now: returns how many entries it tried.
    pub async fn run_due(&self) -> Result<usize, BrokerError> {
        self.pass().await.map(|(tried, _)| tried)
    }

    /// Delivers forever: whenever an entry is queued (on any replica), and
    /// at least every second for the retries that came due.
    pub async fn run(self: Arc<Self>) {
        work(&self.signals, || async {
            match self.pass().await {
                Ok(done) => done,
                Err(e) => {
                    tracing::warn!("{e}; trying again in a second");
                    (0, false)
                }
            }
        })
        .await;
    }

    /// Opens the worker's session and listens there for [`QUEUED`].
    async fn open_session(&self) -> Result<Client, BrokerError> {
        let (client, mut notifications) =
            twokey_pgstore::connect::connect_listening(&self.settings)
                .await
                .map_err(store_error)?;
        client
            .batch_execute(&format!("LISTEN {QUEUED}"))
            .await
            .map_err(store_error)?;
        let signals = self.signals.clone();
        tokio::spawn(async move {
            while let Some(n) = notifications.recv().await {
                if n.payload() == "pin" {
                    signals.pin_queued.store(true, SeqCst);
                }
                signals.wake.notify_one();
            }
        });
        Ok(client)
    }

    /// One pass in one transaction: claims the due entries (PINs first,
    /// then in the order queued, at most a batch, none another worker
    /// holds), delivers them, and settles them; cut short when a PIN is
    /// queued meanwhile (`true`).
    async fn pass(&self) -> Result<(usize, bool), BrokerError> {
        let Some(outbox) = self.outbox.get() else {
            return Ok((0, false));
        };
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            *guard = Some(self.open_session().await?);
        }
        let Some(client) = guard.as_mut() else {
            return Ok((0, false));
        };
        // Cleared before the claim: a PIN queued after it sets it again.
        self.signals.pin_queued.store(false, SeqCst);
        let now_ms = self.deliveries.now_ms();
        let tx = client.transaction().await.map_err(store_error)?;
        let rows = tx
            .query(
                "SELECT id, entry FROM broker_notify_queue WHERE next_ms <= $1
                 ORDER BY pin DESC, seq LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&to_db(now_ms), &to_db(DELIVERY_BATCH as u64)],
            )
            .await
            .map_err(store_error)?;
        let mut due = Vec::with_capacity(rows.len());
        let mut unreadable: Vec<String> = Vec::new();
        for row in &rows {
            match serde_json::from_str::<Entry>(row.get(1)) {
                Ok(entry) => due.push(entry),
                Err(e) => {
                    let id: String = row.get(0);
                    tracing::error!(
                        entry_id = %id,
                        "a queued notification does not decode ({e}); it is kept in \
                         broker_notify_queue with next_ms = {NEVER} and not tried again"
                    );
                    unreadable.push(id);
                }
            }
        }
        // Kept for whoever looks into it, but out of the due set, so that
        // rows which can never be sent cannot fill every batch.
        if !unreadable.is_empty() {
            tx.execute(
                "UPDATE broker_notify_queue SET next_ms = $2 WHERE id = ANY($1)",
                &[&unreadable, &NEVER],
            )
            .await
            .map_err(store_error)?;
        }
        if due.is_empty() {
            tx.commit().await.map_err(store_error)?;
            return Ok((unreadable.len(), false));
        }
        let (done, interrupted) = self.deliveries.deliver_all(&self.signals, due).await;
        let tried = done.len();
        let settlement = self.deliveries.settlement(done);
        for (id, keep) in &settlement.entries {
            match keep {
                Some(entry) => {
                    let json = serde_json::to_string(entry)
                        .map_err(|e| BrokerError::Store(e.to_string()))?;
                    tx.execute(
                        "UPDATE broker_notify_queue SET next_ms = $2, entry = $3 WHERE id = $1",
                        &[id, &to_db(entry.next_ms), &json],
                    )
                    .await
                    .map_err(store_error)?
                }
                None => tx
                    .execute("DELETE FROM broker_notify_queue WHERE id = $1", &[id])
                    .await
                    .map_err(store_error)?,
            };
        }
        for event in settlement.failed {
            outbox.push(&tx, event).await.map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)?;
        self.deliveries.count(settlement.delivered);
        Ok((tried + unreadable.len(), interrupted))
    }
}
